"""Distinct blocks: their lookup-table keys, standalone modules for timing, and every block a space can produce.

A block's latency depends on its kind, its channels, the spatial size it runs at and a few arch-global fields
(temb width, norm groups, activation, text width, projection type); the key spells out exactly those, so two
archs share a table entry only when the block would run the same kernels on the same shapes. Batch, dtype and
text length are settings of the whole profile, not part of the key.

The standalone modules are built with the constructors ``FlexibleUNet2DConditionModel`` uses
(``search_spaces.flexible_unet._resnet`` / ``_attention`` and the same Downsample2D/Upsample2D/TimestepEmbedding
arguments), so a block is timed as it runs in the real network. An up ResNet includes the skip concatenation
that precedes it in the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from search_spaces.arch import BlockSpec, UNetArch

# ---- keys ----------------------------------------------------------------------------------------------------


def _io_sizes(b: BlockSpec, sizes: list[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input size, output size) of a block: resamplers change the level, everything else keeps it."""
    if b.kind == "downsample":
        return sizes[b.level - 1], sizes[b.level]
    if b.kind == "upsample":
        return sizes[b.level + 1], sizes[b.level]
    return sizes[b.level], sizes[b.level]


def block_key(arch: UNetArch, b: BlockSpec, sizes: list[tuple[int, int]]) -> str:
    """The lookup-table key of one block of ``arch`` at the latent ``sizes`` (``arch.sizes(latent)``)."""
    (hi, wi), (ho, wo) = _io_sizes(b, sizes)
    g, act = arch.norm_num_groups, arch.act_fn
    if b.kind == "resnet":
        return (f"resnet {b.in_channels - b.skip_channels}+{b.skip_channels}>{b.out_channels} @{ho}x{wo} "
                f"temb{arch.temb_channels} g{g} {act} eps{arch.norm_eps:g}")
    if b.kind == "attention":
        proj = "linear" if arch.use_linear_projection else "conv"
        upcast = " upcast" if arch.upcast_attention else ""
        return (f"attention c{b.out_channels} heads{b.heads} layers{b.transformer_layers} @{ho}x{wo} "
                f"text{arch.cross_attention_dim} {proj}{upcast} g{g}")
    if b.kind == "downsample":
        return f"downsample c{b.in_channels}>{b.out_channels} @{hi}x{wi}"
    if b.kind == "upsample":
        return f"upsample c{b.in_channels}>{b.out_channels} @{hi}x{wi}>{ho}x{wo}"
    if b.kind == "conv_in":
        return f"conv_in {b.in_channels}>{b.out_channels} @{ho}x{wo}"
    if b.kind == "conv_out":
        return f"conv_out {b.in_channels}>{b.out_channels} @{ho}x{wo}"
    if b.kind == "norm_out":
        return f"norm_out c{b.out_channels} @{ho}x{wo} g{g} {act} eps{arch.norm_eps:g}"
    if b.kind == "time_embedding":
        cond = arch.time_cond_proj_dim or 0
        return (f"time_embedding {b.in_channels}>{b.out_channels} {act} cond{cond} "
                f"flip{int(arch.flip_sin_to_cos)} shift{arch.freq_shift}")
    raise ValueError(f"unknown block kind {b.kind!r}")


def arch_block_keys(arch: UNetArch, latent: int) -> list[tuple[BlockSpec, str]]:
    """Every block of ``arch`` with its key, in execution order."""
    sizes = arch.sizes(latent)
    return [(b, block_key(arch, b, sizes)) for b in arch.blocks]


# ---- every block of a space ----------------------------------------------------------------------------------


def space_blocks(space: Any, latent: int,
                 extra_archs: Iterable[UNetArch] = ()) -> dict[str, tuple[UNetArch, BlockSpec]]:
    """Every distinct block any arch of ``space`` (a ``SearchSpace``) can contain, keyed, with an arch that has it.

    Spaces hold millions of archs, far too many to enumerate, but block shapes are local: an attention block's
    shape is its stage's width, level, heads and depth whatever the number of attentions, and a stage with one
    mid ResNet has the same ResNet shapes as one with five. So the *skeleton* space (each attention count reduced
    to its smallest positive choice, the mid ResNet count to {0, smallest positive}, heads and depth fixed) is
    enumerated, which yields every ResNet/resampler shape and every attention (width, level); each attention
    block is then expanded with all heads x depth choices of its stage.
    """
    from search_spaces.space import SearchSpace

    skeleton = SearchSpace(_skeleton_data(space.data))
    out: dict[str, tuple[UNetArch, BlockSpec]] = {}
    for arch in skeleton.enumerate(limit=200_000):
        n = len(arch.down)
        sizes = arch.sizes(latent)
        for b in arch.blocks:
            if b.kind != "attention":
                out.setdefault(block_key(arch, b, sizes), (arch, b))
                continue
            for heads, layers in _attention_choices(space, _space_stage(b.stage, n, space.max_stages), b.out_channels):
                bb = replace(b, heads=heads, transformer_layers=layers)
                out.setdefault(block_key(arch, bb, sizes), (arch, bb))
    for arch in extra_archs:
        sizes = arch.sizes(latent)
        for b in arch.blocks:
            out.setdefault(block_key(arch, b, sizes), (arch, b))
    return out


def _space_stage(stage: str, n: int, max_stages: int) -> str:
    """An arch's stage name as the space calls it: with n < max stages the arch's up[k] is the space's
    up[max - n + k] (the space keeps the innermost down and outermost up stages)."""
    if stage.startswith("up["):
        return f"up[{max_stages - n + int(stage[3:-1])}]"
    return stage


def _attention_choices(space: Any, stage: str, channels: int) -> list[tuple[int, int]]:
    heads_name = f"{stage}.heads" if f"{stage}.heads" in space._index else f"{stage}.head_dim"
    heads = list(space.choices(heads_name))
    if heads_name.endswith("head_dim"):
        heads = [channels // d for d in heads]
    return [(h, depth) for h in heads for depth in space.choices(f"{stage}.transformer_layers")]


def _skeleton_data(data: dict[str, Any]) -> dict[str, Any]:
    def first(value: Any) -> Any:
        return value[0] if isinstance(value, list) else value

    def reduce_stage(item: dict[str, Any], is_mid: bool) -> dict[str, Any]:
        item = dict(item)
        att = item.get("attentions", 1 if is_mid else 0)
        att = att if isinstance(att, list) else [att]
        positive = [a for a in att if a > 0]
        item["attentions"] = [min(positive)] if positive else [0]
        if is_mid:
            res = item.get("resnets", 2)
            res = res if isinstance(res, list) else [res]
            pos = [r for r in res if r > 0]
            item["resnets"] = sorted({*([0] if 0 in res else []), *([min(pos)] if pos else [])})
        for key in ("heads", "head_dim", "transformer_layers"):
            if key in item:
                item[key] = first(item[key])
        return item

    out = dict(data)
    out.pop("constraints", None)
    if isinstance(out.get("attention"), dict):
        out["attention"] = {k: first(v) for k, v in out["attention"].items()}
    out["down"] = [reduce_stage(s, False) for s in data["down"]]
    out["up"] = [reduce_stage(s, False) for s in data["up"]]
    if data.get("mid") is not None:
        out["mid"] = reduce_stage(data["mid"], True)
    return out


# ---- standalone modules and their inputs ----------------------------------------------------------------------


def build_block(arch: UNetArch, b: BlockSpec) -> Any:
    """A ``torch.nn.Module`` running one block exactly as the FlexibleUNet does, called as ``module(*inputs)``."""
    import torch
    from diffusers.models.activations import get_activation
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.resnet import Downsample2D, Upsample2D
    from torch import nn

    from search_spaces.flexible_unet import _attention, _resnet

    class _Resnet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet = _resnet(arch, b)

        def forward(self, hidden: torch.Tensor, temb: torch.Tensor, *skip: torch.Tensor) -> torch.Tensor:
            if skip:  # an up ResNet: the network concatenates the skip right before it
                hidden = torch.cat([hidden, skip[0]], dim=1)
            return self.resnet(hidden, temb)

    class _Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = _attention(arch, b)

        def forward(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.attention(hidden, encoder_hidden_states=text, return_dict=False)[0]

    class _Upsample(nn.Module):
        def __init__(self, size: tuple[int, int] | None) -> None:
            super().__init__()
            self.upsample = Upsample2D(b.in_channels, use_conv=True, out_channels=b.out_channels)
            self.size = size

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.upsample(hidden, self.size)

    class _TimeEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.time_proj = Timesteps(b.in_channels, arch.flip_sin_to_cos, arch.freq_shift)
            self.time_embedding = TimestepEmbedding(b.in_channels, b.out_channels, act_fn=arch.act_fn,
                                                    cond_proj_dim=arch.time_cond_proj_dim)

        def forward(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return self.time_embedding(self.time_proj(timesteps).to(dtype=like.dtype))

    if b.kind == "resnet":
        return _Resnet()
    if b.kind == "attention":
        return _Attention()
    if b.kind == "downsample":
        return Downsample2D(b.in_channels, use_conv=True, out_channels=b.out_channels, padding=1, name="op")
    if b.kind == "upsample":
        return _Upsample(None)  # block_inputs sets the explicit output size when the network would pass one
    if b.kind in ("conv_in", "conv_out"):
        return nn.Conv2d(b.in_channels, b.out_channels, kernel_size=3, padding=1)
    if b.kind == "norm_out":
        return nn.Sequential(nn.GroupNorm(num_channels=b.out_channels, num_groups=arch.norm_num_groups,
                                          eps=arch.norm_eps), get_activation(arch.act_fn))
    if b.kind == "time_embedding":
        return _TimeEmbedding()
    raise ValueError(f"unknown block kind {b.kind!r}")


def block_inputs(arch: UNetArch, b: BlockSpec, module: Any, sizes: list[tuple[int, int]], batch: int,
                 text_len: int, dtype: Any, device: Any, channels_last: bool = False) -> tuple[Any, ...]:
    """Random inputs of the shapes the block sees in the network (and, for an upsampler whose output is not
    exactly twice its input, the explicit output size the network passes)."""
    import torch

    (hi, wi), (ho, wo) = _io_sizes(b, sizes)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        if channels_last and t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    temb = rand(batch, arch.temb_channels)
    if b.kind == "resnet":
        hidden = rand(batch, b.in_channels - b.skip_channels, hi, wi)
        return (hidden, temb, rand(batch, b.skip_channels, hi, wi)) if b.skip_channels else (hidden, temb)
    if b.kind == "attention":
        return rand(batch, b.in_channels, hi, wi), rand(batch, text_len, arch.cross_attention_dim)
    if b.kind == "upsample":
        module.size = None if (ho, wo) == (2 * hi, 2 * wi) else (ho, wo)
        return (rand(batch, b.in_channels, hi, wi),)
    if b.kind == "time_embedding":
        return torch.full((batch,), 500, dtype=torch.int64, device=device), rand(1)
    return (rand(batch, b.in_channels, hi, wi),)
