"""What the ``supernet`` quality proxy costs at Stable Diffusion scale: its one-time work and its per-trial score.

Called by ``proxy_cost_sd.py`` (``--proxies supernet``, or all), with the options of an experiment's quality
objective (``--experiment``, default the DeciDiffusion 1.0 experiment: 8,000 arch-steps, ``split: auto``,
``max_groups: 4``, the 3-step short run) and that experiment's space. Training the supernets for the
experiment's steps is too long for a short lease, so this times the parts with the proxy's own code and
composes the rest:

- ``groups_s``: :meth:`~proxies.quality.supernet.Supernet.find_groups` with the experiment's options (``split:
  auto`` evaluates the largest arch and one shallower arch per ResNet-count decision, each inherited from the
  teacher), and which groups and supernets it makes: their parameters bound memory and checkpoint size.
- ``step_s``: a proxy with the same options and the groups just found, trained for ``--supernet-steps``
  arch-steps (each step draws an arch, builds it when it is new, shares the supernet's tensors into it, distils one
  batch from the teacher and takes one AdamW step over the supernets); timed between the proxy's own progress
  lines, so the supernets' construction is ``setup_s`` and not a step. Peak GPU memory is that of this training.
- ``per_trial_s``: the fitted proxy called on a member of the space as a search calls it (held-out loss of the
  arch's shared weights, then the short run, timed alone too as ``short_run_s``), ``--passes`` times, the minimum.
- ``checkpoint_save_s`` (with ``--checkpoint-dir``): the same training again with a run folder, so that it writes
  one checkpoint of the whole state (weights, AdamW moments, generators) as a run does every
  ``checkpoint_every`` steps; the difference between the two trainings' times, and the file's size. Skipped, and
  said so, when the folder lacks room for it (a run needs twice that: the next checkpoint is written beside the
  last before it replaces it).

The experiment's cost constraints reach the proxy as in its search. With ``train_on: feasible`` the groups train
for their share of the steps that falls on archs meeting them (``arch_steps``, of the experiment's ``steps``) and
the timed training draws those archs (smaller than the space's average, so cheaper per step), for about
``--supernet-steps`` steps; with the default (``space``), ``arch_steps`` is ``steps``.

One-time = groups + setup + arch_steps x step + (arch_steps / checkpoint_every) x checkpoint; a search of N trials
costs one-time + N x per-trial.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import peak_gib, sync

from nas.experiment import load_experiment
from nas.search.objectives import Evaluator, load_space
from proxies.cost import arch_costs
from proxies.quality.supernet import Supernet
from search_spaces import ConfigError, UNetArch, get_arch


def cost_bounds(path: str | Path) -> tuple[Any, str]:
    """(predicate, label) of the experiment's cost constraints, as its search hands them to the proxy; (None, "")
    without any. Needs no data or teacher: parameters, MACs and the latency predictors only."""
    evaluator = Evaluator(load_experiment(path))
    label = evaluator.cost_label()
    return (evaluator.feasible, label) if label else (None, "")


def supernet_objective(path: str | Path, teacher_arch: UNetArch) -> tuple[dict[str, Any], Any, str]:
    """(options, space, objective name) of the experiment's quality objective whose proxy is ``supernet``; its
    space must distil ``teacher_arch`` (the supernets inherit from it)."""
    exp = load_experiment(path)
    space = load_space(exp)
    if space.teacher is None or get_arch(space.teacher) != teacher_arch:
        raise ConfigError(f"{path}: the space distils teacher {space.teacher!r}, not the --teacher given",
                          field="--teacher")
    for obj in exp.objectives:
        if obj.kind == "quality" and obj.proxy == "supernet":
            return dict(obj.options), space, obj.name
    raise ConfigError(f"{path}: no quality objective with proxy: supernet", field="objectives")


def space_member(space: Any, arch: UNetArch, text_len: int, pool: int = 256) -> tuple[UNetArch, str]:
    """``arch`` when the space holds it, else the sampled member closest to it in parameters: the per-trial cost
    of an arch the search scores, at the student's size."""
    if space.contains(arch):
        return arch, "the student"
    target = arch_costs(arch, batch=1, text_len=text_len).params
    members = [space.sample(random.Random(i)) for i in range(pool)]
    best = min(members, key=lambda a: abs(arch_costs(a, batch=1, text_len=text_len).params - target))
    return best, f"not in the space: the closest in parameters of {pool} sampled members"


class _Stamps:
    """The proxy's progress lines with device-synchronised times: the training loop times itself."""

    def __init__(self, device: str):
        self.device, self.lines = device, []

    def __call__(self, message: str) -> None:
        sync(self.device)
        self.lines.append((time.perf_counter(), message))

    def steps(self) -> list[tuple[int, float]]:
        """(step, time) of every checkpoint line (``... step 40/80, loss ...``)."""
        out = []
        for t, message in self.lines:
            if ", step " in message:
                out.append((int(message.split(", step ")[1].split("/")[0]), t))
        return out


def _train_timed(options: dict[str, Any], ctx: Any, autocast: Any, device: str) -> tuple[Supernet, _Stamps]:
    proxy = Supernet(**options)
    proxy.log = stamps = _Stamps(device)
    with autocast():
        proxy.fit(ctx)
    stamps("done")
    return proxy, stamps


def time_supernet(experiment: str | Path, ctx: Any, teacher_arch: UNetArch, student_arch: UNetArch, autocast: Any,
                  device: str, steps: int, passes: int, checkpoint_dir: Path | None) -> dict[str, Any]:
    """Every figure of the module docstring, as a dict; an error (out of memory, a full disk) is recorded under
    ``error`` with what was measured before it."""
    options, space, name = supernet_objective(experiment, teacher_arch)
    text_len = ctx.data.text.shape[1]
    arch, arch_note = space_member(space, student_arch, text_len)
    feasible, label = cost_bounds(experiment)
    ctx = replace(ctx, space=space, cache_dir=None, feasible=feasible, feasible_label=label)
    out: dict[str, Any] = {"experiment": str(experiment), "objective": name, "options": options, "bounds": label,
                           "timed_steps": steps, "trial_arch": arch.to_dict(), "trial_arch_note": arch_note,
                           "trial_arch_params": arch_costs(arch, batch=1, text_len=text_len).params}
    try:
        _measure(out, options, ctx, arch, autocast, device, steps, passes, checkpoint_dir, text_len)
    except (torch.OutOfMemoryError, OSError) as exc:  # recorded with what was measured before it, never dropped
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def _measure(out: dict[str, Any], options: dict[str, Any], ctx: Any, arch: UNetArch, autocast: Any, device: str,
             steps: int, passes: int, checkpoint_dir: Path | None, text_len: int) -> None:
    peak_gib(device)
    finder = Supernet(**options)
    start = time.perf_counter()
    with autocast():
        groups = finder.find_groups(ctx)
    sync(device)
    out["groups_s"] = time.perf_counter() - start
    out["split_on"] = finder.split_names
    out["split_damage"] = finder.split_damage
    out["groups"] = [{"key": list(k), "params": arch_costs(a, batch=1, text_len=text_len).params}
                     for k, a in groups.items()]
    out["feasible_share_by_group"] = {str(list(k)): v for k, v in finder.feasible_share.items()}
    out["arch_steps"] = len(finder.schedule())  # of the experiment's steps: those on archs meeting the bounds
    supernet_params = sum(g["params"] for g in out["groups"])
    out["supernet_params"] = supernet_params
    # fp32 weights and AdamW's two moments: what a checkpoint holds (and the GPU beside one group's gradients)
    out["state_gib_computed"] = round(12 * supernet_params / 2**30, 1)
    print(f"supernet groups: {len(groups)} ({out['groups_s']:.1f}s), split on {finder.split_names or 'layouts'}, "
          f"{supernet_params / 1e9:.2f}B parameters in supernets", flush=True)

    every = max(1, steps // 4)
    # the option that makes the bounded schedule about ``steps`` long (the schedule keeps each group's share)
    scaled = math.ceil(steps * finder.options["steps"] / out["arch_steps"])
    timing = {**options, "steps": scaled, "split": finder.split_names, "checkpoint_every": every}
    proxy, stamps = _train_timed(timing, ctx, autocast, device)
    out["train_peak_gib"] = peak_gib(device)
    marks = stamps.steps()
    (first_step, first_t), (last_step, last_t) = marks[0], marks[-1]
    out["step_s"] = (last_t - first_t) / max(last_step - first_step, 1)
    out["setup_s"] = max(first_t - stamps.lines[0][0] - first_step * out["step_s"], 0.0)  # building the supernets
    out["train_s"] = stamps.lines[-1][0] - stamps.lines[0][0]
    print(f"supernet training: {out['step_s']:.3f}s/arch-step, setup {out['setup_s']:.1f}s, "
          f"peak {out['train_peak_gib']} GiB", flush=True)

    calls, short = [], []
    for _ in range(passes):
        for record, fn in ((calls, lambda: proxy(arch, ctx)), (short, lambda: proxy.short_run(arch, ctx))):
            sync(device)
            start = time.perf_counter()
            with autocast():
                fn()
            sync(device)
            record.append(time.perf_counter() - start)
    out["per_trial_calls"], out["short_run_calls"] = calls, short
    out["per_trial_s"], out["short_run_s"] = min(calls), min(short)
    out["pass_spread"] = (max(calls) - min(calls)) / min(calls) if passes > 1 else None
    out["trial_peak_gib"] = peak_gib(device)
    print(f"supernet per trial: {out['per_trial_s']:.2f}s (short run {out['short_run_s']:.2f}s)", flush=True)
    proxy._nets = None  # the supernets' memory, before the checkpointed training builds its own
    proxy = None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    if checkpoint_dir is not None:
        _time_checkpoint(out, timing, ctx, autocast, device, steps, checkpoint_dir)


def _time_checkpoint(out: dict[str, Any], timing: dict[str, Any], ctx: Any, autocast: Any, device: str,
                     steps: int, checkpoint_dir: Path) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(checkpoint_dir).free / 2**30
    out["checkpoint_disk_free_gib"] = round(free, 1)
    if free < 1.1 * out["state_gib_computed"]:
        out["checkpoint_skipped"] = (f"{free:.0f} GiB free in the folder, one checkpoint needs about "
                                     f"{out['state_gib_computed']} GiB")
        print(f"supernet checkpoint: skipped, {out['checkpoint_skipped']}", flush=True)
        return
    folder = Path(checkpoint_dir) / f"supernet-cost-{time.time_ns()}"
    try:
        saved, stamps = _train_timed({**timing, "checkpoint_every": steps}, replace(ctx, cache_dir=folder),
                                     autocast, device)
        saved._nets = None
        with_save = stamps.lines[-1][0] - stamps.lines[0][0]
        out["checkpoint_save_s"] = max(with_save - out["train_s"], 0.0)
        files = list(folder.rglob("state.pt"))
        out["checkpoint_gib"] = round(files[0].stat().st_size / 2**30, 2) if files else None
        print(f"supernet checkpoint: {out['checkpoint_save_s']:.1f}s, {out['checkpoint_gib']} GiB", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def compose(out: dict[str, Any], trials: int, gt_run_s: float, amortise_over: int = 200) -> dict[str, Any] | None:
    """One-time and per-trial seconds, the GPU-hours of ``trials`` trials, and the cost as a share of one
    ground-truth run (one-time work divided by ``amortise_over`` trials, as the CPU benchmarks count it)."""
    if "per_trial_s" not in out:
        return None
    proxy = Supernet(**out["options"])  # the experiment's options over the proxy's own defaults
    total_steps = out.get("arch_steps", proxy.options["steps"])
    saves = total_steps // proxy.checkpoint_every
    save_s = out.get("checkpoint_save_s")
    one_time = out["groups_s"] + out["setup_s"] + total_steps * out["step_s"] + saves * (save_s or 0.0)
    return {"per_trial_s": out["per_trial_s"], "one_time_s": one_time, "composed": True,
            "one_time_parts_s": {"groups": out["groups_s"], "setup": out["setup_s"],
                                 f"{total_steps} arch-steps": total_steps * out["step_s"],
                                 f"{saves} checkpoints": None if save_s is None else saves * save_s},
            "checkpoints_priced": save_s is not None,
            "search_gpu_hours": (one_time + trials * out["per_trial_s"]) / 3600,
            "cost_fraction_of_ground_truth": (out["per_trial_s"] + one_time / amortise_over) / gt_run_s,
            "cost_fraction_amortised_over": amortise_over,
            "per_trial_fraction_of_ground_truth": out["per_trial_s"] / gt_run_s,
            "pass_spread": out.get("pass_spread")}
