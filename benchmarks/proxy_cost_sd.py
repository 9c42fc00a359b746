"""What each quality proxy costs at Stable Diffusion scale, and the GPU-hours of a 400-trial search.

The CPU benchmarks rank proxies on 0.5M-parameter U-Nets; a user's search runs them on SD-sized ones. This script
times every proxy of the project, as a search calls it (the project's own classes and functions, end to end),
on an SD1.5 teacher and a DeciDiffusion-1.0-sized student (``--student``; random weights: the cost of a step
does not depend on their values), batch 8, 512 px (64x64 latents), 77-token text 768 wide, under bf16 autocast
(weights and optimiser state in fp32, as accelerate's ``mixed_precision: bf16`` trains; SynFlow runs in float64
as it is written). The data are random latents and text embeddings in a :class:`~proxies.data.LatentCache`.

Besides the end-to-end calls it times the parts every proxy is made of (building the student, inheriting the
teacher's weights, one distillation step, one plain training step, one evaluation timestep over the
evaluation items with and without the teacher), and composes from them what is too long to run here: the
DeciDiffusion experiments' own proxy (``distill`` with 200 steps, ``metric: kd``), one ground-truth run of the
benchmark's protocol at this scale (200 cosine steps, evaluation over 20 timesteps), and the surrogate's
one-time work. A context keeps the teacher's outputs on the evaluation grid, so from the second call on a
distillation proxy's evaluation runs the student alone: composed figures use that steady state
(``eval_timestep_kd_cached_s``), and the faster of the passes of an end-to-end call is one. The composition is
checked against the proxies that were run end to end
(``composition_check``). Every figure is device-synchronised wall time: a part is the median of its
calls after one warm-up call; a proxy is timed end to end once per pass (``--passes``, all proxies in turn
each pass; the minimum is kept and the spread between passes is the noise floor), after the parts have warmed
the device up, because at this scale a warm-up call of each would add a pass.

GPU (the committed result):  python benchmarks/proxy_cost_sd.py --device cuda
CPU smoke run:               python benchmarks/proxy_cost_sd.py --device cpu --teacher tiny --student tiny \\
                                 --resolution 128 --eval-items 8 --name proxy_cost_smoke --proxies macs distill_kd@0
CPU smoke run of the supernet: python benchmarks/proxy_cost_sd.py --device cpu --teacher digits --student digits \\
                                 --experiment experiments/quickstart.yaml --resolution 64 --text-len 8 \\
                                 --eval-items 8 --proxies supernet --checkpoint-dir /tmp --name proxy_cost_smoke

The ``supernet`` proxy (``proxy_cost_sd_supernet.py``) is priced with the options and space of ``--experiment``'s
quality objective (the DeciDiffusion 1.0 experiment's by default): its one-time work composed from timed parts
(``--supernet-steps`` arch-steps of training, optionally one checkpoint in ``--checkpoint-dir``), its per-trial
score end to end.

Writes ``benchmarks/results/proxy_cost_sd_<device>.json`` (``--name`` to change it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import peak_gib, sync, write_result
from proxy_cost_sd_supernet import compose, supernet_objective, time_supernet

from proxies.cost import arch_costs
from proxies.data import LatentCache
from proxies.quality import QualityContext, evaluate, make_proxy
from proxies.quality.fidelity import GT_TIMESTEPS, cheap_features, full_fidelity
from proxies.quality.train import train
from search_spaces import get_arch
from search_spaces.inherit import inherit_weights

PROXY_NAMES = ("macs", "params", "grad_norm", "snip", "synflow", "jacob_cov", "distill_kd@0", "distill_task@20",
               "short_train_inherit@20", "cosine@16/lr0.002", "surrogate_per_trial@5", "supernet")
ROOT = Path(__file__).resolve().parents[1]
GT_STEPS = 200  # the benchmark's ground-truth protocol: 200 cosine steps (proxy_validity_cosine.py)


def random_cache(arch, resolution: int, text_len: int, n_train: int, n_val: int, seed: int) -> LatentCache:
    """Random latents and text embeddings shaped for ``arch``: what a proxy reads, at no download."""
    g = torch.Generator().manual_seed(seed)
    n, side = n_train + n_val, resolution // 8
    mean = torch.randn(n, arch.in_channels, side, side, generator=g)
    text = torch.randn(n, text_len, arch.cross_attention_dim, generator=g)
    return LatentCache(mean=mean, std=torch.full_like(mean, 0.05), text=text, captions=[""] * n,
                       manifest={"splits": {"train": n_train}, "scaling_factor": 0.18215,
                                 "path": "random latents (cost only)"})


def timed(fn: Callable[[], Any], device: str, repeats: int = 1, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones, with the device synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default="sd15", help="shipped arch name or arch YAML")
    parser.add_argument("--student", default="decidiffusion_v1", help="shipped arch name or arch YAML")
    parser.add_argument("--resolution", type=int, default=512, help="pixels (latents are 1/8 of it)")
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="autocast dtype")
    parser.add_argument("--eval-items", type=int, default=256, help="the QualityContext default")
    parser.add_argument("--eval-timesteps", type=int, default=10, help="the QualityContext default")
    parser.add_argument("--step-repeats", type=int, default=10, help="training steps timed per step figure")
    parser.add_argument("--passes", type=int, default=2,
                        help="times every proxy is called in turn; the minimum is kept, the spread is the noise floor")
    parser.add_argument("--trials", type=int, default=400, help="trials of the search priced in GPU-hours")
    parser.add_argument("--anchors", type=int, default=8, help="the surrogate's anchors (its default)")
    parser.add_argument("--proxies", nargs="*", default=None, help="time only these proxies (default: all)")
    parser.add_argument("--name", default=None, help="result file name (default proxy_cost_sd_<device>)")
    parser.add_argument("--experiment", default="experiments/decidiffusion_v1.yaml",
                        help="supernet: the experiment whose quality objective's options and space are priced "
                             "(a relative path not found here is read from the project's root)")
    parser.add_argument("--supernet-steps", type=int, default=20,
                        help="supernet: arch-steps of training timed (the experiment's steps are composed)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="supernet: also time one checkpoint of the supernets' state, written here and deleted")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device: CUDA is not available on this machine", file=sys.stderr)
        return 2
    try:
        teacher_arch, student_arch = get_arch(args.teacher), get_arch(args.student)
    except Exception as exc:  # an unknown name or a bad YAML: one line, exit 2
        print(f"error: --teacher/--student: {exc}", file=sys.stderr)
        return 2
    for field in ("in_channels", "cross_attention_dim"):  # one latent cache and one teacher serve both
        if getattr(student_arch, field) != getattr(teacher_arch, field):
            print(f"error: --student: its {field} {getattr(student_arch, field)} is not the teacher's "
                  f"{getattr(teacher_arch, field)}", file=sys.stderr)
            return 2
    unknown = sorted(set(args.proxies or ()) - set(PROXY_NAMES))
    if unknown:
        print(f"error: --proxies: unknown {', '.join(unknown)} (known: {', '.join(PROXY_NAMES)})", file=sys.stderr)
        return 2
    want_supernet = args.proxies is None or "supernet" in args.proxies
    experiment = Path(args.experiment)
    if not experiment.is_file() and not experiment.is_absolute() and (ROOT / experiment).is_file():
        experiment = ROOT / experiment
    if want_supernet:
        try:
            supernet_objective(experiment, teacher_arch)
        except Exception as exc:  # a missing or bad experiment, one without a supernet objective, another teacher
            where = "" if getattr(exc, "field", None) == "--teacher" else "--experiment: "
            print(f"error: {where}{exc}", file=sys.stderr)
            return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if args.dtype != "fp32" \
        else contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    data = random_cache(teacher_arch, args.resolution, args.text_len, n_train=64,
                        n_val=max(args.eval_items, 64), seed=0)
    ctx = QualityContext(data=data, device=device, seed=0, batch_size=args.batch, eval_items=args.eval_items,
                         eval_timesteps=args.eval_timesteps)
    start_all = time.perf_counter()
    built: dict[str, Any] = {}
    t_teacher, _ = timed(lambda: built.update(teacher=ctx.build(teacher_arch)), device, warmup=0)
    ctx.teacher = built.pop("teacher").eval().requires_grad_(False)
    peak_gib(device)
    parts: dict[str, Any] = {"build_teacher_s": t_teacher}
    print(f"teacher {args.teacher} built in {t_teacher:.1f}s", flush=True)

    # ---- the parts every proxy is made of (they also warm the device up for the end-to-end calls) -------------
    parts["build_student_s"], _ = timed(lambda: built.update(student=ctx.build(student_arch)), device, warmup=0)
    student = built.pop("student")
    parts["inherit_s"], _ = timed(lambda: inherit_weights(student, ctx.teacher), device)
    with autocast():
        n = args.step_repeats
        total, _ = timed(lambda: train(student, ctx, n, lr=1e-5, teacher=ctx.teacher), device)
        parts["distill_step_s"] = total / n
        parts["distill_step_peak_gib"] = peak_gib(device)
        total, _ = timed(lambda: train(student, ctx, n, lr=1e-5), device)
        parts["train_step_s"] = total / n
        one = replace(ctx, eval_timesteps=1)
        # the first trial computes the teacher's outputs on the evaluation grid, later ones reuse them
        parts["eval_timestep_kd_s"], _ = timed(
            lambda: evaluate(student, replace(one, teacher_outputs={}), teacher=ctx.teacher), device)
        parts["eval_timestep_kd_cached_s"], _ = timed(lambda: evaluate(student, one, teacher=ctx.teacher), device)
        parts["eval_timestep_s"], _ = timed(lambda: evaluate(student, one), device)
        small = replace(one, eval_items=64)
        parts["eval_timestep_64_items_s"], _ = timed(lambda: evaluate(student, small), device)
        parts["eval_peak_gib"] = peak_gib(device)
    student = None  # freed before the end-to-end calls
    for key, value in parts.items():
        print(f"{key:28s} {value}", flush=True)

    # ---- every proxy end to end ------------------------------------------------------------------------------
    proxies: dict[str, tuple[Callable[[], Any], bool]] = {
        "macs": (lambda: arch_costs(student_arch, batch=1, text_len=args.text_len).macs, False),
        "params": (lambda: arch_costs(student_arch, batch=1, text_len=args.text_len).params, False),
        "grad_norm": (lambda: make_proxy("grad_norm")(student_arch, ctx), True),
        "snip": (lambda: make_proxy("snip")(student_arch, ctx), True),
        "synflow": (lambda: make_proxy("synflow")(student_arch, ctx), False),  # float64 by design
        "jacob_cov": (lambda: make_proxy("jacob_cov")(student_arch, ctx), True),
        "distill_kd@0": (lambda: make_proxy("distill", steps=0, metric="kd")(student_arch, ctx), True),
        "distill_task@20": (lambda: make_proxy("distill", steps=20, metric="task")(student_arch, ctx), True),
        "short_train_inherit@20": (lambda: make_proxy("short_train", steps=20, init="inherit")(student_arch, ctx),
                                   True),
        "cosine@16/lr0.002": (lambda: full_fidelity(student_arch, ctx, 16, lr=2e-3, eval_items=64), True),
        "surrogate_per_trial@5": (lambda: cheap_features(student_arch, ctx, 5, eval_items=64), True),
    }
    assert set(proxies) | {"supernet"} == set(PROXY_NAMES)
    proxies = {k: v for k, v in proxies.items() if args.proxies is None or k in args.proxies}
    measured: dict[str, dict[str, Any]] = {name: {"calls": []} for name in proxies}
    for _ in range(args.passes):  # every proxy once per pass, so a change of clock or load hits all alike
        for name, (fn, amp) in proxies.items():
            m = measured[name]
            if "error" in m:
                continue
            try:
                with autocast() if amp else contextlib.nullcontext():
                    seconds, _ = timed(fn, device, warmup=0)
                m["calls"].append(seconds)
                m["peak_gib"] = peak_gib(device)
            except torch.OutOfMemoryError as exc:  # recorded, never dropped
                m["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
            print(f"{name:28s} {m}", flush=True)
    for m in measured.values():
        if m["calls"]:
            m["seconds"] = min(m["calls"])
            m["pass_spread"] = (max(m["calls"]) - min(m["calls"])) / max(min(m["calls"]), 1e-9)
    spreads = [m["pass_spread"] for n, m in measured.items() if "pass_spread" in m and n not in ("macs", "params")]
    noise_floor = statistics.median(spreads) if len(spreads) and args.passes > 1 else None

    # ---- the supernet proxy: its one-time work in parts, its per-trial score end to end ---------------------------
    supernet = None
    if want_supernet:
        supernet = time_supernet(experiment, ctx, teacher_arch, student_arch, autocast, device,
                                 args.supernet_steps, args.passes, args.checkpoint_dir)
        supernet["experiment"] = args.experiment  # as given: the result names no path of this machine
        print(f"{'supernet':28s} {supernet.get('error', 'measured')}", flush=True)

    # ---- composed from the parts: what is too long to run here -----------------------------------------------
    base = parts["build_student_s"] + parts["inherit_s"]
    eval_kd = args.eval_timesteps * parts["eval_timestep_kd_cached_s"]  # a search's steady state
    eval_task = args.eval_timesteps * parts["eval_timestep_s"]
    gt_run = base + GT_STEPS * parts["distill_step_s"] + GT_TIMESTEPS * parts["eval_timestep_s"]
    features = measured.get("surrogate_per_trial@5", {}).get("seconds")
    composed = {
        "distill_kd@200 (the DeciDiffusion experiments' proxy)": base + 200 * parts["distill_step_s"] + eval_kd,
        f"ground truth: {GT_STEPS} cosine steps + {GT_TIMESTEPS}-timestep evaluation": gt_run,
        f"surrogate one-time: {args.anchors} anchors' ground truth + features": (
            args.anchors * (gt_run + features) if features else None),
    }
    check = {  # the distillation proxy evaluates with the teacher whatever its metric
        "distill_kd@0": base + eval_kd,
        "distill_task@20": base + 20 * parts["distill_step_s"] + eval_kd,
        "short_train_inherit@20": base + 20 * parts["train_step_s"] + eval_task,
    }
    composition_check = {k: {"composed_s": v, "measured_s": measured[k].get("seconds"),
                             "ratio": (measured[k]["seconds"] / v) if measured[k].get("seconds") else None}
                         for k, v in check.items() if k in measured}
    one_time = composed[f"surrogate one-time: {args.anchors} anchors' ground truth + features"] or 0.0
    hours: dict[str, Any] = {}
    for name, m in measured.items():
        if "seconds" in m:
            extra = one_time if name.startswith("surrogate") else 0.0
            hours[name] = {"per_trial_s": m["seconds"], "one_time_s": extra,
                           "search_gpu_hours": (args.trials * m["seconds"] + extra) / 3600,
                           "cost_fraction_of_ground_truth": m["seconds"] / gt_run}
    for name, seconds in composed.items():
        if seconds is not None and not name.startswith("surrogate") and not name.startswith("ground"):
            hours[name] = {"per_trial_s": seconds, "one_time_s": 0.0, "composed": True,
                           "search_gpu_hours": args.trials * seconds / 3600,
                           "cost_fraction_of_ground_truth": seconds / gt_run}
    priced = compose(supernet, args.trials, gt_run) if supernet else None
    if priced:
        hours[f"supernet ({args.experiment}: one-time composed, per trial measured)"] = priced
    hours["ground_truth_per_trial (for scale)"] = {"per_trial_s": gt_run, "composed": True,
                                                    "search_gpu_hours": args.trials * gt_run / 3600}

    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"\n{args.trials}-trial search on {device_name}, {args.student} student, {args.teacher} teacher, "
          f"batch {args.batch}, {args.dtype}:")
    print(f"{'proxy':58s} {'s/trial':>8s} {'GPU-h':>7s} {'of GT':>6s}")
    for name, h in hours.items():
        frac = h.get("cost_fraction_of_ground_truth")
        print(f"{name:58s} {h['per_trial_s']:8.2f} {h['search_gpu_hours']:7.2f} "
              f"{'' if frac is None else f'{frac:6.1%}'}")
    for name, c in composition_check.items():
        print(f"composition check {name}: composed {c['composed_s']:.2f}s measured {c['measured_s']}")
    out = write_result(args.name or f"proxy_cost_sd_{device.split(':')[0]}", {
        "device": device_name,
        "torch_cuda": torch.version.cuda,
        "settings": {"teacher": args.teacher, "student": args.student, "resolution": args.resolution,
                     "latent": [teacher_arch.in_channels, args.resolution // 8, args.resolution // 8],
                     "text": [args.text_len, teacher_arch.cross_attention_dim], "batch": args.batch,
                     "autocast": args.dtype, "eval_items": args.eval_items, "eval_timesteps": args.eval_timesteps,
                     "step_repeats": args.step_repeats, "passes": args.passes, "trials": args.trials,
                     "anchors": args.anchors, "weights": "random", "data": "random latents and text"},
        "student_params": arch_costs(student_arch, batch=1, text_len=args.text_len).params,
        "teacher_params": arch_costs(teacher_arch, batch=1, text_len=args.text_len).params,
        "noise_floor": {"statistic": "median over proxies of (slowest - fastest pass) / fastest",
                        "value": noise_floor, "passes": args.passes},
        "ground_truth_definition": f"{GT_STEPS} BK-SDM distillation steps on the cosine schedule at batch "
                                   f"{args.batch}, then the held-out loss over {args.eval_items} items x "
                                   f"{GT_TIMESTEPS} timesteps (the CPU benchmarks' protocol at this scale; composed)",
        "parts": parts, "proxies": measured, "composed": composed, "composition_check": composition_check,
        "supernet": supernet, "search_gpu_hours": hours, "elapsed_s": time.perf_counter() - start_all,
    })
    print(f"noise floor (pass-to-pass, median over proxies): {noise_floor}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
