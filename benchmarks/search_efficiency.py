"""Search efficiency: hypervolume vs number of trials for each strategy, against random search.

A search strategy is only worth its complexity if it finds a better quality/latency front than random search
with the same number of trials. To measure that without noise from the objectives, every arch of a small space
gets its objectives computed once, up front, with the project's own proxies:

1. The space: a sub-space of ``search_spaces/spaces/digits.yaml`` (3 stages, no mid upsample, the outer down
   stages at 2 ResNets, the first up stage with one attention block): 432 archs that all inherit the teacher.
2. Quality: the distillation proxy (``proxies.quality`` ``distill``, 0 fine-tuning steps, held-out KD loss)
   against the ``digits`` teacher trained here for ``--teacher-steps`` steps; the evaluation is kept small
   (``--eval-items`` x ``--eval-timesteps``) so the table builds in a few minutes on 2 CPU cores.
3. Latency: ``RooflinePredictor`` with the ``a10g`` device spec (fp16, batch 2, 64 px, 8 text tokens).
4. Each strategy (nsga2, tpe, random, evolution) runs through the project's own ``run_worker`` (samplers,
   Evolution's cost pre-filter, budget, duplicate handling, SQLite storage) for ``--trials`` trials and each of
   ``--seeds`` seeds, with an evaluator whose objectives are looked up in the table.
5. Hypervolume, exact in 2-D, of the trials so far after every trial; reference point = the worst value of each
   objective in the table; reported as a fraction of the hypervolume of the whole table (the true front).

    python benchmarks/search_efficiency.py [--trials 60] [--seeds 5] [--table PATH]

Writes ``benchmarks/results/search_efficiency.json``, ``search_efficiency_table.json`` (the precomputed table,
reusable with ``--table``) and ``search_efficiency.png``. The numbers are hypervolumes, not times, so a busy
machine changes only how long it takes.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import RESULTS, save_figure, write_result

from nas.experiment import Experiment
from nas.search.objectives import Evaluator
from nas.search.optuna_backend import run_worker
from proxies.data import digits_cache
from proxies.latency import Settings
from proxies.latency.roofline import RooflinePredictor, load_spec
from proxies.quality import QualityContext, make_proxy
from proxies.quality.train import train
from search_spaces import UNetArch, get_arch
from search_spaces.space import SearchSpace

SPACE = Path(__file__).parents[1] / "search_spaces" / "spaces" / "digits.yaml"
STRATEGIES = ("random", "nsga2", "tpe", "evolution")
QUALITY, LATENCY = "quality_kd", "latency_a10g_ms"
LATENCY_OBJECTIVE = {"name": LATENCY, "kind": "latency", "predictor": "roofline", "spec": "a10g", "dtype": "fp16",
                     "batch": 2, "resolution": 64, "text_len": 8}


def sub_space() -> dict[str, Any]:
    """The digits space narrowed to a size that can be tabulated exhaustively."""
    data = yaml.safe_load(SPACE.read_text())
    data = copy.deepcopy(data)
    data["name"] = "digits_benchmark"
    data["stages"] = [3]
    data["mid"]["upsample"] = False
    data["down"][0]["resnets"] = 2
    data["down"][2]["resnets"] = 2
    data["up"][0]["attentions"] = 1
    return data


# ---- the table -------------------------------------------------------------------------------------------------


def build_table(space: SearchSpace, args: argparse.Namespace) -> dict[str, Any]:
    """Every arch's (quality, latency), computed with the project's proxies and predictor."""
    start = time.perf_counter()
    ctx = QualityContext(data=digits_cache(seed=0), seed=0, batch_size=64, eval_items=args.eval_items,
                         eval_timesteps=args.eval_timesteps)
    teacher = ctx.build(get_arch("digits"), seed=0)
    train(teacher, ctx, args.teacher_steps, lr=2e-3, seed=0)
    ctx.teacher = teacher.eval()
    teacher_seconds = time.perf_counter() - start
    proxy = make_proxy("distill", steps=0, metric="kd")
    latency = RooflinePredictor(load_spec(LATENCY_OBJECTIVE["spec"]),
                                Settings(dtype="fp16", batch=2, resolution=64, text_len=8))
    rows = []
    archs = space.enumerate()
    for i, arch in enumerate(archs):
        rows.append({"encoding": space.encode(arch), QUALITY: float(proxy(arch, ctx).score),
                     LATENCY: float(latency.predict(arch))})
        if (i + 1) % 50 == 0:
            print(f"  table: {i + 1}/{len(archs)} archs, {time.perf_counter() - start:.0f} s", flush=True)
    return {"quality": f"{proxy.name} (held-out KD loss, {args.eval_items} items x {args.eval_timesteps} "
                       f"timesteps) vs digits teacher trained {args.teacher_steps} steps",
            "latency": "RooflinePredictor a10g fp16, batch 2, 64 px, 8 tokens (predicted ms per U-Net step)",
            "teacher_seconds": teacher_seconds, "seconds": time.perf_counter() - start, "rows": rows}


class TableEvaluator(Evaluator):
    """The experiment's evaluator with every objective looked up in the precomputed table, so a strategy's
    result depends only on which archs it picks. ``cheap_only`` (Evolution's pre-filter) sees latency only,
    as with a real quality proxy."""

    def __init__(self, exp: Experiment, table: dict[UNetArch, tuple[float, float]]):
        super().__init__(exp)
        self.table = table

    def objectives(self, arch: UNetArch, cheap_only: bool = False, report: Any = None) -> dict[str, float]:
        quality, latency = self.table[arch]
        return {LATENCY: latency} if cheap_only else {QUALITY: quality, LATENCY: latency}


# ---- hypervolume -----------------------------------------------------------------------------------------------


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Exact 2-D hypervolume (both objectives minimised) of the region dominated by ``points`` and bounded by
    ``ref``: sweep by the first objective and add the slab each new best second objective opens."""
    hv, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:
            hv += (ref[0] - x) * (best_y - y)
            best_y = y
    return hv


def hv_curve(values: list[tuple[float, float]], ref: tuple[float, float], optimum: float) -> list[float]:
    """Normalised hypervolume of the first k trials, for k = 1..len(values) (dominated points add nothing)."""
    return [hypervolume(values[: k + 1], ref) / optimum for k in range(len(values))]


# ---- the searches ----------------------------------------------------------------------------------------------


def run_search(strategy: str, seed: int, space_data: dict[str, Any], trials: int, population: int,
               table: dict[UNetArch, tuple[float, float]], folder: Path) -> tuple[list[tuple[float, float]], int]:
    """One search through ``run_worker``; returns the trials' values in trial order and the distinct archs."""
    exp = Experiment.model_validate({
        "name": f"{strategy}_{seed}", "seed": seed, "space": space_data, "data": "digits",
        "objectives": [{"name": QUALITY, "kind": "quality", "proxy": "distill", "options": {"steps": 0}},
                       LATENCY_OBJECTIVE],
        "strategy": {"name": strategy, "population": population, "prefilter": 8},
        "budget": {"trials": trials}, "output_dir": str(folder), "base_dir": str(folder),
    })
    exp.cross_check()
    url = f"sqlite:///{folder / f'{strategy}_{seed}.db'}"
    study = run_worker(exp, TableEvaluator(exp, table), url, resume=False)
    done = sorted((t for t in study.trials if t.values is not None), key=lambda t: t.number)
    if len(done) != trials:
        raise RuntimeError(f"{strategy} seed {seed}: {len(done)} completed trials, expected {trials}")
    return [(t.values[0], t.values[1]) for t in done], len({json.dumps(t.params, sort_keys=True) for t in done})


def summarise(curves: list[list[float]], threshold: float) -> dict[str, Any]:
    n = len(curves[0])
    by_trial = list(zip(*curves, strict=True))
    reach = [next((k + 1 for k, v in enumerate(c) if v >= threshold), None) for c in curves]
    return {
        "mean": [statistics.fmean(v) for v in by_trial],
        "std": [statistics.pstdev(v) for v in by_trial],
        "min": [min(v) for v in by_trial], "max": [max(v) for v in by_trial],
        "final_mean": statistics.fmean(by_trial[-1]), "final_std": statistics.pstdev(by_trial[-1]),
        f"trials_to_{threshold:g}": reach,
        f"median_trials_to_{threshold:g}": (statistics.median(r if r is not None else n + 1 for r in reach)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--population", type=int, default=10, help="nsga2 and evolution population")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--eval-items", type=int, default=32)
    parser.add_argument("--eval-timesteps", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.95, help="fraction of the optimal hypervolume")
    parser.add_argument("--table", type=Path, help="reuse a table written by an earlier run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    space_data = sub_space()
    space = SearchSpace(space_data)
    if args.table is not None:
        table_info = json.loads(args.table.read_text())
        table_path = args.table
    else:
        print(f"building the table over {space.cardinality()} archs", flush=True)
        table_info = build_table(space, args)
        table_path = write_result("search_efficiency_table", {"space": space_data, **table_info})
    table = {space.decode(r["encoding"]): (r[QUALITY], r[LATENCY]) for r in table_info["rows"]}
    if len(table) != space.cardinality():
        raise RuntimeError(f"the table has {len(table)} distinct archs, the space {space.cardinality()}")
    points = list(table.values())
    ref = (max(p[0] for p in points), max(p[1] for p in points))
    optimum = hypervolume(points, ref)
    from nas.report import pareto_indices

    true_front = {points[i] for i in pareto_indices(points)}

    results: dict[str, Any] = {}
    search_start = time.perf_counter()
    # the studies' SQLite files on tmpfs where there is one: every suggest is a commit, and fsyncs to a disk
    # would dominate the run (the storage is the real one all the same)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        for strategy in STRATEGIES:
            curves, distinct, front_found = [], [], []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                values, n_distinct = run_search(strategy, seed, space_data, args.trials, args.population, table,
                                                Path(tmp))
                curves.append(hv_curve(values, ref, optimum))
                distinct.append(n_distinct)
                front_found.append(len(true_front & set(values)))
            results[strategy] = {**summarise(curves, args.threshold), "distinct_archs": distinct,
                                 "true_front_points_found": front_found, "seconds": time.perf_counter() - t0}
            r = results[strategy]
            print(f"{strategy:10s} HV@{args.trials} {r['final_mean']:.3f} ± {r['final_std']:.3f}  "
                  f"median trials to {args.threshold:g}: {r[f'median_trials_to_{args.threshold:g}']}", flush=True)

    checkpoints = sorted({k for k in (10, 20, 40, args.trials // 2, args.trials) if 1 <= k <= args.trials})
    versus_random = {s: {str(k): results[s]["mean"][k - 1] / results["random"]["mean"][k - 1] for k in checkpoints}
                     for s in STRATEGIES}
    plot = RESULTS / "search_efficiency.png"
    _plot(results, points, true_front, args, plot)
    path = write_result("search_efficiency", {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "space": {"name": space_data["name"], "archs": space.cardinality(), "from": "search_spaces/spaces/digits.yaml"},
        "table": {"file": Path(table_path).name, "quality": table_info["quality"], "latency": table_info["latency"],
                  "seconds": table_info["seconds"], "reference_point": ref, "optimal_hypervolume": optimum,
                  "true_front_size": len(true_front)},
        "hypervolume": "exact 2-D, of all trials so far, divided by the whole table's (1.0 = the true front)",
        "checkpoints": {s: {str(k): [results[s]["mean"][k - 1], results[s]["std"][k - 1]] for k in checkpoints}
                        for s in STRATEGIES},
        "versus_random_mean_hv_ratio": versus_random,
        "strategies": results,
        "search_seconds": time.perf_counter() - search_start, "wall_seconds": time.perf_counter() - t_start,
        "plot": plot.name,
    })
    print(f"wrote {path} and {plot}")


def _plot(results: dict[str, Any], points: list[tuple[float, float]], front: set[tuple[float, float]],
          args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(1, args.trials + 1))
    for strategy, r in results.items():
        lo = [m - s for m, s in zip(r["mean"], r["std"], strict=True)]
        hi = [m + s for m, s in zip(r["mean"], r["std"], strict=True)]
        ax.plot(x, r["mean"], label=strategy, lw=2 if strategy != "random" else 1.5,
                ls="--" if strategy == "random" else "-")
        ax.fill_between(x, lo, hi, alpha=0.15)
    ax.axhline(args.threshold, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume / true front's")
    ax.set_title(f"{len(points)} archs, mean ± std over {args.seeds} seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    bx.scatter([p[1] for p in points], [p[0] for p in points], s=8, color="lightgrey", label="all archs")
    f = sorted(front, key=lambda p: p[1])
    bx.plot([p[1] for p in f], [p[0] for p in f], "o-", color="black", ms=4, label="true Pareto front")
    bx.set_xlabel("predicted latency, A10G fp16 (ms per step)")
    bx.set_ylabel("distillation KD loss (held-out)")
    bx.set_title("the table")
    bx.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
