"""Refining the finalists on a Ray cluster: the refine study of :mod:`.refine`, its evaluations as Ray tasks.

As with the search under Ray, only the driver touches the storage: it queues the finalists in
``<name>.refine``, asks for each (``study.ask`` pops the queued trial), and runs the refinement as a Ray task
with the trial's resources (``ray.cpus_per_trial``, ``ray.gpus_per_trial``), at most ``ray.max_concurrent`` at
once; a worker that dies mid-task is retried by Ray (``ray.max_failures``), an error in the proxy is recorded
(``error``) and not repeated. A driver killed mid-refinement leaves RUNNING trials that the next ``--resume``
marks ``lost`` and queues again, as it does for the search's trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from nas.experiment import Experiment
from nas.redaction import scrub

from .objectives import Evaluator
from .optuna_backend import record_arch, suggest_arch
from .refine import EMPTY, candidates, enqueue_candidates, open_refine_study
from .workers import mark_worker


def refine_on_ray(exp: Experiment, evaluator: Evaluator, storage: Any, exp_data: dict[str, Any],
                  started: float, log: Callable[[str], Any], allow_pickle: bool = False,
                  fail_orphans: Callable[..., None] | None = None) -> optuna.Study:
    """Refine the finished search's finalists on the connected Ray cluster; returns the refine study.
    ``fail_orphans(study, started, max_retries, log)`` marks the trials a killed driver left RUNNING."""
    import ray

    from .ray_worker import _refine_task

    search = optuna.load_study(study_name=exp.name, storage=storage)
    cands = candidates(exp, search)
    study = open_refine_study(exp, storage)
    if fail_orphans is not None:
        fail_orphans(study, started, exp.max_retries, log)
    queued = enqueue_candidates(study, cands)
    log(f"refine on Ray: {len(cands)} finalists, {queued} queued now, {exp.ray.cpus_per_trial:g} CPU / "
        f"{exp.ray.gpus_per_trial:g} GPU each, at most {exp.ray.max_concurrent} at once")
    task = ray.remote(_refine_task).options(num_cpus=exp.ray.cpus_per_trial, num_gpus=exp.ray.gpus_per_trial,
                                            max_retries=exp.ray.max_failures)
    running: dict[Any, Any] = {}  # Ray object ref -> Optuna trial
    while True:
        while len(running) < exp.ray.max_concurrent and study.get_trials(deepcopy=False,
                                                                         states=(TrialState.WAITING,)):
            trial = study.ask()
            if "fixed_params" not in study._storage.get_trial(trial._trial_id).system_attrs:
                trial.set_user_attr("empty", EMPTY)
                study.tell(trial, state=TrialState.PRUNED)
                continue
            mark_worker(trial)  # the driver's identity: a resume after it died finds the trial orphaned
            arch = suggest_arch(evaluator.space, trial)
            record_arch(trial, arch)
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.params == trial.params]
            if done:  # refined already (a lost attempt's retry whose arch another attempt finished)
                trial.set_user_attr("duplicate_of", done[0].number)
                trial.set_user_attr("seconds", 0.0)
                study.tell(trial, float(done[0].value))
                continue
            running[task.remote(exp_data, arch.to_dict(), allow_pickle)] = trial
        if not running:
            return study
        ready, _ = ray.wait(list(running), num_returns=1)
        trial = running.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except Exception as exc:  # the proxy's own error (Ray wraps it), or a task Ray gave up retrying
            cause = getattr(exc, "cause", None) or exc
            trial.set_user_attr("error", scrub(f"{type(cause).__name__}: {cause}")[:500])
            study.tell(trial, state=TrialState.FAIL)
            log(f"refinement of trial {trial.user_attrs.get('source_trial')} failed: {trial.user_attrs['error']}")
            continue
        for key in ("node", "host", "pid"):
            trial.set_user_attr(key, out[f"nas_{key}"])
        if not math.isfinite(out["value"]):
            trial.set_user_attr("error", f"FloatingPointError: the refined value is {out['value']}")
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("seconds", out["seconds"])
        study.tell(trial, float(out["value"]))
        log(f"refined trial {trial.user_attrs.get('source_trial')}: {out['value']:.6g} ({out['seconds']:.1f} s on "
            f"{out['nas_host']})")
