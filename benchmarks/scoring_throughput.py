"""Archs per second for params + MACs + predicted latency, against building each model and counting with fvcore.

A search scores far more candidates than it trains, so scoring must not build models. This compares
UNet-NAS's closed-form scoring (``proxies.cost.arch_costs`` + a latency predictor) with the usual alternative:
build the model, count parameters, run fvcore's FlopCountAnalysis. One core; best and median of repeats, and
the spread between them as the noise floor.

    python benchmarks/scoring_throughput.py [--space search_spaces/spaces/tiny.yaml] [--profile P.yaml]

The latency predictor is the roofline on the Cloud AI 100 Standard spec (fp16, batch 2, the space's resolution),
plus the lookup table when ``--profile`` gives a profile of the space.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
from common import write_result

from proxies.cost import arch_costs
from proxies.latency.lut import LUTPredictor
from proxies.latency.profile import LatencyProfile, Settings
from proxies.latency.roofline import RooflinePredictor, load_spec
from search_spaces.flexible_unet import FlexibleUNet2DConditionModel
from search_spaces.space import SearchSpace

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "spaces" / "tiny.yaml"))
    parser.add_argument("--profile", default=None, help="also score with the lookup table of this profile")
    parser.add_argument("--archs", type=int, default=2000, help="archs scored by the closed form per repeat")
    parser.add_argument("--fvcore-archs", type=int, default=10, help="archs built and counted with fvcore")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)

    space = SearchSpace.from_yaml(args.space)
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(args.archs)]
    latent = archs[0].sample_size
    settings = Settings(device="cuda", dtype="fp16", batch=2, resolution=latent * 8, text_len=77, threads=None)
    roofline = RooflinePredictor(load_spec("cloud_ai_100_standard"), settings)
    lut = None
    if args.profile:
        prof = LatencyProfile.load(args.profile)
        lut = LUTPredictor(prof)
        settings = prof.settings

    def ours() -> float:
        t = time.perf_counter()
        for a in archs:
            cost = arch_costs(a, batch=2, resolution=settings.latent_size, text_len=77)
            _ = (cost.params, cost.macs, roofline.predict(a), lut.predict(a) if lut else None)
        return len(archs) / (time.perf_counter() - t)

    def fvcore() -> float:
        from fvcore.nn import FlopCountAnalysis

        t = time.perf_counter()
        for a in archs[: args.fvcore_archs]:
            model = FlexibleUNet2DConditionModel.from_arch(a).eval()
            _ = sum(p.numel() for p in model.parameters())
            inputs = (torch.randn(2, a.in_channels, latent, latent), torch.tensor([500, 500]),
                      torch.randn(2, 77, a.cross_attention_dim))
            flops = FlopCountAnalysis(model, inputs)
            flops.unsupported_ops_warnings(False)
            flops.uncalled_modules_warnings(False)
            _ = flops.total()
        return args.fvcore_archs / (time.perf_counter() - t)

    results = {}
    for name, fn, repeats in (("closed_form", ours, args.repeats), ("fvcore", fvcore, max(1, args.repeats // 2))):
        rates = [fn() for _ in range(repeats)]
        results[name] = {"archs_per_s_best": round(max(rates), 2),
                         "archs_per_s_median": round(statistics.median(rates), 2),
                         "noise_floor_pct": round(100 * (max(rates) - min(rates)) / max(rates), 1)}
        r = results[name]
        print(f"{name:12s} best {r['archs_per_s_best']:>10,.2f} archs/s  median {r['archs_per_s_median']:>10,.2f}  "
              f"(spread {r['noise_floor_pct']}%)")
    ratio = results["closed_form"]["archs_per_s_median"] / results["fvcore"]["archs_per_s_median"]
    print(f"closed form (params + MACs + predicted latency) is {ratio:,.0f}x faster than build + fvcore")
    path = write_result("scoring_throughput", {
        "space": os.path.relpath(args.space, ROOT), "archs": args.archs, "fvcore_archs": args.fvcore_archs,
        "latency_predictors": ["roofline:cloud_ai_100_standard"] + (["lut"] if lut else []),
        "threads": 1, "results": results, "ratio": round(ratio, 1),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
