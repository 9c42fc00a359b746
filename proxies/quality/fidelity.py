"""The two fidelities a multi-fidelity quality proxy works with.

* :func:`full_fidelity`: the benchmark's ground-truth protocol. Inherit the teacher's weights, distil with
  BK-SDM's loss for ``steps`` AdamW steps on a cosine schedule with linear warm-up that decays to zero (so the
  end of the run is a converged point, not a sample of a noisy constant-rate trajectory), then the held-out
  denoising loss on the whole validation split over 20 timesteps.
* :func:`cheap_features`: what a few distillation steps tell about an arch: the held-out loss right after
  inheritance and after ``steps`` steps (the start of a learning curve), the share of parameters the teacher
  could not provide (archs that break inheritance start far worse and recover steeply), MACs and parameters.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

from proxies.cost import arch_costs
from search_spaces import ConfigError, UNetArch
from search_spaces.inherit import inherit_weights

from .base import QualityContext, evaluate
from .train import train

GT_TIMESTEPS = 20


def full_fidelity(arch: UNetArch, ctx: QualityContext, steps: int, lr: float = 1e-3, warmup: float = 0.1,
                  seed: int | None = None, eval_items: int | None = None, distill: bool = True) -> dict[str, float]:
    """Held-out loss after the ground-truth protocol (lower is better) and its cost; ``seed`` is the data
    order (default: the context's); ``eval_items`` held-out items (default: the whole validation split).

    ``distill=False`` trains on the task loss alone (the teacher still gives the inherited weights), to test
    whether a ranking without the KD terms, which pull every student towards one teacher, moves less with
    training length. Measured on shapes (``benchmarks/proxy_validity_cosine.py --gt-loss task``): it moves more,
    so the ground truth keeps distilling."""
    if ctx.teacher is None:
        raise ConfigError("full-fidelity runs inherit from a teacher", field="teacher")
    start = time.perf_counter()
    model = ctx.build(arch)
    inherit_weights(model, ctx.teacher, new=ctx.new_modules)
    train(model, ctx, steps, lr=lr, seed=seed, teacher=ctx.teacher if distill else None, schedule="cosine",
          warmup=warmup)
    val = min(len(ctx.data.split("val")), eval_items or len(ctx.data.split("val")))
    loss = evaluate(model, replace(ctx, eval_items=val, eval_timesteps=GT_TIMESTEPS))["task_loss"]
    return {"task_loss": loss, "seconds": time.perf_counter() - start}


def cheap_features(arch: UNetArch, ctx: QualityContext, steps: int, lr: float = 5e-4, eval_items: int = 64,
                   checkpoints: tuple[int, ...] = (), schedule: str = "constant",
                   warmup: float = 0.0) -> dict[str, Any]:
    """Features from inheritance plus ``steps`` distillation steps (BK-SDM's loss; ``schedule`` and ``warmup`` as
    in :func:`~proxies.quality.train.lr_factor`). The held-out loss is measured after inheritance (``loss@0``),
    after ``steps`` steps (``loss@K``) and at every step in ``checkpoints`` (``curve``, for studies of the
    learning curve); ``seconds`` is the whole cost."""
    if ctx.teacher is None:
        raise ConfigError("the features distil from a teacher", field="teacher")
    start = time.perf_counter()
    fctx = replace(ctx, eval_items=eval_items)
    model = ctx.build(arch)
    report = inherit_weights(model, ctx.teacher, new=ctx.new_modules)
    loss0 = evaluate(model, fctx)["task_loss"]
    curve: dict[int, float] = {0: loss0}
    clock: dict[int, float] = {0: time.perf_counter() - start}  # seconds spent when each point was known
    if steps:
        marks = sorted({*checkpoints, steps} - {0})
        every = math.gcd(*marks)

        def record(step: int, value: float) -> bool:
            if step in marks:
                curve[step] = value
                clock[step] = time.perf_counter() - start
            return False

        train(model, fctx, steps, lr=lr, teacher=ctx.teacher, report=record, eval_every=every, schedule=schedule,
              warmup=warmup)
    cost = arch_costs(arch, batch=1, text_len=ctx.data.text.shape[1])
    total = report.inherited_params + report.new_params
    return {"loss@0": loss0, "loss@K": curve[steps], "steps": steps, "curve": {str(k): v for k, v in curve.items()},
            "clock": {str(k): v for k, v in clock.items()},
            "new_fraction": report.new_params / max(1, total), "macs": cost.macs, "params": cost.params,
            "seconds": time.perf_counter() - start}


FEATURES = ("loss@0", "loss@K", "new_fraction", "macs", "params")


def feature_vector(f: dict[str, Any], names: tuple[str, ...] = FEATURES) -> list[float]:
    """Losses, MACs and parameters on a log scale (they span orders of magnitude); shares as they are."""
    return [f[n] if n == "new_fraction" else math.log(max(f[n], 1e-12)) for n in names]
