"""FlexibleUNet against diffusers' UNet2DConditionModel, and the reference archs' speed-up over SD1.5, on one device.

Part 1 (overhead): SD1.5 and SD2.1-base built as diffusers ``UNet2DConditionModel`` and copied into a
``FlexibleUNet2DConditionModel`` (same weights). Both are timed interleaved (one forward of each in turn, so load
and clock changes hit both alike) and their outputs compared. The FlexibleUNet must cost no time over diffusers:
the search ranks archs by the latency of this class, so any overhead here would bias every figure.

Part 2 (speed-ups): every reference arch (SD1.5, SD2.1-base, DeciDiffusion 1.0 layout, BK-SDM base/small/tiny)
built as a FlexibleUNet and timed interleaved; speed-up = SD1.5 latency / arch latency. Published figure to compare
with: DeciDiffusion 1.0 is 1.4x faster per step than SD1.5 on an A10G (shared/reference in the repository docs).

Each figure is the median of ``--iters`` interleaved runs after warm-up, timed with CUDA events (GPU) or
``perf_counter`` on one thread (CPU), over rotating input sets; everything is timed in two passes and the
pass-to-pass difference is reported as the noise floor.

GPU (the committed result):  python benchmarks/unet_speed.py --device cuda
GPU, CUDA-graph replays:     python benchmarks/unet_speed.py --device cuda --cuda-graph
CPU smoke run:               python benchmarks/unet_speed.py --device cpu --resolution 128 --iters 5 --name x
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

import numpy as np
import torch
from common import write_result
from diffusers import UNet2DConditionModel

from proxies.cost import arch_costs
from proxies.latency.profile import Settings
from proxies.latency.timing import graphed, make_timer
from search_spaces import get_arch
from search_spaces.flexible_unet import FlexibleUNet2DConditionModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIFFUSERS_CONFIGS = {
    "sd15": {"cross_attention_dim": 768},
    "sd21base": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
}
REFERENCES = ["sd15", "sd21base", "decidiffusion_v1", "bk_base", "bk_small", "bk_tiny"]


def inputs(cross_dim: int, args: argparse.Namespace, device: torch.device, n_sets: int = 3) -> list[tuple]:
    """``n_sets`` random input sets (never zeros: they can run faster than real data)."""
    gen = torch.Generator().manual_seed(0)
    size, dtype = args.resolution // 8, DTYPES[args.dtype]
    out = []
    for i in range(n_sets):
        x = torch.randn(args.batch, 4, size, size, generator=gen).to(device, dtype)
        text = torch.randn(args.batch, args.text_len, cross_dim, generator=gen).to(device, dtype)
        t = torch.full((args.batch,), 100 + 300 * i, device=device, dtype=torch.int64)
        out.append((x, t, text))
    return out


def time_interleaved(models: dict[str, tuple[torch.nn.Module, list[tuple]]], device: torch.device, warmup: int,
                     iters: int, cuda_graph: bool = False) -> dict[str, list[float]]:
    """One forward of each model in turn, ``iters`` rounds after ``warmup`` rounds; input sets rotate. With
    ``cuda_graph`` each (model, input set) forward is captured once and its replays are timed."""
    graph = Settings(device=str(device), cuda_graph=cuda_graph)  # graphed() is the identity without it
    timer = make_timer(graph)
    samples: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        calls = {name: [graphed(lambda m=model, x=x: m(*x, return_dict=False), graph) for x in sets]
                 for name, (model, sets) in models.items()}
        for r in range(warmup + iters):
            for name, fns in calls.items():
                ms = timer(fns[r % len(fns)])
                if r >= warmup:
                    samples[name].append(ms)
    return samples


def stats(a: list[float], b: list[float]) -> dict[str, float]:
    """Median of each pass, the (p90-p10)/median spread of pass 1, and the pass-to-pass difference (noise)."""
    m1, m2 = float(np.median(a)), float(np.median(b))
    p10, p90 = np.percentile(a, [10, 90])
    return {"ms": round(m1, 4), "ms_pass2": round(m2, 4), "spread": round(float((p90 - p10) / m1), 4),
            "pass_diff": round(abs(m2 - m1) / m1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512, help="image pixels (latent = /8)")
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (default mode)")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    parser.add_argument("--archs", default=",".join(REFERENCES))
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        torch.nn.Module.to(model, device=device, dtype=dtype)
        model.eval()
        return torch.compile(model) if args.compile else model

    def on_device() -> Any:
        return torch.device(device) if device.type == "cuda" else contextlib.nullcontext()

    # ---- part 1: FlexibleUNet vs diffusers, same weights --------------------------------------------------
    overhead: dict[str, Any] = {}
    for ref, cfg in DIFFUSERS_CONFIGS.items():
        torch.manual_seed(0)
        with on_device():
            unet = UNet2DConditionModel(sample_size=args.resolution // 8, **cfg)
        flex = FlexibleUNet2DConditionModel.from_unet2d(unet)
        unet, flex = prepare(unet), prepare(flex)
        sets = inputs(cfg["cross_attention_dim"], args, device)
        with torch.inference_mode():
            a, b = unet(*sets[0], return_dict=False)[0].float(), flex(*sets[0], return_dict=False)[0].float()
        rel = float((a - b).norm() / a.norm())
        say(f"{ref}: output rel diff flexible vs diffusers {rel:.2e}; timing")
        models = {"diffusers": (unet, sets), "flexible": (flex, sets)}
        p1 = time_interleaved(models, device, args.warmup, args.iters, args.cuda_graph)
        p2 = time_interleaved(models, device, args.warmup, args.iters, args.cuda_graph)
        s = {k: stats(p1[k], p2[k]) for k in models}
        overhead[ref] = {**s, "flexible_over_diffusers": round(s["flexible"]["ms"] / s["diffusers"]["ms"], 4),
                         "output_rel_diff": rel, "output_max_abs_diff": float((a - b).abs().max())}
        say(f"{ref}: diffusers {s['diffusers']['ms']:.3f} ms, flexible {s['flexible']['ms']:.3f} ms")
        del unet, flex, models
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- part 2: reference archs ---------------------------------------------------------------------------
    names = [n.strip() for n in args.archs.split(",") if n.strip()]
    models = {}
    for name in names:
        arch = get_arch(name)
        torch.manual_seed(0)
        with on_device():
            model = FlexibleUNet2DConditionModel.from_arch(arch)
        models[name] = (prepare(model), inputs(arch.cross_attention_dim, args, device))
    say(f"built {len(models)} reference archs; timing")
    p1 = time_interleaved(models, device, args.warmup, args.iters, args.cuda_graph)
    p2 = time_interleaved(models, device, args.warmup, args.iters, args.cuda_graph)
    refs: dict[str, Any] = {}
    base = float(np.median(p1["sd15"])) if "sd15" in p1 else None
    for name in names:
        arch = get_arch(name)
        cost = arch_costs(arch, args.batch, args.resolution // 8, args.text_len)
        s = stats(p1[name], p2[name])
        refs[name] = {**s, "params": cost.params, "gmacs": round(cost.macs / 1e9, 2),
                      "speedup_vs_sd15": round(base / s["ms"], 3) if base else None}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (1 thread)"
    payload = {
        "device": device_name,
        "torch_cuda": torch.version.cuda if device.type == "cuda" else None,
        "settings": {"dtype": args.dtype, "batch": args.batch, "resolution": args.resolution,
                     "text_len": args.text_len, "compile": args.compile, "cuda_graph": args.cuda_graph,
                     "warmup": args.warmup, "iters": args.iters, "statistic": "median",
                     "attention": "SDPA (diffusers default)"},
        "flexible_vs_diffusers": overhead, "references": refs,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    name = args.name or (f"unet_speed_{device.type}" + ("_compile" if args.compile else "")
                         + ("_graph" if args.cuda_graph else ""))
    path = write_result(name, payload)
    print(f"{'model':18s} {'ms':>9s} {'pass2':>9s} {'spread':>7s} {'speedup':>8s} {'GMACs':>8s}")
    for ref, o in overhead.items():
        for k in ("diffusers", "flexible"):
            print(f"{ref + ' ' + k:18s} {o[k]['ms']:9.3f} {o[k]['ms_pass2']:9.3f} {o[k]['spread']:7.3f}")
        print(f"{ref:18s} flexible/diffusers = {o['flexible_over_diffusers']:.4f}, rel diff {o['output_rel_diff']:.1e}")
    for n, r in refs.items():
        print(f"{n:18s} {r['ms']:9.3f} {r['ms_pass2']:9.3f} {r['spread']:7.3f} {r['speedup_vs_sd15']:8.3f} "
              f"{r['gmacs']:8.1f}")
    print(f"wrote {path} in {payload['elapsed_s']} s")


if __name__ == "__main__":
    main()
