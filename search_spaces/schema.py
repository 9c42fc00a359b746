"""Plain data (YAML/JSON dicts) -> validated :class:`~search_spaces.arch.UNetArch`, with errors naming the field.

Accepted sugar: a top-level ``attention: {heads | head_dim, transformer_layers}`` gives defaults to every stage
with attention, and a stage may give ``head_dim`` instead of ``heads``. Unknown keys are errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .arch import DownStage, MidBlock, Stage, UNetArch, UpStage
from .errors import ConfigError

_GLOBAL_TYPES: dict[str, type | tuple[type, ...]] = {
    "sample_size": int,
    "in_channels": int,
    "out_channels": int,
    "cross_attention_dim": int,
    "use_linear_projection": bool,
    "upcast_attention": bool,
    "norm_num_groups": int,
    "norm_eps": (int, float),
    "act_fn": str,
    "time_embedding_dim": (int, type(None)),
    "flip_sin_to_cos": bool,
    "freq_shift": int,
    "time_cond_proj_dim": (int, type(None)),
    "down_skip": str,
    "name": str,
}
_STAGE_KEYS = {"channels", "resnets", "attentions", "heads", "head_dim", "transformer_layers"}
_ATTENTION_DEFAULT_KEYS = {"heads", "head_dim", "transformer_layers"}


def check_type(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    """Type check that does not let ``True`` pass as an int nor ``1`` as a bool, nor ``.nan``/``.inf`` pass as a
    number (no field of an arch, space, profile or spec means anything with them, and they poison sums)."""
    allowed = types if isinstance(types, tuple) else (types,)
    ok = False if isinstance(value, bool) and bool not in allowed else isinstance(value, allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"expected {names}, got {type(value).__name__} {value!r}", field=where)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value}", field=where)
    return value


def check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    # YAML keys need not be strings (``1: x``, ``null: y``): sort them as text, never compare mixed types
    unknown = sorted((k for k in data if k not in allowed), key=lambda k: (not isinstance(k, str), str(k)))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
                          field=f"{where}.{unknown[0]}" if where else str(unknown[0]))


def arch_from_dict(data: Any) -> UNetArch:
    if not isinstance(data, Mapping):
        raise ConfigError(f"an arch must be a mapping, got {type(data).__name__}")
    check_keys(data, set(_GLOBAL_TYPES) | {"down", "up", "mid", "attention"}, "")
    for key in ("down", "up"):
        if key not in data:
            raise ConfigError("missing (a list of stages)", field=key)
    kwargs: dict[str, Any] = {}
    for key, types in _GLOBAL_TYPES.items():
        if key in data:
            kwargs[key] = check_type(data[key], types, key)
    if "norm_eps" in kwargs:
        kwargs["norm_eps"] = float(kwargs["norm_eps"])

    defaults = data.get("attention") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError("expected a mapping like {heads: 8, transformer_layers: 1}", field="attention")
    check_keys(defaults, _ATTENTION_DEFAULT_KEYS, "attention")

    def stages(key: str, cls: type, flag: str) -> tuple:
        items = data[key]
        if not isinstance(items, list) or not items:
            raise ConfigError("expected a non-empty list of stages", field=key)
        return tuple(stage_from_dict(item, cls, flag, f"{key}[{i}]", defaults) for i, item in enumerate(items))

    kwargs["down"] = stages("down", DownStage, "downsample")
    kwargs["up"] = stages("up", UpStage, "upsample")
    mid = data.get("mid")
    kwargs["mid"] = None if mid is None else stage_from_dict(mid, MidBlock, "upsample", "mid", defaults,
                                                              channels=kwargs["down"][-1].channels)
    try:
        return UNetArch(**kwargs)
    except TypeError as exc:  # pragma: no cover - all keys are checked above
        raise ConfigError(str(exc)) from None


def stage_from_dict(item: Any, cls: type, flag: str, where: str, defaults: Mapping[str, Any],
                     channels: int | None = None) -> Stage:
    if not isinstance(item, Mapping):
        raise ConfigError(f"expected a mapping, got {type(item).__name__}", field=where)
    allowed = (_STAGE_KEYS | {flag}) - ({"channels"} if cls is MidBlock else set())
    check_keys(item, allowed, where)
    if cls is not MidBlock:
        if "channels" not in item:
            raise ConfigError("missing", field=f"{where}.channels")
        channels = check_type(item["channels"], int, f"{where}.channels")
    if cls is not MidBlock and "resnets" not in item:
        raise ConfigError("missing", field=f"{where}.resnets")
    resnets = check_type(item.get("resnets", 2), int, f"{where}.resnets")
    attentions = check_type(item.get("attentions", 0 if cls is not MidBlock else 1), int, f"{where}.attentions")
    kwargs: dict[str, Any] = {"resnets": resnets, "attentions": attentions,
                              flag: check_type(item.get(flag, False), bool, f"{where}.{flag}")}
    if cls is not MidBlock:
        kwargs["channels"] = channels
    if attentions:
        merged = {**defaults, **item}
        if "heads" in item and "head_dim" in item:
            raise ConfigError("give heads or head_dim, not both", field=f"{where}.head_dim")
        if "heads" in merged and not ("head_dim" in item and "heads" not in item):
            heads = check_type(merged["heads"], int, f"{where}.heads")
        elif "head_dim" in merged:
            head_dim = check_type(merged["head_dim"], int, f"{where}.head_dim")
            if head_dim <= 0 or not channels or channels % head_dim:
                raise ConfigError(f"head_dim {head_dim} does not divide {channels} channels", field=f"{where}.head_dim")
            heads = channels // head_dim
        else:
            raise ConfigError("stage has attentions but no heads (set heads or head_dim here or under "
                              "the top-level attention: section)", field=f"{where}.heads")
        kwargs["heads"] = heads
        kwargs["transformer_layers"] = check_type(merged.get("transformer_layers", 1), int,
                                                  f"{where}.transformer_layers")
    return cls(**kwargs)
