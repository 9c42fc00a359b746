"""How the ground truth's ranking moves with training length, and what ranks the most-trained order: Kendall tau
between the rankings at every length a work folder holds, and every cheap signal against the longest."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from proxy_validity_report import _read, cheap_signals, short_cosine_runs, tau

from proxies.quality.surrogate import arch_key


def ranking_by_length(work: Path, anchors: list, seed: int) -> dict:
    """Every training length at which all ``anchors`` were run (ground truth, 5x, ``--mid-steps``, earlier runs in
    the same work folder) and Kendall tau between each two: how far the ranking keeps moving as training grows."""
    runs: dict[int, list[dict]] = {}
    for path in work.glob(f"gt-{arch_key(anchors[0])}-*-{seed}.json"):
        steps = int(path.stem.rsplit("-", 2)[1])
        found = [_read(work / f"gt-{arch_key(a)}-{steps}-{seed}.json") for a in anchors]
        if all(found):
            runs[steps] = found
    lengths = sorted(runs)
    losses = {s: [g["task_loss"] for g in runs[s]] for s in lengths}
    return {"steps": lengths, "losses": {str(s): losses[s] for s in lengths},
            "seconds": {str(s): float(np.median([g["seconds"] for g in runs[s]])) for s in lengths},
            "arch_keys": [arch_key(a) for a in anchors],
            "tau": {f"{a}-{b}": tau(losses[a], losses[b]) for a, b in itertools.combinations(lengths, 2)}}


def signals_vs_longest(args, anchors: list, lengths: dict) -> dict | None:
    """Kendall tau of every cheap signal, and of the ground truth at every shorter length, against the design
    archs' ranking at the longest length measured: what ranks the most-trained order, whatever the ground truth's
    length. Costs are fractions of the median ``--gt-steps`` run. None until every design arch has its cheap
    features and short cosine runs (``--part all`` or ``design`` jobs)."""
    if len(lengths["steps"]) < 2:
        return None
    signals = cheap_signals(args.work, [arch_key(a) for a in anchors], args.gt_steps)
    if signals is None or not all(f"cosine@{k}/lr{lr:g}" in signals for k, lr in short_cosine_runs(args.gt_steps)):
        return None
    if str(args.gt_steps) not in lengths["seconds"]:
        return None
    longest = lengths["steps"][-1]
    target = lengths["losses"][str(longest)]
    gt_seconds = lengths["seconds"][str(args.gt_steps)]
    for steps in lengths["steps"][:-1]:
        signals[f"ground_truth@{steps}"] = (lengths["losses"][str(steps)], lengths["seconds"][str(steps)])
    return {"longest_steps": longest, "n": len(anchors), "cost_unit": f"median {args.gt_steps}-step ground truth",
            "cost_note": "each run's own clock; these runs were made at different times and machine loads, so the "
                         "fractions are indicative only (--part report times proxies and ground truth under one load)",
            "signals": {name: {"kendall_tau": tau(scores, target), "cost_fraction_of_ground_truth": sec / gt_seconds}
                        for name, (scores, sec) in signals.items()}}


def ranking_by_length_rows(data: dict) -> list[str]:
    """The tau matrix of :func:`ranking_by_length` as printable rows."""
    steps = data["steps"]
    rows = [f"{'steps':>6s}" + "".join(f"{s:>7d}" for s in steps)]
    for a in steps:
        cells = [1.0 if a == b else data["tau"].get(f"{min(a, b)}-{max(a, b)}") for b in steps]
        rows.append(f"{a:>6d}" + "".join(f"{c:7.2f}" for c in cells))
    return rows
