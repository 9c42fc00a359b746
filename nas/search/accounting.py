"""What happened to each trial, told apart for the report: evaluated, reused (duplicate), lost, retried, restarted.

Both backends write the same attributes, so the report reads them the same way:

* ``duplicate_of``: the arch was already evaluated (or being evaluated, ``waited_for``) by that trial; its
  result was reused and nothing was evaluated again;
* FAIL with ``error``: the evaluation itself failed (counted against the budget);
* FAIL without ``error``: the trial was *lost* (its worker, node or driver died); ``lost`` says why when it is
  known (a heartbeat-stale trial failed by Optuna has no reason of its own). A lost trial is *retried* when a
  later trial names it in Optuna's ``retry_history``; it is otherwise *not retried* (``max_retries`` used up,
  or the search ended first);
* FAIL with ``redrawn`` (Ray): dropped before it ran, because a running trial was evaluating the same arch; a
  new arch was drawn instead (not counted against the budget, not retried);
* ``restarts`` (Ray): how many times Ray restarted the trial after a failure (a node lost, a worker killed)
  before it ended; ``restart_reasons`` says what Ray reported each time, ``node``/``host`` where it ended.
"""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_LOST = "its worker stopped sending heartbeats (older than heartbeat_grace)"


def retries(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Lost trial number -> the trial that retried it (its direct retry)."""
    out: dict[int, FrozenTrial] = {}
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        if history:
            out.setdefault(int(history[-1]), t)
    return out


def account(trials: list[FrozenTrial]) -> dict[str, Any]:
    """Counts of the report's trial kinds (see the module docstring)."""
    retried_by = retries(trials)
    lost = [t for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs
            and "redrawn" not in t.user_attrs]
    evaluated = [t for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    archs = {repr(sorted(t.params.items())) for t in evaluated}
    return {
        "evaluated": len(evaluated), "distinct_archs": len(archs),
        "duplicates": sum(t.state == TrialState.COMPLETE and "duplicate_of" in t.user_attrs for t in trials),
        "errors": sum(t.state == TrialState.FAIL and "error" in t.user_attrs for t in trials),
        "lost": len(lost), "retried": sum(t.number in retried_by for t in lost),
        "not_retried": sum(t.number not in retried_by for t in lost),
        "restarted": sum(int(t.user_attrs.get("restarts", 0)) > 0 for t in trials),
        "redrawn": sum(t.state == TrialState.FAIL and "redrawn" in t.user_attrs for t in trials),
    }


def failure_line(t: FrozenTrial, retried_by: dict[int, FrozenTrial]) -> str:
    """One truthful line about a FAIL trial: its error, or why it was lost and whether it was retried."""
    if "error" in t.user_attrs:
        return str(t.user_attrs["error"])
    if "redrawn" in t.user_attrs:
        return f"not evaluated, drawn again: {t.user_attrs['redrawn']} (Ray)"
    line = f"lost: {t.user_attrs.get('lost', HEARTBEAT_LOST)}"
    retry = retried_by.get(t.number)
    if retry is not None:
        return f"{line}; retried as trial {retry.number} ({retry.state.name})"
    if "arch" not in t.user_attrs:
        return f"{line}; not retried (it was lost before it had chosen an arch)"
    return f"{line}; not retried (max_retries used up, or the search ended first)"


def restart_line(t: FrozenTrial) -> str:
    """One line about a trial Ray restarted: how often, after what, and where it ran in the end."""
    reasons = "; ".join(str(r) for r in t.user_attrs.get("restart_reasons", [])) or "reason not recorded"
    where = f" on {t.user_attrs['host']} (node {str(t.user_attrs.get('node', '?'))[:12]})" \
        if "host" in t.user_attrs else ""
    return (f"restarted {t.user_attrs.get('restarts', 0)} time(s) by Ray after: {reasons}; ended "
            f"{t.state.name}{where}")
