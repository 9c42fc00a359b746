"""Short-training proxy: train for a small budget (from inherited or fresh weights) and report the held-out
denoising loss along the way, so a scheduler such as ASHA can stop unpromising trials early."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from search_spaces import ConfigError, UNetArch
from search_spaces.inherit import check_new_modules, inherit_weights

from .base import QualityContext, QualityProxy, Report, evaluate
from .train import train


class ShortTrain(QualityProxy):
    kind = "short_train"

    def __init__(self, steps: int = 50, lr: float = 1e-3, init: str = "fresh", eval_every: int = 10,
                 new_modules: str = "fresh"):
        check_new_modules(new_modules)
        if init not in ("fresh", "inherit"):
            raise ConfigError(f"must be fresh or inherit, got {init!r}", field="init")
        if steps <= 0:
            raise ConfigError(f"must be > 0, got {steps}", field="steps")
        self.steps, self.lr, self.init, self.eval_every = steps, lr, init, eval_every
        self.new_modules = new_modules  # with init: inherit, how the modules the teacher lacks start
        self.name = f"short_train_{init}@{steps}"

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        ctx = replace(ctx, new_modules=self.new_modules)
        model = ctx.build(arch)
        if self.init == "inherit":
            if ctx.teacher is None:
                raise ConfigError("init: inherit needs a teacher", field="teacher")
            inherit_weights(model, ctx.teacher, new=ctx.new_modules)
        history = train(model, ctx, self.steps, lr=self.lr, report=report, eval_every=self.eval_every)
        metrics = evaluate(model, ctx)
        return metrics["task_loss"], {**metrics, "stopped_at": history["stopped_at"],
                                      "final_train_loss": history["losses"][-1]}
