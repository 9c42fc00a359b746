"""Sampling for quality checks: DDIM with trailing timestep spacing (so the first step starts from pure noise,
as zero-terminal-SNR schedules need) and classifier-free guidance with the rescale of Lin et al. 2023."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, text: torch.Tensor, uncond: torch.Tensor, train_scheduler: DDPMScheduler,
             shape: tuple[int, int, int], steps: int = 20, guidance: float = 3.0, guidance_rescale: float = 0.7,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents for a batch of text embeddings ``text`` [B, L, D]; ``uncond`` is the empty caption's [1, L, D]."""
    scheduler = DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    device = next(model.parameters()).device
    b = text.shape[0]
    x = torch.randn((b, *shape), generator=generator).to(device)
    cond = torch.cat([uncond.expand(b, -1, -1), text]).to(device)
    was_training = model.training
    model.eval()
    for t in scheduler.timesteps:
        pred = model(torch.cat([x, x]), t, cond).sample
        u, c = pred.chunk(2)
        guided = u + guidance * (c - u)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, c, guidance_rescale=guidance_rescale)
        x = scheduler.step(guided, t, x).prev_sample
    model.train(was_training)
    return x
