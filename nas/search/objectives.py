"""Turn an experiment's objectives and constraints into one function: arch -> objective values.

Everything expensive to set up (the data cache, a teacher trained or loaded once and saved in the run folder,
latency predictors, a CPU profile measured on first use) is prepared once per process by :class:`Evaluator`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nas.experiment import Experiment, Objective
from proxies.cost import arch_costs
from search_spaces import ConfigError, UNetArch, get_arch, load_arch, space_path
from search_spaces.space import SearchSpace


@dataclass
class Evaluation:
    """Objective values (all minimised), constraint values (<= 0 is feasible) and what it cost."""

    values: dict[str, float]
    constraints: dict[str, float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())


def load_space(exp: Experiment) -> SearchSpace:
    if isinstance(exp.space, dict):
        try:
            return SearchSpace(exp.space)
        except ConfigError as exc:
            raise ConfigError(exc.message, field=f"space.{exc.field}" if exc.field else "space") from None
    if "/" not in exp.space and not exp.space.endswith((".yaml", ".yml")):  # a shipped space by name
        return SearchSpace.from_yaml(space_path(exp.space))
    return SearchSpace.from_yaml(exp.path(exp.space))

PROXY_TRAIN_ITEMS, PROXY_VAL_ITEMS = 4096, 256  # of a sharded dataset, read into memory for the proxies


class Evaluator:
    """Scores archs for one experiment. ``prepare()`` does the one-time work (teacher, profile, a surrogate
    proxy's full-fidelity runs) and is safe to call again: it reuses what the run folder already holds."""

    def __init__(self, exp: Experiment, log: Any = None, allow_pickle: bool = False):
        self.exp = exp
        self.allow_pickle = allow_pickle  # --allow-pickle: a pickle teacher checkpoint may be read (weights_only)
        self.space = load_space(exp)
        self.log = log or (lambda msg: None)
        self._ctx = None
        self._predictors: dict[str, Any] = {}
        self._proxies: dict[str, Any] = {}
        self._refine_proxy: Any = None
        self._reference_values: dict[str, dict[str, float]] = {}

    # ---- one-time preparation -------------------------------------------------------------------------------

    def check(self) -> Evaluator:
        """Every check that needs no side effect: proxy options, reference archs, constraint bounds."""
        for obj in self.exp.objectives:
            if obj.kind == "quality":
                self._make_proxy(obj)
        if self.exp.refine is not None:
            self._make_refine_proxy()
        for i, c in enumerate(self.exp.constraints):
            if c.of is not None and not Path(c.of).exists():
                try:
                    get_arch(c.of)
                except ConfigError as exc:
                    raise ConfigError(exc.message, field=f"constraints[{i}].of") from None
            kind = next(o.kind for o in self.exp.objectives if o.name == c.objective)
            if c.max is not None and c.max <= 0 and kind in ("params", "macs", "latency"):
                raise ConfigError(f"{c.objective} is always positive, so max {c.max:g} cannot be met",
                                  field=f"constraints[{i}].max")
        for i, name in enumerate(self.exp.references):
            try:
                get_arch(name)
            except ConfigError as exc:
                raise ConfigError(exc.message, field=f"references[{i}]") from None
        return self

    def prepare(self) -> Evaluator:
        """The one-time work: predictors (measuring a profile if asked), reference values, data, teacher, the
        quality proxies' one-time work. The cost bounds come first: a proxy may spend its one-time work on the
        archs that meet them alone (:meth:`feasible`; the supernet's ``train_on: feasible``)."""
        self.check()
        self._prepare_costs()
        for obj in self.exp.objectives:
            if obj.kind == "quality":
                ctx = self._quality_context()
                proxy = self._proxies[obj.name] = self._make_proxy(obj)
                if hasattr(proxy, "fit"):  # one-time work (the surrogate's anchors): cached in the run folder,
                    self.log(f"{obj.name}: one-time work of the {proxy.name} proxy (cached, resumable)")
                    if hasattr(proxy, "log"):
                        proxy.log = self.log
                    proxy.fit(ctx)  # done by one process of the machine while the others wait for it
        if self.exp.refine is not None:
            ctx = self._quality_context()
            proxy = self._refine_proxy = self._make_refine_proxy()
            if hasattr(proxy, "fit"):
                self.log(f"refine: one-time work of the {proxy.name} proxy (cached, resumable)")
                proxy.fit(ctx)
        return self

    def _prepare_costs(self) -> None:
        """The latency predictors (measuring a profile if asked) and the reference archs' cost values."""
        for obj in self.exp.objectives:
            if obj.kind == "latency" and obj.name not in self._predictors:
                self._predictors[obj.name] = self._predictor(obj)
        for c in self.exp.constraints:
            if c.of and c.of not in self._reference_values:
                ref = load_arch(c.of) if Path(c.of).exists() else get_arch(c.of)
                self._reference_values[c.of] = self.objectives(ref, cheap_only=True)

    def cost_bounds(self) -> dict[str, float]:
        """Each constraint on a cheap objective (parameters, MACs, latency) as ``label -> bound`` in the objective's
        units."""
        self._prepare_costs()
        kinds = {o.name: o.kind for o in self.exp.objectives}
        return {c.label: c.max if c.max is not None else c.max_ratio * self._reference_values[c.of][c.objective]
                for c in self.exp.constraints if kinds[c.objective] != "quality"}

    def cost_label(self) -> str:
        """The cost bounds as text (``label (bound), ...``; empty without any): what names a cache of one-time work
        done under them."""
        return ", ".join(f"{label} ({bound:.6g})" for label, bound in self.cost_bounds().items())

    def feasible(self, arch: UNetArch) -> bool:
        """Whether ``arch`` meets every constraint known before a quality proxy runs: the archs a search can pick,
        and the ones a proxy may spend its one-time work on alone (the supernet's ``train_on: feasible``)."""
        values = self.objectives(arch, cheap_only=True)
        return all(v <= 0 for v in self.constraint_values_partial(values).values())

    def _make_proxy(self, obj: Objective) -> Any:
        from proxies.quality import make_proxy

        try:
            proxy = make_proxy(obj.proxy, **obj.options)
            if hasattr(proxy, "check_space"):  # options naming the space's decisions (the supernet's split)
                proxy.check_space(self.space)
            return proxy
        except ConfigError as exc:
            idx = self.exp.objectives.index(obj)
            raise ConfigError(exc.message, field=f"objectives[{idx}].{exc.field or 'proxy'}") from None

    def _make_refine_proxy(self) -> Any:
        """The proxy ``refine`` scores the finalists with: its own name and options, else the objective's proxy
        with ``refine.options``. Bad options are located under ``refine``."""
        from proxies.quality import PROXIES, make_proxy

        spec, obj = self.exp.refine, self.exp.refined_objective
        if spec.proxy is not None and spec.proxy not in PROXIES:
            raise ConfigError(f"unknown quality proxy {spec.proxy!r} (known: {', '.join(PROXIES)})",
                              field="refine.proxy")
        try:
            proxy = make_proxy(spec.proxy or obj.proxy, **spec.options)
            if hasattr(proxy, "check_space"):
                proxy.check_space(self.space)
            return proxy
        except ConfigError as exc:  # a bad value names its option; an unknown option, the options
            where = exc.field if exc.field and exc.field != "proxy" else None
            raise ConfigError(exc.message, field="refine.options" + (f".{where}" if where else "")) from None

    def refined_quality(self, arch: UNetArch) -> float:
        """The refined objective's value for ``arch`` at the higher fidelity of ``refine`` (after
        :meth:`prepare`)."""
        return float(self._refine_proxy(arch, self._ctx).score)

    def _quality_context(self) -> Any:
        if self._ctx is not None:
            return self._ctx
        from proxies.data import LatentCache, digits_cache
        from proxies.quality import QualityContext
        from proxies.shards import ShardedDataset, is_sharded

        where = self.exp.data if "://" in self.exp.data else self.exp.path(self.exp.data)
        if self.exp.data == "digits":
            data = digits_cache()
        elif is_sharded(where):  # a bounded in-memory slice: proxies score with thousands of items, not millions
            data = ShardedDataset(where).in_memory(train=PROXY_TRAIN_ITEMS, val=PROXY_VAL_ITEMS)
        else:
            data = LatentCache.load(where)
        q = self.exp.quality_context
        ctx = QualityContext(data=data, seed=self.exp.seed, device=self.exp.device, space=self.space,
                             cache_dir=self.exp.run_dir, batch_size=q.batch_size, micro_batch=q.micro_batch,
                             eval_items=q.eval_items, eval_timesteps=q.eval_timesteps,
                             gradient_checkpointing=q.gradient_checkpointing, mixed_precision=q.mixed_precision)
        label = self.cost_label()
        if label:
            ctx.feasible, ctx.feasible_label = self.feasible, label
        if self.exp.teacher is not None:
            ctx.teacher = self._teacher(ctx)
        self._ctx = ctx
        return ctx

    def _teacher(self, ctx: Any) -> torch.nn.Module:
        from proxies.quality.train import train
        from search_spaces.checkpoints import load_unet, save_pretrained

        spec = self.exp.teacher
        if spec.path is not None:
            model = load_unet(self.exp.path(spec.path), subfolder=spec.subfolder, allow_pickle=self.allow_pickle)
            ctx.data.check_compatible(model.arch)
            return model.to(self.exp.device).eval()
        saved = self.exp.run_dir / "teacher"
        if (saved / "config.json").is_file():
            return load_unet(saved).to(self.exp.device).eval()  # written here, as safetensors
        arch = get_arch(spec.arch) if not Path(spec.arch).exists() else load_arch(spec.arch)
        self.log(f"training the teacher {spec.arch} for {spec.train_steps} steps")
        model = ctx.build(arch, seed=self.exp.seed)
        # the teacher's own recipe: batch 64 in fp32 whatever quality_context sets for the proxies
        recipe = replace(ctx, batch_size=64, micro_batch=None, mixed_precision="no")
        train(model, recipe, spec.train_steps, lr=spec.lr, seed=self.exp.seed)
        if not (saved / "config.json").is_file():  # else another worker saved it first
            save_pretrained(model, saved)  # atomic: a crash leaves no half-written teacher to be reused
        return model.eval()

    def _predictor(self, obj: Objective) -> Any:
        from proxies.latency import LatencyProfile, LUTPredictor, Settings

        idx = self.exp.objectives.index(obj)
        resolution = obj.resolution or 8 * self.space.globals.get("sample_size", 64)
        settings = Settings(device=self.exp.device if obj.predictor != "roofline" else "cpu", dtype=obj.dtype,
                            batch=obj.batch, resolution=resolution, text_len=obj.text_len)
        if obj.predictor == "roofline":
            from proxies.latency.roofline import RooflinePredictor, load_spec

            spec = load_spec(obj.spec if not Path(obj.spec).suffix else self.exp.path(obj.spec))
            return RooflinePredictor(spec, settings)
        path = self.exp.path(obj.profile)
        if not path.is_file() and not obj.measure_if_missing:
            from proxies.latency.profile import find_profile

            try:
                path = find_profile(obj.profile)
            except ConfigError as exc:
                raise ConfigError(f"{exc.message} (or set measure_if_missing: true to measure it here)",
                                  field=f"objectives[{idx}].profile") from None
        if not path.is_file() or (obj.measure_if_missing and not LatencyProfile.load(path).complete):
            if not obj.measure_if_missing:
                raise ConfigError(f"profile {path} not found (set measure_if_missing: true to measure it here)",
                                  field=f"objectives[{idx}].profile")
            from proxies.latency.profiler import run_profile

            self.log(f"measuring latency profile {path} on {settings.device} (resumable)")
            refs = [get_arch(r) for r in {*self.exp.references, *(c.of for c in self.exp.constraints if c.of)}
                    if not Path(r).exists()]
            run_profile(self.space, settings, path, space_label=str(self.exp.space), calibration=8,
                        seed=self.exp.seed, extra_archs=refs)
        profile = LatencyProfile.load(path)
        if obj.predictor == "lut":
            return LUTPredictor(profile, settings)
        from proxies.latency.learned import LearnedPredictor

        profile.check_settings(settings)
        return LearnedPredictor.from_profile(profile, space=self.space)

    # ---- scoring ---------------------------------------------------------------------------------------------

    def predictor(self, name: str) -> Any:
        """The latency predictor of objective ``name`` (after :meth:`prepare`)."""
        return self._predictors[name]

    def proxy(self, name: str) -> Any:
        """The quality proxy of objective ``name`` (after :meth:`prepare`)."""
        return self._proxies[name]

    def objectives(self, arch: UNetArch, cheap_only: bool = False,
                   report: Callable[[str, int, float], bool] | None = None) -> dict[str, float]:
        """Objective values; ``cheap_only`` skips quality proxies (for reference archs and pre-filtering).
        ``report(objective, step, value)`` receives a training proxy's intermediate values (for ASHA); if it
        returns True the proxy stops early."""
        out: dict[str, float] = {}
        for obj in self.exp.objectives:
            if obj.kind == "params":
                out[obj.name] = float(arch_costs(arch).params)
            elif obj.kind == "macs":
                res = obj.resolution
                out[obj.name] = float(arch_costs(arch, obj.batch, res, obj.text_len).macs)
            elif obj.kind == "latency":
                out[obj.name] = float(self._predictors[obj.name].predict(arch))
            elif not cheap_only:
                hook = None if report is None else (lambda step, value, name=obj.name: report(name, step, value))
                out[obj.name] = float(self._proxies[obj.name](arch, self._ctx, hook).score)
        return out

    def constraint_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each constraint as ``value - bound`` (<= 0 is feasible), keyed by the constraint's label."""
        missing = [c.objective for c in self.exp.constraints if c.objective not in values]
        if missing:
            raise KeyError(f"no value for constrained objective {missing[0]}")
        return self.constraint_values_partial(values)

    def constraint_values_partial(self, values: dict[str, float]) -> dict[str, float]:
        """The constraints whose objective is in ``values`` (e.g. the cheap ones before a quality proxy runs)."""
        out = {}
        for c in self.exp.constraints:
            if c.objective not in values:
                continue
            bound = c.max if c.max is not None else c.max_ratio * self._reference_values[c.of][c.objective]
            out[c.label] = values[c.objective] - bound
        return out

    def __call__(self, arch: UNetArch, report: Callable[[str, int, float], bool] | None = None) -> Evaluation:
        start = time.perf_counter()
        values = self.objectives(arch, report=report)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"objective {bad[0]} is {values[bad[0]]}")
        return Evaluation(values, self.constraint_values(values), time.perf_counter() - start)

    @property
    def reference_values(self) -> dict[str, dict[str, float]]:
        return self._reference_values

    def reference_objectives(self) -> dict[str, dict[str, float]]:
        """Cheap objective values of the experiment's reference archs (for plots and reports)."""
        out = {}
        for name in self.exp.references:
            try:
                arch = get_arch(name)
                out[name] = self.objectives(arch, cheap_only=True)
            except ConfigError as exc:  # e.g. a profile that lacks a reference's blocks: report, don't crash
                self.log(f"reference {name} not placed: {exc}")
        return out
