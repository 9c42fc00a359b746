"""The experiment file: one YAML that says what to search, for what, how long and where.

Validated with pydantic (unknown keys are errors); every problem becomes one :class:`ConfigError` naming the
file, the field path and the line. Relative paths inside the file are relative to the file.

```yaml
name: quickstart
seed: 0
space: ../search_spaces/spaces/digits.yaml     # a file, or the space mapping inline
teacher: {arch: digits, train_steps: 300}      # or {path: /models/sd15, subfolder: unet}
data: digits                                   # or a cache folder or sharded dataset (`unet-nas data precompute`)
objectives:
  - {name: quality, kind: quality, proxy: distill, options: {steps: 10}}
  - {name: latency_cpu, kind: latency, predictor: lut, profile: cpu.yaml, measure_if_missing: true,
     resolution: 64, batch: 2, text_len: 8}
  - {name: params, kind: params}
constraints:
  - {objective: params, max: 400000}
  - {objective: latency_cpu, max_ratio: 0.8, of: digits}
strategy: {name: nsga2, population: 8}
budget: {trials: 24, wall_time: 300}
backend: optuna
references: [digits]
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nas.redaction import remember
from search_spaces import ConfigError
from search_spaces.yamlio import read_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherSpec(_Strict):
    """A teacher for inheritance and distillation: a reference arch trained here on the data (CPU-sized only),
    or a local diffusers folder (UNet2DConditionModel or FlexibleUNet)."""

    arch: str | None = None
    train_steps: int = Field(300, ge=1)
    lr: float = Field(2e-3, gt=0)
    path: str | None = None
    subfolder: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.arch is None) == (self.path is None):
            raise ValueError("give exactly one of arch (train it here) or path (a local diffusers folder)")
        return self


class QualityContextSpec(_Strict):
    """How quality proxies train and evaluate (one context per run, shared by every quality objective). The
    defaults suit the CPU benchmarks; an SD-sized search needs smaller batches and bf16: at batch 8 with bf16
    autocast a distillation step of a DeciDiffusion-1.0-sized student beside the SD1.5 teacher peaks at 21 GiB on
    an H200 (``benchmarks/proxy_cost_sd.py``), and the evaluation over 256 items at 27 GiB."""

    batch_size: int = Field(64, ge=1, description="items per training step of a proxy")
    micro_batch: int | None = Field(None, ge=1, description="split each batch (gradients accumulate) to bound memory")
    eval_items: int = Field(256, ge=1, description="held-out items a proxy scores on")
    eval_timesteps: int = Field(10, ge=1, description="timesteps of the held-out evaluation grid")
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16"] = "no"


class Objective(_Strict):
    """One objective. ``kind`` decides which other fields apply; all objectives are minimised."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["quality", "latency", "params", "macs"]
    # quality
    proxy: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    # latency
    predictor: Literal["lut", "roofline", "learned"] | None = None
    profile: str | None = None
    spec: str | None = None
    measure_if_missing: bool = False
    # latency and macs shapes (latency: image pixels; macs: latent size)
    batch: int = Field(2, ge=1)
    resolution: int | None = Field(None, ge=1)
    text_len: int = Field(77, ge=1)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Objective:
        if self.kind == "quality" and not self.proxy:
            raise ValueError("a quality objective needs proxy (grad_norm, snip, synflow, jacob_cov, distill, "
                             "short_train, surrogate, supernet)")
        if self.kind == "latency":
            if self.predictor is None:
                raise ValueError("a latency objective needs predictor: lut, roofline or learned")
            if self.predictor in ("lut", "learned") and not self.profile:
                raise ValueError(f"the {self.predictor} predictor needs a measured profile")
            if self.predictor == "roofline" and not self.spec:
                raise ValueError("the roofline predictor needs spec (a device spec name or file)")
        return self


class Constraint(_Strict):
    """``objective <= max``, or ``objective <= max_ratio x`` its value for a reference arch (``of``)."""

    objective: str
    max: float | None = None
    max_ratio: float | None = Field(None, gt=0)
    of: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _bound(self) -> Constraint:
        if (self.max is None) == (self.max_ratio is None):
            raise ValueError("give exactly one of max or max_ratio (with of: a reference arch)")
        if self.max_ratio is not None and not self.of:
            raise ValueError("max_ratio needs of: the reference arch it is relative to")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return (f"{self.objective}_le_{self.max:g}" if self.max is not None
                else f"{self.objective}_le_{self.max_ratio:g}x_{self.of}")


class Strategy(_Strict):
    name: Literal["nsga2", "tpe", "random", "evolution"] = "nsga2"
    population: int = Field(16, ge=2)
    prefilter: int = Field(8, ge=1, description="evolution: candidates generated per proposal, best kept by cost")


class Budget(_Strict):
    trials: int = Field(ge=1)
    wall_time: float | None = Field(None, gt=0, description="seconds")


class AshaOptions(_Strict):
    """ASHA early stopping on the short_train proxy's held-out loss; both counts are training steps."""

    grace_period: int = Field(10, ge=1, description="training steps every trial runs before it may be stopped")
    reduction_factor: float = Field(2, gt=1, description="keep the best 1/reduction_factor at each rung")


class RayOptions(_Strict):
    address: str | None = None  # None: a local Ray on 127.0.0.1; "auto" or "host:port" to join a cluster
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    max_concurrent: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    # keep a worker process for the next trial (Ray Tune's reuse_actors): its imports and prepared evaluator
    # (teacher, profile) stay loaded; a worker whose trial failed or could not stop in time is never reused
    reuse_actors: bool = True
    asha: AshaOptions | None = None  # needs a short_train quality objective


class RefineSpec(_Strict):
    """Train the search's finalists again at a higher fidelity once the budget is spent.

    A short proxy orders archs by how they look after a few steps, and an arch whose inheritance breaks can look
    worse there than where training ends (``benchmarks/search_quality.py``: on one of three 64-arch tables every
    16-20-step proxy missed 8% of the true front's hypervolume, and training the first two Pareto layers to the
    ground truth recovered it). So the first ``layers`` non-dominated layers of the feasible trials are scored
    again with ``proxy`` and ``options`` (by default the objective's own proxy, with these options), and the
    report's refined front and ``best/refined.yaml`` use those values."""

    objective: str | None = Field(None, description="the quality objective to refine (default: the first one)")
    proxy: str | None = Field(None, description="the higher-fidelity proxy (default: the objective's proxy)")
    options: dict[str, Any] = Field(default_factory=dict, description="its options, e.g. {steps: 200}")
    layers: int = Field(2, ge=1, description="non-dominated layers of the feasible trials to refine")
    max_archs: int | None = Field(None, ge=1, description="refine at most this many archs (first layers first)")


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    space: str | dict[str, Any]
    objectives: list[Objective] = Field(min_length=1)
    constraints: list[Constraint] = Field(default_factory=list)
    strategy: Strategy = Field(default_factory=Strategy)
    budget: Budget
    backend: Literal["optuna", "ray"] = "optuna"
    storage: str | dict[str, str] | None = None
    data: str | None = None
    teacher: TeacherSpec | None = None
    quality_context: QualityContextSpec = Field(default_factory=QualityContextSpec)
    device: str = "cpu"
    references: list[str] = Field(default_factory=list)
    ray: RayOptions = Field(default_factory=RayOptions)
    output_dir: str = "runs"
    heartbeat_interval: int = Field(10, ge=1, description="seconds between a running trial's heartbeats")
    heartbeat_grace: int = Field(30, ge=2, description="a trial silent this long belongs to a dead worker")
    max_retries: int = Field(2, ge=0, description="retries of a trial whose worker died")
    refine: RefineSpec | None = None

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: Any) -> Any:
        if isinstance(v, dict) and (set(v) - {"env", "file"} or len(v) != 1):
            raise ValueError("storage must be a URL, {env: VARIABLE} or {file: path}")
        return v

    def cross_check(self) -> None:
        """Checks across fields, each naming the exact field (pydantic's model validators cannot)."""
        names = [o.name for o in self.objectives]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"objective name {name!r} is used twice", field=f"objectives[{i}].name")
        for i, c in enumerate(self.constraints):
            if c.objective not in names:
                raise ConfigError(f"unknown objective {c.objective!r} (objectives: {', '.join(names)})",
                                  field=f"constraints[{i}].objective")
        if self.heartbeat_grace <= self.heartbeat_interval:  # else live trials would be failed as stale
            raise ConfigError(f"must be longer than heartbeat_interval ({self.heartbeat_interval} s)",
                              field="heartbeat_grace")
        if self.backend == "ray" and self.ray.asha is not None and not any(
                o.kind == "quality" and o.proxy == "short_train" for o in self.objectives):
            raise ConfigError("ASHA stops trials on a short_train quality objective's intermediate loss; add one "
                              "or remove ray.asha", field="ray.asha")
        if self.refine is not None:
            quality = [o.name for o in self.objectives if o.kind == "quality"]
            if not quality:
                raise ConfigError("refine retrains a quality objective; this experiment has none", field="refine")
            if self.refine.objective is not None and self.refine.objective not in quality:
                raise ConfigError(f"{self.refine.objective!r} is not a quality objective (quality objectives: "
                                  f"{', '.join(quality)})", field="refine.objective")
        for i, o in enumerate(self.objectives):
            if o.kind == "quality" and self.data is None:
                raise ConfigError("a quality objective needs data: digits, a cache folder or a sharded dataset",
                                  field=f"objectives[{i}]")

    # ---- derived -------------------------------------------------------------------------------------------

    base_dir: str = "."

    def path(self, value: str) -> Path:
        """A path from the file: relative to the file's folder, or to the run folder with ``{run_dir}/...``."""
        if value.startswith("{run_dir}"):
            return self.run_dir / value.removeprefix("{run_dir}").lstrip("/")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else Path(self.base_dir) / p

    @property
    def refined_objective(self) -> Objective | None:
        """The quality objective ``refine`` retrains, or None without ``refine``."""
        if self.refine is None:
            return None
        name = self.refine.objective
        return next(o for o in self.objectives if o.kind == "quality" and (name is None or o.name == name))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def storage_url(self, override: str | None = None) -> str:
        """The Optuna storage URL: ``--storage``, the file's ``storage`` (a URL, or read from an environment
        variable or a file so that a password never sits in the experiment file), or SQLite in the run folder.
        The URL's password is remembered so that nothing the process prints, logs or writes shows it."""
        url = self._resolve_storage(override)
        remember(url)
        return url

    def _resolve_storage(self, override: str | None) -> str:
        value = override if override is not None else self.storage
        if value is None:
            return f"sqlite:///{(self.run_dir / 'study.db').resolve()}"
        if isinstance(value, dict):
            if "env" in value:
                url = os.environ.get(value["env"])
                if not url:
                    raise ConfigError(f"environment variable {value['env']} is not set", field="storage.env")
                return url
            try:
                return self.path(value["file"]).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the storage URL file: {exc.strerror}", field="storage.file") from None
        return value


def run_storage_url(exp: Experiment, override: str | None, saved: str | os.PathLike) -> str:
    """The storage of a finished run (``unet-nas report``, ``export``), found the way ``search`` finds it:
    ``--storage``, else the saved experiment's ``storage`` (``{env: VARIABLE}`` and ``{file: path}`` read
    now, a URL as saved), else the run's ``study.db``. A URL was saved with its password masked: then the
    error asks for ``--storage`` or, better, ``{env: ...}`` (a password on the command line ends up in the
    shell history and the process list)."""
    try:
        url = exp.storage_url(override)
    except ConfigError as exc:
        raise exc.located(str(saved), read_file(saved)[1]) from None
    if override is None and isinstance(exp.storage, str) and ":***@" in url:
        raise ConfigError("this run's storage URL was saved with its password masked: set the password through "
                          "the experiment's storage: {env: VARIABLE} (or {file: path}), or pass --storage",
                          field="storage").located(str(saved), read_file(saved)[1])
    return url


def load_experiment(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and validate an experiment file; one ConfigError naming file, field and line on any problem."""
    data, lines = read_file(path)
    if not isinstance(data, dict):
        raise ConfigError("an experiment must be a mapping", source=str(path), line=1)
    data = {**data, **(overrides or {})}
    data.setdefault("base_dir", str(Path(path).parent))
    try:
        exp = Experiment.model_validate(data)
        exp.cross_check()
        return exp
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        raise ConfigError(message, field=field).located(str(path), lines) from None
    except ConfigError as exc:
        raise exc.located(str(path), lines) from None


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after",) or str(part).startswith(("function-", "literal[")):
            continue
        else:
            out = f"{out}.{part}" if out else str(part)
    return out
