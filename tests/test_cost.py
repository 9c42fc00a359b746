"""The closed-form cost model against the built model, torch's FlopCounterMode and fvcore."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from proxies.cost import arch_costs, count_macs, count_params
from search_spaces import FlexibleUNet2DConditionModel, get_arch, list_archs
from tests.conftest import random_flexible_arch


def _meta_flops(arch, batch, res, text_len):
    with torch.device("meta"):
        model = FlexibleUNet2DConditionModel.from_arch(arch)
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(batch, arch.in_channels, res, res), torch.zeros(batch, dtype=torch.long),
                  torch.empty(batch, text_len, arch.cross_attention_dim))
    return model, counter.get_total_flops()


@pytest.mark.parametrize("name", list_archs())
def test_reference_costs_equal_built_model_and_flop_counter(name):
    arch = get_arch(name)
    model, flops = _meta_flops(arch, 2, arch.sample_size, 77)
    cost = arch_costs(arch, batch=2, text_len=77)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert 2 * cost.macs == flops


def test_sd15_figures():
    arch = get_arch("sd15")
    assert count_params(arch) == 859_520_964
    macs = count_macs(arch, batch=1, resolution=64, text_len=77)
    assert round(macs / 1e9, 1) == 401.6
    # fvcore-style count without the attention matmuls: ~339 GMACs (16% less)
    cost = arch_costs(arch)
    assert round((cost.macs - cost.attention_macs) / 1e9) == 339
    assert 0.15 < cost.attention_macs / cost.macs < 0.17


@pytest.mark.parametrize("seed", range(8))
def test_random_archs_at_odd_resolutions(seed):
    rng = random.Random(seed)
    arch = random_flexible_arch(rng)
    res = rng.choice([8, 12, 13, 16, 21])
    _, flops = _meta_flops(arch, 3, res, 5)
    assert 2 * arch_costs(arch, batch=3, resolution=res, text_len=5).macs == flops


def test_fvcore_misses_exactly_the_attention_matmuls():
    """fvcore counts conv and linear like we do, but skips scaled_dot_product_attention."""
    from fvcore.nn import FlopCountAnalysis

    arch = get_arch("tiny")
    model = FlexibleUNet2DConditionModel.from_arch(arch).eval()
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, arch.cross_attention_dim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
        unsupported = analysis.unsupported_ops()
    cost = arch_costs(arch)
    assert by_op["conv"] + by_op["linear"] == cost.macs - cost.attention_macs
    assert unsupported["aten::scaled_dot_product_attention"] > 0
    assert cost.attention_macs > 0


def test_per_stage_costs_add_up():
    cost = arch_costs(get_arch("decidiffusion_v1"), batch=2, resolution=64)
    assert sum(c.params for c in cost.stages.values()) == cost.params == 814_746_884
    assert sum(c.macs for c in cost.stages.values()) == cost.macs
    assert set(cost.stages) == {"stem", "down[0]", "down[1]", "down[2]", "mid", "up[0]", "up[1]", "up[2]"}
