"""The quality-proxy interface and the denoising objective all proxies share.

A proxy scores an arch in a :class:`QualityContext` (data, teacher, device, seed); **lower is better**, and every
score carries its cost in seconds. The denoising objective is DeciDiffusion's: v-prediction on a cosine
(``squaredcos_cap_v2``) schedule rescaled to zero terminal SNR, from diffusers' ``DDPMScheduler``.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from search_spaces import ConfigError, FlexibleUNet2DConditionModel, UNetArch

from ..data import LatentCache

MIXED_PRECISION = ("no", "bf16")
Report = Callable[[int, float], bool]  # (step, value) -> True to stop early (a scheduler pruned the trial)


def make_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """v-prediction, cosine betas, zero terminal SNR: the noise schedule of the DeciDiffusion recipe."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", rescale_betas_zero_snr=True, clip_sample=False)


@dataclass
class QualityContext:
    """What a proxy may use. ``micro_batch`` splits each batch to bound memory (gradients accumulate);
    ``gradient_checkpointing`` trades compute for memory on big models. ``space`` and ``cache_dir`` serve
    proxies with one-time work (the surrogate chooses its anchor archs in the space and caches its runs).
    ``new_modules``: how inheritance starts what the teacher lacks (``fresh`` or ``identity``, see
    :func:`search_spaces.inherit.inherit_weights`). ``mixed_precision="bf16"`` runs every proxy under bf16
    autocast (weights and optimiser state stay fp32, as accelerate's ``mixed_precision: bf16`` trains): at SD scale
    it is what fits a distillation step of a 0.8B student beside its teacher in 21 GiB at batch 8."""

    data: LatentCache
    teacher: nn.Module | None = None
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 64
    micro_batch: int | None = None
    gradient_checkpointing: bool = False
    eval_items: int = 256
    eval_timesteps: int = 10
    scheduler: DDPMScheduler = field(default_factory=make_scheduler)
    space: Any = None
    cache_dir: Path | None = None
    new_modules: str = "fresh"
    mixed_precision: str = "no"
    # The archs the search can pick: those meeting the experiment's constraints that are known before a quality
    # proxy runs (parameters, MACs, latency). A proxy may spend its one-time work on them alone (the supernet's
    # ``train_on: feasible``; not its default, which ranks better). ``feasible_label`` says which bounds these are,
    # so that a cache made under other bounds is not reused. None: every arch of the space.
    feasible: Callable[[UNetArch], bool] | None = field(default=None, repr=False, compare=False)
    feasible_label: str = ""
    # the teacher's outputs on the fixed evaluation grid, the same for every arch: see :func:`evaluate`
    teacher_outputs: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
                              field="mixed_precision")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every proxy runs in: bf16 autocast, or nothing. float64 work (SynFlow) is left as it is:
        autocast never casts float64."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def build(self, arch: UNetArch, seed: int | None = None) -> FlexibleUNet2DConditionModel:
        """A freshly initialised model for ``arch`` (deterministic under the seed on a given device).

        Built directly on the context's device: initialising an SD-sized U-Net (0.8B parameters) on the CPU and
        copying it over cost 5-7 s of every trial on an H200 machine (``benchmarks/proxy_cost_sd.py``), as much as
        a zero-cost proxy's whole evaluation. A CUDA build draws other initial values than a CPU build of the same
        seed (each device has its own generator); inherited weights are copied either way."""
        self.data.check_compatible(arch)
        torch.manual_seed(self.seed if seed is None else seed)
        with torch.device(self.device):
            model = FlexibleUNet2DConditionModel.from_arch(arch)
        model = model.to(self.device)
        if self.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def batch(self, generator: torch.Generator, split: str = "train",
              size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean latents, text, timesteps, noise) for a random training batch."""
        data = self.data.split(split)
        n = size or self.batch_size
        idx = torch.randint(0, len(data), (n,), generator=generator)
        x0 = data.sample_latents(idx, generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return x0.to(self.device), data.text[idx].to(self.device), t.to(self.device), noise.to(self.device)


@dataclass
class QualityScore:
    """A proxy's verdict on one arch: ``score`` (lower is better), its cost, and proxy-specific details."""

    score: float
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class QualityProxy(ABC):
    """One way to guess how good an arch will be once trained."""

    name: str = ""
    kind: str = ""  # zero_cost | distill | short_train

    def __call__(self, arch: UNetArch, ctx: QualityContext, report: Report | None = None) -> QualityScore:
        start = time.perf_counter()
        with ctx.autocast():
            score, details = self.compute(arch, ctx, report)
        return QualityScore(float(score), time.perf_counter() - start, details)

    @abstractmethod
    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        """Return (score, details); lower score is better."""


# ---- the denoising objective -----------------------------------------------------------------------------------


def noisy_and_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised input at ``t`` and the v-prediction target."""
    return scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)


def denoising_loss(model: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, text: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    noisy, target = noisy_and_target(scheduler, x0, noise, t)
    return (model(noisy, t, text).sample.float() - target.float()).square().mean()


TEACHER_OUTPUTS_KEPT = 4  # evaluation grids whose teacher outputs a context keeps (SD scale: 168 MB each)


def _teacher_key(teacher: nn.Module, ctx: QualityContext, n: int, chunk: int) -> tuple:
    """What the teacher's outputs on the evaluation grid depend on. The parameters' version counters change
    with every in-place update (an optimiser step, ``load_state_dict``), so a teacher trained on is not served
    its old outputs."""
    device_type = torch.device(ctx.device).type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        autocast = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return (id(teacher), sum(p._version for p in teacher.parameters()), teacher.training, id(ctx.data),
            id(ctx.scheduler), n, ctx.eval_timesteps, chunk, str(ctx.device), autocast)


@torch.no_grad()
def evaluate(model: nn.Module, ctx: QualityContext, teacher: nn.Module | None = None) -> dict[str, float]:
    """Held-out denoising loss on a fixed grid of timesteps, fixed items and fixed noise (deterministic), and,
    given a teacher, the output-level distillation loss against it. The items go through the model in chunks of
    the context's ``micro_batch`` (all at once without one).

    The teacher's outputs on this grid are the same for every arch, so the context keeps them (keyed by the
    teacher, its weights' versions, the data and the grid) and later evaluations reuse them: at SD scale the
    teacher's forward passes are 57% of an evaluation with the teacher (0.82 of 1.44 s per timestep on an H200)."""
    was_training = model.training
    model.eval()
    val = ctx.data.split("val")
    n = min(ctx.eval_items, len(val))
    g = torch.Generator().manual_seed(12345)
    idx = torch.arange(n)
    x0 = val.sample_latents(idx, g).to(ctx.device)
    text = val.text[idx].to(ctx.device)
    steps = torch.linspace(0, ctx.scheduler.config.num_train_timesteps - 1, ctx.eval_timesteps).round().long()
    task = kd = 0.0
    chunk = ctx.micro_batch or n  # bounds memory as in training: 256 SD-sized items in one pass peak at 27 GiB
    cached, fresh, key = [], True, None
    if teacher is not None:
        key = _teacher_key(teacher, ctx, n, chunk)
        if key in ctx.teacher_outputs:
            cached, fresh = ctx.teacher_outputs[key][2], False
    i = 0
    for step in steps:
        noise = torch.randn(x0.shape, generator=g).to(ctx.device)
        t = step.repeat(n).to(ctx.device)
        noisy, target = noisy_and_target(ctx.scheduler, x0, noise, t)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            weight = (min(start + chunk, n) - start) / n  # 1.0 for one chunk: the same figure as unchunked
            out = model(noisy[part], t[part], text[part]).sample.float()
            task += (out - target[part]).square().mean().item() * weight
            if teacher is not None:
                if fresh:
                    cached.append(teacher(noisy[part], t[part], text[part]).sample.float())
                kd += (out - cached[i]).square().mean().item() * weight
                i += 1
    if teacher is not None and fresh:
        while len(ctx.teacher_outputs) >= TEACHER_OUTPUTS_KEPT:
            ctx.teacher_outputs.pop(next(iter(ctx.teacher_outputs)))
        ctx.teacher_outputs[key] = (teacher, ctx.data, cached)  # the references keep their ids from being reused
    model.train(was_training)
    result = {"task_loss": task / len(steps)}
    if teacher is not None:
        result["kd_loss"] = kd / len(steps)
    return result
