"""Does starting what the teacher lacks as the identity make the ground truth or the proxies rank better?

``proxy_validity_cosine.py --new-modules identity`` runs the same jobs with every new module (an attention the
teacher has not got there, a resampler of a stage that changes resolution) started as the identity
(:func:`search_spaces.inherit.start_as_identity`) instead of randomly; its work folder is the fresh run's with
``_identity`` appended. This script reads both folders of one benchmark and seed and reports:

1. per design arch, the ground truth (200 steps) under both initialisations: how much lower identity starts
   end, and Kendall tau between the two rankings and against the fresh 1,000-step runs (the validity test);
2. every proxy of the report computed from the identity runs' features, against the fresh ground truth of the
   test archs (the one the proxies are judged by everywhere else), beside the same proxies from fresh runs.

    python benchmarks/proxy_validity_cosine.py --part all --benchmark shapes --seed 1 --archs 12 \\
        --repeat 4 --new-modules identity          # at least the design jobs and the test archs' features
    python benchmarks/proxy_identity_init.py --benchmark shapes --seed 1 --archs 12
    # shapes2's 64-arch table, on the fresh run's teacher (bit for bit), no test ground truth needed
    python benchmarks/proxy_validity_cosine.py --part proxies --tests table --benchmark shapes2 --seed 0 \
        --new-modules identity --teacher-from runs/proxy_validity_cosine_shapes2_seed0_teacher4000   # (x2)
    python benchmarks/proxy_identity_init.py --benchmark shapes2 --seed 0 --tests table

Writes ``benchmarks/results/proxy_identity_init_BENCHMARK_seedN.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import table_suffix, teacher_suffix, write_result
from proxy_validity_cosine import setup
from proxy_validity_report import _proxies, short_cosine_runs, tau

from proxies.benchmark import BENCHMARKS, TEACHER_STEPS
from proxies.quality.surrogate import arch_key


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _features(folder: Path, arch, gt_steps: int) -> dict | None:
    f = _read(folder / f"feat-{arch_key(arch)}.json")
    short = {f"cosine@{k}/lr{lr:g}": _read(folder / f"cos-{arch_key(arch)}-{k}-{lr:g}.json")
             for k, lr in short_cosine_runs(gt_steps)}
    return {**f, "short": short} if f and all(short.values()) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archs", type=int, default=24)
    parser.add_argument("--gt-steps", type=int, default=200)
    parser.add_argument("--long-factor", type=int, default=5)
    parser.add_argument("--tests", choices=("random", "table"), default="random",
                        help="test archs: --archs random ones, or the benchmark's 64-arch table")
    args = parser.parse_args()
    teacher_steps = TEACHER_STEPS[args.benchmark]
    # the work folders proxy_validity_cosine.py names: the identity suffix comes before the teacher's
    stem = Path("runs") / f"proxy_validity_cosine_{args.benchmark}_seed{args.seed}"
    fresh = Path(f"{stem}{teacher_suffix(teacher_steps)}")
    identity = Path(f"{stem}_identity{teacher_suffix(teacher_steps)}")
    setup_args = argparse.Namespace(benchmark=args.benchmark, seed=args.seed,
                                    archs=0 if args.tests == "table" else args.archs, tests=args.tests,
                                    validate=10, teacher_steps=teacher_steps, batch=32, new_modules="identity",
                                    work=identity, gt_lr=1e-3, device="cpu", teacher_from=fresh)
    torch.set_num_threads(1)
    _, space, anchors, tests = setup(setup_args)

    def gt(folder: Path, arch, steps: int) -> dict | None:
        return _read(folder / f"gt-{arch_key(arch)}-{steps}-{args.seed}.json")

    long_steps = args.gt_steps * args.long_factor
    design = []
    for a in anchors:
        f, i, lg = gt(fresh, a, args.gt_steps), gt(identity, a, args.gt_steps), gt(fresh, a, long_steps)
        if f and i:
            design.append({"arch_key": arch_key(a), "fresh": f["task_loss"], "identity": i["task_loss"],
                           "fresh_long": lg["task_loss"] if lg else None})
    with_long = [d for d in design if d["fresh_long"] is not None]
    out: dict = {
        "benchmark_name": args.benchmark, "seed": args.seed, "gt_steps": args.gt_steps, "long_steps": long_steps,
        "threads": 1, "design": design, "n_design": len(design),
        "identity_vs_fresh_gt_tau": tau([d["fresh"] for d in design], [d["identity"] for d in design])
        if len(design) > 2 else None,
        "identity_gt_lower_share": float(np.mean([d["identity"] < d["fresh"] for d in design])) if design else None,
        "identity_gt_mean_change": float(np.mean([d["identity"] / d["fresh"] - 1 for d in design])) if design else None,
        "fresh_gt_validity_tau": tau([d["fresh"] for d in with_long], [d["fresh_long"] for d in with_long])
        if len(with_long) > 2 else None,
        "identity_gt_vs_fresh_long_tau": tau([d["identity"] for d in with_long], [d["fresh_long"] for d in with_long])
        if len(with_long) > 2 else None,
        "n_with_long": len(with_long),
    }
    # proxies on the test archs, judged by the fresh ground truth; surrogates fitted on the design archs' own
    design_keys = {arch_key(a) for a in anchors}
    for label, folder in (("fresh", fresh), ("identity", identity)):
        rows = [(a, gt(fresh, a, args.gt_steps), _features(folder, a, args.gt_steps))
                for a in tests if arch_key(a) not in design_keys]
        rows = [r for r in rows if r[1] and r[2]]
        design_rows = [(a, gt(folder, a, args.gt_steps), _features(folder, a, args.gt_steps)) for a in anchors]
        design_rows = [r for r in design_rows if r[1] and r[2]]
        out[f"n_test_{label}"] = len(rows)
        if len(rows) >= 3 and design_rows:
            out[f"proxies_{label}"] = _proxies(rows, design_rows, space, 0.0, None)
    if "proxies_fresh" in out and "proxies_identity" in out:
        names = [n for n in out["proxies_fresh"] if n in out["proxies_identity"] and "surrogate" not in n
                 and "additive" not in n]
        print(f"{'proxy':28s} {'fresh':>6s} {'identity':>8s}")
        for n in names:
            f, i = out["proxies_fresh"][n]["kendall_tau"], out["proxies_identity"][n]["kendall_tau"]
            print(f"{n:28s} {f:6.2f} {i:8.2f}")
    for key in ("n_design", "identity_vs_fresh_gt_tau", "identity_gt_lower_share", "identity_gt_mean_change",
                "fresh_gt_validity_tau", "identity_gt_vs_fresh_long_tau", "n_with_long"):
        print(f"{key}: {out[key]}")
    name = f"proxy_identity_init_{args.benchmark}{table_suffix(args.tests, args.benchmark)}_seed{args.seed}"
    print(f"wrote {write_result(name, out)}")


if __name__ == "__main__":
    main()
