"""The analysis half of ``proxy_validity_cosine.py``: reads the cached runs (whatever is finished), computes the
ground truth's validity and repeat noise and every proxy's tau on the test archs, and writes the result JSON."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import table_suffix, teacher_suffix, write_result
from scipy.stats import kendalltau

from proxies.quality.base import evaluate
from proxies.quality.fidelity import FEATURES, GT_TIMESTEPS, feature_vector
from proxies.quality.surrogate import arch_key, fit_ridge

TRIALS = 200
VALIDITY_BAR = 0.9  # the bar: the ground truth's ranking against 5x longer training


def short_cosine_runs(gt_steps: int = 200) -> tuple[tuple[int, float], ...]:
    """The ground-truth protocol shrunk: (steps, peak lr) of the short cosine-to-zero runs, evaluated on 64 items.

    Their lengths are 4% and 8% of the ground truth's steps (8 and 16 at 200), so a longer ground truth (``--gt-steps
    400``, tried on shapes) is judged against proxies of the same share of its cost rather than of a shorter run's."""
    short, long = max(1, gt_steps // 25), max(1, 2 * gt_steps // 25)
    return ((short, 2e-3), (long, 1e-3), (long, 2e-3))

SHORT_SETS = {"short+macs": ("loss@K", "macs"), "short+loss@0+macs": ("loss@0", "loss@K", "macs")}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def tau(a, b) -> float:
    return float(kendalltau(a, b).statistic)


def noise_figures(first: list[float], second: list[float], all_losses: list[float], rng_seed: int = 0) -> dict:
    """Per-run noise of log loss from repeat pairs, pairs tied within noise, and the tau ceiling it implies."""
    d = np.log(first) - np.log(second)
    sigma = float(math.sqrt(np.mean(d ** 2) / 2))  # each run's own spread (a difference has twice the variance)
    logs = np.log(all_losses)
    pairs = list(itertools.combinations(range(len(logs)), 2))
    ties = sum(abs(logs[i] - logs[j]) < tie_threshold(sigma) for i, j in pairs) / len(pairs)
    sims = ceiling_draws(logs, sigma, rng_seed)
    return {"ground_truth_repeat_n": len(first), "ground_truth_repeat_tau": tau(first, second),
            "ground_truth_repeat_sigma_log": sigma,
            "ground_truth_repeat_abs_rel_diff_max": float(np.max(np.abs(np.expm1(d)))),
            "ground_truth_pairs_tied_within_noise": ties, "ground_truth_pairs_n": len(pairs),
            "ground_truth_tau_ceiling": float(np.mean(sims)),
            "ground_truth_tau_ceiling_p5": float(np.percentile(sims, 5))}


def ceiling_draws(logs: np.ndarray, sigma: float, rng_seed: int = 0, draws: int = 2000) -> list[float]:
    """Kendall tau between two noisy replicates (per-run noise ``sigma`` of log loss) of the same true ``logs``,
    ``draws`` times: how well two repeats of the ground truth can agree, its ceiling."""
    rng = np.random.default_rng(rng_seed)
    return [tau(logs + rng.normal(0, sigma, len(logs)), logs + rng.normal(0, sigma, len(logs))) for _ in range(draws)]


def tie_threshold(sigma: float) -> float:
    """A difference of log losses two runs of this per-run noise do not resolve (95%: 1.96 x sqrt(2) sigma)."""
    return 1.96 * math.sqrt(2) * sigma


def validity_noise(val: list[tuple[float, float]], reps: list[tuple[float, float]], sigma_gt: float | None,
                   rng_seed: int = 0) -> dict:
    """How much of the ground truth's disagreement with the 5x runs the two rankings' own noise explains.

    ``val``: (ground truth, 5x) losses of the validity archs; ``reps``: (5x, its repeat) pairs. From the repeats,
    the 5x runs' per-run noise; the validity a ground truth would show if its true order were the 5x order
    (``ground_truth_validity_ceiling``: both rankings drawn around the 5x losses, each with its own noise, tau
    averaged over 2,000 draws); and the discordant pairs that either ranking does not resolve beyond noise."""
    d = np.log([a for a, _ in reps]) - np.log([b for _, b in reps])
    sigma_long = float(math.sqrt(np.mean(d ** 2) / 2))
    gt_logs, long_logs = np.log([g for g, _ in val]), np.log([lg for _, lg in val])
    out = {"ground_truth_validity_long_repeat_n": len(reps),
           "ground_truth_validity_long_repeat_tau": tau([a for a, _ in reps], [b for _, b in reps])
           if len(reps) > 2 else None,
           "ground_truth_validity_long_repeat_sigma_log": sigma_long}
    discordant = [(i, j) for i, j in itertools.combinations(range(len(val)), 2)
                  if (gt_logs[i] - gt_logs[j]) * (long_logs[i] - long_logs[j]) < 0]
    resolved = [(i, j) for i, j in discordant if sigma_gt is not None
                and abs(gt_logs[i] - gt_logs[j]) >= tie_threshold(sigma_gt)
                and abs(long_logs[i] - long_logs[j]) >= tie_threshold(sigma_long)]
    out["ground_truth_validity_discordant_pairs"] = len(discordant)
    out["ground_truth_validity_discordant_beyond_noise"] = len(resolved) if sigma_gt is not None else None
    if sigma_gt is not None:
        rng = np.random.default_rng(rng_seed)
        sims = [tau(long_logs + rng.normal(0, sigma_gt, len(val)), long_logs + rng.normal(0, sigma_long, len(val)))
                for _ in range(2000)]
        out["ground_truth_validity_ceiling"] = float(np.mean(sims))
        out["ground_truth_validity_ceiling_p5"] = float(np.percentile(sims, 5))
        # how often such an exact ground truth would pass the 0.9 bar: the test's power on these archs
        out["ground_truth_validity_pass_rate_if_exact"] = float(np.mean(np.array(sims) >= VALIDITY_BAR - 1e-9))
    return out


def repeat_pairs(gfile, anchors, steps: int, seed: int) -> list[tuple[float, float]]:
    """(loss, its repeat under data-order seed + 1000) of every anchor run both ways at ``steps``."""
    pairs = [(gfile(a, steps, seed), gfile(a, steps, seed + 1000)) for a in anchors]
    return [(x["task_loss"], y["task_loss"]) for x, y in pairs if x and y]


def long_noise_pairs(args, gfile, anchors: list) -> tuple[list[tuple[float, float]], int]:
    """The 5x runs' repeat pairs and their length; where the 5x runs were not repeated, those of the longest
    shorter length that was (a stand-in the report names: noise shrinks with length, so it overstates the 5x
    runs' noise and understates what the test can resolve)."""
    from proxy_validity_lengths import ranking_by_length

    long_steps = args.gt_steps * args.long_factor
    pairs = repeat_pairs(gfile, anchors, long_steps, args.seed)
    if len(pairs) >= 2:
        return pairs, long_steps
    for steps in sorted(ranking_by_length(args.work, anchors, args.seed)["steps"], reverse=True):
        if args.gt_steps < steps < long_steps and len(repeat_pairs(gfile, anchors, steps, args.seed)) >= 2:
            return repeat_pairs(gfile, anchors, steps, args.seed), steps
    return pairs, long_steps


def validity_pairs(gfile, anchors, args) -> list[tuple]:
    """(arch, ground truth, 5x run) of every anchor with both runs finished."""
    val = [(a, gfile(a, args.gt_steps, args.seed), gfile(a, args.gt_steps * args.long_factor, args.seed))
           for a in anchors]
    return [(a, g, lg) for a, g, lg in val if g and lg]


def feature_cost(f: dict, k: int) -> float:
    """Seconds to reach loss@k measured alone: the run's clock at k less the extra evaluations before it."""
    if k == 0:
        return f["clock"]["0"]
    every = 5
    return f["clock"][str(k)] - (k // every - 1) * f["eval_seconds"]


def cheap_signals(work: Path, keys: list[str], gt_steps: int) -> dict[str, tuple[list[float], float]] | None:
    """Every cheap signal of the archs ``keys`` in a work folder: name -> (scores, lower is better; median seconds).
    Params, MACs and ``distill_task@K`` from the features, and each short cosine run of this ground truth's length
    that every arch has. None until every arch has its features."""
    feats = [_read(work / f"feat-{k}.json") for k in keys]
    if not all(feats):
        return None
    signals = {"params": ([-f["params"] for f in feats], 0.0), "macs": ([-f["macs"] for f in feats], 0.0)}
    for k in (0, 5, 10, 20):
        signals[f"distill_task@{k}"] = ([f["curve"][str(k)] for f in feats],
                                        float(np.median([feature_cost(f, k) for f in feats])))
    for k, lr in short_cosine_runs(gt_steps):
        runs = [_read(work / f"cos-{key}-{k}-{lr:g}.json") for key in keys]
        if all(runs):
            signals[f"cosine@{k}/lr{lr:g}"] = ([r["task_loss"] for r in runs],
                                               float(np.median([r["seconds"] for r in runs])))
    return signals


def report(args, setup, gt, features, group) -> None:
    _, space, anchors, tests = setup(args)
    w = args.work
    gfile = lambda a, s, seed: _read(w / f"gt-{arch_key(a)}-{s}-{seed}.json")  # noqa: E731

    def ffile(a) -> dict | None:
        """The arch's cheap features with its short cosine runs (``short``), where all are measured."""
        f = _read(w / f"feat-{arch_key(a)}.json")
        short = {f"cosine@{k}/lr{lr:g}": _read(w / f"cos-{arch_key(a)}-{k}-{lr:g}.json")
                 for k, lr in short_cosine_runs(args.gt_steps)}
        return {**f, "short": short} if f and all(short.values()) else None
    out: dict = {"benchmark_name": args.benchmark, "tests": args.tests, "n_archs": 0, "seed": args.seed,
                 "gt_steps": args.gt_steps,
                 "gt_init": "inherit", "new_modules": args.new_modules, "batch": args.batch,
                 "gt_protocol": f"{'BK-SDM distillation' if args.gt_loss == 'bksdm' else 'the task loss alone'} "
                                f"from inherited weights, AdamW lr {args.gt_lr:g}, cosine to "
                                "zero after 10% linear warm-up, batches of --batch; held-out loss on the whole "
                                "validation split x 20 timesteps",
                 "gt_lr": args.gt_lr, "gt_loss": args.gt_loss,
                 "teacher_steps": args.teacher_steps, "threads": 1, "trials_amortised_over": TRIALS}

    # 1. validity against 5x longer training
    long_steps = args.gt_steps * args.long_factor
    val = validity_pairs(gfile, anchors, args)
    out["validity"] = [{"arch_key": arch_key(a), "group": group(a), "gt": g["task_loss"], "long": lg["task_loss"],
                        "gt_seconds": g["seconds"], "long_seconds": lg["seconds"]} for a, g, lg in val]
    out["ground_truth_validity_n"] = len(val)
    out["ground_truth_validity_long_steps"] = long_steps
    out["ground_truth_validity_groups"] = {k: sum(group(a) == k for a, _, _ in val) for k in ("broken", "kept")}
    out["ground_truth_validity_tau"] = tau([g["task_loss"] for _, g, _ in val],
                                           [lg["task_loss"] for _, _, lg in val]) if len(val) > 2 else None

    # 2. repeat noise
    reps = repeat_pairs(gfile, anchors, args.gt_steps, args.seed)
    rows = [(a, gfile(a, args.gt_steps, args.seed), ffile(a)) for a in tests if arch_key(a) not in
            {arch_key(b) for b in anchors}]
    rows = [(a, g, f) for a, g, f in rows if g and f]
    design_rows = [(a, gfile(a, args.gt_steps, args.seed), ffile(a)) for a in anchors]
    design_rows = [(a, g, f) for a, g, f in design_rows if g and f]
    distinct = {arch_key(b): b for b in anchors + tests}.values()
    every_gt = [g["task_loss"] for g in (gfile(a, args.gt_steps, args.seed) for a in distinct) if g]
    if len(reps) > 2 and len(every_gt) > 1:
        out.update(noise_figures([x for x, _ in reps], [y for _, y in reps], every_gt))
    long_reps, noise_steps = long_noise_pairs(args, gfile, anchors)
    if long_reps and len(val) > 2:
        out.update(validity_noise([(g["task_loss"], lg["task_loss"]) for _, g, lg in val], long_reps,
                                  out.get("ground_truth_repeat_sigma_log")))
        out["ground_truth_validity_long_noise_from_steps"] = noise_steps  # != long steps: a stand-in, said so

    # 3. proxies: on the test archs (surrogates fitted on design archs), and leave-one-out over the design archs
    out["n_archs"] = len(rows)
    out["n_design_archs"] = len(design_rows)
    if not design_rows:
        _write(args, out)
        return
    gt_seconds = float(np.median([g["seconds"] for _, g, _ in rows + design_rows]))
    out["ground_truth_seconds_per_arch"] = gt_seconds
    long_of = {arch_key(a): lg["task_loss"] for a, _, lg in val}
    out["proxies_test"] = (_proxies(rows, design_rows, space, gt_seconds, None, args.gt_steps)
                           if len(rows) >= 3 else None)
    out["proxies_leave_one_out"] = (_proxies(design_rows, design_rows, space, gt_seconds, long_of, args.gt_steps)
                                    if len(design_rows) >= 5 else None)
    use_test = len(rows) >= 8
    out["evaluation"] = ("test archs, surrogates fitted on design archs" if use_test else
                         "leave-one-out over the design archs (each predicted by a fit on the others)")
    proxies = out["proxies"] = out["proxies_test"] if use_test else out["proxies_leave_one_out"]
    if not proxies:
        _write(args, out)
        return
    affordable = {k: v for k, v in proxies.items() if v["kind"] != "baseline"
                  and v["cost_fraction_of_ground_truth"] <= 0.10}
    best = max(affordable, key=lambda k: affordable[k]["kendall_tau"]) if affordable else None
    out["best_proxy_within_10_percent"] = best
    ref = max(proxies[k]["kendall_tau"] for k in ("macs", "params", "distill_task@20"))
    out["target_met"] = bool(best and proxies[best]["kendall_tau"] >= 0.85 and proxies[best]["kendall_tau"] > ref)
    out["archs"] = [{"arch": a.to_dict(), "group": group(a), "gt": g, "features": f} for a, g, f in rows]
    out["design_archs"] = [{"arch": a.to_dict(), "group": group(a), "gt": g, "features": f,
                            "long": long_of.get(arch_key(a))} for a, g, f in design_rows]
    _write(args, out)
    print(f"\n{'proxy':44s} {'tau':>6s} {'vs long':>7s} {'of GT':>7s}")
    for name, v in sorted(proxies.items(), key=lambda kv: -kv[1]["kendall_tau"]):
        print(f"{name:44s} {v['kendall_tau']:6.2f} {v.get('kendall_tau_vs_long') or float('nan'):7.2f} "
              f"{v['cost_fraction_of_ground_truth']:7.1%}")


SETS = {"all": FEATURES, "loss@K+new_fraction": ("loss@K", "new_fraction"),
        "losses+new_fraction": ("loss@0", "loss@K", "new_fraction"), "loss@K+macs": ("loss@K", "macs")}


def _proxies(rows: list, design_rows: list, space, gt_seconds: float, long_of: dict | None,
             gt_steps: int = 200) -> dict:
    """Every proxy on ``rows`` (the short cosine runs those of a ``gt_steps`` ground truth). With ``long_of`` the
    rows are the design archs themselves: each surrogate prediction comes from a fit on the other design archs
    (leave-one-out), and tau against the 5x-longer training is added where it was measured."""
    from sklearn.linear_model import RidgeCV

    y = np.array([g["task_loss"] for _, g, _ in rows])
    loo = long_of is not None
    # costs are ratios of times measured under the same machine load: these rows' own ground-truth runs
    gt_seconds = float(np.median([g["seconds"] for _, g, _ in rows]))
    proxies: dict = {}

    def add(name, kind, scores, seconds, **extra) -> None:
        entry = {"kind": kind, "kendall_tau": tau(scores, y), "seconds_per_arch": seconds,
                 "cost_fraction_of_ground_truth": seconds / gt_seconds, **extra}
        if loo:
            pairs = [(s, long_of[arch_key(a)]) for s, (a, _, _) in zip(scores, rows, strict=True)
                     if arch_key(a) in long_of]
            entry["kendall_tau_vs_long"] = tau(*zip(*pairs, strict=True)) if len(pairs) > 2 else None
            entry["n_vs_long"] = len(pairs)
        proxies[name] = entry

    add("params", "baseline", -np.array([f["params"] for _, _, f in rows], float), 0.0)
    add("macs", "baseline", -np.array([f["macs"] for _, _, f in rows], float), 0.0)
    for k in (0, 5, 10, 20):
        add(f"distill_task@{k}", "distill", [f["curve"][str(k)] for _, _, f in rows],
            float(np.median([feature_cost(f, k) for _, _, f in rows])))
    for k, lr in short_cosine_runs(gt_steps):
        name = f"cosine@{k}/lr{lr:g}"
        add(name, "short_cosine", [f["short"][name]["task_loss"] for _, _, f in rows],
            float(np.median([f["short"][name]["seconds"] for _, _, f in rows])), steps=k, lr=lr)
    fits = ([[r for r in design_rows if r is not row] for row in rows] if loo else
            {n: design_rows[:n] for n in (4, 6, 8, 10) if len(design_rows) >= n})
    for n in ([len(design_rows) - 1] if loo else list(fits)):
        one_time = n * gt_seconds / TRIALS
        for k in (0, 5, 10, 20):
            per_arch = float(np.median([feature_cost(f, k) for _, _, f in rows]))
            for label, names in SETS.items():
                if k == 0 and "loss@K" in names and "loss@0" not in names:
                    continue
                pred = _predict(rows, [fits[i] if loo else fits[n] for i in range(len(rows))],
                                lambda f, k=k: _at(f, k), names)
                add(f"surrogate{n}@{k}[{label}]", "surrogate", pred, per_arch + one_time, anchors=n, steps=k,
                    features=list(names), one_time_seconds_per_trial=one_time, per_arch_seconds=per_arch)
        for k, lr in short_cosine_runs(gt_steps):
            name = f"cosine@{k}/lr{lr:g}"
            per_arch = float(np.median([f["short"][name]["seconds"] for _, _, f in rows]))
            for label, names in SHORT_SETS.items():
                pred = _predict(rows, [fits[i] if loo else fits[n] for i in range(len(rows))],
                                lambda f, name=name: _short(f, name), names)
                add(f"surrogate{n}[{name}][{label}]", "surrogate", pred, per_arch + one_time, anchors=n, steps=k,
                    features=list(names), one_time_seconds_per_trial=one_time, per_arch_seconds=per_arch)
        pred = []
        for i, (a, _, _) in enumerate(rows):
            fit = fits[i] if loo else fits[n]
            enc = _one_hot(space, [r[0] for r in fit] + [a])
            model = RidgeCV(alphas=np.logspace(-3, 3, 25)).fit(enc[:-1], np.log([r[1]["task_loss"] for r in fit]))
            pred.append(float(model.predict(enc[-1:])[0]))
        add(f"additive{n}[encoding]", "surrogate", pred, one_time, anchors=n, steps=0,
            features=["one-hot arch encoding"], one_time_seconds_per_trial=one_time, per_arch_seconds=0.0)
    return proxies


def _predict(rows: list, fits: list, view, names: tuple[str, ...]) -> list[float]:
    """Each row's surrogate prediction from a ridge fit on its own anchors; ``view`` picks the features."""
    out = []
    for (_, _, f), fit in zip(rows, fits, strict=True):
        model = fit_ridge([view(r[2]) for r in fit], [r[1]["task_loss"] for r in fit], names)
        out.append(float(model.predict(np.array([feature_vector(view(f), names)]))[0]))
    return out


def _at(f: dict, k: int) -> dict:
    return {**f, "loss@K": f["curve"][str(k)]}


def _short(f: dict, name: str) -> dict:
    """The features with ``loss@K`` the short cosine run's held-out loss."""
    return {**f, "loss@K": f["short"][name]["task_loss"]}


def _one_hot(space, archs) -> np.ndarray:
    rows = []
    for a in archs:
        v = []
        for d, k in zip(space.decisions, space.encode(a), strict=True):
            v += [1.0 if k == j else 0.0 for j in range(len(d.choices))]
        rows.append(v)
    return np.array(rows)


def validity_report(args, setup, group) -> None:
    """What ``--part validity`` measured: validity tau against 5x training, the ground truth's and the 5x
    runs' repeat noise and the validity ceiling they imply, and the ground truth at ``--mid-steps``."""
    ctx, space, anchors, _ = setup(args)
    gfile = lambda a, s, seed: _read(args.work / f"gt-{arch_key(a)}-{s}-{seed}.json")  # noqa: E731
    long_steps = args.gt_steps * args.long_factor
    val = validity_pairs(gfile, anchors, args)
    # the teacher on the ground truth's own evaluation: whether the students end above or below it
    teacher_loss = evaluate(ctx.teacher, replace(ctx, eval_items=len(ctx.data.split("val")),
                                                 eval_timesteps=GT_TIMESTEPS))["task_loss"]
    out: dict = {"benchmark_name": args.benchmark, "seed": args.seed, "gt_steps": args.gt_steps, "gt_lr": args.gt_lr,
                 "gt_loss": args.gt_loss, "teacher_steps": args.teacher_steps, "teacher_task_loss": teacher_loss,
                 "batch": args.batch, "threads": 1,
                 "ground_truth_validity_n": len(val), "ground_truth_validity_long_steps": long_steps,
                 "ground_truth_validity_tau": tau([g["task_loss"] for _, g, _ in val],
                                                  [lg["task_loss"] for _, _, lg in val]) if len(val) > 2 else None}
    reps = repeat_pairs(gfile, anchors, args.gt_steps, args.seed)
    if len(reps) > 2 and len(val) > 2:  # a report of a study still running has few validity archs yet
        out.update(noise_figures([x for x, _ in reps], [y for _, y in reps], [g["task_loss"] for _, g, _ in val]))
    long_reps, noise_steps = long_noise_pairs(args, gfile, anchors)
    if long_reps and len(val) > 2:
        out.update(validity_noise([(g["task_loss"], lg["task_loss"]) for _, g, lg in val], long_reps,
                                  out.get("ground_truth_repeat_sigma_log")))
        out["ground_truth_validity_long_noise_from_steps"] = noise_steps  # != long steps: a stand-in, said so
    mid = [(a, g, lg, gfile(a, args.mid_steps, args.seed)) for a, g, lg in val] if args.mid_steps else []
    mid = [(a, g, lg, m) for a, g, lg, m in mid if m]
    if len(mid) > 2:
        out["ground_truth_lengthened"] = {
            "steps": args.mid_steps, "n": len(mid),
            "tau_vs_long": tau([m["task_loss"] for *_, m in mid], [lg["task_loss"] for _, _, lg, _ in mid]),
            "tau_vs_ground_truth": tau([m["task_loss"] for *_, m in mid], [g["task_loss"] for _, g, _, _ in mid]),
            "ground_truth_tau_vs_long_same_archs": tau([g["task_loss"] for _, g, _, _ in mid],
                                                       [lg["task_loss"] for _, _, lg, _ in mid]),
            "seconds_per_arch": float(np.mean([m["seconds"] for *_, m in mid]))}
    mids = {arch_key(a): m["task_loss"] for a, _, _, m in mid}
    out["validity"] = [{"arch_key": arch_key(a), "group": group(a), "gt": g["task_loss"], "long": lg["task_loss"],
                        "mid": mids.get(arch_key(a)), "gt_seconds": g["seconds"], "long_seconds": lg["seconds"]}
                       for a, g, lg in val]
    from proxy_validity_spread import spread_validity  # it builds on this module's figures

    spread = spread_validity(args, gfile, val, space, anchors, out.get("ground_truth_repeat_sigma_log"), long_reps)
    if spread:
        out["ground_truth_validity_spread"] = spread
    if getattr(args, "spread", 0):
        from proxy_validity_spread import signals_by_length

        out["signals_by_length_spread"] = by_length = signals_by_length(args, space, anchors)
        for name, v in (by_length or {}).get("signals", {}).items():
            cells = "  ".join(f"{s}: {t:5.2f}" for s, t in v["tau"].items())
            print(f"{name:28s} cost {v['cost_fraction_of_ground_truth']:6.1%}  tau vs  {cells}")
    out["ground_truth_repeat_pairs"] = reps
    out["ground_truth_validity_long_repeat_pairs"] = long_reps
    from proxy_validity_lengths import ranking_by_length, ranking_by_length_rows, signals_vs_longest

    out["ranking_by_training_length"] = lengths = ranking_by_length(args.work, anchors, args.seed)
    out["signals_vs_longest"] = signals_vs_longest(args, anchors, lengths)
    for row in ranking_by_length_rows(out["ranking_by_training_length"]):
        print(row)
    for name, v in (out["signals_vs_longest"] or {}).get("signals", {}).items():
        print(f"{name:28s} tau vs {lengths['steps'][-1]} steps {v['kendall_tau']:5.2f}  "
              f"cost {v['cost_fraction_of_ground_truth']:6.1%}")
    for key, value in (out.get("ground_truth_validity_spread") or {}).items():
        if not isinstance(value, list):
            print(f"spread {key}: {value}")
    for key in ("ground_truth_validity_n", "ground_truth_validity_tau", "ground_truth_validity_ceiling",
                "ground_truth_validity_ceiling_p5", "ground_truth_validity_pass_rate_if_exact",
                "ground_truth_validity_discordant_pairs",
                "ground_truth_validity_discordant_beyond_noise", "ground_truth_repeat_sigma_log",
                "ground_truth_validity_long_repeat_sigma_log", "ground_truth_tau_ceiling", "ground_truth_lengthened",
                "teacher_task_loss"):
        print(f"{key}: {out.get(key)}")
    print(f"wrote {write_result(result_name(args, 'proxy_gt_validity', args.benchmark != 'digits'), out)}")


def result_name(args, stem: str = "proxy_validity_cosine", seed0: bool = False) -> str:
    """The results file of a run of these options (without ``.json``): the stem, then every option that differs
    from its default, so a run of other options never overwrites the default run's results. ``seed0``: name
    seed 0 too (the validity files of shapes always carry their seed)."""
    suffix = "" if args.benchmark == "digits" else f"_{args.benchmark}"
    suffix += table_suffix(getattr(args, "tests", "random"), args.benchmark)
    suffix += f"_seed{args.seed}" if args.seed or seed0 else ""
    suffix += "" if args.new_modules == "fresh" else f"_{args.new_modules}"
    suffix += "" if args.gt_lr == 1e-3 else f"_gtlr{args.gt_lr:g}"
    suffix += "" if args.gt_loss == "bksdm" else f"_gt{args.gt_loss}"
    suffix += teacher_suffix(args.teacher_steps)
    suffix += "" if args.gt_steps == 200 else f"_gt{args.gt_steps}"
    return f"{stem}{suffix}"


def _write(args, out: dict) -> None:
    for key in ("ground_truth_validity_tau", "ground_truth_validity_ceiling",
                "ground_truth_validity_discordant_beyond_noise", "ground_truth_repeat_tau", "ground_truth_tau_ceiling",
                "ground_truth_pairs_tied_within_noise", "n_archs", "best_proxy_within_10_percent", "target_met"):
        print(f"{key}: {out.get(key)}")
    print(f"wrote {write_result(result_name(args), out)}")
