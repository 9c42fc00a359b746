"""Zero-cost proxies at initialisation, on the denoising loss with sampled timesteps and text conditioning.

All four come from the image-classification NAS literature (Abdelfattah et al., "Zero-Cost Proxies for
Lightweight NAS", 2021; Mellor et al., NASWOT, 2021) where *higher* means better; UNet-NAS negates them so that,
like every quality proxy, lower is better. None has been validated on diffusion U-Nets before:
``benchmarks/proxy_validity.py`` measures how well each ranks them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from search_spaces import UNetArch

from .base import QualityContext, QualityProxy, Report, denoising_loss


def _init_batch(ctx: QualityContext) -> tuple[torch.Tensor, ...]:
    return ctx.batch(torch.Generator().manual_seed(ctx.seed + 1))


class GradNorm(QualityProxy):
    """Sum over parameters of the L2 norm of the loss gradient."""

    name, kind = "grad_norm", "zero_cost"

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        model = ctx.build(arch)
        denoising_loss(model, ctx.scheduler, *_init_batch(ctx)).backward()
        value = sum(p.grad.norm().item() for p in model.parameters() if p.grad is not None)
        return -value, {"grad_norm": value}


class Snip(QualityProxy):
    """SNIP saliency: sum of |weight x gradient|."""

    name, kind = "snip", "zero_cost"

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        model = ctx.build(arch)
        denoising_loss(model, ctx.scheduler, *_init_batch(ctx)).backward()
        value = sum((p * p.grad).abs().sum().item() for p in model.parameters() if p.grad is not None)
        return -value, {"snip": value}


class SynFlow(QualityProxy):
    """SynFlow: with all weights made positive and an all-ones input, sum of weight x d(sum of output)/d weight.

    Unlike SynFlow's batch-norm networks, the normalisation layers are kept: with them bypassed, positive
    weights and skip concatenations grow activations past 1e140 within a few stages and the attention softmax
    overflows. float64 keeps the products finite. The score is the negated log of the sum."""

    name, kind = "synflow", "zero_cost"

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        model = ctx.build(arch).double()
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
        c, h, w = ctx.data.latent_shape
        text_len, width = ctx.data.text.shape[1:]
        x = torch.ones(1, c, h, w, dtype=torch.float64, device=ctx.device)
        text = torch.ones(1, text_len, width, dtype=torch.float64, device=ctx.device)
        model(x, torch.tensor([500], device=ctx.device), text).sample.sum().backward()
        value = sum((p * p.grad).sum().item() for p in model.parameters() if p.grad is not None)
        log_value = math.log(value) if value > 0 else float("-inf")
        return -log_value, {"synflow_log": log_value}


class JacobCov(QualityProxy):
    """NASWOT-style Jacobian covariance: how decorrelated the input-output Jacobians of a batch are."""

    name, kind = "jacob_cov", "zero_cost"

    def __init__(self, batch: int = 32):
        self.batch = batch

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        model = ctx.build(arch)
        x0, text, t, noise = ctx.batch(torch.Generator().manual_seed(ctx.seed + 1), size=self.batch)
        noisy = ctx.scheduler.add_noise(x0, noise, t).requires_grad_(True)
        model(noisy, t, text).sample.sum().backward()
        jac = noisy.grad.reshape(self.batch, -1).double().cpu()
        corr = torch.corrcoef(jac)
        corr = torch.nan_to_num(corr, nan=0.0)
        eig = torch.linalg.eigvalsh(corr).clamp_min(0)
        k = 1e-5
        value = -float(torch.sum(torch.log(eig + k) + 1.0 / (eig + k)))
        return -value, {"jacob_cov": value}

