"""Weight inheritance from a teacher U-Net to a student FlexibleUNet, BK-SDM style.

Stages are matched by resolution level: down stages from the input side (``down[i]`` <- teacher ``down[i]``),
up stages from the output side (the last up stage <- the teacher's last), the mid block from the mid block.
Matched stages must have equal widths; otherwise inheritance is refused with a clear error.

Within a matched stage:

* ResNets are matched in order, the i-th student ResNet taking the first unused teacher ResNet at or after the
  previous match whose weights have the same shapes: i-th to i-th whenever possible. This reproduces BK-SDM's
  initialisation, whose up stages drop the *middle* block (its input width differs from the remaining one's).
* An attention takes the teacher attention at the same place after the matched ResNet (the first attention
  after ResNet ``r`` takes the first attention after the teacher's ResNet ``m(r)``); extra attentions take the
  next unused teacher attention in order.
* Parameters are copied by name where shapes agree, so a shallower transformer keeps the teacher's first
  layers; whatever has no counterpart is listed in the report and initialised per ``new``: ``"fresh"`` keeps
  the module's random initialisation; ``"identity"`` makes each new module start as the identity (or, for a
  resampler, as plain average pooling or nearest upsampling), so the student starts as close to the teacher's
  function as its arch allows (Net2Net, ControlNet's zero convolutions). A randomly initialised attention
  block adds a random perturbation to every feature map after it, which training must first undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import UNetArch, interleave
from .errors import ConfigError


@dataclass
class InheritedModule:
    """What happened to one student module: ``inherited`` (all tensors copied), ``partial`` or ``new``."""

    module: str
    source: str | None
    status: str
    params: int
    copied_params: int


@dataclass
class InheritanceReport:
    modules: list[InheritedModule] = field(default_factory=list)

    @property
    def inherited_params(self) -> int:
        return sum(m.copied_params for m in self.modules)

    @property
    def new_params(self) -> int:
        return sum(m.params - m.copied_params for m in self.modules)

    def by_status(self, status: str) -> list[InheritedModule]:
        return [m for m in self.modules if m.status == status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inherited_params": self.inherited_params,
            "new_params": self.new_params,
            "modules": [m.__dict__ for m in self.modules],
        }

    def summary(self) -> str:
        total = self.inherited_params + self.new_params
        share = self.inherited_params / total if total else 0.0
        lines = [f"inherited {self.inherited_params:,} of {total:,} parameters ({share:.1%})"]
        for m in self.modules:
            if m.status != "inherited":
                src = f" <- {m.source}" if m.source else ""
                lines.append(f"  {m.status:8s} {m.module}{src} ({m.copied_params:,}/{m.params:,})")
        return "\n".join(lines)


def teacher_arch(teacher: nn.Module) -> UNetArch:
    """The UNetArch of a FlexibleUNet or of an SD-family diffusers UNet2DConditionModel."""
    arch = getattr(teacher, "arch", None)
    if isinstance(arch, UNetArch):
        return arch
    config = getattr(teacher, "config", None)
    if config is None:
        raise ConfigError(f"cannot read an architecture from a {type(teacher).__name__} teacher")
    return UNetArch.from_unet2d_config(config)


def module_map(student: UNetArch, teacher: UNetArch) -> dict[str, str | None]:
    """Student module path -> teacher module path (or None for freshly initialised modules)."""
    if student.cross_attention_dim != teacher.cross_attention_dim:
        raise ConfigError(f"student text width {student.cross_attention_dim} differs from the teacher's "
                          f"{teacher.cross_attention_dim}", field="cross_attention_dim")
    mapping: dict[str, str | None] = {name: name for name in ("time_embedding", "conv_in", "conv_norm_out", "conv_out")}
    s_blocks = [b for b in student.blocks if b.stage]
    t_blocks = [b for b in teacher.blocks if b.stage]

    pairs: list[tuple[str, str | None]] = [(f"down[{i}]", f"down[{i}]" if i < len(teacher.down) else None)
                                           for i in range(len(student.down))]
    if student.mid is not None:
        pairs.append(("mid", "mid" if teacher.mid is not None else None))
    offset = len(teacher.up) - len(student.up)
    pairs += [(f"up[{i}]", f"up[{i + offset}]" if i + offset >= 0 else None) for i in range(len(student.up))]

    for s_stage, t_stage in pairs:
        s = [b for b in s_blocks if b.stage == s_stage]
        t = [b for b in t_blocks if b.stage == t_stage] if t_stage else []
        if t and _width(s) != _width(t):
            raise ConfigError(f"student {s_stage} has {_width(s)} channels, teacher {t_stage} has {_width(t)}: "
                              "inheritance needs equal widths", field=f"{s_stage}.channels")
        mapping.update(_match_stage(s, t))
    return mapping


def _width(blocks: list) -> int:
    resnets = [b for b in blocks if b.kind == "resnet"]
    return resnets[-1].out_channels if resnets else blocks[0].out_channels if blocks else 0


def _match_stage(s: list, t: list) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    s_res = [b for b in s if b.kind == "resnet"]
    t_res = [b for b in t if b.kind == "resnet"]
    res_map: dict[int, int] = {}
    nxt = 0
    for b in s_res:
        for j in range(nxt, len(t_res)):
            if (t_res[j].in_channels, t_res[j].out_channels) == (b.in_channels, b.out_channels):
                res_map[b.index] = j
                nxt = j + 1
                break
        out[b.module] = t_res[res_map[b.index]].module if b.index in res_map else None

    s_att = [b for b in s if b.kind == "attention"]
    t_att = [b for b in t if b.kind == "attention"]
    s_after = _attentions_after(len(s_res), len(s_att))
    t_after = _attentions_after(len(t_res), len(t_att))
    used: set[int] = set()
    last = -1
    for b in s_att:
        r, offset = s_after[b.index]
        want = None
        if r in res_map:
            candidates = [a for a, (tr, toff) in t_after.items() if tr == res_map[r] and toff == offset]
            want = candidates[0] if candidates and candidates[0] not in used else None
        if want is None:
            want = next((a for a in range(last + 1, len(t_att)) if a not in used), None)
        if want is not None:
            used.add(want)
            last = max(last, want)
        out[b.module] = t_att[want].module if want is not None else None

    for kind in ("downsample", "upsample"):
        mine = [b for b in s if b.kind == kind]
        theirs = [b for b in t if b.kind == kind]
        for b in mine:
            out[b.module] = theirs[0].module if theirs else None
    return out


def _attentions_after(resnets: int, attentions: int) -> dict[int, tuple[int, int]]:
    """attention index -> (index of the ResNet it follows or -1, its offset among the attentions after it)."""
    out: dict[int, tuple[int, int]] = {}
    r, offset = -1, 0
    for kind, idx in interleave(resnets, attentions):
        if kind == "resnet":
            r, offset = idx, 0
        else:
            out[idx] = (r, offset)
            offset += 1
    return out


NEW_MODULES = ("fresh", "identity")


def check_new_modules(value: Any, field: str = "new_modules") -> None:
    """Refuse a ``new_modules`` value other than those of NEW_MODULES, naming ``field``."""
    if value not in NEW_MODULES:
        raise ConfigError(f"must be one of {', '.join(NEW_MODULES)}, got {value!r}", field=field)


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher: nn.Module, new: str = "fresh") -> InheritanceReport:
    """Copy into ``student`` (a FlexibleUNet2DConditionModel) every block it keeps from ``teacher`` (a
    FlexibleUNet2DConditionModel or SD-family UNet2DConditionModel); return what was inherited. ``new``: how
    the modules the teacher cannot provide start (``"fresh"`` or ``"identity"``, see the module docstring)."""
    check_new_modules(new)
    mapping = module_map(teacher_arch(student), teacher_arch(teacher))
    t_state = teacher.state_dict()
    s_params = dict(student.named_parameters())
    report = InheritanceReport()
    for s_mod, t_mod in mapping.items():
        names = [n for n in s_params if n.startswith(s_mod + ".")]
        total = sum(s_params[n].numel() for n in names)
        copied = 0
        for name in names:
            if t_mod is None:
                continue
            source = t_mod + name[len(s_mod):]
            tensor = t_state.get(source)
            if tensor is not None and tensor.shape == s_params[name].shape:
                s_params[name].copy_(tensor)
                copied += tensor.numel()
        status = "inherited" if total and copied == total else "partial" if copied else "new"
        report.modules.append(InheritedModule(s_mod, t_mod, status, total, copied))
        if status == "new" and new == "identity":
            start_as_identity(student.get_submodule(s_mod))
    return report


@torch.no_grad()
def start_as_identity(module: nn.Module) -> None:
    """Initialise a new block so that it passes its input through: an attention block (whose output is added
    to its input) and a ResNet (output = shortcut(input) + conv2(...)) get a zero last projection, so they start
    as the identity (a ResNet that changes width starts as its shortcut); a strided-conv downsampler starts as
    2x2 average pooling, a conv upsampler as nearest upsampling. The zero projections still receive gradients,
    so the block learns from the first step (as ControlNet's zero convolutions do). Other modules are left."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, Transformer2DModel):
        nn.init.zeros_(module.proj_out.weight)
        if module.proj_out.bias is not None:
            nn.init.zeros_(module.proj_out.bias)
    elif isinstance(module, ResnetBlock2D):
        nn.init.zeros_(module.conv2.weight)
        if module.conv2.bias is not None:
            nn.init.zeros_(module.conv2.bias)
    elif isinstance(module, Downsample2D | Upsample2D) and isinstance(module.conv, nn.Conv2d):
        conv = module.conv
        if conv.in_channels != conv.out_channels or conv.kernel_size != (3, 3):
            return
        conv.weight.zero_()
        channels = torch.arange(conv.out_channels)
        if isinstance(module, Downsample2D):  # stride 2, padding 1: output (i, j) sees inputs 2i-1..2i+1
            for di in (1, 2):
                for dj in (1, 2):
                    conv.weight[channels, channels, di, dj] = 0.25
        else:  # after a nearest upsampling: pass the centre through
            conv.weight[channels, channels, 1, 1] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
