"""A FlexibleUNet drops into diffusers' StableDiffusionPipeline (tiny CLIP, VAE and tokenizer built locally)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from search_spaces import FlexibleUNet2DConditionModel, UNetArch, get_arch


def _tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with a character vocabulary and no merges: real tokenisation, no download."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _parts(cross_dim: int):
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_dim, intermediate_size=2 * cross_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False)
    return tokenizer, text_encoder, vae, scheduler


def _pipe(unet, parts):
    tokenizer, text_encoder, vae, scheduler = parts
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe) -> np.ndarray:
    return pipe("a handwritten digit seven", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def parts():
    return _parts(cross_dim=32)


def test_flexible_unet_in_stable_diffusion_pipeline(parts):
    arch = get_arch("tiny")  # 16x16 latents, 32-wide text: matches the tiny CLIP and a 2x VAE -> 32 px
    unet = FlexibleUNet2DConditionModel.from_arch(arch).eval()
    images = _run(_pipe(unet, parts))
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_pipeline_images_match_the_diffusers_unet(parts):
    """Same weights, same pipeline: the FlexibleUNet copy of a UNet2DConditionModel gives the same image."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4).eval()
    flex = FlexibleUNet2DConditionModel.from_unet2d(unet).eval()
    ref = _run(_pipe(unet, parts))
    out = _run(_pipe(flex, parts))
    assert np.abs(ref - out).max() <= 1e-5


def test_saved_flexible_unet_loads_back_into_a_pipeline(parts, tmp_path):
    arch = UNetArch.from_dict({**get_arch("tiny").to_dict(), "down_skip": "after_resnet"})
    unet = FlexibleUNet2DConditionModel.from_arch(arch).eval()
    unet.save_pretrained(tmp_path)
    loaded = FlexibleUNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert np.array_equal(_run(_pipe(unet, parts)), _run(_pipe(loaded, parts)))


# ---- diffusers' pipeline features act on a FlexibleUNet as on its UNet2DConditionModel twin ----------------------


def _twins():
    """A diffusers UNet2DConditionModel and its FlexibleUNet copy (same weights)."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4).eval()
    return unet, FlexibleUNet2DConditionModel.from_unet2d(unet).eval()


def _processor_names(unet) -> list[str]:
    return sorted(type(p).__name__ for p in unet.attn_processors.values())


def test_attention_slicing_acts_on_the_flexible_unet(parts):
    ref_unet, flex = _twins()
    before = _run(_pipe(flex, parts))
    ref_pipe, pipe = _pipe(ref_unet, parts), _pipe(flex, parts)
    ref_pipe.enable_attention_slicing(1)
    pipe.enable_attention_slicing(1)
    assert _processor_names(flex) == _processor_names(ref_unet)
    assert set(_processor_names(flex)) == {"SlicedAttnProcessor"}  # not silently left as it was
    out = _run(pipe)
    assert np.abs(out - _run(ref_pipe)).max() <= 1e-5 and np.abs(out - before).max() <= 1e-5
    pipe.disable_attention_slicing()
    assert "SlicedAttnProcessor" not in _processor_names(flex)
    assert np.abs(_run(pipe) - before).max() <= 1e-5


def test_fuse_qkv_projections_fuses_every_attention_and_unfuses(parts):
    from diffusers.models.attention_processor import Attention

    ref_unet, flex = _twins()
    keys = set(flex.state_dict())
    before = _run(_pipe(flex, parts))
    ref_pipe, pipe = _pipe(ref_unet, parts), _pipe(flex, parts)
    ref_pipe.fuse_qkv_projections(vae=False)
    pipe.fuse_qkv_projections(vae=False)
    attentions = [m for m in flex.modules() if isinstance(m, Attention)]
    assert len(attentions) == 8 and all(m.fused_projections for m in attentions)
    assert set(_processor_names(flex)) == {"FusedAttnProcessor2_0"}
    fused = _run(pipe)
    assert np.abs(fused - _run(ref_pipe)).max() <= 1e-5 and np.abs(fused - before).max() <= 1e-5
    assert np.abs(_run(pipe) - fused).max() == 0  # later calls still work
    pipe.unfuse_qkv_projections(vae=False)
    assert "FusedAttnProcessor2_0" not in _processor_names(flex)
    assert set(flex.state_dict()) == keys  # the fused copies are gone: save_pretrained writes the plain model
    assert np.abs(_run(pipe) - before).max() <= 1e-5
    flex.fuse_qkv_projections()  # the model's own call, as on UNet2DConditionModel
    assert all(m.fused_projections for m in attentions)


def test_set_default_attn_processor_matches_diffusers(parts):
    ref_unet, flex = _twins()
    before = _run(_pipe(flex, parts))
    ref_unet.set_default_attn_processor()
    flex.set_default_attn_processor()
    assert set(_processor_names(flex)) == {"AttnProcessor"} and _processor_names(flex) == _processor_names(ref_unet)
    out = _run(_pipe(flex, parts))
    assert np.abs(out - _run(_pipe(ref_unet, parts))).max() <= 1e-5 and np.abs(out - before).max() <= 1e-5
