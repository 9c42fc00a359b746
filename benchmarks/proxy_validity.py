"""How well does each quality proxy rank U-Net architectures? Ground truth from real training, on the CPU.

1. Train the ``--benchmark``'s teacher on its data (``proxies.benchmark.get_benchmark``): ``digits``,
   scikit-learn's digits, or ``shapes``, rendered shapes with compositional captions (``proxies.shapes``).
2. Sample ``--archs`` distinct architectures from its space (``search_spaces/spaces/<benchmark>.yaml``).
3. Ground truth per arch: train for ``--gt-steps`` steps the way a found arch is trained (``--gt-init inherit``,
   the default: the teacher's weights, BK-SDM's distillation loss) or from scratch (``fresh``); measure the
   held-out denoising loss on the whole validation split over 20 timesteps, and sample quality: the mean
   accuracy of attribute classifiers (logistic regression on the real images; digits: the digit, shapes:
   colour, shape, size, position) on generated samples (DDIM, trailing spacing, rescaled CFG).
4. Repeatability of the ground truth: retrain ``--repeat`` archs with another data-order seed; Kendall tau
   between the two runs.
5. Every proxy on every arch, with its cost in seconds and as a fraction of one ground-truth run (training plus
   held-out evaluation). Proxies that train do so for at most 1/10 of the ground truth's steps, so none is a
   near-copy of the ground-truth procedure. Baselines: params and MACs ("bigger is better").

    python benchmarks/proxy_validity.py [--benchmark digits] [--seed 0] [--archs 24] [--gt-steps 200]

Writes ``benchmarks/results/proxy_validity[_shapes][_seedN].json`` and a plot beside it.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, save_figure, teacher_suffix, write_result
from scipy.stats import kendalltau, spearmanr

from proxies.benchmark import BENCHMARKS, TEACHER_STEPS, get_benchmark
from proxies.cost import arch_costs
from proxies.quality import QualityContext, evaluate, make_proxy
from proxies.quality.train import train
from search_spaces import get_arch
from search_spaces.inherit import inherit_weights
from search_spaces.space import SearchSpace

LR = 2e-3


def sample_accuracy(model, ctx, bench, seed: int) -> float:
    """Mean attribute accuracy of the model's samples for the benchmark's prompts."""
    return bench.sample_quality(model, ctx.scheduler, seed)["sample_accuracy"]


def ground_truth(arch, ctx, gt_ctx, bench, steps: int, data_seed: int, init: str) -> dict:
    start = time.perf_counter()
    model = ctx.build(arch, seed=ctx.seed)
    if init == "inherit":
        inherit_weights(model, ctx.teacher)
        train(model, ctx, steps, lr=LR / 4, seed=data_seed, teacher=ctx.teacher)
    else:
        train(model, ctx, steps, lr=LR, seed=data_seed)
    task_loss = evaluate(model, gt_ctx)["task_loss"]
    seconds = time.perf_counter() - start  # training and held-out evaluation, like the proxies' own runs
    return {"task_loss": task_loss, "sample_accuracy": sample_accuracy(model, ctx, bench, 7), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="digits", help="data, teacher and space")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archs", type=int, default=24)
    parser.add_argument("--gt-steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, help="default: the benchmark's (shapes2 4,000; else 400)")
    parser.add_argument("--repeat", type=int, default=6, help="archs retrained with another data-order seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gt-init", choices=("inherit", "fresh"), default="inherit",
                        help="ground truth trains from the teacher's weights with distillation, or from scratch")
    args = parser.parse_args()
    args.teacher_steps = args.teacher_steps or TEACHER_STEPS[args.benchmark]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    bench = get_benchmark(args.benchmark, seed=0)
    data = bench.data
    ctx = QualityContext(data=data, seed=args.seed, batch_size=64, eval_items=128)
    val = data.split("val")

    print(f"training the teacher ({args.teacher_steps} steps)...", flush=True)
    teacher = ctx.build(get_arch(bench.teacher), seed=args.seed)
    train(teacher, ctx, args.teacher_steps, lr=LR, seed=args.seed)
    ctx.teacher = teacher.eval()
    gt_ctx = QualityContext(data=data, seed=args.seed, teacher=ctx.teacher, eval_items=len(val), eval_timesteps=20)
    teacher_eval = {**evaluate(teacher, ctx), **bench.sample_quality(teacher, ctx.scheduler, 7)}
    print(f"teacher: {teacher_eval}", flush=True)

    space = SearchSpace.from_yaml(bench.space)
    rng = random.Random(args.seed)
    archs: list = []
    while len(archs) < args.archs:
        a = space.sample(rng)
        if a not in archs:
            archs.append(a)

    quick = max(1, args.gt_steps // 10)  # the costliest proxies stay at <= 1/10 of a ground-truth run
    proxies = [make_proxy("grad_norm"), make_proxy("snip"), make_proxy("synflow"), make_proxy("jacob_cov"),
               make_proxy("distill", steps=0), make_proxy("distill", steps=quick, metric="kd"),
               make_proxy("distill", steps=quick, metric="task"),
               make_proxy("short_train", steps=quick, init="fresh", eval_every=quick),
               make_proxy("short_train", steps=quick, init="inherit", eval_every=quick)]
    # distill_kd@N and distill_task@N are one and the same fine-tuning run scored two ways: run it once
    twins = {f"distill_task@{quick}": f"distill_kd@{quick}"}
    rows = []
    for i, arch in enumerate(archs):
        gt = ground_truth(arch, ctx, gt_ctx, bench, args.gt_steps, data_seed=args.seed, init=args.gt_init)
        cost = arch_costs(arch, batch=1, text_len=data.text.shape[1])
        row = {"arch": arch.to_dict(), "gt": gt, "params": cost.params, "macs": cost.macs, "proxies": {}}
        for proxy in proxies:
            if proxy.name in twins:
                twin = row["proxies"][twins[proxy.name]]
                row["proxies"][proxy.name] = {"score": twin["details"]["task_loss"], "seconds": twin["seconds"]}
                continue
            result = proxy(arch, ctx)
            row["proxies"][proxy.name] = {"score": result.score, "seconds": result.seconds,
                                          "details": result.details}
        rows.append(row)
        print(f"[{i + 1}/{len(archs)}] gt loss {gt['task_loss']:.4f} acc {gt['sample_accuracy']:.2f} "
              f"({gt['seconds']:.0f}s) {arch}", flush=True)

    repeat = []
    for arch in archs[: args.repeat]:
        repeat.append(ground_truth(arch, ctx, gt_ctx, bench, args.gt_steps, data_seed=args.seed + 1000,
                                   init=args.gt_init)["task_loss"])
    first = [r["gt"]["task_loss"] for r in rows[: args.repeat]]
    repeat_tau = float(kendalltau(first, repeat).statistic) if args.repeat > 2 else None

    gt_loss = np.array([r["gt"]["task_loss"] for r in rows])
    gt_acc = np.array([r["gt"]["sample_accuracy"] for r in rows])
    gt_seconds = float(np.median([r["gt"]["seconds"] for r in rows]))
    results: dict = {}

    def add(name: str, kind: str, scores: np.ndarray, seconds: float) -> None:
        results[name] = {
            "kind": kind,
            "kendall_tau": float(kendalltau(scores, gt_loss).statistic),
            "spearman": float(spearmanr(scores, gt_loss).statistic),
            "kendall_tau_vs_sample_accuracy": float(kendalltau(scores, -gt_acc).statistic),
            "seconds_per_arch": seconds,
            "cost_fraction_of_ground_truth": seconds / gt_seconds,
        }

    for proxy in proxies:
        scores = np.array([r["proxies"][proxy.name]["score"] for r in rows])
        secs = float(np.median([r["proxies"][proxy.name]["seconds"] for r in rows]))
        add(proxy.name, proxy.kind, scores, secs)
    add("params", "baseline", -np.array([r["params"] for r in rows], dtype=float), 0.0)
    add("macs", "baseline", -np.array([r["macs"] for r in rows], dtype=float), 0.0)

    # the rule: ground truth trains >= 10x the steps of the costliest proxy (`quick` = gt_steps // 10)
    honest = quick * 10 <= args.gt_steps
    distill = {k: v for k, v in results.items() if v["kind"] == "distill"}
    best = max(distill, key=lambda k: distill[k]["kendall_tau"])
    zero = max(v["kendall_tau"] for v in results.values() if v["kind"] == "zero_cost")
    tau = distill[best]["kendall_tau"]
    target = (tau >= 0.8 and tau >= results["params"]["kendall_tau"] and tau >= results["macs"]["kendall_tau"]
              and tau > zero)

    print(f"\n{'proxy':24s} {'kind':12s} {'tau':>6s} {'rho':>6s} {'tau(acc)':>8s} {'s/arch':>7s} {'of GT':>6s}")
    for name, v in sorted(results.items(), key=lambda kv: -kv[1]["kendall_tau"]):
        print(f"{name:24s} {v['kind']:12s} {v['kendall_tau']:6.2f} {v['spearman']:6.2f} "
              f"{v['kendall_tau_vs_sample_accuracy']:8.2f} {v['seconds_per_arch']:7.2f} "
              f"{v['cost_fraction_of_ground_truth']:6.1%}")
    print(f"ground truth: {gt_seconds:.1f}s per arch; repeatability tau {repeat_tau}; budget rule met: {honest}")
    print(f"best distillation proxy {best}: target (tau >= 0.8, >= baselines, > zero-cost) "
          f"{'met' if target else 'NOT met'}")

    suffix = "" if args.benchmark == "digits" else f"_{args.benchmark}"
    suffix += "" if args.seed == 0 else f"_seed{args.seed}"
    suffix += "" if args.gt_init == "inherit" else "_fresh_gt"
    suffix += teacher_suffix(args.teacher_steps)
    plot = RESULTS / f"proxy_validity{suffix}.png"
    _plot(results, plot, args.benchmark)
    path = write_result(f"proxy_validity{suffix}", {
        "benchmark": args.benchmark, "n_archs": len(rows), "seed": args.seed, "gt_steps": args.gt_steps,
        "gt_init": args.gt_init, "teacher_steps": args.teacher_steps,
        "threads": args.threads, "ground_truth_repeat_tau": repeat_tau, "ground_truth_repeat_n": args.repeat,
        "ground_truth_seconds_per_arch": gt_seconds,
        "classifier_accuracy_on_real": bench.classifier.real_accuracy,
        "teacher": teacher_eval, "budget_rule_met": honest, "best_distill_proxy": best, "target_met": target,
        "proxies": results, "archs": rows, "wall_seconds": time.perf_counter() - t_start, "plot": plot.name,
    })
    print(f"wrote {path} and {plot}")


def _plot(results: dict, path: Path, benchmark: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"zero_cost": "tab:orange", "distill": "tab:blue", "short_train": "tab:green", "baseline": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in results.items():
        x = max(v["cost_fraction_of_ground_truth"], 1e-4)
        ax.scatter(x, v["kendall_tau"], color=colours[v["kind"]], s=40)
        ax.annotate(name, (x, v["kendall_tau"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("cost per arch / one ground-truth training run (baselines plotted at 1e-4)")
    ax.set_ylabel("Kendall tau vs held-out loss after training")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(f"Quality proxies on the {benchmark} space (CPU)")
    for kind, c in colours.items():
        ax.scatter([], [], color=c, label=kind)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
