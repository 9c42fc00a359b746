"""Teacher-distillation proxy (BK-SDM style): inherit the teacher's weights, optionally fine-tune K steps with
BK-SDM's loss, and score on held-out data.

The score is the held-out output-level distillation loss (``metric="kd"``, how far the student's prediction is
from the teacher's) or the held-out denoising loss (``metric="task"``), both on a fixed grid of timesteps; the
details carry both and the inheritance summary.

``schedule="cosine"`` (linear warm-up over ``warmup`` of the steps, then a decay to zero) makes the K steps the
benchmark's ground-truth protocol shrunk: the score is read at a converged point of a short run rather than
mid-way through a constant-rate one. ``new_modules="identity"`` starts the modules the teacher lacks as the
identity (:func:`search_spaces.inherit.inherit_weights`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from search_spaces import ConfigError, UNetArch
from search_spaces.inherit import check_new_modules, inherit_weights

from .base import QualityContext, QualityProxy, Report, evaluate
from .train import train


class Distill(QualityProxy):
    kind = "distill"

    def __init__(self, steps: int = 0, lr: float = 5e-4, metric: str = "kd", feature_kd: bool = True,
                 schedule: str = "constant", warmup: float = 0.1, new_modules: str = "fresh"):
        check_new_modules(new_modules)
        if metric not in ("kd", "task"):
            raise ConfigError(f"metric must be kd or task, got {metric!r}", field="metric")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(f"must be an integer >= 0, got {steps!r}", field="steps")
        if schedule not in ("constant", "cosine"):
            raise ConfigError(f"must be constant or cosine, got {schedule!r}", field="schedule")
        if not isinstance(warmup, int | float) or isinstance(warmup, bool) or not 0 <= warmup < 1:
            raise ConfigError(f"must be a fraction in [0, 1), got {warmup!r}", field="warmup")
        if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
            raise ConfigError(f"must be a number > 0, got {lr!r}", field="lr")
        self.steps, self.lr, self.metric, self.feature_kd = steps, lr, metric, feature_kd
        self.schedule, self.warmup, self.new_modules = schedule, float(warmup), new_modules
        self.name = f"distill_{metric}@{steps}" + ("_cosine" if schedule == "cosine" else "")

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        if ctx.teacher is None:
            raise ConfigError("the distillation proxy needs a teacher", field="teacher")
        ctx = replace(ctx, new_modules=self.new_modules)
        student = ctx.build(arch)
        inherited = inherit_weights(student, ctx.teacher, new=ctx.new_modules)
        history = None
        if self.steps:
            history = train(student, ctx, self.steps, lr=self.lr, teacher=ctx.teacher, feature_kd=self.feature_kd,
                            report=report, eval_every=max(1, self.steps // 4) if report else 0,
                            schedule=self.schedule, warmup=self.warmup if self.schedule == "cosine" else 0.0)
        metrics = evaluate(student, ctx, teacher=ctx.teacher)
        details = {**metrics, "inherited_params": inherited.inherited_params, "new_params": inherited.new_params}
        if history:
            details["final_train_loss"] = history["losses"][-1]
        return metrics["kd_loss" if self.metric == "kd" else "task_loss"], details
