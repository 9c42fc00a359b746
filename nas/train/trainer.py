"""The DeciDiffusion training recipe on accelerate: phases, v-prediction on a zero-terminal-SNR cosine schedule,
Min-SNR-gamma weighting, optional BK-SDM distillation, EMA in its phase, exact resume.

One process by default; ``accelerate launch -m nas train FILE`` runs the same code on many GPUs or nodes
(each process draws its own share of every batch; gradients are averaged by accelerate).

Exact resume. Every random draw of optimizer step ``s`` (items, posterior samples, caption dropout, timesteps,
noise) comes from a generator seeded by ``(seed, s, process, micro-batch)``, so the data stream is a pure
function of the step: no data-loader position has to be replayed. A sharded dataset (``proxies.shards``) streams
instead: the samples of step ``s`` are positions ``[s * batch, (s + 1) * batch)`` of an epoch order that is a
pure function of (seed, epoch, position), each process reading its share, and every draw of a sample is seeded
by its position, so those batches do not even depend on the process count. A checkpoint (``accelerator.save_state``:
model, optimizer, LR schedule, EMA, every RNG state; plus ``state.json`` with the step and phase) is written
to a temporary folder and renamed, so a kill at any moment leaves whole checkpoints only. ``--resume`` loads
the newest one, drops the loss-curve rows written after it, and continues: the next step's loss is the one the
uninterrupted run had.

Phases. Each phase builds its own optimizer (AdamW or LAMB) and LR schedule (``diffusers.optimization``) over
its steps, and sets gradient accumulation so that ``batch`` = processes x accumulation x micro-batch. A phase
with ``ema: true`` starts a fresh EMA (``diffusers.training_utils.EMAModel``) of the weights it begins with,
updates it after every step of that phase only, and hands its EMA weights on: at the phase's end they replace
the model's (the next phase fine-tunes them; after the last phase they are the released model).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr

from proxies.data import LatentCache, digits_cache
from proxies.quality.train import capture, paired_stages
from proxies.shards import Draws, ShardedDataset, is_sharded, stream_loader
from proxies.shards.store import is_remote
from search_spaces import ConfigError, FlexibleUNet2DConditionModel, load_arch
from search_spaces.checkpoints import load_unet
from search_spaces.yamlio import atomic_write, dump_json

from .checkpointing import Checkpointing
from .lamb import Lamb
from .outputs import CSV_FIELDS, RunOutputs, _located
from .recipe import Phase, Recipe


def make_noise_scheduler(recipe: Recipe) -> DDPMScheduler:
    """diffusers' DDPMScheduler with the recipe's schedule (DeciDiffusion's: v-prediction, squaredcos_cap_v2,
    rescaled to zero terminal SNR)."""
    n = recipe.noise
    return DDPMScheduler(num_train_timesteps=n.num_train_timesteps, beta_schedule=n.beta_schedule,
                         prediction_type=n.prediction_type, rescale_betas_zero_snr=n.rescale_betas_zero_snr,
                         clip_sample=False)


def step_generator(seed: int, step: int, process: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch: a pure function of where it is in the run."""
    state = np.random.SeedSequence([seed, step, process, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Trainer(Checkpointing, RunOutputs):
    """Runs a recipe into ``out``: ``checkpoints/``, ``loss.csv``, ``validation/``, ``model/``,
    ``metrics.json``. ``stop_after`` ends the run (as if killed) right after that global step's checkpoint."""

    def __init__(self, recipe: Recipe, out: str | os.PathLike, log: Callable[[str], None] = print,
                 stop_after: int | None = None, allow_pickle: bool = False):
        self.recipe = recipe
        self.allow_pickle = allow_pickle  # read pickle teacher/model weights (weights-only); see checkpoints
        self.out = Path(out)
        self.log = log
        self.stop_after = stop_after
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._data: dict[str, LatentCache | ShardedDataset] = {}
        self._held: dict[str, LatentCache] = {}
        self._stream: Any = None
        self.text_encoder: Any = None

    # ---- setup -----------------------------------------------------------------------------------------------

    def _data_key(self, phase: Phase | None) -> str:
        return (phase.data if phase is not None and phase.data else None) or self.recipe.data

    def data(self, phase: Phase | None = None) -> LatentCache | ShardedDataset:
        """The phase's data, opened once: a one-file cache (read into memory) or a sharded dataset (streamed)."""
        key = self._data_key(phase)
        if key not in self._data:
            r = self.recipe
            where = key if is_remote(key) else self.recipe.path(key)
            if key == "digits":
                self._data[key] = digits_cache()
            elif is_sharded(where):
                spec = r.loader
                data = ShardedDataset(where, cache_dir=r.path(spec.cache_dir) if spec.cache_dir else None,
                                      cache_bytes=int(spec.cache_gb * 2**30), verify=spec.verify,
                                      skip_bad=spec.skip_bad_shards)
                if data.skipped:
                    self.log(f"{key}: {len(data.skipped)} bad shards left out: " + "; ".join(data.skipped))
                self._data[key] = data
            else:
                self._data[key] = LatentCache.load(where)
        return self._data[key]

    def held_out(self, phase: Phase | None = None) -> LatentCache:
        """In-memory data for validation images and held-out losses: the cache itself, or a bounded set of a
        sharded dataset's validation records (``loader.val_items``)."""
        data = self.data(phase)
        if isinstance(data, LatentCache):
            return data
        key = self._data_key(phase)
        if key not in self._held:
            self._held[key] = data.in_memory(train=self.recipe.loader.val_items, val=self.recipe.loader.val_items,
                                              encode=self._encode_text)
        return self._held[key]

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> embeddings with the frozen text encoder (datasets that store token ids)."""
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            return self.text_encoder(tokens.to(device))[0].float()

    def _stream_offset(self, index: int) -> int:
        """Where phase ``index`` starts in its dataset's stream: after the samples of earlier phases on the same
        data (a phase that continues on the same data continues its epoch)."""
        r = self.recipe
        key = self._data_key(r.phases[index])
        return sum(p.steps * p.batch for p in r.phases[:index] if self._data_key(p) == key)

    def check(self) -> Trainer:
        """Everything that can be checked before training: data, model, teacher, resolutions. Raises
        ConfigError naming the recipe field."""
        r = self.recipe
        self.model = self._build_model()
        arch = self.model.arch
        self.teacher = None
        if r.teacher is not None and any(p.distill for p in r.phases):
            if r.teacher.sha256 is not None:
                from nas.export import check_teacher_pin

                _located(lambda: check_teacher_pin(r.path(r.teacher.path), r.teacher.subfolder, r.teacher.sha256),
                         "teacher.sha256")
            self.teacher = _located(lambda: load_unet(r.path(r.teacher.path), subfolder=r.teacher.subfolder,
                                                        allow_pickle=self.allow_pickle), "teacher.path")
        if r.pipeline_from is not None:
            from nas.pipeline import check_parts

            _located(lambda: check_parts(self.model, r.path(r.pipeline_from)), "pipeline_from")
        for i, phase in enumerate(r.phases):
            data = _located(lambda phase=phase: self.data(phase), f"phases[{i}].data" if phase.data else "data")
            width = None
            if isinstance(data, ShardedDataset) and data.text_mode == "tokens":
                if self.text_encoder is None:
                    self.text_encoder = self._load_text_encoder(data)
                width = int(self.text_encoder.config.hidden_size)
            _located(lambda data=data, width=width: data.check_compatible(arch, *([width] if width else [])),
                     "model")
            size = data.latent_shape[-1]
            expected = int(data.manifest.get("resolution", size))  # digits: the identity "VAE", pixels = latents
            if phase.resolution != expected:
                raise ConfigError(f"the data is {expected} px ({size}x{size} latents), the phase says "
                                  f"{phase.resolution}", field=f"phases[{i}].resolution")
            if self.teacher is not None:
                _located(lambda data=data: data.check_compatible(self.teacher.arch), "teacher")
            if r.caption_dropout > 0 and data.uncond is None:
                raise ConfigError("caption dropout needs the empty caption's embedding, which this cache lacks "
                                  "(written before it was stored: run `unet-nas data precompute` again)",
                                  field="caption_dropout")
        return self

    def _load_text_encoder(self, data: ShardedDataset) -> Any:
        """The frozen CLIP text encoder of a dataset that stores token ids: the recipe's ``text_encoder``, else
        the one the dataset was precomputed with (its index names the folder)."""
        from transformers import CLIPTextModel

        from proxies.data import _load_model

        path = self.recipe.text_encoder or data.index.meta.get("text_encoder")
        if not path:
            raise ConfigError("the dataset stores token ids: give the text encoder to run on them",
                              field="text_encoder")
        model = _located(lambda: _load_model(CLIPTextModel, self.recipe.path(path), "text_encoder",
                                             self.allow_pickle), "text_encoder")
        return model.eval().requires_grad_(False)

    def _build_model(self) -> FlexibleUNet2DConditionModel:
        spec = self.recipe.model
        if spec.pretrained is not None:
            return _located(lambda: load_unet(self.recipe.path(spec.pretrained), subfolder=spec.subfolder,
                                                 allow_pickle=self.allow_pickle), "model.pretrained")
        ref = self.recipe.path(spec.arch)
        arch = _located(lambda: load_arch(ref if ref.exists() else spec.arch), "model.arch")  # a file or folder
        set_seed(self.recipe.seed)
        return FlexibleUNet2DConditionModel.from_arch(arch)

    # ---- the run ---------------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any] | None:
        """Train (from the newest checkpoint with ``resume``); returns the metrics, or None if stopped early."""
        r = self.recipe
        if not hasattr(self, "model"):
            self.check()
        ckpt = self._resume_point(resume)
        tensorboard = r.log.tensorboard and _tensorboard_available()
        try:
            self.accelerator = acc = Accelerator(
                mixed_precision=r.mixed_precision, step_scheduler_with_optimizer=False,
                log_with="tensorboard" if tensorboard else None,
                project_config=ProjectConfiguration(project_dir=str(self.out),
                                                    logging_dir=str(self.out / "tensorboard")))
        except ValueError as exc:  # e.g. fp16 where the device has no fp16 autocast
            raise ConfigError(f"accelerate refused it: {str(exc).splitlines()[0]}", field="mixed_precision") from None
        if tensorboard:
            acc.init_trackers(r.name)
        if not acc.is_main_process:  # one voice in the log
            self.log = lambda _message: None
        set_seed(r.seed)
        if r.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.to(acc.device).train()
        if self.teacher is not None:
            self.teacher.to(acc.device).eval().requires_grad_(False)
        if self.text_encoder is not None:
            self.text_encoder.to(acc.device)
        self.noise = make_noise_scheduler(r)
        self.ema: EMAModel | None = None
        if any(p.ema for p in r.phases):
            self.ema = EMAModel(self.model.parameters(), model_cls=FlexibleUNet2DConditionModel,
                                model_config=self.model.config)
            acc.register_for_checkpointing(self.ema)
        self._csv = self.out / "loss.csv"
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "recipe.json", dump_json(r.model_dump()))

        self._elapsed = 0.0  # training seconds before this process (a resumed run's clock continues)
        if ckpt is not None:
            self._load(ckpt)
        elif acc.is_main_process:
            atomic_write(self._csv, ",".join(CSV_FIELDS) + "\n")
        started = time.perf_counter() - self._elapsed
        self._started = started
        while self.step < r.total_steps:
            index = r.phase_at(self.step)
            if not self._run_phase(index, started):
                acc.end_training()
                return None
        acc.wait_for_everyone()
        metrics = self._finish(time.perf_counter() - started) if acc.is_main_process else None
        acc.end_training()
        return metrics

    def _run_phase(self, index: int, started: float) -> bool:
        """Run phase ``index`` from the current step to its end; False if stopped by ``stop_after``."""
        r, acc = self.recipe, self.accelerator
        phase, start = r.phases[index], r.phase_starts()[index]
        end = start + phase.steps
        acc.free_memory()  # drop the previous phase's optimizer and schedule from accelerate's checkpoint lists
        model = acc.unwrap_model(self.model) if hasattr(self, "_prepared") else self.model
        optimizer = self._optimizer(phase, model)
        # the Accelerator is built with step_scheduler_with_optimizer=False, so a prepared scheduler steps once per
        # call (once per optimizer step) on every process count: the schedule is laid out over the phase's steps
        schedule = get_scheduler(phase.lr_schedule, optimizer, num_warmup_steps=phase.warmup_steps,
                                 num_training_steps=phase.steps)
        self.model, optimizer, schedule = acc.prepare(model, optimizer, schedule)
        self._prepared = True
        micro, accum = self._micro_batch(phase, index)
        acc.gradient_accumulation_steps = accum
        if self._pending is not None:  # resuming inside this phase: optimizer and schedule state too
            acc.load_state(str(self._pending))
            self._pending = None
            _rescale_schedule(schedule, self.step - start)  # a checkpoint of a run before this fix counted processes
            self.log(f"resumed at step {self.step} (phase {phase.name})")
        if self.ema is not None and phase.ema and self.step == start:
            self._reset_ema(phase)
        data = self.data(phase)
        if isinstance(data, ShardedDataset):  # streamed: the loader starts at this step, on this process's share
            draws = Draws(r.seed, index, r.noise.num_train_timesteps, r.caption_dropout)
            self._stream = iter(stream_loader(data, draws, self.step - start, phase.steps, phase.batch,
                                              acc.process_index, acc.num_processes, micro,
                                              self._stream_offset(index), workers=r.loader.workers,
                                              block=r.loader.shuffle_block))
        else:
            data = data.split("train")
            self._stream = None
        pairs = paired_stages(acc.unwrap_model(self.model), self.teacher) if (
            phase.distill and self.teacher is not None and r.distill.feature_weight > 0) else []
        self.log(f"phase {phase.name}: steps {self.step + 1}-{end}, {phase.optimizer} lr {phase.lr:g} "
                 f"({phase.lr_schedule}), batch {phase.batch} = {acc.num_processes} x {accum} x {micro}"
                 + (", EMA" if phase.ema else "") + (", distillation" if phase.distill else ""))
        while self.step < end:
            row = self._train_step(phase, index, data, micro, accum, pairs, optimizer, schedule)
            self.step += 1
            if self.step == end and phase.ema and self.ema is not None:
                self.ema.copy_to(acc.unwrap_model(self.model).parameters())  # the phase's result is its EMA
            row.update(step=self.step, phase=phase.name, seconds=round(time.perf_counter() - started, 3))
            self.history.append(row)
            if self.step % r.log.every == 0 or self.step == end:
                self._log_row(row)
            if self.step % r.checkpoint.every == 0 or self.step == end or self.step == self.stop_after:
                self._save_checkpoint(index)
            if r.validation.every and self.step % r.validation.every == 0:
                self._validate()
            if self.stop_after is not None and self.step >= self.stop_after:
                return False
        return True

    def _train_step(self, phase: Phase, index: int, data: Any, micro: int, accum: int,
                    pairs: list[tuple[str, str]], optimizer: Any, schedule: Any) -> dict[str, Any]:
        r, acc = self.recipe, self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        totals = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}
        for m in range(accum):
            x0, text, t, noise = self._batch(data, micro, m)
            noisy = self.noise.add_noise(x0, noise, t)
            target = self.noise.get_velocity(x0, noise, t) if r.noise.prediction_type == "v_prediction" else noise
            with acc.accumulate(self.model):
                with capture(unwrapped, [p[0] for p in pairs]) as s_feats, acc.autocast():
                    out = self.model(noisy, t, text).sample.float()
                task = self._task_loss(out, target, t)
                loss, kd = task, torch.zeros((), device=out.device)
                if phase.distill and self.teacher is not None:
                    kd = self._kd_loss(out, noisy, t, text, pairs, s_feats)
                    loss = task + kd
                acc.backward(loss)
                if acc.sync_gradients and r.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.model.parameters(), r.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in (("loss", loss), ("task_loss", task), ("kd_loss", kd)):
                totals[key] += float(acc.reduce(value.detach(), "mean")) / accum
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"training loss became {totals['loss']} at step {self.step + 1}")
        lr = schedule.get_last_lr()[0]
        schedule.step()
        ema_active = bool(phase.ema and self.ema is not None)
        if ema_active:
            self.ema.step(unwrapped.parameters())
        return {**totals, "lr": lr, "ema": int(ema_active)}

    def _batch(self, data: Any, n: int, micro: int) -> tuple[torch.Tensor, ...]:
        """(clean latents, text, timesteps, noise) of micro-batch ``micro`` of the coming step."""
        acc = self.accelerator
        if self._stream is not None:  # a sharded dataset: the micro-batch's samples and draws come ready
            b = next(self._stream)
            text = b["text"].to(acc.device)
            if self.text_encoder is not None and not text.is_floating_point():
                text = self._encode_text(text)
            return b["x0"].to(acc.device), text, b["t"].to(acc.device), b["noise"].to(acc.device)
        g = step_generator(self.recipe.seed, self.step, acc.process_index, micro)
        idx = torch.randint(0, len(data), (n,), generator=g)
        x0 = data.sample_latents(idx, g)
        text = data.text[idx].clone()
        if self.recipe.caption_dropout > 0:
            drop = torch.rand(n, generator=g) < self.recipe.caption_dropout
            text[drop] = data.uncond[0]
        t = torch.randint(0, self.noise.config.num_train_timesteps, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return tuple(v.to(acc.device) for v in (x0, text, t, noise))

    def _task_loss(self, out: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """MSE per item, weighted by Min-SNR-gamma (Hang et al. 2023) when ``snr_gamma`` is set: min(SNR, gamma)
        / (SNR + 1) for v-prediction, min(SNR, gamma) / SNR for epsilon (as diffusers' training scripts)."""
        mse = (out - target.float()).square().mean(dim=list(range(1, out.ndim)))
        gamma = self.recipe.snr_gamma
        if gamma is None:
            return mse.mean()
        snr = compute_snr(self.noise, t)
        weight = torch.clamp(snr, max=gamma)
        weight = weight / (snr + 1) if self.recipe.noise.prediction_type == "v_prediction" else weight / snr
        return (mse * weight).mean()

    def _kd_loss(self, out: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 pairs: list[tuple[str, str]], s_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """BK-SDM: output-level MSE to the teacher, plus feature-level MSE at every paired stage's output."""
        spec = self.recipe.distill
        with torch.no_grad(), capture(self.teacher, [p[1] for p in pairs]) as t_feats, \
                self.accelerator.autocast():
            t_out = self.teacher(noisy, t, text).sample.float()
        kd = spec.output_weight * (out - t_out).square().mean()
        for s_name, t_name in pairs:
            a, b = s_feats.get(s_name), t_feats.get(t_name)
            if a is not None and b is not None and a.shape == b.shape:
                kd = kd + spec.feature_weight * (a.float() - b.float()).square().mean()
        return kd

    def _optimizer(self, phase: Phase, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if phase.optimizer == "lamb":
            return Lamb(params, lr=phase.lr, betas=phase.betas, eps=phase.eps, weight_decay=phase.weight_decay)
        return torch.optim.AdamW(params, lr=phase.lr, betas=phase.betas, eps=phase.eps,
                                 weight_decay=phase.weight_decay)

    def _micro_batch(self, phase: Phase, index: int) -> tuple[int, int]:
        """(items per forward pass per process, accumulation steps) with batch = processes x accum x micro."""
        n = self.accelerator.num_processes
        if phase.batch % n:
            raise ConfigError(f"batch {phase.batch} does not split over {n} processes", field=f"phases[{index}].batch")
        share = phase.batch // n
        micro = min(phase.micro_batch or share, share)
        if share % micro:
            raise ConfigError(f"each process's share ({share}) is not a multiple of micro_batch {micro}",
                              field=f"phases[{index}].micro_batch")
        return micro, share // micro

    def _reset_ema(self, phase: Phase) -> None:
        """A fresh EMA of the weights the phase starts from."""
        params = list(self.accelerator.unwrap_model(self.model).parameters())
        self.ema.shadow_params = [p.detach().clone() for p in params]
        self.ema.optimization_step = 0
        self.ema.decay = phase.ema_decay


def _rescale_schedule(schedule: Any, position: int) -> None:
    """Put a resumed LR schedule at ``position`` (optimizer steps done in the phase), whatever the process count
    of the run that saved it (checkpoints written while the schedule was laid out over steps x processes
    continue correctly too). The diffusers schedules are ``LambdaLR``s: the rate is a function of the position."""
    inner = getattr(schedule, "scheduler", schedule)
    inner.last_epoch = position
    lrs = [base * lam(position) for base, lam in zip(inner.base_lrs, inner.lr_lambdas, strict=True)]
    for group, lr in zip(inner.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    inner._last_lr = lrs


def _tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
