"""FlexibleUNet vs diffusers: bit-level agreement, save/load, gradient checkpointing, Flexible-only archs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from proxies.cost import arch_costs
from search_spaces import FlexibleUNet2DConditionModel, UNetArch, get_arch
from tests.conftest import random_flexible_arch, random_unet2d_config, scaled_reference

SD_FAMILY = {
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21base": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
    "bk_base": {"cross_attention_dim": 768, "attention_head_dim": 8, "layers_per_block": 1},
    "bk_small": {"cross_attention_dim": 768, "attention_head_dim": 8, "layers_per_block": 1,
                 "mid_block_type": None},
    "bk_tiny": {"cross_attention_dim": 768, "attention_head_dim": 8, "layers_per_block": 1, "mid_block_type": None,
                "block_out_channels": [320, 640, 1280], "down_block_types": ["CrossAttnDownBlock2D"] * 3,
                "up_block_types": ["CrossAttnUpBlock2D"] * 3},
}
PUBLISHED_PARAMS = {"sd15": 859_520_964, "bk_base": 579_384_964, "bk_small": 482_346_884, "bk_tiny": 323_384_964,
                    "decidiffusion_v1": 814_746_884}


def _random_fill(model: torch.nn.Module, seed: int = 0) -> None:
    """Fast random weights (default init of 860M parameters is slow on a CPU); norms get non-trivial scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(0, 0.5, generator=g)


def _inputs(model_arch: UNetArch, batch: int = 2, res: int = 8, text: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model_arch.in_channels, res, res, generator=g)
    e = torch.randn(batch, text, model_arch.cross_attention_dim, generator=g)
    t = torch.tensor([17, 803][:batch])
    return x, t, e


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(SD_FAMILY))
def test_full_size_reference_matches_diffusers(name):
    """The real SD1.5/SD2.1-base/BK-SDM sizes: same params, same keys, same output (8x8 latents keep it fast)."""
    cfg = {"sample_size": 64, **SD_FAMILY[name]}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to_empty(device="cpu")
    _random_fill(unet)
    flex = FlexibleUNet2DConditionModel.from_unet2d(unet)
    assert flex.arch == get_arch(name)
    assert _n_params(flex) == _n_params(unet) == arch_costs(get_arch(name)).params
    if name in PUBLISHED_PARAMS:
        assert _n_params(flex) == PUBLISHED_PARAMS[name]
    x, t, e = _inputs(flex.arch, batch=1, res=8, text=5)
    with torch.no_grad():
        ref = unet(x, t, e).sample
        out = flex(x, t, e).sample
    assert ref.abs().max() > 1e-3
    assert (ref - out).abs().max().item() <= 1e-5


def test_decidiffusion_v1_parameter_count():
    with torch.device("meta"):
        model = FlexibleUNet2DConditionModel.from_arch("decidiffusion_v1")
    assert _n_params(model) == PUBLISHED_PARAMS["decidiffusion_v1"] == arch_costs(model.arch).params


@pytest.mark.parametrize("seed", range(24))
def test_random_unet2d_configs_match_diffusers(seed):
    rng = random.Random(seed)
    cfg = random_unet2d_config(rng)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    _random_fill(unet, seed)
    flex = FlexibleUNet2DConditionModel.from_unet2d(unet).eval()
    assert _n_params(flex) == _n_params(unet) == arch_costs(flex.arch).params
    assert flex.state_dict().keys() == unet.state_dict().keys()
    res = rng.choice([8, 16, 12, 13])  # 12 and 13 exercise diffusers' forwarded upsample sizes
    x, t, e = _inputs(flex.arch, res=res, seed=seed)
    with torch.no_grad():
        ref = unet(x, t, e).sample
        out = flex(x, t, e, return_dict=False)[0]
    assert out.shape == ref.shape
    assert (ref - out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["sd15", "sd21base", "bk_base", "bk_small", "bk_tiny"])
def test_scaled_references_match_diffusers_with_masks(name):
    """Width-scaled reference layouts, with attention masks and an int timestep, against diffusers."""
    data = scaled_reference(name, width=40)
    arch = UNetArch.from_dict(data)
    cfg = dict(SD_FAMILY[name])  # heads stay as published; the head width shrinks with the channels
    cfg.update(sample_size=16, cross_attention_dim=32, norm_num_groups=8, time_embedding_dim=160,
               block_out_channels=[s.channels for s in arch.down])
    unet = UNet2DConditionModel(**cfg).eval()
    flex = FlexibleUNet2DConditionModel.from_unet2d(unet).eval()
    assert flex.arch == arch
    x, _, e = _inputs(arch, batch=2, res=16, text=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = unet(x, 250, e, encoder_attention_mask=mask).sample
        out = flex(x, 250, e, encoder_attention_mask=mask).sample
    assert (ref - out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("seed", range(20))
def test_flexible_only_archs_build_run_and_cost_exactly(seed):
    """Unequal up/down stages, attentions above ResNets, Deci-style mid: forward, backward, exact costs."""
    rng = random.Random(1000 + seed)
    arch = random_flexible_arch(rng)
    torch.manual_seed(seed)
    model = FlexibleUNet2DConditionModel.from_arch(arch)
    cost = arch_costs(arch, batch=2, resolution=16, text_len=7)
    assert _n_params(model) == cost.params
    x, t, e = _inputs(arch, res=16)
    out = model(x, t, e).sample
    assert out.shape == (2, arch.out_channels, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.device("meta"):
        meta_model = FlexibleUNet2DConditionModel.from_arch(arch)
        counter = FlopCounterMode(display=False)
        with counter:
            meta_model(torch.empty(2, arch.in_channels, 16, 16), torch.tensor([1, 2]),
                       torch.empty(2, 7, arch.cross_attention_dim))
    assert counter.get_total_flops() == 2 * cost.macs


def test_flexible_only_arch_example_decidiffusion_style():
    """An up stage with 2 ResNets and 6 attentions and a down stage with 1 ResNet and 3 attentions."""
    arch = UNetArch.from_dict(scaled_reference("decidiffusion_v1", width=40))
    assert arch.up[0].attentions == 6 and arch.up[0].resnets == 2
    assert arch.down[2].attentions == 3 and arch.down[2].resnets == 1
    model = FlexibleUNet2DConditionModel.from_arch(arch)
    x, t, e = _inputs(arch, res=16)
    assert model(x, t, e).sample.shape == x.shape
    x, t, e = _inputs(arch, res=13)  # not a multiple of 8: upsamplers are told the skip sizes
    assert model(x, t, e).sample.shape == x.shape


def test_save_and_load_round_trip(tmp_path):
    arch = random_flexible_arch(random.Random(7))
    model = FlexibleUNet2DConditionModel.from_arch(arch).eval()
    model.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "config.json").is_file()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = FlexibleUNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert loaded.arch == arch
    x, t, e = _inputs(arch, res=16)
    with torch.no_grad():
        assert torch.equal(model(x, t, e).sample, loaded(x, t, e).sample)


def test_load_diffusers_checkpoint_folder(tmp_path):
    """A saved UNet2DConditionModel folder (as in an SD checkpoint's unet/) loads as a FlexibleUNet."""
    cfg = random_unet2d_config(random.Random(3))
    unet = UNet2DConditionModel(**cfg).eval()
    unet.save_pretrained(tmp_path / "unet")
    flex = FlexibleUNet2DConditionModel.from_unet2d_pretrained(tmp_path / "unet").eval()
    x, t, e = _inputs(flex.arch, res=16)
    with torch.no_grad():
        assert (unet(x, t, e).sample - flex(x, t, e).sample).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    arch = random_flexible_arch(random.Random(11))
    torch.manual_seed(0)
    model = FlexibleUNet2DConditionModel.from_arch(arch)
    x, t, e = _inputs(arch, res=16)
    model(x, t, e).sample.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert all(s.gradient_checkpointing for _, s in model.named_stages())
    model(x, t, e).sample.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)


def test_unsupported_forward_arguments_are_refused():
    model = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(scaled_reference("bk_tiny", 40)))
    x, t, e = _inputs(model.arch, res=16)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, e, class_labels=torch.tensor([1, 2]))


def test_uses_sdpa_attention():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(scaled_reference("bk_tiny", 40)))
    assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
