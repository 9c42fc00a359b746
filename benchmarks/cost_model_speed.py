"""How many architectures per second the closed-form cost model scores on one CPU core.

Target: >= 10,000 archs/s (params + MACs at batch 2, 64x64 latents, 77 tokens) for archs of the SD1.5 space.
The process pins itself to one core. Shared machines are noisy, so each figure is the best and the median of
several repeats, and the spread between them is printed as the noise floor.

    python benchmarks/cost_model_speed.py [--archs 5000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

from common import write_result

from proxies import cost as cost_mod
from search_spaces.space import SearchSpace

SPACE = Path(__file__).parents[1] / "search_spaces" / "spaces" / "sd15.yaml"


def _clear_caches() -> None:
    for fn in (cost_mod.resnet_cost, cost_mod.attention_cost, cost_mod.conv3x3_cost, cost_mod.time_embedding_cost):
        fn.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    space = SearchSpace.from_yaml(SPACE)
    rng = random.Random(0)

    # end to end: sample an arch (validated, routed) and score it
    def sample_and_score() -> float:
        _clear_caches()
        t = time.perf_counter()
        for _ in range(args.archs):
            cost_mod.arch_costs(space.sample(rng), batch=2, resolution=64, text_len=77)
        return args.archs / (time.perf_counter() - t)

    # scoring only: archs already in hand (a search scores its own candidates), block caches cold then warm
    archs = [space.sample(rng) for _ in range(args.archs)]

    def score(cold: bool) -> float:
        if cold:
            _clear_caches()
        t = time.perf_counter()
        for a in archs:
            cost_mod.arch_costs(a, batch=2, resolution=64, text_len=77)
        return args.archs / (time.perf_counter() - t)

    results = {}
    for name, fn in (("score_cold_cache", lambda: score(True)), ("score_warm_cache", lambda: score(False)),
                     ("sample_and_score", sample_and_score)):
        rates = [fn() for _ in range(args.repeats)]
        results[name] = {
            "archs_per_s_best": round(max(rates)),
            "archs_per_s_median": round(statistics.median(rates)),
            "archs_per_s_worst": round(min(rates)),
            "noise_floor_pct": round(100 * (max(rates) - min(rates)) / max(rates), 1),
        }
        r = results[name]
        print(f"{name:18s} best {r['archs_per_s_best']:>8,} archs/s  median {r['archs_per_s_median']:>8,}  "
              f"worst {r['archs_per_s_worst']:>8,}  (spread {r['noise_floor_pct']}%)")
    ok = results["score_cold_cache"]["archs_per_s_median"] >= 10_000
    print(f"target >= 10,000 archs/s (median, cold cache): {'met' if ok else 'NOT met'}")
    path = write_result("cost_model_speed", {
        "space": "search_spaces/spaces/sd15.yaml", "archs": args.archs, "repeats": args.repeats,
        "shape": {"batch": 2, "resolution": 64, "text_len": 77}, "threads": 1, "results": results,
        "target_archs_per_s": 10_000, "target_met": ok,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
