"""The product end to end on a table whose every arch has the validated ground truth: ``unet-nas search`` with a
short proxy, then ``refine`` with the ground-truth recipe, judged by the committed ground truth.

``search_quality.py`` looks every value up in the table; this runs the real thing. The experiment searches the
64-arch table sub-space of ``--benchmark`` (:func:`table_space`) around the teacher of the proxy-validity run
whose results file is ``--results`` (its work folder's ``teacher/``, bit for bit), on that benchmark's data saved
as a latent cache folder, with:

* the quality objective ``distill`` at the short cosine run of the validity study (16 steps, peak 2e-3, task
  loss) and the A10G roofline latency at the benchmark's shapes, ``evolution``, ``--trials`` trials, ``--workers``
  processes;
* ``refine: {layers: 2}`` with the ground-truth recipe (200 cosine steps at 1e-3, BK-SDM distillation, task
  loss), and a quality context set as the ground truth evaluates (batch 32, the whole validation split, 20
  timesteps), so that a refined value is the ground-truth protocol run by the product.

It reports how far the product's refined values are from the committed ground truth of the same archs (the same
protocol, seed and teacher: equal up to the order of floating-point sums), and the share of the true front's
hypervolume (ground truth x latency, all 64 archs) that the search's own front and its refined front reach.

    python benchmarks/refine_live.py --results \\
        benchmarks/results/proxy_validity_cosine_shapes2_table_teacher4000.json   # -> refine_live_shapes2_seed0.json

The search's wall time depends on the machine's load; the hypervolumes and values do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from common import table_suffix, teacher_suffix, write_result
from proxy_validity_cosine import table_space
from search_efficiency import LATENCY_OBJECTIVE, hypervolume
from search_quality import records_from, table_truth

from nas.report import pareto_indices
from proxies.benchmark import TEACHER_STEPS, get_benchmark
from proxies.quality.fidelity import GT_TIMESTEPS
from search_spaces import UNetArch

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True,
                        help="a proxy_validity_cosine.py --tests table results file (its teacher and ground truth)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="default: runs/refine_live_BENCHMARK_seedN")
    args = parser.parse_args()
    try:
        results = json.loads(args.results.read_text())
        bench_name, seed = results["benchmark_name"], results["seed"]
        records, _ = records_from(results)
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"--results: {args.results}: {err}")
    steps = TEACHER_STEPS[bench_name]
    source = ROOT / "runs" / f"proxy_validity_cosine_{bench_name}_seed{seed}{teacher_suffix(steps)}" / "teacher"
    if not (source / "config.json").is_file():
        parser.error(f"no teacher at {source}: run proxy_validity_cosine.py --part all --tests table --benchmark "
                     f"{bench_name} --seed {seed} first (it trains and keeps it)")
    work = args.work or ROOT / "runs" / f"refine_live_{bench_name}_seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    bench = get_benchmark(bench_name, seed=0)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        bench.data.save(data)
    latent, text_len = bench.data.latent_shape[-1], bench.data.text.shape[1]
    latency = {**LATENCY_OBJECTIVE, "resolution": latent * 8, "text_len": text_len}
    val = len(bench.data.split("val"))
    name = f"live_{bench_name}_s{seed}"
    exp = {
        "name": name, "seed": seed, "space": table_space(bench_name), "data": str(data.resolve()),
        "teacher": {"path": str(source.resolve())}, "device": "cpu", "output_dir": str(work.resolve()),
        "quality_context": {"batch_size": 32, "eval_items": val, "eval_timesteps": GT_TIMESTEPS},
        "objectives": [{"name": "quality", "kind": "quality", "proxy": "distill",
                        "options": {"steps": 16, "lr": 2e-3, "schedule": "cosine", "metric": "task"}}, latency],
        "strategy": {"name": "evolution", "population": 10, "prefilter": 8},
        "budget": {"trials": args.trials},
        "refine": {"layers": 2, "options": {"steps": 200, "lr": 1e-3, "schedule": "cosine", "metric": "task"}},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    db = work / name / "study.db"
    command = [sys.executable, "-m", "nas", "search", str(path), "--workers", str(args.workers)]
    if db.is_file():
        command.append("--resume")
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per worker
    done = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - start
    print(done.stdout[-3000:], done.stderr[-3000:])
    if done.returncode != 0:
        sys.exit(f"unet-nas search failed (exit {done.returncode})")

    url = f"sqlite:///{db}"
    search = optuna.load_study(study_name=name, storage=url)
    refine = optuna.load_study(study_name=f"{name}.refine", storage=url)
    lat, truth, ref, optimum = table_truth(records, latent, text_len)
    complete = [t for t in search.trials if t.state == optuna.trial.TrialState.COMPLETE]
    archs = [UNetArch.from_dict(t.user_attrs["arch"]) for t in complete]
    own = [archs[i] for i in pareto_indices([tuple(t.values) for t in complete])]
    refined = [t for t in refine.trials if t.state == optuna.trial.TrialState.COMPLETE
               and "duplicate_of" not in t.user_attrs]
    pairs = [(UNetArch.from_dict(t.user_attrs["arch"]), t.value, t.user_attrs.get("seconds")) for t in refined]
    gaps = [abs(v / records[a]["gt"] - 1) for a, v, _ in pairs]
    refined_archs = [a for a, _, _ in pairs]
    by_value = [(v, lat[a]) for a, v, _ in pairs]
    refined_front = [refined_archs[i] for i in pareto_indices(by_value)]
    out = {
        "source": args.results.name, "benchmark_name": bench_name, "seed": seed, "trials": args.trials,
        "workers": args.workers, "experiment": {k: v for k, v in exp.items() if k not in ("space", "output_dir")},
        "space": table_space(bench_name)["name"], "threads_per_worker": 1,
        "search_trials": len(search.trials), "complete": len(complete), "distinct_archs": len(set(archs)),
        "refined": len(pairs), "refine_trials": len(refine.trials),
        "refine_seconds": [s for _, _, s in pairs],
        "refined_vs_committed_ground_truth": {
            "max_relative_gap": max(gaps) if gaps else None, "mean_relative_gap": sum(gaps) / len(gaps) if gaps
            else None,
            "pairs": [{"arch": a.to_dict(), "refined": v, "ground_truth": records[a]["gt"]} for a, v, _ in pairs]},
        "hypervolume_fraction": {
            "search_front_by_its_proxy": hypervolume([truth[a] for a in own], ref) / optimum,
            "refined_front": hypervolume([truth[a] for a in refined_front], ref) / optimum},
        "hypervolume": "exact 2-D of the archs' committed (ground truth, A10G roofline latency) over the true "
                       "front's of all 64 table archs",
        "wall_seconds": wall,
    }
    hv = out["hypervolume_fraction"]
    print(f"{len(complete)} trials, {len(pairs)} refined; refined vs committed ground truth: max gap "
          f"{out['refined_vs_committed_ground_truth']['max_relative_gap']}; HV fraction: search front "
          f"{hv['search_front_by_its_proxy']:.3f}, refined front {hv['refined_front']:.3f}; {wall:.0f} s")
    name = f"refine_live_{bench_name}{table_suffix('table', bench_name)}_seed{seed}"
    print(f"wrote {write_result(name, out)}")


if __name__ == "__main__":
    main()
