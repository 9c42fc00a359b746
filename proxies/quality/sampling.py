"""Sampling for quality checks: the recipe's samplers on the training schedule, with classifier-free guidance and
the rescale of Lin et al. 2023.

* ``ddim``: DDIM with trailing timestep spacing (so the first step starts from pure noise, as zero-terminal-SNR
  schedules need);
* ``dpmpp``: DPM-Solver++ multistep (2nd order), also on trailing timesteps, the family DeciDiffusion 2.0's
  sampler comes from.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

SAMPLERS = ("ddim", "dpmpp")


def make_sampler(name: str, train_scheduler: Any) -> Any:
    """A diffusers scheduler of kind ``name`` (one of :data:`SAMPLERS`) on ``train_scheduler``'s schedule."""
    config = train_scheduler.config
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, timestep_spacing="trailing",
                                                       algorithm_type="dpmsolver++", solver_order=2,
                                                       final_sigmas_type="zero")
    raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


@torch.no_grad()
def generate(model: nn.Module, text: torch.Tensor, uncond: torch.Tensor, train_scheduler: DDPMScheduler,
             shape: tuple[int, int, int], steps: int = 20, guidance: float = 3.0, guidance_rescale: float = 0.7,
             generator: torch.Generator | None = None, sampler: str = "ddim",
             latents: torch.Tensor | None = None) -> torch.Tensor:
    """Latents for a batch of text embeddings ``text`` [B, L, D]; ``uncond`` is the empty caption's [1, L, D].
    The starting noise is ``latents`` if given (per-item noise that does not depend on the batch), else drawn
    from ``generator``."""
    scheduler = make_sampler(sampler, train_scheduler)
    scheduler.set_timesteps(steps)
    device = next(model.parameters()).device
    b = text.shape[0]
    x = latents.clone() if latents is not None else torch.randn((b, *shape), generator=generator)
    x = x.to(device) * scheduler.init_noise_sigma
    cond = torch.cat([uncond.expand(b, -1, -1), text]).to(device)
    was_training = model.training
    model.eval()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        pred = model(inp, t, cond).sample
        u, c = pred.chunk(2)
        guided = u + guidance * (c - u)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, c, guidance_rescale=guidance_rescale)
        x = scheduler.step(guided, t, x).prev_sample
    model.train(was_training)
    return x
