"""The validity test on archs spread over the range of quality (``proxy_validity_cosine.py --spread N``): which
archs, and the figures on the design archs plus them."""

from __future__ import annotations

import random

import numpy as np
from proxy_validity_lengths import ranking_by_length
from proxy_validity_report import _read, cheap_signals, tau, validity_noise

from proxies.quality.surrogate import arch_key

SPREAD_SIGNAL = "20"  # the cheap features' checkpoint that picks the --spread archs: distill_task@20


def spread_pool(space, anchors: list, size: int, seed: int) -> list:
    """``size`` distinct random archs of the space that are not design archs: the candidates of ``--spread``."""
    rng, pool, tries = random.Random(seed + 500), [], 0
    while len(pool) < size and tries < 100 * size:
        tries += 1
        a = space.sample(rng)
        if a not in anchors and a not in pool:
            pool.append(a)
    return pool


def pick_spread(signal: list[float], n: int) -> list[int]:
    """Indices of ``n`` pool archs at evenly spaced ranks of ``signal`` (lowest and highest included): archs spread
    over the range of quality rather than over the arch encoding, which the design archs already cover."""
    order = sorted(range(len(signal)), key=lambda i: signal[i])
    if n >= len(order):
        return order
    return [order[round(k * (len(order) - 1) / max(1, n - 1))] for k in range(n)]


def spread_validity(args, gfile, val: list, space, anchors: list, sigma_gt: float | None,
                    long_reps: list) -> dict | None:
    """The validity test on the design archs plus the ``--spread`` archs (picked over the range of quality by
    :func:`pick_spread`), and on the spread archs alone; None until every pool arch has its cheap features."""
    if not getattr(args, "spread", 0):
        return None
    pool = spread_pool(space, anchors, args.spread_pool, args.seed)
    feats = [_read(args.work / f"feat-{arch_key(a)}.json") for a in pool]
    if not all(feats):
        return None
    signal = [f["curve"][SPREAD_SIGNAL] for f in feats]
    chosen = [pool[i] for i in pick_spread(signal, args.spread)]
    extra = [(a, gfile(a, args.gt_steps, args.seed), gfile(a, args.gt_steps * args.long_factor, args.seed))
             for a in chosen]
    extra = [(a, g, lg) for a, g, lg in extra if g and lg]
    both = val + extra
    if len(both) < 2:  # the 5x runs are still running
        return {"n_spread": len(extra), "n_all": len(both)}
    out: dict = {"selection": f"{args.spread} of {len(pool)} random non-design archs at evenly spaced ranks of "
                              f"distill_task@{SPREAD_SIGNAL}", "n_spread": len(extra), "n_all": len(both),
                 "tau_all": tau([g["task_loss"] for _, g, _ in both], [lg["task_loss"] for _, _, lg in both])
                 if len(both) > 2 else None,
                 "tau_spread_only": tau([g["task_loss"] for _, g, _ in extra], [lg["task_loss"] for _, _, lg in extra])
                 if len(extra) > 2 else None,
                 "gt_range_all": [min(g["task_loss"] for _, g, _ in both), max(g["task_loss"] for _, g, _ in both)],
                 "long_range_all": [min(lg["task_loss"] for *_, lg in both), max(lg["task_loss"] for *_, lg in both)],
                 "gt_range_design": [min(g["task_loss"] for _, g, _ in val), max(g["task_loss"] for _, g, _ in val)]
                 if val else None}
    if long_reps and len(both) > 2:
        noise = validity_noise([(g["task_loss"], lg["task_loss"]) for _, g, lg in both], long_reps, sigma_gt)
        out.update({k.replace("ground_truth_validity_", ""): v for k, v in noise.items()
                    if not k.startswith("ground_truth_validity_long_repeat")})
    signals = cheap_signals(args.work, [arch_key(a) for a, _, _ in both], args.gt_steps)
    if signals:  # how the cheap signals rank the 16 at both lengths (the spread archs were picked by one)
        long_losses, gt_losses = [lg["task_loss"] for *_, lg in both], [g["task_loss"] for _, g, _ in both]
        gt_seconds = float(np.median([g["seconds"] for _, g, _ in both]))
        out["signals"] = {name: {"tau_vs_long": tau(v, long_losses), "tau_vs_ground_truth": tau(v, gt_losses),
                                 "cost_fraction_of_ground_truth": sec / gt_seconds}
                          for name, (v, sec) in signals.items()}
        out["signals_cost_note"] = ("each run's own clock, as its run found the machine; the fractions are of the "
                                    "median ground-truth run of these archs and indicative only")
    out["archs"] = [{"arch_key": arch_key(a), "pool_signal": signal[pool.index(a)], "gt": g["task_loss"],
                     "long": lg["task_loss"], "gt_seconds": g["seconds"], "long_seconds": lg["seconds"]}
                    for a, g, lg in extra]
    return out


def spread_archs_chosen(args, space, anchors: list) -> list | None:
    """The design archs and the ``--spread`` archs, as :func:`spread_validity` picks them; None until every pool arch
    has its cheap features."""
    pool = spread_pool(space, anchors, args.spread_pool, args.seed)
    feats = [_read(args.work / f"feat-{arch_key(a)}.json") for a in pool]
    if not all(feats):
        return None
    return list(anchors) + [pool[i] for i in pick_spread([f["curve"][SPREAD_SIGNAL] for f in feats], args.spread)]


def signals_by_length(args, space, anchors: list) -> dict | None:
    """Kendall tau of every cheap signal and of every shorter ground truth against the ranking of the design plus
    spread archs at each training length all of them were run at (the ground truth's own length included): what
    a proxy could reach if the ground truth were that long. Costs are fractions of the median ``--gt-steps`` run
    of these archs (each run's own clock: indicative only). None until the archs' signals exist (``--part
    signals``)."""
    archs = spread_archs_chosen(args, space, anchors) if getattr(args, "spread", 0) else None
    if not archs:
        return None
    by_length = ranking_by_length(args.work, archs, args.seed)
    runs = {s: by_length["losses"][str(s)] for s in by_length["steps"]}
    seconds = {s: by_length["seconds"][str(s)] for s in by_length["steps"]}
    signals = cheap_signals(args.work, by_length["arch_keys"], args.gt_steps)
    if args.gt_steps not in runs or signals is None:
        return None
    lengths = sorted(runs)
    out = {"n": len(archs), "lengths": lengths, "cost_unit": f"median {args.gt_steps}-step run of these archs",
           "signals": {}}
    for name, (scores, sec) in signals.items():
        out["signals"][name] = {"cost_fraction_of_ground_truth": sec / seconds[args.gt_steps],
                                "tau": {str(s): tau(scores, runs[s]) for s in lengths}}
    for a in lengths:
        out["signals"][f"ground_truth@{a}"] = {"cost_fraction_of_ground_truth": seconds[a] / seconds[args.gt_steps],
                                               "tau": {str(b): tau(runs[a], runs[b]) for b in lengths if b != a}}
    return out
