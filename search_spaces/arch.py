"""`UNetArch`: an immutable, validated description of one text-to-image U-Net, stage by stage.

An architecture travels through UNet-NAS as a ``UNetArch`` value; only the places that need tensors build a
model from it. Everything that depends on the wiring (which block sees which channels at which resolution, which
skip goes where) is computed once, here, in :meth:`UNetArch.blocks`, and is shared by the model builder
(``flexible_unet.py``), the cost model (``proxies.cost``) and weight inheritance (``inherit.py``).

Conventions (the ones diffusers' ``UNet2DConditionModel`` uses, generalised):

* A stage holds ``resnets`` ResNet blocks and ``attentions`` transformer blocks. They run interleaved
  ResNet, attention, ResNet, attention, ... and whatever is left of the longer list follows
  (``itertools.zip_longest`` order, as DeciDiffusion does): 1 ResNet + 3 attentions runs R A A A,
  2 ResNets + 6 attentions runs R A R A A A A A, 3 ResNets + 1 attention runs R A R R.
* Skips. ``conv_in``'s output is the first skip. Every down ResNet gives one skip: with
  ``down_skip: after_attention`` (diffusers, the default) the state just before the next ResNet or the end of
  the stage, i.e. after the attentions that follow the ResNet; with ``after_resnet`` (DeciDiffusion) the
  ResNet's own output. A downsampler's output is a skip when another down stage follows it; the last stage's
  downsampler (DeciDiffusion) feeds the mid block only. Every up ResNet concatenates the newest unconsumed skip,
  which must be at the resolution the up stage runs at; an arch whose skips cannot be consumed this way is
  refused, naming the stage.
* The mid block runs at the last down stage's width; it may be absent, ResNet-only, or hold any number of
  ResNets and attentions, and may end with an upsampler (then the last down stage downsamples, as in
  DeciDiffusion 1.0).
* ``conv_in`` maps to the first down stage's width; the sinusoidal time projection has that width too and the
  time embedding defaults to four times it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from .errors import ConfigError
from .yamlio import dump_yaml, parse_text

DOWN_SKIP_CHOICES = ("after_attention", "after_resnet")
ACT_FNS = ("silu", "swish", "mish", "gelu", "relu")


# --------------------------------------------------------------------------------------------------------------
# Stage descriptions


@dataclass(frozen=True)
class DownStage:
    """One down stage: ``resnets`` ResNets and ``attentions`` transformer blocks at one resolution."""

    channels: int
    resnets: int
    attentions: int = 0
    heads: int | None = None
    transformer_layers: int | None = None
    downsample: bool = False

    def __post_init__(self) -> None:
        _normalise_attention(self)


@dataclass(frozen=True)
class UpStage:
    """One up stage; each of its ResNets consumes one skip."""

    channels: int
    resnets: int
    attentions: int = 0
    heads: int | None = None
    transformer_layers: int | None = None
    upsample: bool = False

    def __post_init__(self) -> None:
        _normalise_attention(self)


@dataclass(frozen=True)
class MidBlock:
    """The bottleneck block; it keeps the width of the last down stage."""

    resnets: int = 2
    attentions: int = 1
    heads: int | None = None
    transformer_layers: int | None = None
    upsample: bool = False

    def __post_init__(self) -> None:
        _normalise_attention(self)


Stage = DownStage | UpStage | MidBlock


def _normalise_attention(stage: Stage) -> None:
    """A stage without attention has no heads or depth: drop them so that equal archs compare equal."""
    if not stage.attentions and (stage.heads is not None or stage.transformer_layers is not None):
        object.__setattr__(stage, "heads", None)
        object.__setattr__(stage, "transformer_layers", None)


@dataclass(frozen=True)
class BlockSpec:
    """One module of the built network, in execution order.

    ``level`` is the resolution level of the block's *output* (spatial size = input size / 2**level, rounded
    up at each downsampling); ``module`` is its path in the model's ``state_dict``.
    """

    kind: str  # conv_in | time_embedding | resnet | attention | downsample | upsample | norm_out | conv_out
    module: str
    stage: str  # "down.0", "mid", "up.2" or "" for the stem and head
    index: int
    in_channels: int
    out_channels: int
    level: int
    skip_channels: int = 0
    heads: int = 0
    transformer_layers: int = 0


def interleave(resnets: int, attentions: int) -> tuple[tuple[str, int], ...]:
    """Execution order of a stage: (("resnet", 0), ("attention", 0), ("resnet", 1), ...), remainder last."""
    order: list[tuple[str, int]] = []
    for r, a in itertools.zip_longest(range(resnets), range(attentions)):
        if r is not None:
            order.append(("resnet", r))
        if a is not None:
            order.append(("attention", a))
    return tuple(order)


# --------------------------------------------------------------------------------------------------------------
# The architecture


@dataclass(frozen=True)
class UNetArch:
    """A whole U-Net: global fields plus down stages, an optional mid block and up stages.

    Build one with :meth:`from_dict` (validated), :meth:`from_yaml`, :meth:`from_unet2d_config`,
    :meth:`from_decidiffusion` or :func:`search_spaces.get_arch`. Instances are hashable and compare by value.
    """

    down: tuple[DownStage, ...]
    up: tuple[UpStage, ...]
    mid: MidBlock | None = None
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    time_embedding_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_cond_proj_dim: int | None = None
    down_skip: str = "after_attention"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.mid is not None and not (self.mid.resnets or self.mid.attentions or self.mid.upsample):
            object.__setattr__(self, "mid", None)  # an empty mid block is no mid block
        if self.time_embedding_dim is None and self.down:
            object.__setattr__(self, "time_embedding_dim", 4 * self.down[0].channels)  # diffusers' default
        _validate(self)

    # ---- derived facts -----------------------------------------------------------------------------------

    @property
    def stem_channels(self) -> int:
        """Width of ``conv_in`` and of the sinusoidal time projection."""
        return self.down[0].channels

    @property
    def temb_channels(self) -> int:
        return self.time_embedding_dim or 4 * self.stem_channels

    @property
    def num_downsamples(self) -> int:
        return sum(s.downsample for s in self.down)

    def sizes(self, resolution: int | tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Spatial size at each resolution level for an input of ``resolution`` (default: ``sample_size``)."""
        res = self.sample_size if resolution is None else resolution
        h, w = (res, res) if isinstance(res, int) else res
        out = [(h, w)]
        for _ in range(self.num_downsamples):
            h, w = (h + 1) // 2, (w + 1) // 2  # a 3x3 stride-2 conv with padding 1 rounds up
            out.append((h, w))
        return out

    @cached_property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Every module of the network in execution order, with its channels, skip and resolution level."""
        return _route(self)

    # ---- serialisation -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain-data form: every field explicit, stages without attention omit heads/depth."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        for f in fields(self):
            if f.name in ("down", "up", "mid", "name"):
                continue
            out[f.name] = getattr(self, f.name)
        out["down"] = [_stage_dict(s) for s in self.down]
        out["mid"] = None if self.mid is None else _stage_dict(self.mid)
        out["up"] = [_stage_dict(s) for s in self.up]
        return out

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> UNetArch:
        """Validate plain data (from YAML/JSON) into an arch; any problem is one :class:`ConfigError`."""
        from .schema import arch_from_dict

        return arch_from_dict(data)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> UNetArch:
        data, lines = parse_text(text, source)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise exc.located(source, lines) from None

    @classmethod
    def from_json(cls, text: str) -> UNetArch:
        return cls.from_yaml(text)  # JSON is YAML; one parser, one error style

    def replace(self, **changes: Any) -> UNetArch:
        """A validated copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)

    # ---- importers ---------------------------------------------------------------------------------------

    @classmethod
    def from_unet2d_config(cls, config: Mapping[str, Any], name: str = "") -> UNetArch:
        """Import a diffusers ``UNet2DConditionModel`` config of the Stable Diffusion family."""
        from .importers import arch_dict_from_unet2d_config

        return cls.from_dict({**arch_dict_from_unet2d_config(config), "name": name})

    @classmethod
    def from_decidiffusion(cls, config: Mapping[str, Any], name: str = "") -> UNetArch:
        """Import DeciDiffusion's ``flexible_unet/config.json`` (see ``importers.py`` for the mapping)."""
        from .importers import arch_dict_from_decidiffusion

        return cls.from_dict({**arch_dict_from_decidiffusion(config), "name": name})

    def __str__(self) -> str:
        def stage(s: Stage) -> str:
            att = f"+{s.attentions}A" if s.attentions else ""
            ch = getattr(s, "channels", "")
            return f"{ch}:{s.resnets}R{att}"

        mid = "none" if self.mid is None else stage(self.mid)
        label = f"{self.name} " if self.name else ""
        return (
            f"{label}UNetArch(down=[{', '.join(stage(s) for s in self.down)}], mid={mid}, "
            f"up=[{', '.join(stage(s) for s in self.up)}])"
        )


def _stage_dict(s: Stage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(s):
        value = getattr(s, f.name)
        if f.name in ("heads", "transformer_layers") and not s.attentions:
            continue
        out[f.name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Structural validation and skip routing


# Upper bounds far beyond any real U-Net (SD1.5: 4 stages, 3 ResNets, 1280 channels; SDXL: 10 transformer layers):
# they only stop an absurd input (``resnets: 1000000000``) from making routing and costing run for hours.
MAX_STAGES = 16
MAX_BLOCKS = 256  # ResNets, attentions or transformer layers in one stage
MAX_WIDTH = 1 << 16  # channels, text width, time embedding width, sample size


def _validate(arch: UNetArch) -> None:
    """Check one arch; raise a ConfigError naming the field. Called from ``__post_init__``."""
    if not arch.down or not arch.up:
        raise ConfigError("an arch needs at least one down and one up stage", field="down" if not arch.down else "up")
    for key in ("down", "up"):
        if len(getattr(arch, key)) > MAX_STAGES:
            raise ConfigError(f"at most {MAX_STAGES} stages, got {len(getattr(arch, key))}", field=key)
    for key in ("sample_size", "in_channels", "out_channels", "cross_attention_dim", "time_embedding_dim",
                "time_cond_proj_dim"):
        if (getattr(arch, key) or 0) > MAX_WIDTH:
            raise ConfigError(f"at most {MAX_WIDTH}, got {getattr(arch, key)}", field=key)
    for key in ("sample_size", "in_channels", "out_channels", "cross_attention_dim", "norm_num_groups"):
        if getattr(arch, key) <= 0:
            raise ConfigError(f"must be positive, got {getattr(arch, key)}", field=key)
    if not arch.norm_eps > 0:
        raise ConfigError(f"must be positive, got {arch.norm_eps}", field="norm_eps")
    if arch.time_embedding_dim is not None and arch.time_embedding_dim <= 0:
        raise ConfigError("must be positive", field="time_embedding_dim")
    if arch.time_cond_proj_dim is not None and arch.time_cond_proj_dim <= 0:
        raise ConfigError("must be positive", field="time_cond_proj_dim")
    if arch.down_skip not in DOWN_SKIP_CHOICES:
        raise ConfigError(f"must be one of {', '.join(DOWN_SKIP_CHOICES)}, got {arch.down_skip!r}", field="down_skip")
    if arch.act_fn not in ACT_FNS:
        raise ConfigError(f"must be one of {', '.join(ACT_FNS)}, got {arch.act_fn!r}", field="act_fn")
    groups = arch.norm_num_groups
    named: list[tuple[str, Stage, int]] = [(f"down[{i}]", s, s.channels) for i, s in enumerate(arch.down)]
    if arch.mid is not None:
        named.append(("mid", arch.mid, arch.down[-1].channels))
    named += [(f"up[{i}]", s, s.channels) for i, s in enumerate(arch.up)]
    for where, s, channels in named:
        if channels <= 0:
            raise ConfigError(f"must be positive, got {channels}", field=f"{where}.channels")
        if channels % groups:
            raise ConfigError(f"{channels} channels are not divisible by norm_num_groups {groups}",
                              field=f"{where}.channels")
        if channels > MAX_WIDTH:
            raise ConfigError(f"at most {MAX_WIDTH}, got {channels}", field=f"{where}.channels")
        for key in ("resnets", "attentions", "transformer_layers"):
            if (getattr(s, key) or 0) > MAX_BLOCKS:
                raise ConfigError(f"at most {MAX_BLOCKS}, got {getattr(s, key)}", field=f"{where}.{key}")
        for key in ("resnets", "attentions"):
            if getattr(s, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(s, key)}", field=f"{where}.{key}")
        if s.attentions:
            if s.heads is None or s.heads <= 0:
                raise ConfigError(f"must be a positive number of heads, got {s.heads}", field=f"{where}.heads")
            if channels % s.heads:
                raise ConfigError(f"{channels} channels are not divisible by {s.heads} heads", field=f"{where}.heads")
            if s.transformer_layers is None or s.transformer_layers <= 0:
                raise ConfigError(f"must be >= 1, got {s.transformer_layers}", field=f"{where}.transformer_layers")
    if arch.mid is not None and arch.mid.upsample and not arch.down[-1].downsample:
        raise ConfigError("the mid block upsamples, so the last down stage must downsample "
                          f"(down[{len(arch.down) - 1}].downsample: true)", field="mid.upsample")
    if arch.in_channels and arch.sample_size < 2 ** arch.num_downsamples:
        raise ConfigError(f"sample_size {arch.sample_size} is smaller than the {2 ** arch.num_downsamples}x "
                          "total downsampling", field="sample_size")
    # the routing both validates and gives the block list: keep it, so ``arch.blocks`` costs nothing later
    arch.__dict__["blocks"] = _route(arch)


def _route(arch: UNetArch) -> tuple[BlockSpec, ...]:
    """Walk the network once: channels, levels and skip consumption of every module, refusing bad wiring."""
    blocks: list[BlockSpec] = []
    c0 = arch.stem_channels
    blocks.append(BlockSpec("time_embedding", "time_embedding", "", 0, c0, arch.temb_channels, 0))
    blocks.append(BlockSpec("conv_in", "conv_in", "", 0, arch.in_channels, c0, 0))
    skips: list[tuple[int, int, str]] = [(0, c0, "conv_in")]  # (level, channels, producer)
    level, ch = 0, c0

    def stage_items(where: str, module: str, s: Stage, out_ch: int, consume: bool) -> None:
        nonlocal ch
        order = interleave(s.resnets, s.attentions)
        if s.resnets == 0 and out_ch != ch:
            raise ConfigError(f"has no ResNet, so it cannot change the width from {ch} to {out_ch}",
                              field=f"{where}.channels")
        for pos, (kind, idx) in enumerate(order):
            if kind == "resnet":
                skip_ch = 0
                if consume:
                    if not skips:
                        raise ConfigError(f"ResNet {idx} has no skip left to consume: the down side produces fewer "
                                          "skips than the up ResNets need", field=f"{where}.resnets")
                    s_level, skip_ch, producer = skips.pop()
                    if s_level != level:
                        raise ConfigError(
                            f"ResNet {idx} runs at 1/{2 ** level} resolution but the next skip ({producer}) is at "
                            f"1/{2 ** s_level}: the up ResNets do not match the skips of the down side",
                            field=f"{where}.resnets")
                blocks.append(BlockSpec("resnet", f"{module}.resnets.{idx}", where, idx, ch + skip_ch, out_ch,
                                        level, skip_channels=skip_ch))
                ch = out_ch
            else:
                blocks.append(BlockSpec("attention", f"{module}.attentions.{idx}", where, idx, ch, ch, level,
                                        heads=s.heads or 0, transformer_layers=s.transformer_layers or 0))
            if isinstance(s, DownStage) and kind == "resnet" and arch.down_skip == "after_resnet":
                skips.append((level, ch, f"{where} ResNet {idx}"))
            if isinstance(s, DownStage) and arch.down_skip == "after_attention":
                nxt = order[pos + 1][0] if pos + 1 < len(order) else "end"
                ridx = sum(k == "resnet" for k, _ in order[: pos + 1]) - 1
                if ridx >= 0 and nxt in ("resnet", "end"):
                    skips.append((level, ch, f"{where} ResNet {ridx}"))

    for i, s in enumerate(arch.down):
        where = f"down[{i}]"
        stage_items(where, f"down_blocks.{i}", s, s.channels, consume=False)
        if s.downsample:
            level += 1
            blocks.append(BlockSpec("downsample", f"down_blocks.{i}.downsamplers.0", where, 0, ch, ch, level))
            if i < len(arch.down) - 1:
                skips.append((level, ch, f"{where} downsampler"))
    if arch.mid is not None:
        stage_items("mid", "mid_block", arch.mid, ch, consume=False)
        if arch.mid.upsample:
            level -= 1
            blocks.append(BlockSpec("upsample", "mid_block.upsamplers.0", "mid", 0, ch, ch, level))
    for i, s in enumerate(arch.up):
        where = f"up[{i}]"
        stage_items(where, f"up_blocks.{i}", s, s.channels, consume=True)
        left = sum(1 for lv, _, _ in skips if lv == level)
        if left and skips[-1][0] == level:
            raise ConfigError(f"leaves {left} skip(s) at 1/{2 ** level} resolution unconsumed: it needs "
                              f"{s.resnets + left} ResNets, has {s.resnets}", field=f"{where}.resnets")
        if s.upsample:
            if level == 0:
                raise ConfigError("upsamples above the input resolution", field=f"{where}.upsample")
            level -= 1
            blocks.append(BlockSpec("upsample", f"up_blocks.{i}.upsamplers.0", where, 0, ch, ch, level))
    if level != 0:
        raise ConfigError(f"the up path ends at 1/{2 ** level} of the input resolution: the up stages need "
                          f"{level} more upsample(s)", field=f"up[{len(arch.up) - 1}].upsample")
    if skips:
        raise ConfigError(f"{len(skips)} skip(s) from {skips[-1][2]} onwards are never consumed: the up path "
                          f"needs another stage with {len(skips)} ResNet(s)", field="up")
    blocks.append(BlockSpec("norm_out", "conv_norm_out", "", 0, ch, ch, 0))
    blocks.append(BlockSpec("conv_out", "conv_out", "", 0, ch, arch.out_channels, 0))
    return tuple(blocks)
