"""The worker side of the Ray backend: what runs inside a Ray Tune trial.

Kept apart from the driver (:mod:`.ray_backend`) because it runs in another process, usually on another node:
it needs only the experiment (passed as plain data), the arch in the trial's config and the run folder the
driver prepared, never the study or its storage. One prepared :class:`Evaluator` per worker process and
experiment is kept: with ``ray.reuse_actors`` (the default) Ray runs the next trial in the same process, and
preparing loads the teacher and the profile.
"""

from __future__ import annotations

import json
from typing import Any

from nas.experiment import Experiment
from search_spaces import UNetArch

from .objectives import Evaluator

# One prepared Evaluator per worker process and experiment (kept while Ray reuses the actor).
_WORKER: dict[str, Evaluator] = {}


def _trainable(config: dict[str, Any], exp_data: dict[str, Any], allow_pickle: bool = False) -> None:
    """One trial on a worker: score the arch and report; raises (so Ray records an error) on any failure."""
    from ray import tune

    exp = Experiment.model_validate(exp_data)
    names = [o.name for o in exp.objectives]
    nas = config["nas"]
    if nas["duplicate"] is not None:
        dup = nas["duplicate"]
        tune.report({**dict(zip(names, dup["values"], strict=True)), "nas_final": True, "nas_seconds": 0.0,
                     "nas_constraints": json.dumps(dup["constraints"]), "nas_duplicate_of": dup["of"],
                     "nas_step": _max_step(exp), **_where()})
        return
    evaluator = _worker_evaluator(exp, allow_pickle)
    values, constraints, seconds = _evaluate(exp, evaluator, UNetArch.from_dict(nas["arch"]))
    tune.report({**values, "nas_final": True, "nas_seconds": seconds, "nas_constraints": json.dumps(constraints),
                 "nas_step": _max_step(exp), **_where()})


def _where() -> dict[str, str]:
    """The Ray node, host and worker process this attempt runs in (the trial's ``node``, ``host`` and ``pid``:
    with ``reuse_actors`` one worker process runs trial after trial)."""
    import os
    import socket

    import ray

    return {"nas_node": ray.get_runtime_context().get_node_id(), "nas_host": socket.gethostname(),
            "nas_pid": str(os.getpid())}


def _max_step(exp: Experiment) -> int:
    """The short_train proxy's step count (ASHA's max_t), 1 otherwise."""
    for o in exp.objectives:
        if o.kind == "quality" and o.proxy == "short_train":
            return int(o.options.get("steps", 50))
    return 1


def _worker_evaluator(exp: Experiment, allow_pickle: bool = False) -> Evaluator:
    import torch

    key = f"{exp.run_dir}:{exp.name}"
    if key not in _WORKER:
        torch.set_num_threads(max(1, int(exp.ray.cpus_per_trial)))
        _WORKER[key] = Evaluator(exp, allow_pickle=allow_pickle).prepare()  # the teacher, profile the driver saved
    return _WORKER[key]


def _evaluate(exp: Experiment, evaluator: Evaluator, arch: UNetArch) -> tuple[dict[str, float], dict[str, float],
                                                                           float]:
    """The evaluator, with a short-training proxy's intermediate values wired to ``tune.report`` when ASHA is on."""
    from ray import tune

    report = None
    if exp.ray.asha is not None:
        cheap = evaluator.objectives(arch, cheap_only=True)

        def report(name: str, step: int, value: float) -> bool:
            if step < evaluator.proxy(name).steps:  # at the last step ASHA (max_t) would stop the trial early
                tune.report({**cheap, name: float(value), "nas_step": step, **_where()})
            return False  # ASHA stops the trial from the driver; the proxy never stops itself

    ev = evaluator(arch, report=report)
    return ev.values, ev.constraints, ev.seconds


def _refine_task(exp_data: dict[str, Any], arch: dict[str, Any], allow_pickle: bool = False) -> dict[str, Any]:
    """One refinement (``refine``) as a Ray task on a worker: the arch's refined quality, what it cost and where it
    ran. Raises (so the driver records the error) on any failure."""
    import time

    exp = Experiment.model_validate(exp_data)
    evaluator = _worker_evaluator(exp, allow_pickle)  # prepares the refine proxy too (and keeps it loaded)
    start = time.perf_counter()
    value = evaluator.refined_quality(UNetArch.from_dict(arch))
    return {"value": value, "seconds": time.perf_counter() - start, **_where()}
