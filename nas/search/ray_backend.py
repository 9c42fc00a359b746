"""The cluster search: Ray Tune runs the trials, Optuna (through Ray's ``OptunaSearch``) suggests them.

The Optuna study stays the single source of truth, exactly as with the local backend: ``OptunaSearch`` is given
the experiment's storage and study name, so every trial lands in ``runs/<name>/study.db`` (or ``--storage``)
with the same parameters and user attributes (``arch``, ``arch_summary``, ``constraints``, ``feasible``,
``seconds``, ``error``, ``duplicate_of``) and ``unet-nas report`` works unchanged.

How it fits together (all storage writes happen on the driver, so only the driver needs the storage):

* ``_DefineByRun`` is the define-by-run space: one ``suggest_categorical`` per applicable decision
  (``suggest_arch``); it returns the decoded arch and the Optuna trial id as constants in the Tune config, so a
  worker needs neither the space nor the study. A re-suggested arch carries its earlier values instead.
* ``_trainable`` (:mod:`.ray_worker`) runs on a worker with ``tune.with_resources`` (CPUs, GPUs, fractions allowed).
  It reports the objective values, the constraint values (JSON) and ``nas_final``; a short_train proxy also reports
  its held-out loss every ``eval_every`` steps (``nas_step``) for ASHA.
* ``_StudySearch`` (an ``OptunaSearch``) sets the user attributes and ``trial.set_constraint`` before telling
  Optuna, so constraints reach NSGA-II/TPE as in the local backend. A trial that ASHA (or the wall time)
  stopped before its final report is told PRUNED, with ``stopped_at`` = the last step reported.
* ``_StudyCallback`` records errors: Ray calls the searcher's ``on_trial_complete(error=True)`` without the
  exception, and plain ``OptunaSearch`` would tell FAIL with no reason (after which Optuna refuses new user
  attributes). So the searcher leaves an errored trial RUNNING and the callback, which Ray calls right after
  with the ``Trial`` object, writes ``error`` (the exception's type and message) and then FAIL.

* With ``refine``, the finalists are refined as Ray tasks with the trials' resources once the search is done
  (:mod:`.ray_refine`), the driver again the only one writing to the storage.

Known limits (also in the README, "Searching on a Ray cluster"):

* Optuna heartbeats do not apply: trials are created by ``study.ask()`` on the driver and no heartbeat thread
  runs. A lost worker or node is handled by Ray instead: ``FailureConfig(max_failures)`` restarts the trial
  (from scratch: trials do not checkpoint). Ray retries every failure, so a trial that raises
  deterministically runs ``1 + max_failures`` times before it is recorded FAIL.
* ASHA is single-metric: with several objectives it stops trials on the quality objective (the short_train
  held-out loss) alone, however good their latency or size. Stopped trials are PRUNED, not COMPLETE, so a
  half-trained loss never enters the Pareto front.
* ``OptunaSearch`` ignores intermediate results for multi-objective studies (Optuna has no multi-objective
  ``report``/pruning) and uses Optuna's ``NopPruner``: early stopping is ASHA's job only. It has no constraint
  support of its own; constraints work because this module sets them on the trial before ``tell``.
* One Ray driver per study. ``--resume`` does not restore Ray's own experiment (``Tuner.restore`` re-runs
  the trials Ray had not checkpointed as finished, COMPLETE ones included): the study is the record. The
  trials the killed driver left RUNNING are marked FAIL with ``lost`` (not counted against the budget) and
  retried with the same arch (up to ``max_retries``, as a dead worker's trial in the local backend), then a new
  Tune run under ``runs/<name>/ray/`` takes the budget still left, queued retries first.
* Where a trial ran and what it survived is in its user attributes: ``node`` (Ray node id), ``host`` and
  ``pid`` (worker process) of the attempt that finished it, ``restarts`` and ``restart_reasons`` when Ray
  restarted it after a failure (a node lost, a worker killed); ``summary.md`` lists them under "Restarted
  trials".
* Every node must see the repository and the run folder at the same absolute path (a shared filesystem), as
  workers load the teacher and latency profile the driver prepared there. Ray pickles the searcher into
  ``runs/<name>/ray/``; its storage pickles with the URL redacted (``_PrivateRDBStorage``) and the driver finds
  the real URL again on restore, so no password is written there.
* The wall-time budget stops running trials (they become PRUNED); the local backend lets the last trial finish.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from nas.experiment import Experiment
from search_spaces import ConfigError
from search_spaces.space import SearchSpace
from search_spaces.yamlio import dump_yaml

from .objectives import Evaluator
from .optuna_backend import (
    Evolution,
    _same_arch,
    counted,
    make_sampler,
    open_study,
    record_constraints,
    suggest_arch,
    with_driver,
)
from .picklable import check_picklable
from .ray_connect import _connect, _disconnect
from .ray_worker import _trainable
from .tested import untested

REDRAWS = 20  # draws of a trial whose arch a running trial is evaluating, before it is evaluated again
# Driver-side objects (evaluator, storage, log) per experiment name. Ray pickles the searcher and callbacks
# into its experiment state for Tuner.restore, so they look these up by name instead of holding them.
_DRIVER: dict[str, dict[str, Any]] = {}


# ---- driver -----------------------------------------------------------------------------------------------------


def run_ray(exp: Experiment, file: str | Path, storage_url: str, resume: bool,
            log: Callable[[str], Any] = print, allow_pickle: bool = False) -> optuna.Study:
    """Run the experiment's search on Ray (joining ``ray.address`` or starting Ray on 127.0.0.1) and return the
    Optuna study holding its trials. ``allow_pickle`` lets the driver and the workers read a pickle teacher
    checkpoint (``--allow-pickle``; see :mod:`search_spaces.checkpoints`)."""
    from ray import tune

    quality = _asha_objective(exp)
    exp = exp.model_copy(update={"output_dir": str(Path(exp.output_dir).resolve()),
                                 "base_dir": str(Path(exp.base_dir).resolve())})  # workers run elsewhere
    for problem in untested():
        log(f"warning: {problem}; if this search fails, install the tested releases: pip install -c constraints.txt")
    evaluator = Evaluator(exp, log=log, allow_pickle=allow_pickle).prepare()  # teacher and profile once
    check_picklable(make_sampler(exp), exp.strategy.name)
    ray_dir = exp.run_dir / "ray"
    started = time.monotonic()
    # Ray first, the study after: a Ray that cannot start must not leave an empty study that refuses a re-run
    _connect(exp, log)
    try:
        storage = _storage(storage_url)
        study = open_study(exp, storage, resume)
        if resume and exp.refine is not None:  # refined at another fidelity: refuse before the search goes on
            from .refine import check_fidelity, load_refine_study

            check_fidelity(exp, load_refine_study(exp, storage))
        _save_experiment(exp)
        _DRIVER[exp.name] = {"evaluator": evaluator, "storage": storage, "log": log,
                             "evolution": Evolution(exp, evaluator.space, evaluator)
                             if exp.strategy.name == "evolution" else None}
        # workers never touch the storage (only the driver writes to it): they get the experiment without it
        exp_data = {**exp.model_dump(), "storage": None}
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, exp_data=exp_data, allow_pickle=allow_pickle),
            {"cpu": exp.ray.cpus_per_trial, "gpu": exp.ray.gpus_per_trial})
        previous = sorted(ray_dir.glob("search_*")) if ray_dir.is_dir() else []
        if resume:
            _fail_orphans(study, started, exp.max_retries, log)
        remaining = exp.budget.trials - counted(study)
        left = None if exp.budget.wall_time is None else exp.budget.wall_time - (time.monotonic() - started)
        if remaining > 0 and (left is None or left > 0):
            log(f"Ray: {remaining} trials, {exp.ray.cpus_per_trial:g} CPU / {exp.ray.gpus_per_trial:g} GPU each, "
                f"at most {exp.ray.max_concurrent} at once" + (f", ASHA on {quality}" if quality else ""))
            _tuner(exp, evaluator, storage, trainable, ray_dir, f"search_{len(previous):03d}", remaining, left,
                   quality).fit()
        if exp.refine is not None:  # the finalists, as Ray tasks, while Ray is still connected
            from .ray_refine import refine_on_ray

            refine_on_ray(exp, evaluator, storage, exp_data, started, log, allow_pickle,
                          _fail_orphans if resume else None)
    finally:
        _DRIVER.pop(exp.name, None)
        _disconnect()
    return optuna.load_study(study_name=exp.name, storage=storage)


def _asha_objective(exp: Experiment) -> str | None:
    """The objective ASHA stops on (the short_train quality objective), or None without ``ray.asha``."""
    if exp.ray.asha is None:
        return None
    short = [o.name for o in exp.objectives if o.kind == "quality" and o.proxy == "short_train"]
    if not short:
        raise ConfigError("ASHA needs a quality objective with proxy: short_train (it stops trials on that "
                          "proxy's held-out loss)", field="ray.asha")
    return short[0]


# The real URLs of the storages opened by this driver, by their redacted form (see _PrivateRDBStorage).
_URLS: dict[str, str] = {}


class _PrivateRDBStorage(RDBStorage):
    """An RDBStorage whose pickled form holds the *redacted* URL. Ray pickles the searcher, and with it the
    storage, into ``runs/<name>/ray/`` (for ``Tuner.restore``); a plain RDBStorage would write the database
    password there. Unpickled on the driver, it finds the real URL again by the redacted one (the driver opens
    the storage, and so registers it, before it restores anything)."""

    def __getstate__(self) -> dict[Any, Any]:
        from nas.redaction import redact

        state = super().__getstate__()
        state["url"] = redact(self.url)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        url = _URLS.get(state["url"])
        if url is None:
            raise RuntimeError(f"storage {state['url']} is not open in this process: run_ray opens it first")
        super().__setstate__({**state, "url": url})


def _storage(url: str) -> RDBStorage:
    """The study's storage, without heartbeats: nothing under Ray would send them (see the module docstring)."""
    from nas.redaction import redact

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = _PrivateRDBStorage(with_driver(url), engine_kwargs=engine_kwargs)
        _URLS[redact(storage.url)] = storage.url
        return storage
    except Exception as exc:  # sqlalchemy raises many types for a bad URL or an unreachable server
        from nas.report import redact

        raise ConfigError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                          field="storage") from None


def _save_experiment(exp: Experiment) -> None:
    """``runs/<name>/experiment.yaml``, which ``unet-nas report`` reads (as the local backend's CLI writes it)."""
    from nas.report import atomic_write, redact

    saved = exp.model_dump()
    if isinstance(saved.get("storage"), str):
        saved["storage"] = redact(saved["storage"])
    atomic_write(exp.run_dir / "experiment.yaml", dump_yaml(saved))


def _tuner(exp: Experiment, evaluator: Evaluator, storage: RDBStorage, trainable: Any, ray_dir: Path, name: str,
           samples: int, wall_time: float | None, quality: str | None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    names = [o.name for o in exp.objectives]
    multi = len(names) > 1
    searcher = _StudySearch(_DefineByRun(evaluator.space), metric=names if multi else names[0],
                            mode=["min"] * len(names) if multi else "min", sampler=make_sampler(exp),
                            study_name=exp.name, storage=storage, nas_name=exp.name, nas_objectives=names)
    scheduler = None
    if quality is not None:
        proxy = evaluator.proxy(quality)
        scheduler = ASHAScheduler(time_attr="nas_step", metric=quality, mode="min", max_t=proxy.steps,
                                  grace_period=exp.ray.asha.grace_period,
                                  reduction_factor=exp.ray.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                                    max_concurrent_trials=exp.ray.max_concurrent, time_budget_s=wall_time,
                                    reuse_actors=exp.ray.reuse_actors,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=str(ray_dir), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=exp.ray.max_failures),
                                  callbacks=[_StudyCallback(exp.name, exp.budget.trials)]),
    )


def _trial_name(trial: Any) -> str:
    """Short trial folder names (the default embeds every parameter and the arch)."""
    return f"trial_{trial.trial_id}"


def _fail_orphans(study: optuna.Study, since: float, max_retries: int, log: Callable[[str], Any]) -> None:
    """Trials a killed driver left RUNNING: mark them FAIL, without ``error``, so they do not use up the budget
    (``counted``), with ``lost`` saying why, and queue a retry of each arch (up to ``max_retries``), which the
    next Tune run asks first."""
    import copy

    from .workers import RetryLostTrial

    storage, retry = study._storage, RetryLostTrial(max_retry=max_retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start is not None and t.datetime_start.timestamp() < time.time() - (time.monotonic() - since):
            frozen = copy.deepcopy(t)
            storage.set_trial_user_attr(t._trial_id, "lost", "its Ray driver stopped before the trial finished")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            retried = retry.will_retry(frozen)
            retry(study, frozen)
            log(f"trial {t.number} FAIL: its Ray driver stopped before it finished; "
                + ("its arch is retried" if retried else "not retried (no arch chosen yet, or max_retries used up)"))


# ---- searcher and callback (driver side, pickled by Ray) --------------------------------------------------------


class _DefineByRun:
    """The define-by-run space for OptunaSearch. Returns constants merged into the Tune config: the arch, the
    Optuna trial id, and for a re-suggested arch its earlier values (a worker then reports them unchanged)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        arch = suggest_arch(self.space, trial)
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("arch_summary", str(arch).split("(", 1)[1].rstrip(")"))
        nas: dict[str, Any] = {"arch": arch.to_dict(), "optuna_trial_id": trial._trial_id, "duplicate": None,
                               "running_twin": None}
        previous = _same_arch(trial.ot_trial)
        if previous is not None:
            nas["duplicate"] = {"of": previous.number, "values": list(previous.values),
                                "constraints": previous.user_attrs.get("constraints", {})}
        else:  # all trials are asked here, one at a time: a RUNNING one with this arch is being evaluated
            me = trial.ot_trial
            nas["running_twin"] = next((t.number for t in me.study.get_trials(deepcopy=False,
                                                                              states=(TrialState.RUNNING,))
                                        if t._trial_id != me._trial_id and "arch" in t.user_attrs
                                        and t.params == me.params), None)
        return {"nas": nas}


class _StudySearch(OptunaSearch):
    """OptunaSearch that writes what the local backend writes before telling Optuna (see module docstring)."""

    def __init__(self, *args: Any, nas_name: str, nas_objectives: list[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.nas_name, self.nas_objectives = nas_name, nas_objectives

    def suggest(self, trial_id: str) -> dict | None:
        """Draw again while the arch is one a running trial is evaluating: Ray's loop cannot wait here, and an
        Optuna trial cannot change its parameters. The dropped Optuna trial is FAIL with ``redrawn`` (not
        counted against the budget, not retried). After ``REDRAWS`` tries the arch is evaluated again."""
        for _ in range(REDRAWS):
            config = super().suggest(trial_id)
            twin_number = config["nas"].get("running_twin") if isinstance(config, dict) and "nas" in config else None
            if twin_number is None:
                return config
            dropped = self._ot_trials.pop(trial_id)
            dropped.set_user_attr("redrawn", f"trial {twin_number} was evaluating the same arch")
            self._ot_study.tell(dropped, state=TrialState.FAIL)
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        if error:
            return  # _StudyCallback.on_trial_error records the reason, then FAIL
        ot_trial = self._ot_trials[trial_id]
        try:
            for key in ("node", "host", "pid"):  # where the attempt that finished the trial ran
                if result and result.get(f"nas_{key}"):
                    ot_trial.set_user_attr(key, str(result[f"nas_{key}"]))
            if result and result.get("nas_final"):
                record_constraints(ot_trial, json.loads(result["nas_constraints"]))  # as in the local backend
                ot_trial.set_user_attr("seconds", float(result.get("nas_seconds", 0.0)))
                if result.get("nas_duplicate_of") is not None:
                    ot_trial.set_user_attr("duplicate_of", int(result["nas_duplicate_of"]))
                values = [float(result[m]) for m in self.nas_objectives]
                self._ot_study.tell(ot_trial, values if len(values) > 1 else values[0])
            else:  # stopped by ASHA or the wall time before its final report
                if result and result.get("nas_step") is not None:
                    ot_trial.set_user_attr("stopped_at", int(result["nas_step"]))
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError) as exc:
            # e.g. a trial already told before a driver crash and re-run after Tuner.restore
            warnings.warn(f"trial {ot_trial.number} not recorded again: {exc}", stacklevel=1)
            return
        evolution = _DRIVER.get(self.nas_name, {}).get("evolution")
        if evolution is not None:  # enqueue a cost-prefiltered child; study.ask() takes enqueued trials first
            evolution(self._ot_study, self._ot_study._storage.get_trial(ot_trial._trial_id))


class _StudyCallback(Callback):
    """Records an errored trial's reason in the study (then FAIL), and logs progress."""

    def __init__(self, name: str, budget: int):
        self.name, self.budget = name, budget

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        driver = _DRIVER.get(self.name)
        if driver is None:
            return
        storage: RDBStorage = driver["storage"]
        tid = trial.config["nas"]["optuna_trial_id"]
        reason = _reason(trial)
        try:
            storage.set_trial_user_attr(tid, "error", reason[:500])
            storage.set_trial_state_values(tid, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        driver["log"](f"trial {storage.get_trial_number_from_id(tid)} FAIL after "
                      f"{trial.run_metadata.num_failures} attempt(s): {reason}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Ray restarts the trial after a failure (its node lost, its worker killed): record it in the study,
        where Ray's own count (``num_failures``) would otherwise be the only trace."""
        driver = _DRIVER.get(self.name)
        if driver is None:
            return
        storage: RDBStorage = driver["storage"]
        tid = trial.config["nas"]["optuna_trial_id"]
        where = getattr(getattr(trial.temporary_state, "location", None), "hostname", None)
        reason = _reason(trial) + (f" (on {where})" if where else "")
        attrs = storage.get_trial(tid).user_attrs
        try:
            storage.set_trial_user_attr(tid, "restarts", int(attrs.get("restarts", 0)) + 1)
            storage.set_trial_user_attr(tid, "restart_reasons", [*attrs.get("restart_reasons", []), reason[:300]])
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        driver["log"](f"trial {storage.get_trial_number_from_id(tid)} restarted by Ray after: {reason}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        driver = _DRIVER.get(self.name)
        if driver is None:
            return
        storage: RDBStorage = driver["storage"]
        t = storage.get_trial(trial.config["nas"]["optuna_trial_id"])
        values = ", ".join(f"{v:.4g}" for v in t.values) if t.values else ""
        driver["log"](f"trial {t.number} {t.state.name} {values}".rstrip())


def _reason(trial: Any) -> str:
    """The trial's exception as ``Type: message`` (Ray wraps it in RayTaskError). Ray writes it to the trial's
    local folder first and copies it to the run's storage later: a restart is reported before that copy."""
    from nas.redaction import scrub

    exc = None
    for read in (trial.get_pickled_error, lambda: _local_error(trial, pickled=True)):
        try:
            exc = read()
        except Exception:  # an unpicklable exception, or no such file: try the next place, then the text
            exc = None
        if exc is not None:
            cause = getattr(exc, "cause", None) or exc
            return scrub(" ".join(f"{type(cause).__name__}: {cause}".split()))
    text = (trial.get_error() or _local_error(trial, pickled=False) or "unknown error").strip()
    last = text.split("Failure # ")[-1].splitlines()[1:] or text.splitlines()  # the latest failure's lines
    return scrub(" ".join(" ".join(last).split())[:300]) if last else "unknown error"


def _local_error(trial: Any, pickled: bool) -> Any:
    """The latest error as Ray wrote it in the trial's local folder (pickled, or as text), or None."""
    import cloudpickle

    name = trial.run_metadata.pickled_error_filename if pickled else trial.run_metadata.error_filename
    local = getattr(trial, "local_path", None)
    if not name or not local or not (Path(local) / name).is_file():
        return None
    data = (Path(local) / name).read_bytes()
    return cloudpickle.loads(data) if pickled else data.decode(errors="replace")
