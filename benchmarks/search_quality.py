"""Search quality: how good a front the project's own search finds when a quality proxy drives it, measured
with the validated ground truth.

A proxy's Kendall tau says how it orders archs; a search needs it to pick a good quality/latency front. This
benchmark closes the loop on a benchmark's 64-arch sub-space (:func:`table_space`) whose every arch has the ground
truth (the cosine protocol validated against 5x longer training), the cheap features and the short cosine runs:
the results file of ``proxy_validity_cosine.py --tests table`` keeps them all (``--results``), so the study
reruns from a clean checkout.

1. For each proxy (``--proxies``; the ground truth itself as the ceiling), a table arch -> (proxy score, A10G
   latency predicted by ``RooflinePredictor`` at the benchmark's latent size and caption length).
2. The project's own search loop (``run_worker``: the ``--strategy`` sampler, its cost pre-filter, budget,
   duplicate handling, SQLite storage) for ``--trials`` trials and each of ``--seeds`` seeds, objectives looked up
   in that table, as ``search_efficiency.py`` does.
3. After each of ``--checkpoints`` trials (20, 30, 60): the search's own Pareto front (by its proxy and latency),
   each arch on it measured with the ground truth; the exact 2-D hypervolume of those (ground truth, latency)
   points divided by the hypervolume of the true ground-truth front of the whole table (1.0 = the search returned
   the true front).
4. ``--refine N`` (2): the same for the finalists, the search's archs on the first N Pareto layers of its own
   values, trained to the ground truth, the front then picked by the ground truth: budget spent unevenly, one
   full run per finalist (counted in ``refined_finalists``). At the full budget the product's own refinement
   (``refine: {layers: N}``, :func:`nas.search.refine.run_refine`, its refined value the table's ground truth)
   runs after each search; ``product_refine`` records that it refined exactly these finalists.

    python benchmarks/search_quality.py    # digits, seed 0: benchmarks/results/proxy_validity_cosine.json
    python benchmarks/search_quality.py \
        --results benchmarks/results/proxy_validity_cosine_shapes2_table_seed1_teacher4000.json

``--latency-share F`` searches under a latency constraint, as the DeciDiffusion experiments do: at most the ``F``
quantile of the table's latencies, so that a share ``F`` of the table meets it. The search gets it as a constraint
(the strategy's pre-filter and the product's refinement honour it), and every hypervolume is over the archs meeting
it: the search's own front among its feasible trials, against the true front of the feasible archs.

Writes ``benchmarks/results/search_quality.json`` (digits, seed 0), else ``search_quality_BENCHMARK_seedN.json``
(``_latencyF`` appended under a latency constraint).
The numbers are hypervolumes, not times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import write_result
from proxy_validity_cosine import table_space
from search_efficiency import LATENCY_OBJECTIVE, QUALITY, TableEvaluator, hypervolume

from nas.experiment import Experiment
from nas.report import pareto_indices
from nas.search.optuna_backend import make_storage, open_study, run_worker
from nas.search.refine import nondominated_layers, refined_rows, run_refine
from proxies.benchmark import get_benchmark
from proxies.latency import Settings
from proxies.latency.roofline import RooflinePredictor, load_spec
from proxies.quality.fidelity import feature_vector
from proxies.quality.surrogate import fit_ridge
from search_spaces import UNetArch
from search_spaces.space import SearchSpace

CHECKPOINTS = (20, 30, 60)


def records_from(results: dict) -> tuple[dict[UNetArch, dict], list[dict]]:
    """Each test arch's record (ground truth, cheap features, short cosine runs) and the design archs' (the
    surrogates' anchors, in design order) from a ``proxy_validity_cosine*.json``, which keeps them all."""
    def record(e: dict) -> dict:
        return {"gt": e["gt"]["task_loss"], "features": e["features"], "short": e["features"]["short"]}

    tests = {UNetArch.from_dict(e["arch"]): record(e) for e in results["archs"]}
    return tests, [record(e) for e in results["design_archs"]]


def proxy_scores(name: str, rows: list[dict], anchors: list[dict]) -> list[float]:
    """Each row's score under proxy ``name`` (lower is better): ``ground_truth``, ``macs`` (more is better, so
    negated), ``params``, ``distill_task@K`` (the held-out loss after K constant-rate distillation steps),
    ``cosine@K/lrX`` (the ground-truth protocol at K steps), ``surrogateN@K`` or ``surrogateN[cosine@K/lrX]``
    (ridge regression of the log ground truth on the held-out loss after K constant-rate distillation steps, or
    after that short cosine run, and log MACs, fitted on the first N design archs)."""
    if name == "ground_truth":
        return [r["gt"] for r in rows]
    if name in ("macs", "params"):
        return [-float(r["features"][name]) for r in rows]
    if name.startswith("distill_task@"):
        return [r["features"]["curve"][name.split("@")[1]] for r in rows]
    if name.startswith("cosine@"):
        return [r["short"][name]["task_loss"] for r in rows]
    if name.startswith("surrogate"):
        names = ("loss@K", "macs")
        if "@" in name.split("[")[0]:  # surrogateN@K
            n, k = name[len("surrogate"):].split("@")

            def feats(r: dict) -> dict:
                return {**r["features"], "loss@K": r["features"]["curve"][k]}
        else:  # surrogateN[cosine@K/lrX]
            n, short = name[len("surrogate"):].split("[", 1)
            short = short.rstrip("]")

            def feats(r: dict) -> dict:
                return {**r["features"], "loss@K": r["short"][short]["task_loss"]}

        fit = anchors[: int(n)]
        model = fit_ridge([feats(r) for r in fit], [r["gt"] for r in fit], names)
        return [float(model.predict(np.array([feature_vector(feats(r), names)]))[0]) for r in rows]
    raise ValueError(f"unknown proxy {name!r}")


def table_from(study: dict, results: dict, records: dict[UNetArch, dict]) -> dict[str, dict[UNetArch, float]]:
    """The supernet configurations of a ``proxy_validity_supernet_*.json`` as proxies (``supernet:CONFIG`` -> the table
    archs' values, in ``results``' order). Where that study recomputed the table on its own teacher
    (``per_arch``), its ground truth, ``cosine@16/lr0.002`` and ``distill_task@20`` replace the source's in
    ``records``: every proxy is then judged against the ground truth of the teacher it was measured with."""
    order = [UNetArch.from_dict(e["arch"]) for e in results["archs"]]
    per_arch = study.get("per_arch")
    if per_arch is not None:
        for i, arch in enumerate(order):
            r = records[arch]
            r["gt"] = per_arch["ground_truth"][i]
            r["short"] = {**r["short"], "cosine@16/lr0.002": {"task_loss": per_arch["cosine@16/lr0.002"][i]}}
            r["features"] = {**r["features"],
                             "curve": {**r["features"]["curve"], "20": per_arch["distill_task@20"][i]}}
    out = {}
    for name, row in study["proxies"].items():
        if name.startswith("supernet:"):
            out[name] = dict(zip(order, row["values"], strict=True))
    return out


class RefineTableEvaluator(TableEvaluator):
    """The table evaluator whose refined value (``refine``) is the arch's ground truth: what training a finalist
    with the ground-truth protocol returns, looked up."""

    def __init__(self, exp: Experiment, table: dict[UNetArch, tuple[float, float]],
                 truth: dict[UNetArch, tuple[float, float]]):
        super().__init__(exp, table)
        self.truth = truth

    def refined_quality(self, arch: UNetArch) -> float:
        return self.truth[arch][0]


def _other_worker(exp_data: dict[str, Any], table: dict, truth: dict, url: str, index: int) -> None:
    """A further worker process on the study (as ``unet-nas search --workers`` starts them): its own sampler seed."""
    exp = Experiment.model_validate(exp_data)
    run_worker(exp, RefineTableEvaluator(exp, table, truth), url, resume=True, worker=str(index))


def run_search(strategy: str, seed: int, space_data: dict[str, Any], trials: int,
               table: dict[UNetArch, tuple[float, float]], folder: Path, latency: dict[str, Any],
               truth: dict[UNetArch, tuple[float, float]], refine: int,
               workers: int = 1, latency_max: float | None = None) -> tuple[list[UNetArch], list[UNetArch]]:
    """One search through the project's ``run_worker`` (``workers`` processes on one study, as ``--workers``
    runs them), then (``refine`` > 0) its refinement through ``run_refine``: the archs of its completed trials in
    trial order, and the archs it refined."""
    exp = Experiment.model_validate({
        "name": f"{strategy}_{seed}", "seed": seed, "space": space_data, "data": "digits",
        "objectives": [{"name": QUALITY, "kind": "quality", "proxy": "distill", "options": {"steps": 0}}, latency],
        "strategy": {"name": strategy, "population": 10, "prefilter": 8},
        "budget": {"trials": trials}, "output_dir": str(folder), "base_dir": str(folder),
        **({"refine": {"layers": refine}} if refine else {}),
        **({"constraints": [{"objective": latency["name"], "max": latency_max}]} if latency_max is not None else {}),
    })
    exp.cross_check()
    url = f"sqlite:///{folder / f'{strategy}_{seed}.db'}"
    evaluator = RefineTableEvaluator(exp, table, truth)
    if workers == 1:
        study = run_worker(exp, evaluator, url, resume=False)
    else:  # the study first, then every worker joins it; this process is worker "0" (the experiment's seed)
        import multiprocessing as mp

        open_study(exp, make_storage(url, exp), resume=False)
        spawn = mp.get_context("spawn")
        procs = [spawn.Process(target=_other_worker, args=(exp.model_dump(), table, truth, url, i))
                 for i in range(1, workers)]
        for p in procs:
            p.start()
        study = run_worker(exp, evaluator, url, resume=True, worker="0")
        for p in procs:
            p.join()
    done = sorted((t for t in study.get_trials() if t.values is not None), key=lambda t: t.number)
    # several workers may each overshoot the budget by one trial (Optuna's guarantee); one worker never does
    if len(done) < trials or (workers == 1 and len(done) != trials):  # a failed table lookup: a broken benchmark
        errors = {t.user_attrs.get("error") for t in study.trials if t.values is None}
        raise RuntimeError(f"{strategy} seed {seed}: {len(done)} of {trials} trials completed: {errors}")
    refined: list[UNetArch] = []
    if refine:
        rows = refined_rows(exp, study, run_refine(exp, evaluator, url))
        refined = [UNetArch.from_dict(r["arch"]) for r in rows]
    return [UNetArch.from_dict(t.user_attrs["arch"]) for t in done], refined


def table_truth(records: dict[UNetArch, dict], latent: int, text_len: int) -> tuple[dict, dict, tuple, float]:
    """Each table arch's A10G latency (roofline, fp16, batch 2, at the benchmark's shapes) and (ground truth,
    latency) point, the hypervolume reference point (the worst of each) and the true front's hypervolume."""
    latency = RooflinePredictor(load_spec(LATENCY_OBJECTIVE["spec"]),
                                Settings(dtype="fp16", batch=2, resolution=latent * 8, text_len=text_len))
    lat = {a: float(latency.predict(a)) for a in records}
    truth = {a: (records[a]["gt"], lat[a]) for a in records}
    points = list(truth.values())
    ref = (max(p[0] for p in points), max(p[1] for p in points))
    return lat, truth, ref, hypervolume(points, ref)


def top_layers(archs: list[UNetArch], proxy: dict[UNetArch, tuple[float, float]], layers: int) -> list[UNetArch]:
    """The search's distinct archs on the first ``layers`` Pareto layers of its own (proxy, latency) values
    (non-dominated sorting, as NSGA-II ranks and ``refine`` picks): layer 1 is its front, layer 2 the front of the
    rest, ... Only archs of ``truth`` count (under a constraint, the feasible ones, as the product's report and
    refinement pick among feasible trials)."""
    rest = [a for a in dict.fromkeys(archs) if a in proxy]
    return [rest[i] for layer in nondominated_layers([proxy[a] for a in rest])[:layers] for i in layer]


def front_fraction(archs: list[UNetArch], proxy: dict[UNetArch, tuple[float, float]],
                   truth: dict[UNetArch, tuple[float, float]], ref: tuple[float, float], optimum: float,
                   layers: int = 1) -> tuple[float, int]:
    """The archs on the first ``layers`` Pareto layers by the search's own values (:func:`top_layers`) measured
    with the ground truth, as a share of the true front's hypervolume, and how many archs that is. Layer 1 is
    the search's own front; with more layers these are the finalists trained with the ground-truth protocol and
    the front picked from them by the ground truth (dominated archs add no hypervolume), at one ground-truth run
    per finalist after the search."""
    chosen = top_layers([a for a in archs if a in truth], proxy, layers)
    return hypervolume([truth[a] for a in chosen], ref) / optimum, len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/proxy_validity_cosine.json"),
                        help="a proxy_validity_cosine.py --tests table results file (default: digits, seed 0)")
    parser.add_argument("--proxies", nargs="+", default=["ground_truth", "surrogate6@5", "cosine@16/lr0.002",
                                                           "distill_task@20", "macs"])
    parser.add_argument("--table-from", type=Path, default=None,
                        help="a proxy_validity_supernet_*.json: its supernet configurations become proxies "
                             "(supernet:CONFIG), and where it recomputed the table on its own teacher, that "
                             "ground truth and its cosine@16/lr0.002 and distill_task@20 replace the source's")
    parser.add_argument("--strategy", default="evolution")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=list(CHECKPOINTS),
                        help="trial counts at which the found front is measured")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes per search (results file suffixed _workersN when > 1)")
    parser.add_argument("--refine", type=int, default=2,
                        help="also measure the front of the first N Pareto layers fully trained (0: off)")
    parser.add_argument("--latency-share", type=float, default=None,
                        help="search under a latency constraint met by this share of the table (0 < F < 1)")
    args = parser.parse_args()
    if args.refine < 0 or args.workers < 1 or min(args.checkpoints) < 1 or max(args.checkpoints) > args.trials:
        parser.error("--refine must be >= 0, --workers >= 1 and every --checkpoints value within 1..--trials")
    if args.latency_share is not None and not 0 < args.latency_share < 1:
        parser.error("--latency-share must be in (0, 1)")
    start = time.perf_counter()
    try:
        results = json.loads(args.results.read_text())
        if results.get("tests", "table") != "table":  # digits' table run predates the key
            raise ValueError("its test archs are random ones, not a table (run it with --tests table)")
        bench_name, run_seed = results["benchmark_name"], results["seed"]
        records, anchors = records_from(results)
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"--results: {args.results}: {err!r}" if isinstance(err, KeyError) else
                     f"--results: {args.results}: {err}")
    supernets: dict[str, dict[UNetArch, float]] = {}
    if args.table_from is not None:
        try:
            study = json.loads(args.table_from.read_text())
            if study.get("source") != args.results.name:
                raise ValueError(f"it studied {study.get('source')}, not {args.results.name}")
            supernets = table_from(study, results, records)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--table-from: {args.table_from}: {err}")
    bench = get_benchmark(bench_name, seed=0)
    latent, text_len = bench.data.latent_shape[-1], bench.data.text.shape[1]
    # the experiment's latency objective and the table's: A10G, fp16, batch 2, at the benchmark's shapes
    latency_objective = {**LATENCY_OBJECTIVE, "resolution": latent * 8, "text_len": text_len}

    space_data = table_space(bench_name)
    space = SearchSpace(space_data)
    archs = space.enumerate()
    if set(archs) != set(records):
        parser.error(f"--results: {args.results}: its {len(records)} test archs are not the {bench_name} table's "
                     f"{len(archs)}")

    lat, truth, ref, optimum = table_truth(records, latent, text_len)
    latency_max = None
    if args.latency_share is not None:  # only the archs meeting the constraint count, as in a constrained search
        latency_max = float(np.quantile(list(lat.values()), args.latency_share, method="inverted_cdf"))
        truth = {a: p for a, p in truth.items() if lat[a] <= latency_max}
        points = list(truth.values())
        ref = (max(p[0] for p in points), max(p[1] for p in points))
        optimum = hypervolume(points, ref)
    on_front = set(pareto_indices(list(truth.values())))
    true_front = [a for i, a in enumerate(truth) if i in on_front]

    all_scores: dict[str, list[float]] = {}
    for name in args.proxies:  # every name checked before the first search runs
        try:
            all_scores[name] = ([supernets[name][a] for a in archs] if name in supernets else
                                proxy_scores(name, [records[a] for a in archs], anchors))
        except (ValueError, KeyError, IndexError) as err:
            parser.error(f"--proxies: {name}: {err}")

    from scipy.stats import kendalltau

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        for name in args.proxies:
            scores = all_scores[name]
            table = {a: (s, lat[a]) for a, s in zip(archs, scores, strict=True)}
            judged = {a: v for a, v in table.items() if a in truth}  # the feasible archs' values
            per_seed: dict[str, list[float]] = {str(k): [] for k in sorted(set(args.checkpoints))}
            refined: dict[str, list[float]] = {k: [] for k in per_seed}
            finalists: dict[str, list[int]] = {k: [] for k in per_seed}
            product: list[bool] = []
            for seed in range(args.seeds):
                folder = Path(tmp) / name.replace("/", "_")
                folder.mkdir(exist_ok=True)
                found, by_product = run_search(args.strategy, seed, space_data, args.trials, table, folder,
                                               latency_objective, truth, args.refine, args.workers, latency_max)
                if args.refine:  # the product refined exactly the finalists this study measures at the full budget
                    product.append(set(by_product) == set(top_layers(found, judged, args.refine)))
                for k in per_seed:
                    per_seed[k].append(front_fraction(found[: int(k)], judged, truth, ref, optimum)[0])
                    if args.refine:
                        hv, n = front_fraction(found[: int(k)], judged, truth, ref, optimum, args.refine)
                        refined[k].append(hv)
                        finalists[k].append(n)
            whole = front_fraction(archs, judged, truth, ref, optimum)[0]  # the proxy's front over the whole table
            results[name] = {
                "kendall_tau": float(kendalltau(scores, [records[a]["gt"] for a in archs]).statistic),
                **({"kendall_tau_feasible": float(kendalltau([judged[a][0] for a in truth],
                                                             [records[a]["gt"] for a in truth]).statistic)}
                   if latency_max is not None else {}),
                "ground_truth_hypervolume_fraction": per_seed,
                "mean": {k: float(np.mean(v)) for k, v in per_seed.items()},
                "whole_table_front_fraction": whole}
            if args.refine:
                results[name]["refined_hypervolume_fraction"] = refined
                results[name]["refined_mean"] = {k: float(np.mean(v)) for k, v in refined.items()}
                results[name]["refined_finalists"] = finalists
                results[name]["product_refine"] = {
                    "same_finalists_as_measured": product,
                    "what": f"run_refine after each {args.trials}-trial search refined the same archs as the "
                            f"first {args.refine} Pareto layers measured above (one entry per seed)"}
                if not all(product):
                    raise RuntimeError(f"{name}: the product's refinement chose other finalists: {product}")
            print(f"{name:32s} tau {results[name]['kendall_tau']:5.2f}  " + "  ".join(
                f"HV@{k} {np.mean(v):.3f}±{np.std(v):.3f}" for k, v in per_seed.items()) +
                f"  (whole-table front {whole:.3f})" + ("  refined " + "  ".join(
                    f"@{k} {np.mean(v):.3f} ({np.mean(finalists[k]):.1f} runs)" for k, v in refined.items())
                    if args.refine else ""), flush=True)

    name = "search_quality" + ("" if (bench_name, run_seed) == ("digits", 0) else f"_{bench_name}_seed{run_seed}")
    name += f"_workers{args.workers}" if args.workers > 1 else ""
    name += "_supernet" if args.table_from is not None else ""
    name += f"_latency{args.latency_share:g}" if latency_max is not None else ""
    path = write_result(name, {
        "source": args.results.name, "benchmark_name": bench_name, "seed": run_seed,
        "table_from": args.table_from.name if args.table_from is not None else None,
        "ground_truth_teacher": ("recomputed on the teacher of --table-from" if args.table_from is not None
                         and "per_arch" in study else "the source run's"),
        "space": {"name": space_data["name"], "archs": len(archs), "definition": space_data},
        "ground_truth": "the cosine protocol of proxy_validity_cosine.py (validated against 5x longer training)",
        "latency": f"RooflinePredictor a10g fp16, batch 2, {latent * 8} px, {text_len} tokens "
                   "(predicted ms per U-Net step)",
        "strategy": args.strategy, "trials": args.trials, "seeds": args.seeds, "workers": args.workers,
        "checkpoints": sorted(set(args.checkpoints)),
        "refine": args.refine or None,
        "refined": "the search's archs on the first --refine Pareto layers of its own values (non-dominated "
                   "sorting), trained with the ground-truth protocol, the front picked from those by the ground "
                   "truth; refined_finalists: how many ground-truth runs that took" if args.refine else None,
        "hypervolume": "exact 2-D, of the search's own front (by its proxy) measured with the ground truth, "
                       "divided by the true ground-truth front's",
        "reference_point": ref, "true_front_size": len(true_front),
        "latency_constraint": None if latency_max is None else {
            "share": args.latency_share, "max_ms": latency_max, "feasible_archs": len(truth),
            "what": "a constraint of every search; hypervolumes over the archs meeting it"},
        "proxies": results, "wall_seconds": time.perf_counter() - start,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
