"""Search quality: how good a front the project's own search finds when a quality proxy drives it, measured
with the validated ground truth.

A proxy's Kendall tau says how it orders archs; a search needs it to pick a good quality/latency front. This
benchmark closes the loop on the 64-arch digits sub-space of ``proxy_validity_cosine.py --tests table``, whose
every arch has the ground truth (the cosine protocol validated against 5x longer training), the cheap features
and the short cosine runs cached in that run's work folder:

1. For each proxy (``--proxies``; the ground truth itself as the ceiling), a table arch -> (proxy score, A10G
   latency predicted by ``RooflinePredictor``).
2. The project's own search loop (``run_worker``: the ``--strategy`` sampler, its cost pre-filter, budget,
   duplicate handling, SQLite storage) for ``--trials`` trials and each of ``--seeds`` seeds, objectives looked up
   in that table, as ``search_efficiency.py`` does.
3. After 20, 30 and 60 trials: the search's own Pareto front (by its proxy and latency), each arch on it
   measured with the ground truth; the exact 2-D hypervolume of those (ground truth, latency) points divided by
   the hypervolume of the true ground-truth front of the whole table (1.0 = the search returned the true front).

    python benchmarks/search_quality.py [--work runs/proxy_validity_cosine_digits_seed0]

Writes ``benchmarks/results/search_quality.json``. The numbers are hypervolumes, not times.
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
from proxy_validity_report import short_cosine_runs
from search_efficiency import LATENCY_OBJECTIVE, QUALITY, TableEvaluator, hypervolume

from nas.experiment import Experiment
from nas.report import pareto_indices
from nas.search.optuna_backend import run_worker
from proxies.latency import Settings
from proxies.latency.roofline import RooflinePredictor, load_spec
from proxies.quality.fidelity import feature_vector
from proxies.quality.surrogate import arch_key, design, fit_ridge
from search_spaces import UNetArch
from search_spaces.space import SearchSpace

CHECKPOINTS = (20, 30, 60)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def arch_record(work: Path, arch: UNetArch, gt_steps: int, seed: int) -> dict | None:
    """The arch's ground truth, cheap features and short cosine runs from the work folder (None if missing)."""
    key = arch_key(arch)
    gt = _read(work / f"gt-{key}-{gt_steps}-{seed}.json")
    feat = _read(work / f"feat-{key}.json")
    short = {f"cosine@{k}/lr{lr:g}": _read(work / f"cos-{key}-{k}-{lr:g}.json")
             for k, lr in short_cosine_runs(gt_steps)}
    if not (gt and feat and all(short.values())):
        return None
    return {"gt": gt["task_loss"], "features": feat, "short": short}


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
    raise SystemExit(f"error: --proxies: unknown proxy {name!r}")


def run_search(strategy: str, seed: int, space_data: dict[str, Any], trials: int,
               table: dict[UNetArch, tuple[float, float]], folder: Path) -> list[UNetArch]:
    """One search through the project's ``run_worker``; the archs of its completed trials in trial order."""
    exp = Experiment.model_validate({
        "name": f"{strategy}_{seed}", "seed": seed, "space": space_data, "data": "digits",
        "objectives": [{"name": QUALITY, "kind": "quality", "proxy": "distill", "options": {"steps": 0}},
                       LATENCY_OBJECTIVE],
        "strategy": {"name": strategy, "population": 10, "prefilter": 8},
        "budget": {"trials": trials}, "output_dir": str(folder), "base_dir": str(folder),
    })
    exp.cross_check()
    url = f"sqlite:///{folder / f'{strategy}_{seed}.db'}"
    study = run_worker(exp, TableEvaluator(exp, table), url, resume=False)
    done = sorted((t for t in study.trials if t.values is not None), key=lambda t: t.number)
    if len(done) != trials:  # a table lookup cannot fail: a failed trial is a broken benchmark
        errors = {t.user_attrs.get("error") for t in study.trials if t.values is None}
        raise RuntimeError(f"{strategy} seed {seed}: {len(done)} of {trials} trials completed: {errors}")
    return [UNetArch.from_dict(t.user_attrs["arch"]) for t in done]


def found_fraction(archs: list[UNetArch], proxy: dict[UNetArch, tuple[float, float]],
                   truth: dict[UNetArch, tuple[float, float]], ref: tuple[float, float], optimum: float) -> float:
    """The search's own front (by its proxy and latency) measured with the ground truth, as a share of the
    true front's hypervolume."""
    distinct = list(dict.fromkeys(archs))
    front = [distinct[i] for i in pareto_indices([proxy[a] for a in distinct])]
    return hypervolume([truth[a] for a in front], ref) / optimum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/proxy_validity_cosine_digits_seed0"),
                        help="work folder of proxy_validity_cosine.py --benchmark digits --tests table")
    parser.add_argument("--seed", type=int, default=0, help="that run's seed")
    parser.add_argument("--gt-steps", type=int, default=200)
    parser.add_argument("--proxies", nargs="+", default=["ground_truth", "surrogate6@5", "cosine@16/lr0.002",
                                                           "distill_task@20", "macs"])
    parser.add_argument("--strategy", default="evolution")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()

    space_data = table_space()
    space = SearchSpace(space_data)
    archs = space.enumerate()
    records = {a: arch_record(args.work, a, args.gt_steps, args.seed) for a in archs}
    missing = [arch_key(a) for a, r in records.items() if r is None]
    if missing:
        raise SystemExit(f"error: {args.work}: {len(missing)} of {len(archs)} table archs not measured yet")
    full = SearchSpace.from_yaml("digits")
    design_archs = design(full, 10, args.seed, text_len=8)
    anchors = [arch_record(args.work, a, args.gt_steps, args.seed) for a in design_archs]
    if any(r is None for r in anchors):
        raise SystemExit(f"error: {args.work}: the design archs (the surrogates' anchors) are not all measured yet")

    latency = RooflinePredictor(load_spec(LATENCY_OBJECTIVE["spec"]),
                                Settings(dtype="fp16", batch=2, resolution=64, text_len=8))
    lat = {a: float(latency.predict(a)) for a in archs}
    truth = {a: (records[a]["gt"], lat[a]) for a in archs}
    points = list(truth.values())
    ref = (max(p[0] for p in points), max(p[1] for p in points))
    optimum = hypervolume(points, ref)
    true_front = [archs[i] for i in pareto_indices(points)]

    from scipy.stats import kendalltau

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        for name in args.proxies:
            scores = proxy_scores(name, [records[a] for a in archs], anchors)
            table = {a: (s, lat[a]) for a, s in zip(archs, scores, strict=True)}
            per_seed: dict[str, list[float]] = {str(k): [] for k in CHECKPOINTS if k <= args.trials}
            for seed in range(args.seeds):
                folder = Path(tmp) / name.replace("/", "_")
                folder.mkdir(exist_ok=True)
                found = run_search(args.strategy, seed, space_data, args.trials, table, folder)
                for k in per_seed:
                    per_seed[k].append(found_fraction(found[: int(k)], table, truth, ref, optimum))
            whole = found_fraction(archs, table, truth, ref, optimum)  # the proxy's front over the whole table
            results[name] = {
                "kendall_tau": float(kendalltau(scores, [records[a]["gt"] for a in archs]).statistic),
                "ground_truth_hypervolume_fraction": per_seed,
                "mean": {k: float(np.mean(v)) for k, v in per_seed.items()},
                "whole_table_front_fraction": whole}
            print(f"{name:32s} tau {results[name]['kendall_tau']:5.2f}  " + "  ".join(
                f"HV@{k} {np.mean(v):.3f}±{np.std(v):.3f}" for k, v in per_seed.items()) +
                f"  (whole-table front {whole:.3f})", flush=True)

    path = write_result("search_quality", {
        "space": {"name": space_data["name"], "archs": len(archs), "definition": space_data},
        "ground_truth": "the cosine protocol of proxy_validity_cosine.py (validated against 5x longer training)",
        "latency": "RooflinePredictor a10g fp16, batch 2, 64 px, 8 tokens (predicted ms per U-Net step)",
        "strategy": args.strategy, "trials": args.trials, "seeds": args.seeds, "checkpoints": list(CHECKPOINTS),
        "hypervolume": "exact 2-D, of the search's own front (by its proxy) measured with the ground truth, "
                       "divided by the true ground-truth front's",
        "reference_point": ref, "true_front_size": len(true_front),
        "proxies": results, "wall_seconds": time.perf_counter() - start,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
