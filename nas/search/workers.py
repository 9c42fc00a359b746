"""Several workers on one study: who each one is, which archs it may evaluate, and which workers are dead.

* **Distinct seeds.** Every worker's sampler is seeded from ``(experiment seed, worker identity)``: workers
  seeded alike draw the same archs at the same moments and evaluate each twice. The worker that creates the
  study is worker ``"0"`` and keeps the experiment's seed, so a one-worker search stays reproducible.
* **No arch evaluated twice.** Before evaluating, a trial *claims* its arch (a timestamp in its system
  attributes) and looks for a twin, another trial with the same parameters. A COMPLETE twin's result is reused
  (``duplicate_of``). A RUNNING twin that claimed first (earlier claim, then lower number) is *waited for* and
  its result reused when it completes; if it dies or fails instead, this trial evaluates the arch itself. We
  wait rather than draw again because an Optuna trial cannot change its parameters once suggested, and a
  waiting trial costs one worker a poll per second, not a proxy run. The order of claims is total, so two
  trials never wait for each other; of two trials that claim at the same moment at least one sees the other
  (each reads after its own write), so with synchronised clocks one arch is never evaluated twice.
* **Dead workers.** A RUNNING trial records its worker (``host:pid``) and when that process started. A trial
  whose worker is provably gone (same host, and no process with that pid and start time) is failed at once,
  not after ``heartbeat_grace``, and retried with the same arch like a heartbeat-stale one. A trial whose
  worker runs on another host can only be judged by its heartbeat (Optuna's ``fail_stale_trials``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import psutil
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

CLAIM_KEY = "nas:claimed"  # system attribute: when the trial claimed its arch (time.time() of its worker)
STARTED_KEY = "nas:worker_started"  # system attribute: when the trial's worker process started (psutil)
POLL_SECONDS = 0.5


def identity() -> str:
    """This process as ``host:pid`` (the ``worker`` attribute of its trials)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_seed(seed: int, worker: str) -> int:
    """The sampler seed of ``worker``: the experiment's seed for worker ``"0"`` (the one that created the
    study), else a hash of both, stable across runs and platforms (unlike ``hash()``)."""
    if worker == "0":
        return seed
    digest = hashlib.sha256(f"{seed}/{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _process_started(pid: int) -> float | None:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # exited; its parent has not reaped it yet
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def mark_worker(trial: Trial) -> None:
    """Record which process runs the trial, so that a lost or doubled trial can be traced and a dead worker
    proven dead."""
    trial.set_user_attr("worker", identity())
    trial.storage.set_trial_system_attr(trial._trial_id, STARTED_KEY, _process_started(os.getpid()))


def dead_reason(t: FrozenTrial) -> str | None:
    """Why the worker of RUNNING trial ``t`` is provably gone, or None when it may still run."""
    worker = t.user_attrs.get("worker")
    if not isinstance(worker, str) or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    started = _process_started(int(pid))
    recorded = t.system_attrs.get(STARTED_KEY)
    if started is None:
        return f"its worker {worker} no longer runs"
    if isinstance(recorded, (int, float)) and abs(started - recorded) > 1.0:
        return f"its worker {worker} no longer runs (pid {pid} is another process now)"
    return None


def fail_dead_trials(study: optuna.Study, log: Callable[[str], Any] | None = None) -> str | None:
    """Fail (and retry, through the storage's stale-trial callback) every RUNNING trial whose worker is provably
    gone, then let Optuna fail the heartbeat-stale ones. Returns one line naming the RUNNING trials of other
    workers left alone, or None."""
    storage = study._storage
    retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number is None or t.user_attrs.get("worker") == identity():
            continue
        reason = dead_reason(t)
        if reason is None:
            continue
        frozen = copy.deepcopy(t)
        try:
            storage.set_trial_user_attr(t._trial_id, "lost", reason)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker finished it meanwhile, or another did
            continue
        if log is not None:
            again = isinstance(retry, RetryLostTrial) and retry.will_retry(frozen)
            log(f"trial {t.number} FAIL: {reason}; " + ("its arch is retried" if again else "not retried"))
        if retry is not None:
            retry(study, frozen)
    with warnings.catch_warnings():  # experimental in Optuna since 2.9; what optimize() itself runs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    left = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") != identity()]
    if not left:
        return None
    here = socket.gethostname()
    where = ", ".join(f"{t.number} ({t.user_attrs.get('worker', 'worker unknown')}"
                      + (", alive" if str(t.user_attrs.get("worker", "")).startswith(f"{here}:") else "") + ")"
                      for t in left)
    return (f"left {len(left)} RUNNING trial(s) alone: {where}; their workers may still run, so they are failed "
            "and retried only once their heartbeat is older than heartbeat_grace")


class RetryLostTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a lost trial (a WAITING copy with the same parameters), without what belonged to the
    lost attempt: its worker, claim and loss reason would otherwise be copied into the retry. A trial lost
    before its arch was chosen is not retried: the next trial draws a new arch anyway."""

    def __init__(self, max_retry: int | None = None):
        with warnings.catch_warnings():  # experimental in Optuna since 2.8; the retry every worker relies on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)

    def will_retry(self, trial: FrozenTrial) -> bool:
        """Whether :meth:`__call__` queues a retry of ``trial`` (it has an arch, and retries are left)."""
        history = trial.system_attrs.get("retry_history", [])
        return "arch" in trial.user_attrs and (self._max_retry is None or len(history) < self._max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "arch" not in trial.user_attrs:  # lost while its parameters were drawn: no arch to evaluate again
            return
        clean = copy.deepcopy(trial)
        for key in ("worker", "lost", "duplicate_of", "waited_for", "node", "host", "pid", "restarts",
                    "restart_reasons"):
            clean.user_attrs.pop(key, None)
        for key in (CLAIM_KEY, STARTED_KEY):
            clean.system_attrs.pop(key, None)
        super().__call__(study, clean)


# ---- one evaluation per arch -----------------------------------------------------------------------------------


def claim_arch(trial: Trial) -> None:
    """Claim the trial's arch (all its parameters are suggested): later claims of the same arch wait for it."""
    trial.storage.set_trial_system_attr(trial._trial_id, CLAIM_KEY, time.time())


def twin(trial: Trial, wait: Callable[[FrozenTrial], None] | None = None) -> FrozenTrial | None:
    """The COMPLETE trial whose result this trial reuses, after waiting (``wait`` is called each poll) for a
    RUNNING twin that claimed the arch first; None when this trial must evaluate the arch itself."""
    storage, mine = trial.storage, trial._trial_id
    while True:
        me = storage.get_trial(mine)
        key = (me.system_attrs.get(CLAIM_KEY, float("inf")), me.number)
        ahead = None
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t._trial_id == mine or t.params != me.params:
                continue
            if t.state == TrialState.COMPLETE:
                return t
            claimed = t.system_attrs.get(CLAIM_KEY)
            if claimed is not None and (claimed, t.number) < key and (ahead is None or t.number < ahead.number):
                ahead = t
        if ahead is None:
            return None
        if wait is not None:
            wait(ahead)
        time.sleep(POLL_SECONDS)
