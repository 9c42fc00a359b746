"""How long a short cosine run must be to rank the archs, and whether smaller batches make up for its length.

The short cosine proxy (``cosine@16/lr0.002``: the ground-truth protocol shrunk to 16 AdamW steps on batches of
32, a 64-item evaluation) is in the top group on every validated run yet stops at tau 0.75-0.79. Early in training
progress is made per optimiser step more than per sample while the batch is above the critical batch size, and
these U-Nets are small. So the same number of training samples spent on more, smaller steps (32 x 16, 64 x 8)
should reach further along each arch's curve, where the curves of close archs have stopped crossing. And if
they do not, how many steps of the ground-truth protocol does ranking at 0.85 take (``--variants 32x32@0.002
64x32@0.002 100x32@0.002``)? Measured on both benchmarks and seeds: 18% to more than 38% of a ground-truth run.

The study reads a finished ``proxy_validity_cosine*.json`` (its test and design archs, their ground truth and
their 5x runs), rebuilds that run's teacher in the run's work folder (the same seed and recipe: on the same
CPU kernels the same bits; the report says how far the recomputed ``16x32`` baseline is from the run's own
``cosine@16/lr0.002``), and runs every variant on every arch, interleaved so that each arch's variants
share the machine's load. Costs are the variants' median seconds as a share of the recomputed baseline's, times
the baseline's measured cost fraction of a ground-truth run in the original run.

    python benchmarks/proxy_step_budget.py --results benchmarks/results/proxy_validity_cosine.json --part run &
    python benchmarks/proxy_step_budget.py --results benchmarks/results/proxy_validity_cosine.json --part run
    python benchmarks/proxy_step_budget.py --results benchmarks/results/proxy_validity_cosine.json --part report

Writes ``benchmarks/results/proxy_step_budget_<benchmark>[_table]_seed<N>[_teacher<steps>].json`` (``_table``:
a shapes run whose test archs are its 64-arch table).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import environment, table_suffix, teacher_suffix
from proxy_validity_cosine import SHORT_EVAL_ITEMS, cached, claim, setup
from scipy.stats import kendalltau

from proxies.quality.fidelity import full_fidelity
from proxies.quality.surrogate import arch_key
from search_spaces import UNetArch

BASELINE = "16x32@0.002"
VARIANTS = (BASELINE, "32x16@0.002", "64x8@0.002", "64x8@0.001")
REQUIRED = ("benchmark_name", "seed", "archs", "design_archs", "proxies")


def parse_variant(text: str) -> tuple[int, int, float]:
    """``STEPSxBATCH@LR`` -> (steps, batch, lr)."""
    try:
        shape, lr = text.split("@")
        steps, batch = shape.split("x")
        out = int(steps), int(batch), float(lr)
    except ValueError:
        raise ValueError(f"{text!r} is not STEPSxBATCH@LR (e.g. 64x8@0.002)") from None
    if out[0] < 1 or out[1] < 1 or not out[2] > 0:
        raise ValueError(f"{text!r}: steps and batch must be >= 1 and the learning rate > 0")
    return out


def run_args(results: dict) -> argparse.Namespace:
    """The options of the proxy_validity_cosine run that wrote ``results`` (its teacher, seed and work folder)."""
    init = teacher_suffix(results.get("teacher_steps", 400))
    name, seed = results["benchmark_name"], results["seed"]
    return argparse.Namespace(
        benchmark=name, seed=seed, device="cpu", teacher_steps=results.get("teacher_steps", 400),
        new_modules=results.get("new_modules", "fresh"), batch=results.get("batch", 32), tests="random", archs=0,
        validate=10, work=Path("runs") / f"proxy_validity_cosine_{name}_seed{seed}{init}")


def run(args, results: dict) -> None:
    rargs = run_args(results)
    ctx, _, _, _ = setup(rargs)
    archs = [UNetArch.from_dict(a["arch"])
             for a in results["design_archs"] + results["archs"]]
    variants = [(v, *parse_variant(v)) for v in args.variants]
    for i, arch in enumerate(archs):
        with claim(args, f"arch-{i}") as mine:
            if not mine:
                continue
            t = time.perf_counter()
            for name, steps, batch, lr in variants:
                path = args.work / f"sb-{arch_key(arch)}-{name}.json"
                cached(path, lambda arch=arch, steps=steps, batch=batch, lr=lr: full_fidelity(
                    arch, replace(ctx, batch_size=batch), steps, lr=lr, seed=rargs.seed, eval_items=SHORT_EVAL_ITEMS))
            print(f"arch {i}: {time.perf_counter() - t:.0f}s", flush=True)


def report(args, results: dict) -> None:
    def loaded(entries: list[dict], name: str) -> list[dict] | None:
        runs = []
        for e in entries:
            arch = UNetArch.from_dict(e["arch"])
            path = args.work / f"sb-{arch_key(arch)}-{name}.json"
            if not path.is_file():
                return None
            runs.append(json.loads(path.read_text()))
        return runs

    tests, design = results["archs"], results["design_archs"]
    gt = [e["gt"]["task_loss"] for e in tests]
    dgt = [e["gt"]["task_loss"] for e in design]
    dlong = [e["long"]["task_loss"] if isinstance(e["long"], dict) else e["long"] for e in design]
    base_runs = loaded(tests + design, BASELINE)
    if base_runs is None:
        raise SystemExit(f"error: {args.work}: the {BASELINE} baseline is not finished on every arch (--part run)")
    base_seconds = float(np.median([r["seconds"] for r in base_runs]))
    base_fraction = results["proxies"]["cosine@16/lr0.002"]["cost_fraction_of_ground_truth"]
    original = [e["features"]["short"]["cosine@16/lr0.002"]["task_loss"] for e in tests + design]
    reproduced = float(np.max(np.abs(np.array([r["task_loss"] for r in base_runs]) - np.array(original))))
    out: dict = {"benchmark": "proxy_step_budget", "environment": environment(), "source": args.results.name,
                 "benchmark_name": results["benchmark_name"], "seed": results["seed"],
                 "teacher_steps": results.get("teacher_steps", 400), "n_test_archs": len(tests),
                 "n_design_archs": len(design),
                 "ground_truth_validity_tau": results.get("ground_truth_validity_tau"),
                 "ground_truth_tau_ceiling": results.get("ground_truth_tau_ceiling"),
                 "baseline": BASELINE, "baseline_reproduced_max_abs_diff": reproduced,
                 "baseline_cost_fraction_in_source": base_fraction, "threads": 1, "variants": {}}
    for name in args.variants:
        runs = loaded(tests + design, name)
        if runs is None:
            print(f"{name}: not finished")
            continue
        t, d = [r["task_loss"] for r in runs[: len(tests)]], [r["task_loss"] for r in runs[len(tests):]]
        seconds = float(np.median([r["seconds"] for r in runs]))
        steps, batch, lr = parse_variant(name)
        row = {"steps": steps, "batch": batch, "lr": lr, "kendall_tau": float(kendalltau(t, gt).statistic),
               "kendall_tau_design_archs": float(kendalltau(d, dgt).statistic),
               "kendall_tau_design_archs_vs_5x": float(kendalltau(d, dlong).statistic),
               "seconds_per_arch": seconds, "cost_vs_baseline": seconds / base_seconds,
               "cost_fraction_of_ground_truth": base_fraction * seconds / base_seconds}
        out["variants"][name] = row
        print(f"{name:>12}: tau {row['kendall_tau']:.3f} (design {row['kendall_tau_design_archs']:.3f}, "
              f"vs 5x {row['kendall_tau_design_archs_vs_5x']:.3f}) {seconds:.1f}s "
              f"cost {row['cost_fraction_of_ground_truth']:.1%}")
    print(f"baseline reproduced within {reproduced:.2e} of the source run")
    table = table_suffix(results.get("tests", "random"), out["benchmark_name"])
    dest = Path("benchmarks/results") / (f"proxy_step_budget_{out['benchmark_name']}{table}_seed{out['seed']}"
                                         f"{teacher_suffix(out['teacher_steps'])}.json")
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="a proxy_validity_cosine*.json")
    parser.add_argument("--part", choices=("run", "report"), required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="STEPSxBATCH@LR each")
    args = parser.parse_args()
    try:
        results = json.loads(args.results.read_text())
        missing = [k for k in REQUIRED if k not in results]
    except (OSError, ValueError) as err:
        parser.error(f"--results: {args.results}: {err}")
    if missing:
        parser.error(f"--results: {args.results}: not a proxy_validity_cosine results file (no {', '.join(missing)})")
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as err:
            parser.error(f"--variants: {err}")
    args.work = Path("runs") / f"proxy_step_budget_{args.results.stem}"
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    (run if args.part == "run" else report)(args, results)
