"""What a training run leaves besides its checkpoints: the loss curve, validation grids, the final model, the
pipeline folder and ``metrics.json``.

A mixin of :class:`nas.train.trainer.Trainer`, whose state it reads. Every file is written atomically (a
temporary name, then a rename), so an interrupted run never leaves half a grid, model or metrics file.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proxies.data import LatentCache
from proxies.quality.base import QualityContext, evaluate
from proxies.quality.sampling import generate
from search_spaces import ConfigError, FlexibleUNet2DConditionModel
from search_spaces.checkpoints import load_pretrained
from search_spaces.yamlio import atomic_write, dump_json

CSV_FIELDS = ["step", "phase", "loss", "task_loss", "kd_loss", "lr", "ema", "seconds"]


class RunOutputs:
    """The loss-curve rows, validation grids and the end of a run (final model, pipeline, metrics)."""

    def _log_row(self, row: dict[str, Any]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with open(self._csv, "a") as fh:
                fh.write(",".join(_fmt(row[k]) for k in CSV_FIELDS) + "\n")
            self.log(f"step {row['step']:>7} {row['phase']:>10}  loss {row['loss']:.4f}  lr {row['lr']:.3g}"
                     + ("  ema" if row["ema"] else ""))
        acc.log({k: row[k] for k in ("loss", "task_loss", "kd_loss", "lr")}, step=row["step"])

    @torch.no_grad()
    def _validate(self) -> None:
        """A grid of samples (DDIM, trailing timesteps, rescaled CFG) for the first distinct validation captions;
        with EMA running, from the EMA weights."""
        acc, spec = self.accelerator, self.recipe.validation
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.model)
        data = self.held_out(self.recipe.phases[self.recipe.phase_at(max(self.step - 1, 0))]).split("val")
        first: dict[str, int] = {}
        for i, caption in enumerate(data.captions):
            if caption not in first and len(first) < spec.num_images:
                first[caption] = i
        if not first:
            return
        idx = torch.tensor(sorted(first.values()))
        ema_on = self.ema is not None and self.recipe.phases[self.recipe.phase_at(self.step - 1)].ema
        if ema_on:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        try:
            uncond = data.uncond if data.uncond is not None else torch.zeros_like(data.text[:1])
            with acc.autocast():
                latents = generate(model, data.text[idx], uncond, self.noise, data.latent_shape, steps=spec.steps,
                                   guidance=spec.guidance, guidance_rescale=spec.guidance_rescale,
                                   generator=torch.Generator().manual_seed(spec.seed))
        finally:
            if ema_on:
                self.ema.restore(model.parameters())
        images = self._decode(latents.float(), data)
        path = self.out / "validation" / f"step-{self.step:08d}.png"
        _save_grid(images, path)
        atomic_write(path.with_suffix(".txt"), "\n".join(data.captions[i] for i in idx.tolist()) + "\n")

    def _decode(self, latents: torch.Tensor, data: LatentCache) -> torch.Tensor:
        """Images in [0, 1]: through the recipe's VAE if given, else the latents themselves (the digits' "VAE" is
        the identity; other latents show their first channels)."""
        spec = self.recipe.validation
        if spec.vae:
            from diffusers import AutoencoderKL

            vae = load_pretrained(AutoencoderKL, self.recipe.path(spec.vae), allow_pickle=self.allow_pickle).eval()
            images = vae.decode(latents / data.scaling_factor).sample
        else:
            images = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1]
        return ((images.clamp(-1, 1) + 1) / 2).cpu()

    def _write_pipeline(self, model: FlexibleUNet2DConditionModel) -> None:
        """``<output>/pipeline``: the trained model as a diffusers pipeline with the parts of the recipe's
        ``pipeline_from`` (replacing one from an earlier finish)."""
        from nas.pipeline import write_pipeline

        r, v = self.recipe, self.recipe.validation
        folder = self.out / "pipeline"
        if folder.exists():
            shutil.rmtree(folder)
        sampling = {"num_inference_steps": v.steps, "guidance_scale": v.guidance,
                    "guidance_rescale": v.guidance_rescale}
        _located(lambda: write_pipeline(model, folder, r.path(r.pipeline_from), noise=r.noise, sampling=sampling,
                                        allow_pickle=self.allow_pickle), "pipeline_from")
        self.log(f"pipeline in {folder}")

    def _finish(self, seconds: float) -> dict[str, Any]:
        """Save the final model and write ``metrics.json``."""
        r = self.recipe
        model = self.accelerator.unwrap_model(self.model).eval()
        final = self.out / "model"
        tmp = self.out / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if r.pipeline_from is not None:
            self._write_pipeline(model)
        if r.validation.every == 0 or self.step % r.validation.every:
            self._validate()
        last = _csv_rows(self._csv)
        tail = [float(row["loss"]) for row in last if row["phase"] == r.phases[-1].name][-5:]
        data = self.held_out(r.phases[-1])
        ctx = QualityContext(data=data, seed=r.seed, device=str(self.accelerator.device), scheduler=self.noise)
        metrics: dict[str, Any] = {
            "recipe": r.name, "steps": self.step, "final_loss": float(np.mean(tail)) if tail else float("nan"),
            "final_loss_definition": f"mean training loss of the last {len(tail)} logged steps (every "
                                     f"{r.log.every} steps; Min-SNR weighted: {r.snr_gamma is not None})",
            "val_loss": evaluate(model, ctx)["task_loss"],
            "phases": {p.name: float(next((row["loss"] for row in reversed(last) if row["phase"] == p.name), "nan"))
                       for p in r.phases},
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
            "processes": self.accelerator.num_processes, "mixed_precision": r.mixed_precision,
        }
        from .digits import digit_accuracy, is_digits

        if is_digits(data) and r.evaluation.digit_accuracy:
            e = r.evaluation
            metrics.update(digit_accuracy(model, data, self.noise, e.samples_per_class, e.steps, e.guidance,
                                          e.guidance_rescale, e.seed))
        else:
            metrics["digit_accuracy"] = None  # only the built-in digits data has a digit classifier
        atomic_write(self.out / "metrics.json", dump_json(metrics))
        return metrics


def _located(fn: Callable[[], Any], field: str) -> Any:
    """Run ``fn``; a ConfigError it raises is re-raised naming the recipe field (and keeping its own file)."""
    try:
        return fn()
    except ConfigError as exc:
        where = f" ({exc.source}{':' + str(exc.line) if exc.line else ''})" if exc.source else ""
        inner = f"{exc.field}: " if exc.field else ""
        raise ConfigError(f"{inner}{exc.message}{where}", field=field) from None


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # exact: a resumed curve compares bit for bit


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _save_grid(images: torch.Tensor, path: Path, min_size: int = 64) -> None:
    """A one-row PNG of images [N, C, H, W] in [0, 1], upscaled (nearest) so 8x8 digits are visible."""
    from PIL import Image

    c, h = images.shape[1], images.shape[2]
    scale = max(1, min_size // h)
    grid = images.permute(0, 2, 3, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    grid = torch.cat(list(grid), dim=1)  # side by side
    array = (grid.numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
