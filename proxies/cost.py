"""Closed-form parameter and MAC counts of a UNetArch, without building a model.

Every count is per block (``UNetArch.blocks``), from the block's channels and the spatial size at its level, so a
search can score tens of thousands of archs per second (``benchmarks/cost_model_speed.py``).

What is counted, and why it matches the tools people check against:

* ``params`` equals ``sum(p.numel() for p in model.parameters())`` of the built FlexibleUNet exactly.
* ``macs`` equals ``torch.utils.flop_counter.FlopCounterMode`` / 2 for one forward pass on the meta device:
  convolutions and linear layers without their bias adds, *and* both matmuls of scaled-dot-product attention
  (Q K^T and attn V). Norms, activations and elementwise ops are not counted. fvcore's default count skips
  ``scaled_dot_product_attention`` and so reports less (SD1.5 at 64x64 latents, batch 1, 77 tokens: 401.6
  GMACs here, about 339 G from fvcore); :func:`arch_costs` gives ``attention_macs`` separately so both numbers
  are at hand. (FlopCounterMode counts SDPA on the meta device but not on CPU tensors, and counts nothing under
  ``torch.inference_mode()``.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from search_spaces.arch import BlockSpec, UNetArch


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates of one block or a whole network."""

    params: int
    macs: int
    attention_macs: int = 0  # the SDPA matmuls included in ``macs`` (what fvcore leaves out)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs, self.attention_macs + other.attention_macs)


ZERO = Cost(0, 0, 0)


# ---- per-module closed forms (cached: a search space has few distinct blocks) ----------------------------------


@lru_cache(maxsize=65536)
def resnet_cost(cin: int, cout: int, temb: int, hw: int, batch: int) -> Cost:
    """diffusers ResnetBlock2D: GroupNorm, 3x3 conv, time projection, GroupNorm, 3x3 conv, 1x1 shortcut if needed."""
    params = 2 * cin + (9 * cin * cout + cout) + (temb * cout + cout) + 2 * cout + (9 * cout * cout + cout)
    macs = 9 * cin * cout * hw + temb * cout + 9 * cout * cout * hw
    if cin != cout:
        params += cin * cout + cout
        macs += cin * cout * hw
    return Cost(params, batch * macs)


@lru_cache(maxsize=65536)
def attention_cost(c: int, layers: int, cross_dim: int, hw: int, text_len: int, batch: int) -> Cost:
    """diffusers Transformer2DModel (continuous input, GEGLU feed-forward, one self and one cross attention per
    layer); the projection in/out is a 1x1 conv or a linear layer, the same count either way."""
    params = 2 * c + 2 * (c * c + c)  # group norm, proj_in, proj_out
    macs = 2 * c * c * hw
    per_layer_params = (
        3 * 2 * c  # three layer norms
        + 4 * c * c + c  # self-attention q, k, v (no bias), out (bias)
        + 2 * c * c + 2 * cross_dim * c + c  # cross-attention q, out (c x c), k, v (from the text width)
        + c * 8 * c + 8 * c  # GEGLU projection to 2 x 4c
        + 4 * c * c + c  # feed-forward out
    )
    sdpa = 2 * hw * hw * c + 2 * hw * text_len * c
    per_layer_macs = 4 * hw * c * c + (2 * hw * c * c + 2 * text_len * cross_dim * c) + 12 * hw * c * c + sdpa
    return Cost(params + layers * per_layer_params, batch * (macs + layers * per_layer_macs), batch * layers * sdpa)


@lru_cache(maxsize=65536)
def conv3x3_cost(cin: int, cout: int, hw_out: int, batch: int) -> Cost:
    """A 3x3 conv with bias (conv_in, conv_out, Downsample2D, Upsample2D's conv at the output size)."""
    return Cost(9 * cin * cout + cout, batch * 9 * cin * cout * hw_out)


@lru_cache(maxsize=4096)
def time_embedding_cost(proj: int, temb: int, cond: int, batch: int) -> Cost:
    """TimestepEmbedding: linear proj -> temb, SiLU, linear temb -> temb (+ a bias-free cond projection)."""
    params = proj * temb + temb + temb * temb + temb + cond * proj
    return Cost(params, batch * (proj * temb + temb * temb + cond * proj))


def block_cost(arch: UNetArch, b: BlockSpec, sizes: list[tuple[int, int]], batch: int, text_len: int) -> Cost:
    """Params and MACs of one module of ``arch.blocks``."""
    h, w = sizes[b.level]
    hw = h * w
    if b.kind == "resnet":
        return resnet_cost(b.in_channels, b.out_channels, arch.temb_channels, hw, batch)
    if b.kind == "attention":
        return attention_cost(b.out_channels, b.transformer_layers, arch.cross_attention_dim, hw, text_len, batch)
    if b.kind in ("conv_in", "conv_out", "downsample", "upsample"):
        return conv3x3_cost(b.in_channels, b.out_channels, hw, batch)
    if b.kind == "time_embedding":
        return time_embedding_cost(b.in_channels, b.out_channels, arch.time_cond_proj_dim or 0, batch)
    if b.kind == "norm_out":
        return Cost(2 * b.out_channels, 0)
    raise ValueError(f"unknown block kind {b.kind!r}")


# ---- whole networks --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchCost:
    """Costs of one arch at one input shape, in total and per stage (``"down[0]"``, ``"mid"``, ``"up[2]"``,
    ``"stem"`` for time embedding/conv_in/out head)."""

    params: int
    macs: int
    attention_macs: int
    stages: dict[str, Cost]
    batch: int
    resolution: int
    text_len: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def arch_costs(arch: UNetArch, batch: int = 1, resolution: int | None = None, text_len: int = 77) -> ArchCost:
    """Total and per-stage params/MACs of ``arch`` for a ``batch`` of ``resolution``-sized latents (default:
    the arch's ``sample_size``) with ``text_len`` text tokens."""
    res = arch.sample_size if resolution is None else resolution
    sizes = arch.sizes(res)
    stages: dict[str, Cost] = {}
    for b in arch.blocks:
        key = b.stage or "stem"
        stages[key] = stages.get(key, ZERO) + block_cost(arch, b, sizes, batch, text_len)
    total = sum(stages.values(), ZERO)
    return ArchCost(total.params, total.macs, total.attention_macs, stages, batch, res, text_len)


def count_params(arch: UNetArch) -> int:
    """Exact parameter count of the model ``arch`` builds."""
    return arch_costs(arch).params


def count_macs(arch: UNetArch, batch: int = 1, resolution: int | None = None, text_len: int = 77) -> int:
    """Multiply-accumulates of one forward pass, attention matmuls included (FlopCounterMode / 2)."""
    return arch_costs(arch, batch, resolution, text_len).macs


def constraint_filter(constraints: Mapping[str, Any]) -> Callable[[UNetArch], bool] | None:
    """A predicate for ``SearchSpace.sample(accept=...)`` from a space's ``constraints`` (None if there are none).

    ``max_params`` bounds the exact parameter count; ``max_macs`` the MACs at ``batch`` (default 1),
    ``resolution`` (default: the arch's sample size) and ``text_len`` (default 77).
    """
    max_params = constraints.get("max_params")
    max_macs = constraints.get("max_macs")
    if max_params is None and max_macs is None:
        return None
    batch = int(constraints.get("batch", 1))
    resolution = constraints.get("resolution")
    text_len = int(constraints.get("text_len", 77))

    def accept(arch: UNetArch) -> bool:
        cost = arch_costs(arch, batch, resolution, text_len)
        return (max_params is None or cost.params <= max_params) and (max_macs is None or cost.macs <= max_macs)

    return accept
