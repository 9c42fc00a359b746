"""Short training loops for the proxies: plain denoising, or BK-SDM distillation from a teacher.

BK-SDM's loss (arXiv 2305.15798): task MSE + output-level KD MSE (student vs teacher prediction) + feature-level
KD MSE at the output of every down and up stage, all weighted 1. Stages pair by resolution level: down stages
from the input side, up stages from the output side (as in weight inheritance), and only pairs whose feature
maps have the same shape take part.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .base import QualityContext, Report, evaluate, noisy_and_target


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``down[i]``/``mid``/``up[i]`` -> module, for a FlexibleUNet or a diffusers UNet2DConditionModel."""
    out: dict[str, nn.Module] = {f"down[{i}]": m for i, m in enumerate(model.down_blocks)}
    if getattr(model, "mid_block", None) is not None:
        out["mid"] = model.mid_block
    out.update({f"up[{i}]": m for i, m in enumerate(model.up_blocks)})
    return out


def paired_stages(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    s, t = stage_modules(student), stage_modules(teacher)
    n_sd = sum(k.startswith("down") for k in s)
    n_td = sum(k.startswith("down") for k in t)
    n_su = sum(k.startswith("up") for k in s)
    n_tu = sum(k.startswith("up") for k in t)
    pairs = [(f"down[{i}]", f"down[{i}]") for i in range(min(n_sd, n_td))]
    pairs += [(f"up[{i}]", f"up[{i + n_tu - n_su}]") for i in range(n_su) if i + n_tu - n_su >= 0]
    return pairs


@contextmanager
def capture(model: nn.Module, names: list[str]):
    """Record the output hidden state of the named stages during forward passes."""
    store: dict[str, torch.Tensor] = {}
    modules = stage_modules(model)
    handles = []
    for name in names:
        def hook(_module: nn.Module, _args: Any, output: Any, name: str = name) -> None:
            store[name] = output[0] if isinstance(output, tuple) else output
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def lr_factor(step: int, steps: int, schedule: str = "constant", warmup: float = 0.0) -> float:
    """The learning-rate multiplier before optimiser step ``step`` (0-based) of ``steps``: ``constant``, or
    ``cosine`` (linear warm-up over the first ``warmup`` fraction, then a cosine decay to zero), which makes the
    end of a run a converged point rather than a sample of a noisy constant-rate trajectory."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    ramp = round(warmup * steps)
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1.0 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def step_loss(model: nn.Module, ctx: QualityContext, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, teacher: nn.Module | None = None,
              pairs: list[tuple[str, str]] = ()) -> torch.Tensor:
    """The training loss of one (micro-)batch: the task MSE, plus with a teacher BK-SDM's output-level KD and the
    feature-level KD at every stage pair of ``pairs`` (:func:`paired_stages`) whose shapes agree. One function, so
    that every loop that trains a student (:func:`train`, a weight-sharing supernet) optimises the same loss."""
    noisy, target = noisy_and_target(ctx.scheduler, x0, noise, t)
    with capture(model, [p[0] for p in pairs]) as s_feats:
        out = model(noisy, t, text).sample.float()
    loss = (out - target).square().mean()
    if teacher is not None:
        with torch.no_grad(), capture(teacher, [p[1] for p in pairs]) as t_feats:
            t_out = teacher(noisy, t, text).sample.float()
        loss = loss + (out - t_out).square().mean()
        for s_name, t_name in pairs:
            a, b = s_feats.get(s_name), t_feats.get(t_name)
            if a is not None and b is not None and a.shape == b.shape:
                loss = loss + (a.float() - b.float()).square().mean()
    return loss


def backward_batch(model: nn.Module, ctx: QualityContext, batch: tuple[torch.Tensor, ...],
                   teacher: nn.Module | None = None, pairs: list[tuple[str, str]] = ()) -> float:
    """Accumulate the gradients of one batch's :func:`step_loss` (forward passes under the context's autocast), in
    chunks of the context's ``micro_batch`` that add up to the batch mean; return the loss."""
    x0, text, t, noise = batch
    chunk = ctx.micro_batch or x0.shape[0]
    total = 0.0
    for start in range(0, x0.shape[0], chunk):
        part = slice(start, start + chunk)
        with ctx.autocast():
            loss = step_loss(model, ctx, x0[part], text[part], t[part], noise[part], teacher, pairs)
        weight = min(chunk, x0.shape[0] - start) / x0.shape[0]
        (loss * weight).backward()
        total += loss.item() * weight
    return total


def train(model: nn.Module, ctx: QualityContext, steps: int, lr: float = 1e-3, seed: int | None = None,
          teacher: nn.Module | None = None, feature_kd: bool = True, report: Report | None = None,
          eval_every: int = 0, schedule: str = "constant", warmup: float = 0.0) -> dict[str, Any]:
    """Train ``model`` for ``steps`` AdamW steps on the context's training split. With a teacher, BK-SDM's
    distillation loss. ``report(step, held-out loss)`` is called every ``eval_every`` steps; if it returns True
    the run stops early. ``schedule``/``warmup``: see :func:`lr_factor`. Deterministic under ``seed`` (default:
    the context's)."""
    g = torch.Generator().manual_seed(ctx.seed if seed is None else seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, schedule, warmup))
    pairs = paired_stages(model, teacher) if (teacher is not None and feature_kd) else []
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    model.train()
    losses: list[float] = []
    stopped_at = None
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        total = backward_batch(model, ctx, ctx.batch(g), teacher, pairs)
        opt.step()
        sched.step()
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError(f"training loss became {total} at step {step}")
        losses.append(total)
        if (report is not None and eval_every and step % eval_every == 0
                and report(step, evaluate(model, ctx)["task_loss"])):
            stopped_at = step
            break
    return {"losses": losses, "stopped_at": stopped_at}
