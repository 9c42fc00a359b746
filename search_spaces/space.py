"""`SearchSpace`: which architecture choices are open, read from the ``space:`` section of an experiment YAML.

A space is an ordered list of categorical *decisions* ("how many stages", "down[1].attentions", ...). Every
combination of choices is a valid arch by construction, which is what makes the API small and exact:

* ``sample`` draws each active decision uniformly; ``mutate`` changes one active decision; ``crossover`` takes
  each decision from one parent or the other.
* ``encode`` gives a fixed-length vector of choice indices (``-1`` for decisions that do not apply, e.g. the
  heads of a stage without attention or the stages beyond the sampled depth); ``decode`` inverts it.
* ``cardinality`` counts distinct archs exactly (decisions that do not apply are not multiplied in).

What the space derives instead of asking for:

* With ``n`` stages the arch uses ``down[:n]`` and ``up[-n:]`` (BK-SDM-Tiny drops SD's innermost down stage and
  its outermost up stage, i.e. the same resolution level on both sides).
* Down stages downsample, all but the last; the last one too when the mid block upsamples (DeciDiffusion's
  layout). Up stages upsample, all but the last.
* Each up stage has exactly as many ResNets as there are skips at its resolution (one per down ResNet at that
  level, plus the downsampler or ``conv_in`` skip): that is the only count for which the skips route.

Cost constraints (``constraints: {max_params: ..., max_macs: ...}``) are kept here as data and checked by
``proxies.cost`` (imports run ``nas -> proxies -> search_spaces``): pass ``accept=`` to ``sample``/``mutate``.

YAML shape::

    space:
      base: sd15                  # reference arch name or an inline arch: global fields (text width, ...)
      stages: [3, 4]              # optional; default: len(down)
      attention: {heads: [8], transformer_layers: [1]}   # defaults for every stage
      down:                       # per stage: a value or a list of choices
        - {channels: 320, resnets: [1, 2], attentions: [0, 1, 2]}
        ...
      mid: {resnets: [0, 1, 2], attentions: [0, 1], upsample: [false, true]}   # or null: no mid block
      up:
        - {channels: 1280, attentions: [0, 1, 2, 3]}
        ...
      constraints: {max_params: 900000000}
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .arch import DownStage, MidBlock, UNetArch, UpStage
from .errors import ConfigError
from .schema import check_keys, check_type
from .yamlio import read_file

Accept = Callable[[UNetArch], bool]


@dataclass(frozen=True)
class Decision:
    """One categorical choice of the space, e.g. ``down[1].attentions`` in ``(0, 1, 2)``."""

    name: str
    choices: tuple[Any, ...]


_STAGE_FIELDS = ("channels", "resnets", "attentions", "heads", "transformer_layers")
_ATTN_FIELDS = ("heads", "transformer_layers")
_MID_FIELDS = ("resnets", "attentions", "heads", "transformer_layers", "upsample")
_GLOBAL_KEYS = {"sample_size", "in_channels", "out_channels", "cross_attention_dim", "use_linear_projection",
                "upcast_attention", "norm_num_groups", "norm_eps", "act_fn", "time_embedding_dim",
                "flip_sin_to_cos", "freq_shift", "time_cond_proj_dim", "down_skip"}


class SearchSpace:
    """A set of UNetArchs described by per-stage choices; see the module docstring for the YAML shape."""

    def __init__(self, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ConfigError(f"a space must be a mapping, got {type(data).__name__}")
        check_keys(data, {"name", "base", "teacher", "stages", "attention", "down", "mid", "up", "constraints",
                          "globals"}, "")
        self.data = dict(data)
        self.name: str = str(data.get("name", ""))
        self.teacher: str | None = data.get("teacher")
        self.globals = self._globals(data)
        self.constraints = _constraints(data.get("constraints"))
        defaults = data.get("attention") or {}
        if not isinstance(defaults, Mapping):
            raise ConfigError("expected a mapping like {heads: [8], transformer_layers: [1]}", field="attention")
        check_keys(defaults, {"heads", "head_dim", "transformer_layers"}, "attention")

        for key in ("down", "up"):
            if not isinstance(data.get(key), list) or not data[key]:
                raise ConfigError("expected a non-empty list of stage choices", field=key)
        if len(data["down"]) != len(data["up"]):
            raise ConfigError(f"{len(data['up'])} up stages for {len(data['down'])} down stages: list one up "
                              "stage per down stage (the i-th from the end pairs with down[i])", field="up")
        self.max_stages = len(data["down"])
        self.stages = self._choices(data.get("stages", self.max_stages), "stages", int)
        for n in self.stages:
            if not 1 <= n <= self.max_stages:
                raise ConfigError(f"{n} is not between 1 and the {self.max_stages} stages listed", field="stages")

        self.decisions: list[Decision] = [Decision("stages", self.stages)]
        for i, item in enumerate(data["down"]):
            self._stage(item, f"down[{i}]", defaults, ("channels", "resnets", "attentions"))
        mid = data.get("mid")
        self.has_mid = mid is not None
        if self.has_mid:
            self._stage(mid, "mid", defaults, ("resnets", "attentions", "upsample"))
        for i, item in enumerate(data["up"]):
            self._stage(item, f"up[{i}]", defaults, ("channels", "attentions"))
        self._index = {d.name: k for k, d in enumerate(self.decisions)}
        self._check_all_valid()

    # ---- parsing -----------------------------------------------------------------------------------------

    def _globals(self, data: Mapping[str, Any]) -> dict[str, Any]:
        base = data.get("base")
        out: dict[str, Any] = {}
        if base is not None:
            from .registry import get_arch

            arch = get_arch(base) if isinstance(base, str) else _inline_arch(base)
            out = {k: v for k, v in arch.to_dict().items() if k in _GLOBAL_KEYS}
        extra = data.get("globals") or {}
        if not isinstance(extra, Mapping):
            raise ConfigError("expected a mapping of arch fields", field="globals")
        check_keys(extra, _GLOBAL_KEYS, "globals")
        out.update(extra)
        return out

    @staticmethod
    def _choices(value: Any, where: str, types: type | tuple[type, ...]) -> tuple[Any, ...]:
        values = list(value) if isinstance(value, list) else [value]
        if not values:
            raise ConfigError("needs at least one choice", field=where)
        for k, v in enumerate(values):
            check_type(v, types, f"{where}[{k}]" if isinstance(value, list) else where)
        if len(set(values)) != len(values):
            raise ConfigError(f"repeated choices in {values}", field=where)
        return tuple(values)

    def _stage(self, item: Any, where: str, defaults: Mapping[str, Any], required: tuple[str, ...]) -> None:
        if not isinstance(item, Mapping):
            raise ConfigError(f"expected a mapping of choices, got {type(item).__name__}", field=where)
        allowed = set(required) | {"heads", "head_dim", "transformer_layers"}
        if where.startswith("up"):
            allowed.add("resnets")  # refused below with a reason
        check_keys(item, allowed, where)
        if where.startswith("up") and "resnets" in item:
            raise ConfigError("up stages get one ResNet per skip at their resolution; the space derives the count",
                              field=f"{where}.resnets")
        merged = {**defaults, **item}
        if "heads" in item and "head_dim" in item:
            raise ConfigError("give heads or head_dim, not both", field=f"{where}.head_dim")
        if "head_dim" in item or ("heads" not in merged and "head_dim" in merged):
            head_key, head_values = "head_dim", merged["head_dim"]
        else:
            head_key, head_values = "heads", merged.get("heads", 8)
        for key in required:
            if key == "channels" and key not in item:
                raise ConfigError("missing", field=f"{where}.channels")
            if key == "resnets" and key not in item and where != "mid":
                raise ConfigError("missing", field=f"{where}.resnets")
            default = {"resnets": 2, "attentions": 1 if where == "mid" else 0, "upsample": False}.get(key)
            value = item.get(key, default)
            kind = bool if key == "upsample" else int
            choices = self._choices(value, f"{where}.{key}", kind)
            if kind is int:
                for c in choices:
                    low = 1 if (key == "resnets" and where.startswith("down")) or key == "channels" else 0
                    if c < low:
                        raise ConfigError(f"choice {c} is below {low}" + (
                            " (a down stage needs a ResNet to set its width)" if key == "resnets" else ""),
                            field=f"{where}.{key}")
            self.decisions.append(Decision(f"{where}.{key}", choices))
        heads = self._choices(head_values, f"{where}.{head_key}", int)
        if any(h <= 0 for h in heads):
            raise ConfigError("choices must be positive", field=f"{where}.{head_key}")
        self.decisions.append(Decision(f"{where}.{head_key}", heads))
        self.decisions.append(Decision(f"{where}.transformer_layers",
                                       self._choices(merged.get("transformer_layers", 1),
                                                     f"{where}.transformer_layers", int)))

    def _check_all_valid(self) -> None:
        """Every channel/heads combination must divide, so that every combination of choices is an arch."""
        groups = self.globals.get("norm_num_groups", 32)
        widths: dict[str, tuple[int, ...]] = {}
        for i in range(self.max_stages):
            widths[f"down[{i}]"] = self.choices(f"down[{i}].channels")
            widths[f"up[{i}]"] = self.choices(f"up[{i}].channels")
        if self.has_mid:
            widths["mid"] = tuple({c for n in self.stages for c in widths[f"down[{n - 1}]"]})
        for stage, chans in widths.items():
            for c in chans:
                if c % groups:
                    raise ConfigError(f"{c} channels are not divisible by norm_num_groups {groups}",
                                      field=f"{stage}.channels" if stage != "mid" else "mid")
                head_name = f"{stage}.head_dim" if f"{stage}.head_dim" in self._index else f"{stage}.heads"
                for h in self.choices(head_name):
                    if c % h:
                        raise ConfigError(f"{h} does not divide {c} channels (every combination must be valid)",
                                          field=head_name)
        for n in self.stages:  # build the smallest and largest arch of each depth: catches global problems
            self.decode([0 if d.name != "stages" else self.stages.index(n) for d in self.decisions], check=False)

    # ---- decisions -------------------------------------------------------------------------------------------

    def choices(self, name: str) -> tuple[Any, ...]:
        return self.decisions[self._index[name]].choices

    def _active(self, values: Mapping[str, Any]) -> list[bool]:
        """Which decisions apply, given the values chosen (depth, attention counts)."""
        return [self.applies(d.name, values) for d in self.decisions]

    def applies(self, name: str, values: Mapping[str, Any]) -> bool:
        """Whether one decision applies. It depends only on ``stages`` and the stage's attention count, which
        come before it in decision order, so decisions can be taken one after the other."""
        stage, _, key = name.partition(".")
        if stage.startswith(("down[", "up[")):
            i = int(stage[stage.index("[") + 1:-1])
            n = values["stages"]
            if not (i < n if stage.startswith("down") else i >= self.max_stages - n):
                return False
        if key in ("heads", "head_dim", "transformer_layers"):
            return values.get(f"{stage}.attentions", 0) > 0
        return True

    def _values_from_indices(self, idx: Sequence[int]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for d, k in zip(self.decisions, idx, strict=True):
            if k >= 0:
                values[d.name] = d.choices[k]
        return values

    def _arch(self, values: Mapping[str, Any]) -> UNetArch:
        n = values["stages"]
        mid_up = bool(values.get("mid.upsample", False)) if self.has_mid else False

        def attn(stage: str, channels: int) -> dict[str, Any]:
            a = values[f"{stage}.attentions"]
            if not a:
                return {"attentions": 0}
            heads = values.get(f"{stage}.heads") or channels // values[f"{stage}.head_dim"]
            return {"attentions": a, "heads": heads, "transformer_layers": values[f"{stage}.transformer_layers"]}

        down = []
        for i in range(n):
            c = values[f"down[{i}].channels"]
            down.append({"channels": c, "resnets": values[f"down[{i}].resnets"], **attn(f"down[{i}]", c),
                         "downsample": i < n - 1 or mid_up})
        # skips per resolution level: conv_in or the previous stage's downsampler, plus one per down ResNet
        skips = [1 + d["resnets"] for d in down]
        up = []
        for k, i in enumerate(range(self.max_stages - n, self.max_stages)):
            c = values[f"up[{i}].channels"]
            up.append({"channels": c, "resnets": skips[n - 1 - k], **attn(f"up[{i}]", c), "upsample": k < n - 1})
        mid = None
        if self.has_mid:
            mid = {"resnets": values["mid.resnets"], **attn("mid", down[-1]["channels"]), "upsample": mid_up}
        return UNetArch.from_dict({**self.globals, "down": down, "mid": mid, "up": up})

    # ---- public API ----------------------------------------------------------------------------------------

    def sample(self, rng: random.Random, accept: Accept | None = None, max_tries: int = 10_000) -> UNetArch:
        """A random arch (each applicable decision uniform); with ``accept``, rejection-sample until it holds."""
        for _ in range(max_tries):
            idx = self._sample_indices(rng)
            arch = self.decode(idx)
            if accept is None or accept(arch):
                return arch
        raise ConfigError(f"no arch satisfying the constraints in {max_tries} samples; loosen the constraints",
                          field="constraints")

    def _sample_indices(self, rng: random.Random) -> list[int]:
        values: dict[str, Any] = {}
        idx = []
        for d in self.decisions:
            k = rng.randrange(len(d.choices))
            values[d.name] = d.choices[k]
            idx.append(k)
        active = self._active(values)
        return [k if on else -1 for k, on in zip(idx, active, strict=True)]

    def encode(self, arch: UNetArch) -> list[int]:
        """Fixed-length vector of choice indices, ``-1`` where a decision does not apply."""
        values = self._values_of(arch)
        active = self._active(values)
        out = []
        for d, on in zip(self.decisions, active, strict=True):
            out.append(d.choices.index(values[d.name]) if on else -1)
        return out

    def decode(self, vector: Sequence[int], check: bool = True) -> UNetArch:
        """The arch of an :meth:`encode` vector; wrong length or out-of-range indices raise ConfigError."""
        if len(vector) != len(self.decisions):
            raise ConfigError(f"expected {len(self.decisions)} entries, got {len(vector)}", field="vector")
        idx = [int(k) for k in vector]
        for d, k in zip(self.decisions, idx, strict=True):
            if not -1 <= k < len(d.choices):
                raise ConfigError(f"index {k} out of range for {len(d.choices)} choices", field=d.name)
        values = self._values_from_indices(idx)
        if "stages" not in values:
            raise ConfigError("the stages decision always applies", field="stages")
        if check:
            active = self._active(values)
            for d, k, on in zip(self.decisions, idx, active, strict=True):
                if on and k < 0:
                    raise ConfigError("applies to this arch but is -1", field=d.name)
        return self._arch(values)

    def contains(self, arch: UNetArch) -> bool:
        """Whether ``arch`` is one of this space's archs (global fields included)."""
        try:
            return self.decode(self.encode(arch)) == arch
        except (ConfigError, ValueError, KeyError):
            return False

    def mutate(self, arch: UNetArch, rng: random.Random, accept: Accept | None = None,
               max_tries: int = 1_000) -> UNetArch:
        """A neighbour of ``arch``: one applicable decision changed to another choice."""
        idx = self.encode(arch)
        for _ in range(max_tries):
            values = self._values_from_indices(idx)
            active = self._active(values)
            open_ = [k for k, (d, on) in enumerate(zip(self.decisions, active, strict=True))
                     if on and len(d.choices) > 1]
            if not open_:
                raise ConfigError("the space has a single arch: nothing to mutate")
            k = rng.choice(open_)
            new = list(idx)
            new[k] = rng.choice([c for c in range(len(self.decisions[k].choices)) if c != idx[k]])
            child = self._complete(new, rng)
            if accept is None or accept(child):
                return child
        raise ConfigError(f"no mutation satisfying the constraints in {max_tries} tries", field="constraints")

    def crossover(self, a: UNetArch, b: UNetArch, rng: random.Random, accept: Accept | None = None,
                  max_tries: int = 1_000) -> UNetArch:
        """A child taking each decision from ``a`` or ``b`` with equal chance."""
        ia, ib = self.encode(a), self.encode(b)
        for _ in range(max_tries):
            child = self._complete([x if rng.random() < 0.5 else y for x, y in zip(ia, ib, strict=True)], rng)
            if accept is None or accept(child):
                return child
        raise ConfigError(f"no crossover child satisfying the constraints in {max_tries} tries", field="constraints")

    def _complete(self, idx: list[int], rng: random.Random) -> UNetArch:
        """Fill decisions that became applicable (e.g. heads of a stage that gained attention) at random."""
        values = self._values_from_indices(idx)
        active = self._active(values)
        while any(on and k < 0 for k, on in zip(idx, active, strict=True)):
            for j, (d, on) in enumerate(zip(self.decisions, active, strict=True)):
                if on and idx[j] < 0:
                    idx[j] = rng.randrange(len(d.choices))
            values = self._values_from_indices(idx)
            active = self._active(values)
        return self.decode([k if on else -1 for k, on in zip(idx, active, strict=True)])

    def cardinality(self) -> int:
        """The exact number of distinct archs in the space (constraints not applied)."""
        total = 0
        for n in self.stages:
            count = 1
            for i in range(n):
                count *= self._stage_count(f"down[{i}]", ("channels", "resnets"))
            for i in range(self.max_stages - n, self.max_stages):
                count *= self._stage_count(f"up[{i}]", ("channels",))
            if self.has_mid:
                count *= self._stage_count("mid", ("resnets", "upsample"))
            total += count
        return total

    def _stage_count(self, stage: str, plain: tuple[str, ...]) -> int:
        head = f"{stage}.head_dim" if f"{stage}.head_dim" in self._index else f"{stage}.heads"
        with_attention = len(self.choices(head)) * len(self.choices(f"{stage}.transformer_layers"))
        attn = sum(1 if a == 0 else with_attention for a in self.choices(f"{stage}.attentions"))
        return math.prod(len(self.choices(f"{stage}.{k}")) for k in plain) * attn

    def enumerate(self, limit: int = 1_000_000) -> list[UNetArch]:
        """Every arch of the space (for small spaces: counting under constraints, exhaustive checks)."""
        size = self.cardinality()
        if size > limit:
            raise ConfigError(f"the space has {size} archs, more than the limit {limit}")
        out: list[UNetArch] = []

        def walk(k: int, idx: list[int], values: dict[str, Any]) -> None:
            if k == len(self.decisions):
                out.append(self.decode(idx))
                return
            d = self.decisions[k]
            if not self.applies(d.name, values):
                walk(k + 1, [*idx, -1], values)
                return
            for j, choice in enumerate(d.choices):
                walk(k + 1, [*idx, j], {**values, d.name: choice})

        walk(0, [], {})
        return out

    def describe(self) -> list[dict[str, Any]]:
        """One row per decision: name and choices (for ``unet-nas space show``)."""
        return [{"decision": d.name, "choices": list(d.choices)} for d in self.decisions]

    def _values_of(self, arch: UNetArch) -> dict[str, Any]:
        """Decision values that would produce ``arch``; raises ConfigError when it is not in the space."""
        n = len(arch.down)
        if n not in self.stages or len(arch.up) != n:
            raise ConfigError(f"has {n} down / {len(arch.up)} up stages; the space allows {list(self.stages)}",
                              field="down")
        values: dict[str, Any] = {"stages": n}

        def put(name: str, value: Any) -> None:
            if name not in self._index or value not in self.choices(name):
                raise ConfigError(f"{value!r} is not one of the space's choices", field=name)
            values[name] = value

        def stage_values(stage: str, s: DownStage | UpStage | MidBlock, channels: int, keys: tuple[str, ...]) -> None:
            for key in keys:
                put(f"{stage}.{key}", getattr(s, key))
            put(f"{stage}.attentions", s.attentions)
            if s.attentions:
                if f"{stage}.head_dim" in self._index:
                    put(f"{stage}.head_dim", channels // s.heads)
                else:
                    put(f"{stage}.heads", s.heads)
                put(f"{stage}.transformer_layers", s.transformer_layers)

        for i, s in enumerate(arch.down):
            stage_values(f"down[{i}]", s, s.channels, ("channels", "resnets"))
        for k, s in enumerate(arch.up):
            stage_values(f"up[{self.max_stages - n + k}]", s, s.channels, ("channels",))
        if self.has_mid:
            if arch.mid is None:
                put("mid.resnets", 0)
                put("mid.attentions", 0)
                put("mid.upsample", False)
            else:
                stage_values("mid", arch.mid, arch.down[-1].channels, ("resnets", "upsample"))
        elif arch.mid is not None:
            raise ConfigError("the space has no mid block", field="mid")
        return values

    # ---- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchSpace:
        """Load a space: a shipped space name (``digits``), a space file, or an experiment file whose ``space:`` is a
        mapping, a shipped name or a space file (relative to the experiment file). Every ``--space`` option and
        space argument of the command line reads it here, so all of them accept the same three forms."""
        from .registry import space_path

        path = space_path(path)
        data, lines = read_file(path)
        nested = isinstance(data, Mapping) and "space" in data
        if nested and isinstance(data["space"], str):  # an experiment naming its space
            try:
                inner = space_path(data["space"], base=path.parent)
            except ConfigError as exc:
                raise ConfigError(exc.message, field="space").located(str(path), lines) from None
            return cls.from_yaml(inner)
        try:
            return cls(data["space"] if nested else data)
        except ConfigError as exc:
            raise exc.located(str(path), lines, "space" if nested else "") from None

    def __repr__(self) -> str:
        return f"SearchSpace({self.name or 'unnamed'}, {len(self.decisions)} decisions, {self.cardinality()} archs)"


def _inline_arch(base: Any) -> UNetArch:
    try:
        return UNetArch.from_dict(base)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=f"base.{exc.field}" if exc.field else "base") from None


CONSTRAINT_KEYS = {"max_params": (int, float), "max_macs": (int, float), "batch": int, "resolution": int,
                   "text_len": int}


def _constraints(data: Any) -> dict[str, Any]:
    """Validated cost constraints: max_params, max_macs (at batch/resolution/text_len, default 1/sample/77)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping like {max_params: 900000000}", field="constraints")
    check_keys(data, set(CONSTRAINT_KEYS), "constraints")
    out = {}
    for key, value in data.items():
        check_type(value, CONSTRAINT_KEYS[key], f"constraints.{key}")
        if value <= 0:
            raise ConfigError(f"must be positive, got {value}", field=f"constraints.{key}")
        out[key] = value
    return out
