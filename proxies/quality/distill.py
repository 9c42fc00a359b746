"""Teacher-distillation proxy (BK-SDM style): inherit the teacher's weights, optionally fine-tune K steps with
BK-SDM's loss, and score on held-out data.

The score is the held-out output-level distillation loss (``metric="kd"``, how far the student's prediction is
from the teacher's) or the held-out denoising loss (``metric="task"``), both on a fixed grid of timesteps; the
details carry both and the inheritance summary.
"""

from __future__ import annotations

from typing import Any

from search_spaces import ConfigError, UNetArch
from search_spaces.inherit import inherit_weights

from .base import QualityContext, QualityProxy, Report, evaluate
from .train import train


class Distill(QualityProxy):
    kind = "distill"

    def __init__(self, steps: int = 0, lr: float = 5e-4, metric: str = "kd", feature_kd: bool = True):
        if metric not in ("kd", "task"):
            raise ConfigError(f"metric must be kd or task, got {metric!r}", field="metric")
        if steps < 0:
            raise ConfigError(f"must be >= 0, got {steps}", field="steps")
        self.steps, self.lr, self.metric, self.feature_kd = steps, lr, metric, feature_kd
        self.name = f"distill_{metric}@{steps}"

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        if ctx.teacher is None:
            raise ConfigError("the distillation proxy needs a teacher", field="teacher")
        student = ctx.build(arch)
        inherited = inherit_weights(student, ctx.teacher)
        history = None
        if self.steps:
            history = train(student, ctx, self.steps, lr=self.lr, teacher=ctx.teacher, feature_kd=self.feature_kd,
                            report=report, eval_every=max(1, self.steps // 4) if report else 0)
        metrics = evaluate(student, ctx, teacher=ctx.teacher)
        details = {**metrics, "inherited_params": inherited.inherited_params, "new_params": inherited.new_params}
        if history:
            details["final_train_loss"] = history["losses"][-1]
        return metrics["kd_loss" if self.metric == "kd" else "task_loss"], details
