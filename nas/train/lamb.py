"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2).

DeciDiffusion trained its phases 2-4 with LAMB at batch 6144. torch.optim has no LAMB, and the maintained
implementations (apex's FusedLAMB, timm's Lamb) would add a CUDA extension or a large dependency for one
optimizer, so this is the paper's update in a few lines, tested step by step against the formula
(``tests/test_train.py``)::

    m_t = beta1 m_{t-1} + (1 - beta1) g_t             v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    m^ = m_t / (1 - beta1^t)                           v^ = v_t / (1 - beta2^t)
    u  = m^ / (sqrt(v^) + eps) + lambda x              (Adam direction plus decoupled weight decay)
    x  = x - lr * (||x|| / ||u||) * u                  (per tensor; the ratio is 1 when either norm is 0)

The trust ratio uses phi(z) = z, as in the paper's experiments; ``max_trust`` optionally clips it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class Lamb(Optimizer):
    """Layer-wise adaptive moments for large batches: Adam's direction, scaled per tensor by ||x|| / ||u||."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, max_trust: float | None = None):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "max_trust": max_trust})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                x = p.float()
                if group["weight_decay"]:
                    update.add_(x, alpha=group["weight_decay"])
                w_norm, u_norm = x.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                if group["max_trust"] is not None:
                    trust = trust.clamp(max=group["max_trust"])
                p.copy_(x - group["lr"] * trust * update)
        return loss
