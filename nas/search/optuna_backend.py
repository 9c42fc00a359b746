"""The local search: an Optuna study (SQLite in the run folder by default, any RDB URL for many workers).

The study is the single source of truth: every trial's arch, objective values, constraint values, failure
reason and timing live in it, so ``--resume``, extra workers on other hosts and ``unet-nas report`` all read the
same place.

* Archs are suggested define-by-run, one ``suggest_categorical`` per applicable space decision, so the
  parameters read naturally in optuna-dashboard (``down[1].attentions = 2``).
* Failures (an exception, NaN, running out of memory) are recorded as FAIL with the reason in the trial's
  ``error`` attribute, and the search goes on.
* Constraints are stored on each trial where Optuna reads them (the ``constraints`` system attribute: a list,
  <= 0 is feasible, in the order of the study's ``constraints`` user attribute), for the samplers' constraint
  handling, never as a penalty. Optuna 5 reads the list as well as its newer per-key form, while
  optuna-dashboard (0.21) and Optuna 4's samplers read only the list; ``best_trials`` then skips infeasible ones.
* Several workers sample from distinct seeds and never evaluate one arch twice (see :mod:`.workers`).
* Heartbeats: a trial whose worker died (``kill -9``, a lost node) is marked FAIL once its heartbeat is stale,
  or at once when its worker is provably gone (same host, no such process), and retried with the same arch.
* The budget counts finished trials of all workers (completed, pruned, and failed by their own error; a
  crashed worker's trial is retried, not counted twice).
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from nas.experiment import Experiment
from nas.redaction import scrub
from search_spaces import ConfigError, UNetArch
from search_spaces.space import SearchSpace

from .objectives import Evaluator
from .picklable import NSGAIISampler
from .workers import RetryLostTrial, claim_arch, fail_dead_trials, mark_worker, twin, worker_seed

CONSTRAINTS_KEY = "constraints"  # optuna.study._constrained_optimization._CONSTRAINTS_KEY (a list of floats)

# failures are recorded in the study (and trials.csv, summary.md); Optuna's per-trial warnings with tracebacks
# would only bury the progress bar
optuna.logging.set_verbosity(optuna.logging.ERROR)


# ---- archs <-> trials ------------------------------------------------------------------------------------------


def suggest_arch(space: SearchSpace, trial: Trial) -> UNetArch:
    """Ask the trial for every applicable decision of the space, in order, and decode the arch."""
    values: dict[str, Any] = {}
    idx: list[int] = []
    for d in space.decisions:
        if space.applies(d.name, values):
            value = trial.suggest_categorical(d.name, list(d.choices))
            values[d.name] = value
            idx.append(d.choices.index(value))
        else:
            idx.append(-1)
    return space.decode(idx)


def arch_params(space: SearchSpace, arch: UNetArch) -> dict[str, Any]:
    """The trial parameters that make ``suggest_arch`` return ``arch`` (for ``study.enqueue_trial``)."""
    return {d.name: d.choices[k] for d, k in zip(space.decisions, space.encode(arch), strict=True) if k >= 0}


# ---- storage and study -----------------------------------------------------------------------------------------


def with_driver(url: str) -> str:
    """A ``postgresql://`` URL without a driver, pointed at the installed one. SQLAlchemy 2.1 maps a bare
    ``postgresql://`` to psycopg 3, while the ``postgres`` extra installs psycopg2: without this, the URL every
    PostgreSQL guide shows would fail with an ImportError although a working driver is installed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{module}://{rest}"
    return url


def make_storage(url: str, exp: Experiment) -> RDBStorage:
    url = with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers share one file
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna; we rely on them knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryLostTrial(max_retry=exp.max_retries)
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=exp.heartbeat_interval,
                                 grace_period=exp.heartbeat_grace, heartbeat_stale_trial_callback=retry)
    except Exception as exc:  # sqlalchemy raises many types for a bad URL or an unreachable server
        from nas.report import redact

        hint = " (install a driver: pip install 'unet-nas[postgres]')" if isinstance(exc, ImportError) else ""
        raise ConfigError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                          f"{hint}", field="storage") from None
    if url.startswith("sqlite"):
        serialize_sqlite(storage.engine)
    return storage


def serialize_sqlite(engine: Any) -> None:
    """Make every transaction on a SQLite study ``BEGIN IMMEDIATE``: it takes the write lock before it reads.

    Optuna hands a queued (WAITING) trial to one worker by reading its state and setting it RUNNING in one
    transaction with ``SELECT ... FOR UPDATE``, which SQLite ignores. With pysqlite's deferred transactions two
    local workers could both read WAITING and both take the trial: both evaluated it and the second to finish
    died on "Cannot tell a COMPLETE trial" (seen with the evolution strategy's queued children and ``refine``'s
    queued finalists, whose trials are all queued). Serialising the transactions makes the read and the write
    one step, as PostgreSQL's row lock does; the SQLAlchemy recipe for pysqlite (its own BEGIN switched off)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections opened while the storage set itself up get the hooks too


def make_sampler(exp: Experiment, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The strategy's sampler, seeded with ``seed`` (a worker's, see :func:`.workers.worker_seed`; default the
    experiment's). Constraints reach NSGA-II and TPE through the trials' ``constraints`` system attribute."""
    s = exp.strategy
    seed = exp.seed if seed is None else seed
    if s.name == "nsga2":
        return NSGAIISampler(population_size=s.population, seed=seed)  # picklable for Ray (Optuna >= 5.1)
    if s.name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              n_startup_trials=min(10, max(2, exp.budget.trials // 3)))
    # random, and the evolutionary strategy, which draws its first population at random and then enqueues
    # cost-model-filtered children (see Evolution)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(exp: Experiment, storage: RDBStorage, resume: bool, seed: int | None = None) -> optuna.Study:
    directions = ["minimize"] * len(exp.objectives)
    if resume:
        try:
            study = optuna.load_study(study_name=exp.name, storage=storage, sampler=make_sampler(exp, seed))
        except KeyError:
            raise ConfigError(f"no study {exp.name!r} to resume in this storage", field="name") from None
        if len(study.directions) != len(directions):
            raise ConfigError(f"the stored study has {len(study.directions)} objectives, the file "
                              f"{len(directions)}", field="objectives")
        return study
    try:
        study = optuna.create_study(study_name=exp.name, storage=storage, directions=directions,
                                    sampler=make_sampler(exp, seed))
    except optuna.exceptions.DuplicatedStudyError:
        raise ConfigError(f"a study named {exp.name!r} already exists: pass --resume to continue it, or rename "
                          "the experiment", field="name") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in exp.objectives])
    study.set_user_attr("objectives", [o.name for o in exp.objectives])
    study.set_user_attr("constraints", [c.label for c in exp.constraints])
    return study


def counted(study: optuna.Study) -> int:
    """Finished trials that use up the budget (a crashed worker's trial is retried instead)."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        own_failure = t.state == TrialState.FAIL and "error" in t.user_attrs
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or own_failure:
            n += 1
    return n


# ---- the evolutionary strategy ---------------------------------------------------------------------------------


class Evolution:
    """Mutation and crossover of the feasible Pareto set; each proposal generates ``prefilter`` children and
    keeps the one the cheap objectives (params, MACs, predicted latency) rank best, SnapFusion/OFA style:
    the expensive quality proxy only runs on candidates that already look good on cost."""

    def __init__(self, exp: Experiment, space: SearchSpace, evaluator: Evaluator, seed: int | None = None):
        self.exp, self.space, self.evaluator = exp, space, evaluator
        self.rng = random.Random(exp.seed if seed is None else seed)  # a worker's own seed: workers differ

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if len(done) < self.exp.strategy.population or waiting:
            return
        from nas.report import pareto_indices

        feasible = [t for t in done if t.user_attrs.get("feasible", True)] or done
        front = [feasible[i] for i in pareto_indices([t.values for t in feasible])]
        parents = [UNetArch.from_dict(t.user_attrs["arch"]) for t in front]
        seen = {UNetArch.from_dict(t.user_attrs["arch"]) for t in done}
        candidates = []
        for _ in range(self.exp.strategy.prefilter * 4):
            a = self.rng.choice(parents)
            child = (self.space.crossover(a, self.rng.choice(parents), self.rng) if self.rng.random() < 0.5
                     else self.space.mutate(a, self.rng))
            if child not in seen and child not in candidates:
                candidates.append(child)
            if len(candidates) >= self.exp.strategy.prefilter:
                break
        if not candidates:
            return
        scored = []
        for c in candidates:
            cheap = self.evaluator.objectives(c, cheap_only=True)
            violation = sum(max(0.0, v) for k, v in self.evaluator.constraint_values_partial(cheap).items())
            scored.append((violation, tuple(cheap.values()), c))
        scored.sort(key=lambda s: (s[0], s[1]))
        study.enqueue_trial(arch_params(self.space, scored[0][2]), skip_if_exists=True)


# ---- running ---------------------------------------------------------------------------------------------------


def record_constraints(trial: Trial, constraints: dict[str, float]) -> None:
    """The constraint values (``value - bound``, <= 0 feasible) where Optuna's samplers, ``best_trials`` and
    optuna-dashboard read them, and by label in the ``constraints`` user attribute for the report."""
    trial.set_user_attr("constraints", constraints)
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_KEY, [float(v) for v in constraints.values()])
    trial.set_user_attr("feasible", all(v <= 0 for v in constraints.values()))


def record_arch(trial: Trial, arch: UNetArch) -> None:
    """The arch in the trial's user attributes, where the report, a retry and a twin read it."""
    trial.set_user_attr("arch", arch.to_dict())
    trial.set_user_attr("arch_summary", str(arch).split("(", 1)[1].rstrip(")"))


def take_arch(space: SearchSpace, trial: Trial) -> tuple[UNetArch, FrozenTrial | None]:
    """Start a trial: record its worker, suggest and record its arch, claim it, and wait for a twin that claimed it
    first. Returns the arch and the COMPLETE twin whose result to reuse, or None to evaluate it here."""
    # which process ran it: with several workers or hosts, a lost or doubled trial can be traced, and a dead
    # worker's trial failed at once
    mark_worker(trial)
    arch = suggest_arch(space, trial)
    record_arch(trial, arch)
    claim_arch(trial)

    def waiting(other: FrozenTrial) -> None:
        if trial.user_attrs.get("waited_for") != other.number:
            trial.set_user_attr("waited_for", other.number)  # another worker is evaluating this arch
        fail_dead_trials(trial.study)  # the one waited for may belong to a worker that died meanwhile

    return arch, twin(trial, waiting)


def make_objective(exp: Experiment, evaluator: Evaluator) -> Callable[[Trial], tuple[float, ...]]:
    names = [o.name for o in exp.objectives]

    def objective(trial: Trial) -> tuple[float, ...]:
        arch, previous = take_arch(evaluator.space, trial)
        try:
            if previous is not None:
                values = dict(zip(names, previous.values, strict=True))
                ev_constraints = previous.user_attrs.get("constraints", {})
                trial.set_user_attr("duplicate_of", previous.number)
                seconds = 0.0
            else:
                ev = evaluator(arch)
                values, ev_constraints, seconds = ev.values, ev.constraints, ev.seconds
            bad = [n for n in names if not math.isfinite(values[n])]
            if bad:
                raise FloatingPointError(f"objective {bad[0]} is {values[bad[0]]}")
        except Exception as exc:
            trial.set_user_attr("error", scrub(f"{type(exc).__name__}: {exc}")[:500])
            raise
        record_constraints(trial, ev_constraints)
        trial.set_user_attr("seconds", seconds)
        return tuple(values[n] for n in names)

    return objective


def _same_arch(trial: Trial) -> FrozenTrial | None:
    """A completed trial with the same parameters: its values are reused instead of re-running the proxy."""
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params:
            return t
    return None


def run_worker(exp: Experiment, evaluator: Evaluator, storage_url: str, resume: bool,
               on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None, worker: str | None = None,
               log: Callable[[str], Any] | None = None) -> optuna.Study:
    """Run trials until the budget (all workers together) or the wall time is used up.

    ``worker`` names this worker for its sampler seed (:func:`.workers.worker_seed`): ``"0"`` for the one that
    created the study (the default without ``resume``), an index for the local ``--workers`` processes, else
    ``host:pid`` (the default with ``resume``). Before the first
    trial the RUNNING trials of provably dead workers are failed and retried; ``log`` receives one line about
    each, and one about the RUNNING trials left to their (maybe live) workers."""
    storage = make_storage(storage_url, exp)
    if worker is None:  # the worker that creates the study keeps the experiment's seed; one that joins, its own
        worker = f"{socket.gethostname()}:{os.getpid()}" if resume else "0"
    seed = worker_seed(exp.seed, worker)
    study = open_study(exp, storage, resume, seed)
    left = fail_dead_trials(study, log)
    if left is not None and log is not None:
        log(left)
    start = time.monotonic()
    budget = exp.budget

    def stop_when_spent(study: optuna.Study, trial: FrozenTrial) -> None:
        if counted(study) >= budget.trials:
            study.stop()
        if budget.wall_time is not None and time.monotonic() - start >= budget.wall_time:
            study.stop()

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [stop_when_spent]
    if exp.strategy.name == "evolution":
        callbacks.insert(0, Evolution(exp, evaluator.space, evaluator, seed))
    if on_trial is not None:
        callbacks.append(on_trial)
    # trials that do not count (a dead worker's, retried) leave budget over after n_trials: go round again
    for _ in range(1 + exp.max_retries):
        remaining = budget.trials - counted(study)
        left_s = None if budget.wall_time is None else budget.wall_time - (time.monotonic() - start)
        if remaining <= 0 or (left_s is not None and left_s <= 0):
            break
        study.optimize(make_objective(exp, evaluator), n_trials=remaining, timeout=left_s, catch=(Exception,),
                       callbacks=callbacks, gc_after_trial=False)
    return study
