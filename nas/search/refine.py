"""Refining a search's finalists: the first Pareto layers scored again at a higher fidelity.

A short quality proxy ranks archs by how they look after a few training steps. Most of the time that finds the
front, but an arch whose weight inheritance breaks can look worse after a few steps than where training ends:
on one of the three 64-arch tables of ``benchmarks/search_quality.py`` every 16-20-step proxy missed 8% of the
true front's hypervolume, and training the search's first two Pareto layers to the ground truth recovered it
(0.92 -> 0.999 at 60 trials for 21-26 extra runs). This module spends a search's budget that way: once the
budget is used up, the first ``refine.layers`` non-dominated layers of the feasible trials (by the search's own
values) are scored again with ``refine.proxy`` / ``refine.options``, and the report picks the refined front and
``best/refined.yaml`` from those values.

The refined values live in a second Optuna study in the same storage, ``<name>.refine`` (one objective: the
refined quality), so they get what the search's trials get: each refinement is a trial with the candidate's
parameters (enqueued), it claims its arch so that two workers never refine one arch twice (the later one waits
and reuses the result, ``duplicate_of``), a worker that dies leaves a trial that is failed and retried through
heartbeats, an evaluation error is recorded (``error``) and counted, and ``--resume`` refines only what is left.
Every worker that finishes the search joins the refinement, so ``--workers N`` refines N archs at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from nas.experiment import Experiment
from nas.redaction import scrub
from search_spaces import ConfigError, UNetArch

from .objectives import Evaluator
from .optuna_backend import make_storage, take_arch
from .workers import fail_dead_trials

EMPTY = "no refine candidate was left when it started (another worker took the last one); nothing was evaluated"


def refine_study_name(exp: Experiment) -> str:
    """The study that holds the refined values, beside the search's in the same storage."""
    return f"{exp.name}.refine"


def fidelity(exp: Experiment) -> dict[str, Any]:
    """What a refined value means: the objective, proxy and options. A study refined with another fidelity cannot
    be continued (its values would mix two measures)."""
    spec, obj = exp.refine, exp.refined_objective
    return {"objective": obj.name, "proxy": spec.proxy or obj.proxy, "options": dict(spec.options)}


def nondominated_layers(values: list[tuple[float, ...]]) -> list[list[int]]:
    """Indices of ``values`` in non-dominated layers (all minimised): the Pareto front, then the front of the
    rest, and so on."""
    from nas.report import pareto_indices

    left = list(range(len(values)))
    out = []
    while left:
        front = [left[i] for i in pareto_indices([values[j] for j in left])]
        out.append(front)
        left = [j for j in left if j not in front]
    return out


def candidates(exp: Experiment, search: optuna.Study) -> list[tuple[FrozenTrial, int]]:
    """(trial, layer) of the archs to refine: one trial per distinct arch among the feasible COMPLETE trials,
    the first ``refine.layers`` non-dominated layers by the search's values, each layer in the order of its
    values, at most ``refine.max_archs`` in all."""
    from nas.report import meets_all

    labels = [c.label for c in exp.constraints]
    seen: dict[str, FrozenTrial] = {}
    for t in sorted(search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if meets_all(t, labels):
            seen.setdefault(arch_key(t), t)
    feasible = list(seen.values())
    out: list[tuple[FrozenTrial, int]] = []
    for layer, idx in enumerate(nondominated_layers([tuple(t.values) for t in feasible])[:exp.refine.layers]):
        out += [(t, layer) for t in sorted((feasible[i] for i in idx), key=lambda t: (tuple(t.values), t.number))]
    return out[:exp.refine.max_archs] if exp.refine.max_archs is not None else out


def check_fidelity(exp: Experiment, study: optuna.Study | None) -> None:
    """Refuse to continue a refine study made at another fidelity (objective, proxy or options): its values and
    the new ones would mix two measures. ``--resume`` checks before the search goes on."""
    have = None if study is None else study.user_attrs.get("fidelity")
    want = fidelity(exp)
    if have is not None and have != want:
        raise ConfigError(f"this run's finalists were refined with {have['proxy']} {have['options']} on "
                          f"{have['objective']}, the file asks for {want['proxy']} {want['options']} on "
                          f"{want['objective']}: rename the experiment to refine at another fidelity",
                          field="refine")


def open_refine_study(exp: Experiment, storage: Any) -> optuna.Study:
    """The refine study, created on first use (by whichever worker gets there first); refused with a
    ConfigError if it was refined at another fidelity."""
    study = optuna.create_study(study_name=refine_study_name(exp), storage=storage, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=exp.seed), load_if_exists=True)
    check_fidelity(exp, study)
    if study.user_attrs.get("fidelity") is None:
        study.set_user_attr("fidelity", fidelity(exp))
        study.set_user_attr("objective", exp.refined_objective.name)
    return study


def _wait_for_search(search: optuna.Study, log: Callable[[str], Any] | None, poll: float) -> None:
    """Wait until no search trial runs: the candidates are the finished search's. Trials of workers that died
    are failed (at once on this host, after ``heartbeat_grace`` elsewhere) so that the wait ends."""
    said = False
    while True:
        running = search.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if log is not None and not said:
            log(f"refine: waiting for {len(running)} running search trial(s) of other workers")
            said = True
        fail_dead_trials(search)
        time.sleep(poll)


def arch_key(t: FrozenTrial) -> str:
    """The trial's arch as a comparable key: its parameters, or the ones it was enqueued with (a WAITING
    trial, or a RUNNING one still suggesting, has no parameters of its own yet)."""
    params = t.system_attrs.get("fixed_params") or t.params
    return repr(sorted(params.items()))


def enqueue_candidates(study: optuna.Study, cands: list[tuple[FrozenTrial, int]]) -> int:
    """Queue every candidate that has no refinement yet: none COMPLETE, RUNNING or WAITING, and none that
    failed by its own error (recorded, not repeated). A lost one (its worker died, or Ctrl-C) is queued again.
    Returns how many were queued."""
    taken = {arch_key(t) for t in study.get_trials(deepcopy=False)
             if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
             or (t.state == TrialState.FAIL and "error" in t.user_attrs)}
    n = 0
    for t, layer in cands:
        if arch_key(t) in taken:
            continue
        study.enqueue_trial(t.params, user_attrs={"source_trial": t.number, "layer": layer})
        taken.add(arch_key(t))
        n += 1
    return n


def make_refine_objective(evaluator: Evaluator) -> Callable[[Trial], float]:
    def objective(trial: Trial) -> float:
        if "fixed_params" not in trial.storage.get_trial(trial._trial_id).system_attrs:
            trial.set_user_attr("empty", EMPTY)  # recorded and told apart in the report, never silently dropped
            raise optuna.TrialPruned(EMPTY)
        arch, previous = take_arch(evaluator.space, trial)
        try:
            if previous is not None:
                value, seconds = float(previous.value), 0.0
                trial.set_user_attr("duplicate_of", previous.number)
            else:
                start = time.perf_counter()
                value = evaluator.refined_quality(arch)
                seconds = time.perf_counter() - start
            if not math.isfinite(value):
                raise FloatingPointError(f"the refined value is {value}")
        except Exception as exc:
            trial.set_user_attr("error", scrub(f"{type(exc).__name__}: {exc}")[:500])
            raise
        trial.set_user_attr("seconds", seconds)
        return value

    return objective


def run_refine(exp: Experiment, evaluator: Evaluator, storage_url: str,
               log: Callable[[str], Any] | None = None, on_trial: Callable[..., None] | None = None,
               poll: float = 1.0) -> optuna.Study:
    """Refine the finished search's finalists (see the module docstring) until none is left; safe to call from
    several workers at once and again after a crash. ``evaluator`` must be prepared."""
    storage = make_storage(storage_url, exp)
    search = optuna.load_study(study_name=exp.name, storage=storage)
    _wait_for_search(search, log, poll)
    cands = candidates(exp, search)
    study = open_refine_study(exp, storage)
    left = fail_dead_trials(study, log)
    if left is not None and log is not None:
        log(left)
    queued = enqueue_candidates(study, cands)
    if log is not None:
        plural = "s" if exp.refine.layers > 1 else ""
        log(f"refine: {len(cands)} finalists (first {exp.refine.layers} Pareto layer{plural}"
            + (f", at most {exp.refine.max_archs}" if exp.refine.max_archs else "") + f"), {queued} queued now")
    objective = make_refine_objective(evaluator)
    callbacks = [on_trial] if on_trial is not None else None
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=False)
    return study


def load_refine_study(exp: Experiment, storage: Any) -> optuna.Study | None:
    """The run's refine study, or None when it has none (no ``refine``, or not started yet)."""
    try:
        return optuna.load_study(study_name=refine_study_name(exp), storage=storage)
    except KeyError:
        return None


def refined_rows(exp: Experiment, search: optuna.Study, refine: optuna.Study) -> list[dict[str, Any]]:
    """One row per refined arch: the search trial it came from, its values with the refined objective's value
    replaced, the search's own value of it, the layer and what the refinement cost."""
    names = [o.name for o in exp.objectives]
    q = names.index(refine.user_attrs.get("objective", exp.refined_objective.name))
    by_number = {t.number: t for t in search.get_trials(deepcopy=False)}
    rows, seen = [], set()
    for t in sorted(refine.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        src = by_number.get(t.user_attrs.get("source_trial"))
        if src is None or src.state != TrialState.COMPLETE or arch_key(t) in seen:
            continue
        seen.add(arch_key(t))
        values = list(src.values)
        values[q] = float(t.value)
        rows.append({"refine_trial": t.number, "source_trial": src.number, "layer": t.user_attrs.get("layer"),
                     "values": dict(zip(names, values, strict=True)), "search_value": float(src.values[q]),
                     "seconds": t.user_attrs.get("seconds"), "arch": src.user_attrs.get("arch"),
                     "arch_summary": src.user_attrs.get("arch_summary", "")})
    return rows


def refined_front(names: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated refined rows, by their refined values, in the order of those values."""
    from nas.report import pareto_indices

    values = [tuple(r["values"][n] for n in names) for r in rows]
    front = [rows[i] for i in pareto_indices(values)]
    return sorted(front, key=lambda r: (tuple(r["values"][n] for n in names), r["source_trial"]))


def best_refined(names: list[str], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The refined arch best on the first objective (ties broken by the next ones), as ``best/all.yaml`` is
    chosen among the search's trials."""
    if not rows:
        return None
    return min(rows, key=lambda r: (tuple(r["values"][n] for n in names), r["source_trial"]))


def arch_of(row: dict[str, Any]) -> UNetArch:
    return UNetArch.from_dict(row["arch"])
