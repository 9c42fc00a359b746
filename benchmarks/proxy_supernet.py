"""Few-shot weight-sharing supernets as a quality proxy, judged on a 64-arch table with the validated ground truth.

Item 3's untried directions: a supernet trained better than the naive one (which ranked the first digits benchmark
at tau 0.59), split by the block that breaks inheritance, so that no shared weight has to serve archs whose skip
connections differ. The study runs the product's ``supernet`` proxy (``proxies/quality/supernet.py``) on the table
space of a ``proxy_validity_cosine.py --tests table`` run: one supernet per value of the decision that breaks
inheritance (``--split inheritance``) or one for all (``--split none``), ``--steps`` arch-steps of the ground
truth's own loss and schedule, then every table arch scored by one 64-item evaluation of its shared weights.

A ground truth belongs to its teacher, and a teacher retrained on other CPU kernels is another teacher, so
``--part gt`` recomputes on this machine's teacher every table arch's ground truth (200 steps) and the proxies to
beat (``cosine@16/lr0.002``, ``distill_task@20``), in the source run's work folder, two processes sharing the
table. ``--part report`` judges every configuration and those baselines against it (or against the source run's
ground truth until it is complete, which the report says), costs as shares of the median ground-truth run
measured here; the supernets' seconds are one-time work divided by 200 trials (the issue's rule). A recomputed
ground truth cannot borrow the source run's validity either: ``--part validity`` trains 10 table archs spread
over its range 5x longer (1,000 steps) and repeats their 200-step runs under another data-order seed, and the
report gives that validity tau and repeat noise in place of the source run's.

    python benchmarks/proxy_supernet.py --part gt --results R &   # R: a proxy_validity_cosine*.json of a table run
    python benchmarks/proxy_supernet.py --part gt --results R
    python benchmarks/proxy_supernet.py --part validity --results R &   # two processes share the 20 runs
    python benchmarks/proxy_supernet.py --part validity --results R
    python benchmarks/proxy_supernet.py --part run --results R [--supernet-seed 1]   # the proxy's defaults
    python benchmarks/proxy_supernet.py --part run --results R --steps 2000 --short-steps 0 --split inheritance
    python benchmarks/proxy_supernet.py --part short --results R [--supernet-seed 1] [--short-steps 5]
    python benchmarks/proxy_supernet.py --part run --results R --supernet-seed 1 --feasible-share 0.5
    python benchmarks/proxy_supernet.py --part report --results R

``--feasible-share F`` trains the supernets under a cost bound, as a search passes its experiment's constraints to
the proxy: MACs at most the ``F`` quantile of the table space's, so that a share ``F`` of the table meets it. The
report ranks the table archs that meet it (the ones a search could pick) with those supernets and with the
unbounded ones of the same seed (``bounded_training``). Rows named ``feasible<F>-equal`` were made by the proxy's
first bounded schedule (all ``steps`` on those archs, the groups in turn), before each group kept only its share.

``--sandwich`` trains with the sandwich rule's largest arch (``sandwich: true``: each step also trains the group's
supernet, its largest arch, on the same batch); the report pairs each such configuration with the same one without
(``sandwich_rule``).

``--part short`` runs only the per-trial short run (:meth:`Supernet.short_run`) on every table arch; the report
combines it with a shared-weights-only ``--part run`` configuration of the same seed (the supernets are
deterministic under it), so the short run's settings can be studied without training the supernets again, and
checks the combination against the product's end-to-end runs where both exist.

Writes ``benchmarks/results/proxy_validity_supernet_<source>.json`` (``digits``, ``digits_seed1``,
``shapes2_table_teacher4000``, ...).
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import environment, run_stem
from proxy_step_budget import REQUIRED, run_args
from proxy_supernet_variants import bounded_training, macs_bound, sandwich_rule
from proxy_validity_cosine import SHORT_EVAL_ITEMS, cached, gt, run_claimed, setup, table_space
from proxy_validity_report import _one_hot, noise_figures
from scipy.stats import kendalltau

from proxies.cost import arch_costs
from proxies.quality import make_proxy
from proxies.quality.fidelity import cheap_features, full_fidelity
from proxies.quality.supernet import Supernet
from proxies.quality.surrogate import arch_key
from search_spaces import SearchSpace, UNetArch
from search_spaces.yamlio import atomic_write

TRIALS = 200  # one-time work is divided by this many trials (the rule)
VALIDITY_ARCHS = 10  # table archs spread over the recomputed ground truth, trained 5x longer and repeated
LONG_FACTOR = 5
BASELINE_EVERY = 8
BASELINE = "cosine@16/lr0.002"


def split_of(benchmark: str, split: str) -> str | list[str]:
    """The ``split`` option of the supernet proxy: ``auto`` (the proxy's default: the ResNet counts that damage
    inheritance most, as many as its steps allow); with ``inheritance``, the down stage whose keeping one ResNet
    breaks inheritance (digits: the first; shapes and shapes2: the second; see ``table_space``); with a
    comma-separated list of decision names, those; else none (a one-shot supernet)."""
    if split in ("none", "auto"):
        return [] if split == "none" else "auto"
    if split == "inheritance":
        return ["down[0].resnets" if benchmark == "digits" else "down[1].resnets"]
    return split.split(",")


def context(results: dict) -> tuple:
    """The source run's context (its teacher, rebuilt or loaded from its work folder), options and table."""
    rargs = run_args(results)
    rargs.tests = "table"
    rargs.gt_lr, rargs.gt_loss, rargs.gt_steps, rargs.feature_eval_items = 1e-3, "bksdm", 200, SHORT_EVAL_ITEMS
    ctx, _, _, _ = setup(rargs)
    return ctx, rargs, [UNetArch.from_dict(e["arch"]) for e in results["archs"]]


def run_gt(args, results: dict) -> None:
    """This machine's ground truth of every table arch and the proxies to beat, on this machine's teacher: a
    teacher retrained on other CPU kernels is another teacher (the 16-step baseline moves by up to 9% of its
    value), and a ground truth belongs to its teacher. Cached in the source run's work folder under its names,
    each arch claimed so that two processes share the table."""
    ctx, rargs, archs = context(results)
    jobs = [(f"supernet-gt-{i}", lambda a=a: (
        gt(rargs, ctx, a, 200, rargs.seed),
        cached(rargs.work / f"cos-{arch_key(a)}-16-0.002.json", lambda: full_fidelity(
            a, ctx, 16, lr=0.002, seed=rargs.seed, eval_items=SHORT_EVAL_ITEMS)),
        cached(rargs.work / f"d20-{arch_key(a)}.json",
               lambda: cheap_features(a, ctx, 20, eval_items=SHORT_EVAL_ITEMS))))
        for i, a in enumerate(archs)]
    run_claimed(rargs, jobs)


def validity_archs(rargs, archs: list[UNetArch]) -> list[UNetArch]:
    """``VALIDITY_ARCHS`` table archs spread evenly over the range of this machine's ground truth (best to
    worst), so that the 5x check covers close pairs and distant ones alike."""
    paths = [rargs.work / f"gt-{arch_key(a)}-200-{rargs.seed}.json" for a in archs]
    if not all(p.is_file() for p in paths):
        raise SystemExit("run --part gt to the end first: the validity archs are picked by its ground truth")
    order = np.argsort([json.loads(p.read_text())["task_loss"] for p in paths])
    return [archs[order[i]] for i in np.linspace(0, len(archs) - 1, VALIDITY_ARCHS).round().astype(int)]


def run_validity(args, results: dict) -> None:
    """The recomputed ground truth's own validity and repeat noise, on this machine's teacher (a recomputed
    table cannot borrow the source run's): each validity arch's ground truth again under another data-order
    seed, then trained ``LONG_FACTOR`` x longer with the same protocol. Claimed, so two processes share it."""
    ctx, rargs, archs = context(results)
    chosen = validity_archs(rargs, archs)
    long_steps = 200 * LONG_FACTOR
    jobs = [(f"supernet-repeat-{i}", lambda a=a: gt(rargs, ctx, a, 200, rargs.seed + 1000))
            for i, a in enumerate(chosen)]
    jobs += [(f"supernet-long-{i}", lambda a=a: gt(rargs, ctx, a, long_steps, rargs.seed))
             for i, a in enumerate(chosen)]
    run_claimed(rargs, jobs)


def validity_here(rargs, archs: list[UNetArch], truth: np.ndarray) -> dict:
    """Validity (tau of the 200-step ranking against the 5x one) and repeat noise of the recomputed ground truth,
    from what ``--part validity`` finished; empty when it has not started."""
    try:
        chosen = validity_archs(rargs, archs)
    except SystemExit:
        return {}
    read = lambda a, steps, seed: (json.loads(p.read_text())["task_loss"]  # noqa: E731
                                   if (p := rargs.work / f"gt-{arch_key(a)}-{steps}-{seed}.json").is_file() else None)
    first = [read(a, 200, rargs.seed) for a in chosen]
    reps = [(f, r) for f, a in zip(first, chosen, strict=True) if (r := read(a, 200, rargs.seed + 1000)) is not None]
    longs = [(f, g) for f, a in zip(first, chosen, strict=True)
             if (g := read(a, 200 * LONG_FACTOR, rargs.seed)) is not None]
    out: dict = {}
    if len(reps) >= 3:
        out.update(noise_figures([f for f, _ in reps], [r for _, r in reps], truth.tolist()))
    if len(longs) >= 3:
        out["ground_truth_validity_n"] = len(longs)
        out["ground_truth_validity_long_steps"] = 200 * LONG_FACTOR
        out["ground_truth_validity_tau"] = float(kendalltau([f for f, _ in longs], [g for _, g in longs]).statistic)
    if out:
        out["ground_truth_validity_measured"] = (f"here, on this machine's teacher: {len(longs)} of {len(chosen)} "
                                                 f"5x runs, {len(reps)} of {len(chosen)} repeats")
    return out


def additivity(space: SearchSpace, archs: list[UNetArch], values: np.ndarray) -> dict:
    """How additive a ranking is over the table's decisions: least squares of log ``values`` on the one-hot
    encoding (main effects), then with every pairwise product. For the ground truth, the tau of each fit against
    it is the best any additive (or pairwise) proxy could reach on this table; for a proxy, the main-effect R^2
    says whether it could rank interactions at all."""
    onehot = _one_hot(space, archs)
    x = onehot[:, onehot.std(axis=0) > 0]
    pairs = [x[:, i] * x[:, j] for i, j in itertools.combinations(range(x.shape[1]), 2)]
    y = np.log(values)
    out = {}
    for name, design in (("additive", x), ("pairwise", np.column_stack([x, *pairs]) if pairs else x)):
        design = np.column_stack([design, np.ones(len(y))])
        fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        out[f"{name}_r2"] = float(1 - np.var(y - fit) / np.var(y))
        out[f"{name}_fit_tau"] = float(kendalltau(fit, y).statistic)
    return out


def baseline_seconds(ctx, archs: list[UNetArch], seed: int) -> list[float]:
    """The cost unit under this process's load: the 16-step baseline on every ``BASELINE_EVERY``-th arch, timed
    afresh (a ground-truth run's seconds are its median over the baseline's share, measured by the source run)."""
    return [full_fidelity(a, replace(ctx, space=None), 16, lr=0.002, seed=seed,
                          eval_items=SHORT_EVAL_ITEMS)["seconds"] for a in archs[::BASELINE_EVERY]]


def store_row(path: Path, key: str, row: dict) -> None:
    """Add ``row`` under ``key`` to the JSON file ``path``, under a file lock (two processes share a table)."""
    with open(path.with_name("configs.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.is_file() else {}
        rows[key] = row
        atomic_write(path, json.dumps(rows, indent=1) + "\n")


def run_short(args, results: dict) -> None:
    """The product proxy's per-trial short run (:meth:`Supernet.short_run`: ``--short-steps`` from inheritance,
    the data order of ``--supernet-seed``, as in a search whose seed is that) on every table arch, timed against
    the 16-step baseline in the same process. The short run does not depend on the supernets, which are
    deterministic under their seed, so a ``--part run`` configuration's shared-weight scores combine with it into
    the product's score without training the supernets again (the report checks the combination against the
    product's end-to-end runs where both exist)."""
    ctx, _, archs = context(results)
    ctx = replace(ctx, seed=args.supernet_seed, cache_dir=None, teacher_outputs={})
    proxy = make_proxy("supernet", short_steps=args.short_steps, short_eval_items=args.short_eval_items)
    name = f"short{args.short_steps}/items{proxy.short_eval_items}/seed{args.supernet_seed}"
    base = baseline_seconds(ctx, archs, results["seed"])
    values, seconds = [], []
    for a in archs:
        start = time.perf_counter()
        values.append(proxy.short_run(a, ctx))
        seconds.append(time.perf_counter() - start)
    row = {"short_steps": args.short_steps, "short_eval_items": proxy.short_eval_items,
           "data_seed": args.supernet_seed, "values": values,
           "seconds_per_arch": float(np.median(seconds)), "baseline_seconds": float(np.median(base)),
           "baseline_seconds_all": base}
    store_row(args.work / "short.json", name, row)
    print(f"{name}: {row['seconds_per_arch']:.2f}s per arch, baseline {row['baseline_seconds']:.2f}s", flush=True)


def combined_rows(configs: dict, shorts: dict, weight: float) -> dict[str, dict]:
    """Each shared-weights-only ``--part run`` configuration times each ``--part short`` run of its seed, as the
    product scores it: shared loss x short loss ** ``weight``; both parts' seconds (each against the baseline
    timed in its own process) add up in the report."""
    out = {}
    for config, row in configs.items():
        if row.get("short_steps") or "/short" in config or config.startswith("prototype:"):
            continue  # the product's own end-to-end runs, or the study's loop that preceded the product's proxy
        for short in shorts.values():
            if short["data_seed"] == row["supernet_seed"]:
                values = [a * b ** weight for a, b in zip(row["values"], short["values"], strict=True)]
                items = short.get("short_eval_items", SHORT_EVAL_ITEMS)
                tail = f"/short{short['short_steps']}x{weight:g}" + (f"i{items}" if items != SHORT_EVAL_ITEMS else "")
                out[config + tail] = {
                    **row, "values": values, "short_steps": short["short_steps"], "short_weight": weight,
                    "short_eval_items": items,
                    "shared_values": row["values"], "short_values": short["values"], "short_part": short,
                    "combined": "shared-weight scores of --part run x --part short's losses"}
    return out


def short_weight_curve(row: dict, tau) -> dict[str, float]:
    """Kendall tau of shared-weight loss x short-run loss ** w over a grid of weights ``w`` (0: the shared weights
    alone): how sensitive the ranking is to the product's one tuned constant."""
    shared, short = np.log(row["shared_values"]), np.log(row["short_values"])
    return {f"{w:g}": tau(np.exp(shared + w * short)) for w in np.round(np.arange(0, 0.105, 0.01), 2)}


def default_rows(proxies: dict) -> list[dict]:
    """The rows run with the product's defaults (``split: auto``, its ``short_steps`` and ``short_weight``) on the
    whole table (no cost bound)."""
    d = Supernet()
    return [v for k, v in proxies.items() if k.startswith("supernet:auto/") and "feasible_share" not in v
            and not v.get("sandwich")
            and v.get("short_steps") == d.short_steps
            and v.get("short_weight") == d.short_weight and v.get("steps") == d.options["steps"]
            and v.get("short_eval_items", SHORT_EVAL_ITEMS) == d.short_eval_items]


def run(args, results: dict) -> None:
    """One supernet configuration of the product's proxy on the table space: the one-time work, then every table
    arch scored; the values and the seconds are kept in the work folder."""
    ctx, _, archs = context(results)
    name = results["benchmark_name"]
    table = SearchSpace(table_space(name))
    space = table if all(table.contains(a) for a in archs) else ctx.space  # a table run, or random test archs
    ctx = replace(ctx, space=space, seed=args.supernet_seed, cache_dir=None, teacher_outputs={})
    bounded = {}
    if args.feasible_share is not None:
        if space is not table:
            raise SystemExit("--feasible-share needs a table run (its bound is a quantile of the table space)")
        text_len = ctx.data.text.shape[1]
        bound = macs_bound(table, args.feasible_share, text_len)
        meets = lambda a: arch_costs(a, batch=1, text_len=text_len).macs <= bound  # noqa: E731
        ctx = replace(ctx, feasible=meets, feasible_label=f"macs <= {bound:.0f}")
        bounded = {"feasible_share": args.feasible_share, "feasible_macs_bound": bound,
                   "feasible_of_arch": [bool(meets(a)) for a in archs]}
    proxy = make_proxy("supernet", steps=args.steps, lr=args.lr, split=split_of(name, args.split),
                       short_steps=args.short_steps, short_weight=args.short_weight,
                       short_eval_items=args.short_eval_items, train_on="feasible" if bounded else "space",
                       sandwich=args.sandwich)
    items = proxy.short_eval_items
    config = f"{args.split}/{args.steps}/lr{args.lr:g}/seed{args.supernet_seed}" + (
        f"/short{args.short_steps}x{args.short_weight:g}" + (f"i{items}" if items != SHORT_EVAL_ITEMS else "")
        if args.short_steps and args.short_weight else "") + (
        f"/feasible{args.feasible_share:g}" if bounded else "") + ("/sandwich" if args.sandwich else "")
    base = baseline_seconds(ctx, archs, results["seed"])
    start = time.perf_counter()
    nets = proxy.fit(ctx)
    super_seconds = time.perf_counter() - start
    print(f"{config}: {len(nets)} supernet(s), {super_seconds:.0f}s", flush=True)
    scores = [proxy(a, ctx) for a in archs]
    row = {"space": space.name, "split": args.split, "split_decisions": proxy.split_names,
           "split_damage": proxy.split_damage,
           "steps": args.steps, "lr": args.lr,
           "supernet_seed": args.supernet_seed, "groups": len(nets),
           "group_of_arch": [str(s.details["group"]) for s in scores], "supernet_seconds": super_seconds,
           "seconds_per_arch": float(np.median([s.seconds for s in scores])), "values": [s.score for s in scores],
           "short_steps": args.short_steps, "short_weight": args.short_weight, "short_eval_items": items,
           "shared_values": [s.details["shared_loss"] for s in scores],
           "short_values": [s.details.get("short_loss") for s in scores],
           "baseline_seconds": float(np.median(base)), "baseline_seconds_all": base,
           **({"sandwich": True} if args.sandwich else {}),
           **bounded, **({"trained_groups": len(nets), "arch_steps": len(proxy.schedule()),
                          "bounded_schedule": "proportional", "group_feasible_share": {
                              str(list(k)): v for k, v in proxy.feasible_share.items()}} if bounded else {})}
    store_row(args.work / "configs.json", config, row)
    print(f"{config}: {row['seconds_per_arch']:.1f}s per arch", flush=True)


def report(args, results: dict) -> None:
    """Kendall tau of every configuration and of the baselines against this machine's ground truth (where
    ``--part gt`` finished; else the source run's, said in ``ground_truth``), costs as shares of the median
    ground-truth run measured here."""
    rargs = run_args(results)
    archs = [UNetArch.from_dict(e["arch"]) for e in results["archs"]]
    here = [[rargs.work / f"{kind}-{arch_key(a)}{tail}.json" for a in archs]
            for kind, tail in (("gt", "-200-" + str(rargs.seed)), ("cos", "-16-0.002"), ("d20", ""))]
    recomputed = all(p.is_file() for paths in here for p in paths)
    entries = results["archs"]
    macs = np.array([e["features"]["macs"] for e in entries])
    params = np.array([e["features"]["params"] for e in entries])
    if recomputed:
        gt_runs, cos, d20 = ([json.loads(p.read_text()) for p in paths] for paths in here)
        truth = np.array([r["task_loss"] for r in gt_runs])
        gt_seconds = float(np.median([r["seconds"] for r in gt_runs]))
        baselines = {BASELINE: ([r["task_loss"] for r in cos], [r["seconds"] for r in cos]),
                     "distill_task@20": ([r["loss@K"] for r in d20], [r["seconds"] for r in d20])}
    else:
        truth = np.array([e["gt"]["task_loss"] for e in entries])
        gt_seconds = float(results["ground_truth_seconds_per_arch"])
        baselines = {}
    tau = lambda v: float(kendalltau(v, truth).statistic)  # noqa: E731
    out = {"benchmark": "proxy_supernet", "environment": environment(), "source": args.results.name,
           "benchmark_name": results["benchmark_name"], "seed": results["seed"], "n_archs": len(archs),
           "threads": 1, "trials_amortised_over": TRIALS,
           "ground_truth": "recomputed on this machine's teacher" if recomputed else "the source run's",
           "ground_truth_seconds_median": gt_seconds,
           # the protocol's validity (tau against 5x longer training) and repeat-noise ceiling, measured by the
           # source run on its teacher; replaced below by --part validity's figures on a recomputed table
           "ground_truth_validity_tau": results.get("ground_truth_validity_tau"),
           "ground_truth_tau_ceiling": results.get("ground_truth_tau_ceiling"),
           "ground_truth_pairs_tied_within_noise": results.get("ground_truth_pairs_tied_within_noise"),
           "ground_truth_validity_measured": "by the source run, on its teacher",
           "source_ground_truth_tau_vs_here": tau([e["gt"]["task_loss"] for e in entries]) if recomputed else None,
           "proxies": {"macs": {"kind": "baseline", "kendall_tau": tau(-macs), "cost_fraction_of_ground_truth": 0.0},
                       "params": {"kind": "baseline", "kendall_tau": tau(-params),
                                  "cost_fraction_of_ground_truth": 0.0}}}
    if recomputed:  # the recomputed ground truth's own validity and noise where --part validity measured them
        out.update(validity_here(rargs, archs, truth))
    if recomputed:  # the timing noise floor: how much one job's seconds vary across the table under the run's load
        out["ground_truth_seconds_p10_p90"] = [float(np.percentile([r["seconds"] for r in gt_runs], q))
                                               for q in (10, 90)]
    for name, (values, seconds) in baselines.items():
        out["proxies"][name] = {"kind": "distill", "kendall_tau": tau(values),
                                "cost_fraction_of_ground_truth": float(np.median(seconds)) / gt_seconds,
                                "seconds_p10_p90": [float(np.percentile(seconds, q)) for q in (10, 90)]}
    if recomputed:  # the table as measured here, for search_quality.py --table-from
        out["per_arch"] = {"ground_truth": truth.tolist(), **{k: list(v) for k, (v, _) in baselines.items()}}
    if not recomputed:  # the source run's figures: the same archs against the same ground truth
        for name in (BASELINE, "distill_task@20"):
            out["proxies"][name] = {"kind": "distill", **{k: results["proxies"][name][k]
                                                          for k in ("kendall_tau", "cost_fraction_of_ground_truth")}}
    table = SearchSpace(table_space(results["benchmark_name"]))
    on_table = all(table.contains(a) for a in archs)
    if on_table:  # the ceiling of an additive proxy: the ground truth's own best additive fit
        out["ground_truth_additivity"] = additivity(table, archs, truth)
    configs_path, shorts_path = args.work / "configs.json", args.work / "short.json"
    configs = json.loads(configs_path.read_text()) if configs_path.is_file() else {}
    shorts = json.loads(shorts_path.read_text()) if shorts_path.is_file() else {}
    combined = combined_rows(configs, shorts, Supernet().short_weight)
    for config, row in combined.items():  # the product's end-to-end runs, where made, must agree exactly
        end_to_end = configs.get(config)
        if end_to_end is not None:
            same = np.allclose(end_to_end["values"], row["values"], rtol=1e-5, atol=0)
            out.setdefault("end_to_end_check", {})[config] = bool(same)
    configs = {**configs, **{k: v for k, v in combined.items() if k not in configs}}
    base_fraction = (out["proxies"][BASELINE]["cost_fraction_of_ground_truth"] if BASELINE in out["proxies"]
                     else results["proxies"][BASELINE]["cost_fraction_of_ground_truth"])
    out["baseline_cost_fraction"] = base_fraction
    for config, row in configs.items():
        values, groups = np.array(row["values"]), np.array(row["group_of_arch"])
        # a ground-truth run's seconds under this configuration's load: its baseline over the baseline's share
        unit = row["baseline_seconds"] / base_fraction if "baseline_seconds" in row else gt_seconds
        one_time = row["supernet_seconds"] / TRIALS / unit
        per_arch = row["seconds_per_arch"] / unit
        if "short_part" in row:  # the short run, timed in its own process against its own baseline
            short = row["short_part"]
            per_arch += short["seconds_per_arch"] / (short["baseline_seconds"] / base_fraction)
        out["proxies"][f"supernet:{config}"] = {
            **{k: v for k, v in row.items() if k not in ("group_of_arch", "short_part")},
            **({"short_seconds_per_arch": row["short_part"]["seconds_per_arch"],
                "short_baseline_seconds": row["short_part"]["baseline_seconds"]} if "short_part" in row else {}),
            "kind": "supernet", "kendall_tau": tau(values),
            "kendall_tau_within_groups": {g: float(kendalltau(values[groups == g], truth[groups == g]).statistic)
                                          for g in sorted(set(groups)) if (groups == g).sum() > 2},
            "cost_fraction_one_time": one_time,
            **({"additivity": additivity(table, archs, values)} if on_table else {}),
            **({"kendall_tau_by_short_weight": short_weight_curve(row, tau)} if row.get("short_values", [None])[0]
               else {}),
            "cost_fraction_of_ground_truth": one_time + per_arch}
    others = {name: values for name, (values, _) in baselines.items()}
    sigma = out.get("ground_truth_repeat_sigma_log", results.get("ground_truth_repeat_sigma_log"))
    bounded = bounded_training(out["proxies"], truth, {**others, "macs": -macs}, sigma)
    if bounded:
        out["bounded_training"] = bounded
    sandwich = sandwich_rule(out["proxies"])
    if sandwich:
        out["sandwich_rule"] = sandwich
        print(f"sandwich rule over {sandwich['seeds']} configurations: paired tau difference "
              f"{sandwich['difference_mean']:+.3f} ({sandwich['difference_min']:+.3f} to "
              f"{sandwich['difference_max']:+.3f}), better on {sandwich['sandwich_better']}")
    within = {k: v for k, v in out["proxies"].items() if v["cost_fraction_of_ground_truth"] <= 0.10}
    best = max(within, key=lambda k: within[k]["kendall_tau"])
    out["best_proxy_within_10_percent"] = {"name": best, **{k: within[best][k] for k in
                                                           ("kendall_tau", "cost_fraction_of_ground_truth")}}
    # the product's default over every supernet seed run (the honest figure, not a best-of), and the shared
    # weights alone (split: auto, no short run: the proxy before short_steps)
    for label, rows in (("supernet_default", default_rows(out["proxies"])),
                        ("supernet_auto", [v for k, v in out["proxies"].items() if k.startswith("supernet:auto/")
                                           and not v.get("short_steps") and "feasible_share" not in v
                                           and not v.get("sandwich")])):
        if rows:
            taus = [v["kendall_tau"] for v in rows]
            out[label] = {"seeds": len(rows), "kendall_tau_min": min(taus), "kendall_tau_max": max(taus),
                          "kendall_tau_mean": float(np.mean(taus)),
                          "cost_fraction_max": max(v["cost_fraction_of_ground_truth"] for v in rows),
                          "target_met_every_seed": all(t >= 0.85 for t in taus) and all(
                              v["cost_fraction_of_ground_truth"] <= 0.10 for v in rows)}
    for name, row in out["proxies"].items():
        print(f"{name:>45}: tau {row['kendall_tau']:.3f}  cost {row['cost_fraction_of_ground_truth']:.1%}")
    for variant, row in out.get("bounded_training", {}).items():
        print(f"bounded training, {row['n_feasible']} of {len(truth)} archs meet the bound ({variant}): tau "
              f"{row['kendall_tau_bounded_mean']:.3f} bounded vs {row['kendall_tau_unbounded_mean']:.3f} unbounded "
              f"(mean over {row['seeds']} seeds; paired difference {row['difference_mean']:+.3f})")
    for label in ("supernet_default", "supernet_auto"):
        if label in out:
            row = out[label]
            print(f"{label} over {row['seeds']} seeds: tau {row['kendall_tau_min']:.3f}-{row['kendall_tau_max']:.3f}, "
                  f"cost <= {row['cost_fraction_max']:.1%}, target met on every seed: {row['target_met_every_seed']}")
    dest = Path("benchmarks/results") / f"proxy_validity_supernet_{run_stem(args.results.stem)}.json"
    atomic_write(dest, json.dumps(out, indent=1) + "\n")
    print(f"ground truth: {out['ground_truth']}; wrote {dest}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="a proxy_validity_cosine*.json of a table run")
    parser.add_argument("--part", choices=("gt", "validity", "run", "short", "report"), default="run")
    parser.add_argument("--steps", type=int, default=Supernet().options["steps"],
                        help="supernet arch-steps in all groups together")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--split", default="auto",
                        help="auto, inheritance, none, or a comma-separated list of the space's decision names")
    parser.add_argument("--supernet-seed", type=int, default=0)
    parser.add_argument("--short-steps", type=int, default=Supernet().short_steps,
                        help="the proxy's short run from inheritance per trial (0: the shared weights alone)")
    parser.add_argument("--short-weight", type=float, default=Supernet().short_weight)
    parser.add_argument("--short-eval-items", type=int, default=Supernet().short_eval_items,
                        help="held-out items of the short run's evaluation")
    parser.add_argument("--sandwich", action="store_true",
                        help="the sandwich rule's largest arch: each step also trains the group's supernet")
    parser.add_argument("--feasible-share", type=float, default=None,
                        help="train under a MACs bound met by this share of the table space (0 < F < 1)")
    args = parser.parse_args()
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--results: {args.results}: {err}")
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        parser.error(f"--results: {args.results}: not a proxy_validity_cosine results file (no {', '.join(missing)})")
    if args.steps < 1 or not args.lr > 0 or args.short_steps < 0 or not args.short_weight >= 0 or \
            args.short_eval_items < 1 or not (args.feasible_share is None or 0 < args.feasible_share < 1):
        parser.error("--steps must be >= 1, --lr > 0, --short-steps >= 0, --short-weight >= 0, "
                     "--short-eval-items >= 1 and --feasible-share in (0, 1)")
    args.work = Path("runs") / f"proxy_supernet_{args.results.stem}"
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    {"gt": run_gt, "validity": run_validity, "run": run, "short": run_short, "report": report}[args.part](args, results)
