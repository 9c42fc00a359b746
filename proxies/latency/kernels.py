"""Per-kernel work of each block: FLOPs, activation and weight traffic, for the roofline and learned predictors.

Each block is split into the kernels eager PyTorch runs for it (a GroupNorm, a convolution, an SDPA call, a
residual add ...). A kernel is ``(flops, activation elements read + written, weight elements)`` for one forward
pass at batch ``batch``. The convolution and matmul FLOPs are 2 x the MACs of :mod:`proxies.cost` (the tests
check the two agree); the traffic assumes flash-style attention (the hw x hw score matrix is never written out).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from search_spaces.arch import BlockSpec, UNetArch

Kernel = tuple[float, float, float]  # flops, activation elements moved, weight elements


def _conv(cin: int, cout: int, hw_in: int, hw_out: int, k: int = 3) -> Kernel:
    return 2.0 * k * k * cin * cout * hw_out, float(cin * hw_in + cout * hw_out), float(k * k * cin * cout)


def _elementwise(elems: int, inputs: int = 1) -> Kernel:
    return 0.0, float((inputs + 1) * elems), 0.0


def _linear(rows: int, cin: int, cout: int) -> Kernel:
    return 2.0 * rows * cin * cout, float(rows * (cin + cout)), float(cin * cout)


@lru_cache(maxsize=65536)
def resnet_kernels(cin: int, skip: int, cout: int, hw: int, temb: int) -> tuple[Kernel, ...]:
    """ResnetBlock2D (plus the skip concatenation of an up ResNet), one sample."""
    c = cin + skip
    ks: list[Kernel] = []
    if skip:
        ks.append(_elementwise(c * hw))  # torch.cat
    ks += [_elementwise(c * hw), _elementwise(c * hw),  # GroupNorm, SiLU
           _conv(c, cout, hw, hw), _linear(1, temb, cout), _elementwise(cout * hw, 2),  # conv1, temb proj, add
           _elementwise(cout * hw), _elementwise(cout * hw), _conv(cout, cout, hw, hw)]  # norm2, SiLU, conv2
    if c != cout:
        ks.append(_conv(c, cout, hw, hw, k=1))
    ks.append(_elementwise(cout * hw, 2))  # residual add
    return tuple(ks)


@lru_cache(maxsize=65536)
def attention_kernels(c: int, layers: int, hw: int, text_len: int, cross: int) -> tuple[Kernel, ...]:
    """Transformer2DModel with ``layers`` BasicTransformerBlocks (self-attn, cross-attn, GEGLU), one sample."""
    ks: list[Kernel] = [_elementwise(c * hw), _linear(hw, c, c)]  # GroupNorm, proj_in
    for _ in range(layers):
        ks += [
            _elementwise(c * hw), _linear(hw, c, 3 * c),  # LayerNorm, q/k/v
            (4.0 * hw * hw * c, float(4 * c * hw), 0.0),  # SDPA self (QK^T and AV), flash-style traffic
            _linear(hw, c, c), _elementwise(c * hw, 2),  # out proj, residual
            _elementwise(c * hw), _linear(hw, c, c), _linear(text_len, cross, 2 * c),  # LayerNorm, q, k/v of text
            (4.0 * hw * text_len * c, float(2 * c * hw + 2 * c * text_len), 0.0),  # SDPA cross
            _linear(hw, c, c), _elementwise(c * hw, 2),
            _elementwise(c * hw), _linear(hw, c, 8 * c), _elementwise(4 * c * hw, 2),  # LN, GEGLU proj, gate
            _linear(hw, 4 * c, c), _elementwise(c * hw, 2),  # feed-forward out, residual
        ]
    ks += [_linear(hw, c, c), _elementwise(c * hw, 2)]  # proj_out, residual
    return tuple(ks)


def block_kernels(arch: UNetArch, b: BlockSpec, sizes: list[tuple[int, int]], text_len: int) -> tuple[Kernel, ...]:
    """The kernels of one block of ``arch`` for one sample at latent ``sizes``."""
    h, w = sizes[b.level]
    hw = h * w
    if b.kind == "resnet":
        return resnet_kernels(b.in_channels - b.skip_channels, b.skip_channels, b.out_channels, hw,
                              arch.temb_channels)
    if b.kind == "attention":
        return attention_kernels(b.out_channels, b.transformer_layers, hw, text_len, arch.cross_attention_dim)
    if b.kind == "downsample":
        hi, wi = sizes[b.level - 1]
        return (_conv(b.in_channels, b.out_channels, hi * wi, hw),)
    if b.kind == "upsample":
        hi, wi = sizes[b.level + 1]
        return (0.0, float(b.in_channels * (hi * wi + hw)), 0.0), _conv(b.in_channels, b.out_channels, hw, hw)
    if b.kind in ("conv_in", "conv_out"):
        return (_conv(b.in_channels, b.out_channels, hw, hw),)
    if b.kind == "norm_out":
        return _elementwise(b.out_channels * hw), _elementwise(b.out_channels * hw)
    if b.kind == "time_embedding":
        cond = arch.time_cond_proj_dim or 0
        ks = [_elementwise(b.in_channels), _linear(1, b.in_channels, b.out_channels), _elementwise(b.out_channels),
              _linear(1, b.out_channels, b.out_channels)]
        if cond:
            ks.append(_linear(1, cond, b.in_channels))
        return tuple(ks)
    raise ValueError(f"unknown block kind {b.kind!r}")


def kernel_array(kernels: tuple[Kernel, ...], batch: int) -> np.ndarray:
    """(n, 3) array: flops and activation traffic scaled to ``batch``; weights are read once per pass."""
    arr = np.asarray(kernels, dtype=float).reshape(-1, 3)
    return arr * np.array([batch, batch, 1.0])
