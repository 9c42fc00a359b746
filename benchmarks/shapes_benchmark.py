"""The shapes benchmark's own figures: how good its attribute classifiers are on real images, and how good and how
costly its teacher is when trained the way ``benchmarks/proxy_validity.py --benchmark shapes`` trains it.

1. The data (``proxies.shapes.shapes_cache``, seed 0) and the attribute classifiers fitted on its real training
   images: accuracy per attribute on the real held-out split, and the seconds to fit them.
2. Seconds per training step of the ``shapes`` teacher against the ``digits`` teacher (batch 64, one thread),
   interleaved in ``--rounds`` rounds: minimum and spread, the repeat noise floor.
3. The teacher trained for ``--teacher-steps`` (AdamW, lr 2e-3, batch 64, seed 0: proxy_validity's recipe), with
   every ``--every`` steps the held-out denoising loss (128 items x 10 timesteps, as proxy_validity reports its
   teacher) and the attribute accuracy of 96 samples, one per combination of attributes; at the end also the
   loss on the whole validation split over 20 timesteps (the ground truth's evaluation), the samples of a
   second sampling seed and samples without classifier-free guidance. Chance: mean attribute accuracy 1/3
   (1/4, 1/3, 1/2, 1/4), all four right 1/96.

    nice python benchmarks/shapes_benchmark.py [--teacher-steps 400] [--threads 1] [--benchmark shapes2]

``--benchmark shapes2`` does the same on two shapes per image (eight attributes; samples for 96 fixed pairs).
Writes ``benchmarks/results/shapes_benchmark.json`` (``shapes_benchmark_N_steps.json`` for other step counts,
``shapes2_benchmark[_N_steps].json`` for shapes2).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import write_result

from proxies.benchmark import TEACHER_STEPS, get_benchmark
from proxies.data import digits_cache
from proxies.quality import QualityContext, evaluate
from proxies.quality.train import train
from search_spaces import get_arch

LR = 2e-3  # proxy_validity's


def step_seconds(rounds: int, steps: int, shapes_data) -> dict:
    """Seconds per training step of each teacher, the two interleaved round by round."""
    models = {}
    for name, data in (("shapes", shapes_data), ("digits", digits_cache())):
        ctx = QualityContext(data=data, seed=0, batch_size=64)
        model = ctx.build(get_arch(name))
        train(model, ctx, 1, lr=LR)  # warm-up
        models[name] = (ctx, model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (ctx, model) in models.items():
            start = time.perf_counter()
            train(model, ctx, steps, lr=LR)
            times[name].append((time.perf_counter() - start) / steps)
    out = {name: {"min": min(t), "median": float(np.median(t)), "max": max(t),
                  "spread_of_min": max(t) / min(t) - 1} for name, t in times.items()}
    out["ratio_shapes_to_digits"] = out["shapes"]["min"] / out["digits"]["min"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, help="default: the benchmark's (shapes2 4,000; else 400)")
    parser.add_argument("--every", type=int, default=100, help="evaluate the teacher every so many steps")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmark", choices=("shapes", "shapes2"), default="shapes",
                        help="one shape per image, or two (the harder variant)")
    args = parser.parse_args()
    args.teacher_steps = args.teacher_steps or TEACHER_STEPS[args.benchmark]
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()  # the machine is shared: say under what load the seconds were taken
    start = time.perf_counter()
    bench = get_benchmark(args.benchmark, seed=0)
    attributes = bench.data.manifest["attributes"]  # chance: a uniform guess per attribute
    setup_seconds = time.perf_counter() - start
    data = bench.data
    print(f"data and classifiers: {setup_seconds:.1f}s; classifiers on real held-out images: "
          f"{bench.classifier.real_accuracy}", flush=True)

    timing = step_seconds(args.rounds, 3, data)
    print(f"seconds per step: {timing}", flush=True)

    ctx = QualityContext(data=data, seed=0, batch_size=64, eval_items=128)
    teacher = ctx.build(get_arch(bench.teacher), seed=0)
    untrained = bench.sample_quality(teacher, ctx.scheduler, 7)
    curve: list[dict] = []
    spent_evaluating = 0.0

    def report(step: int, held_out: float) -> bool:
        # train() has just run evaluate() for ``held_out``: run it again to time it, and take both off
        nonlocal spent_evaluating
        t0 = time.perf_counter()
        evaluate(teacher, ctx)
        spent_evaluating += 2 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        quality = bench.sample_quality(teacher, ctx.scheduler, 7)
        curve.append({"step": step, "task_loss": held_out, **quality})
        print(f"step {step}: held-out {held_out:.4f}, attribute accuracy {quality['sample_accuracy']:.3f}, "
              f"all correct {quality['sample_all_correct']:.3f} {quality['sample_accuracy_per_attribute']}",
              flush=True)
        spent_evaluating += time.perf_counter() - t0
        return False

    t0 = time.perf_counter()
    history = train(teacher, ctx, args.teacher_steps, lr=LR, seed=0, report=report, eval_every=args.every)
    train_seconds = time.perf_counter() - t0 - spent_evaluating  # the optimiser steps alone
    final = evaluate(teacher, ctx)
    val = data.split("val")
    gt_ctx = QualityContext(data=data, seed=0, eval_items=len(val), eval_timesteps=20)
    teacher_eval = {
        **final, "task_loss_whole_val_20_timesteps": evaluate(teacher, gt_ctx)["task_loss"],
        "final_train_loss": history["losses"][-1],
        **bench.sample_quality(teacher, ctx.scheduler, 7),
        "sample_seed_8": bench.sample_quality(teacher, ctx.scheduler, 8),
        # guidance 3.0 pushes pixels far past [-1, 1]; clamped, small shapes grow: the same samples unguided
        "sample_guidance_1": bench.sample_quality(teacher, ctx.scheduler, 7, guidance=1.0, guidance_rescale=0.0),
    }
    print(f"teacher after {args.teacher_steps} steps ({train_seconds:.0f}s of training): {teacher_eval}", flush=True)

    name = f"{args.benchmark}_benchmark" + ("" if args.teacher_steps == 400 else f"_{args.teacher_steps}_steps")
    path = write_result(name, {
        "threads": args.threads, "data": {k: v for k, v in data.manifest.items() if k != "path"},
        "n_images": len(data), "data_and_classifier_seconds": setup_seconds,
        "classifier": "logistic regression per attribute on flattened pixels (scikit-learn, max_iter 3000)",
        "classifier_accuracy_on_real_held_out": bench.classifier.real_accuracy,
        "chance": {"sample_accuracy": float(np.mean([1 / len(v) for v in attributes.values()])),
                   "sample_all_correct": 1 / int(np.prod([len(v) for v in attributes.values()]))},
        "teacher_arch": get_arch(bench.teacher).to_dict(), "teacher_steps": args.teacher_steps, "lr": LR,
        "batch_size": 64, "teacher_train_seconds": train_seconds, "seconds_per_step": timing,
        "untrained_teacher": untrained, "teacher": teacher_eval, "curve": curve,
        "wall_seconds": time.perf_counter() - start,
        "load_average_1_5_15_min": {"start": load_start, "end": os.getloadavg()},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
