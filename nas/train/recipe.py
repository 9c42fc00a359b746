"""The training recipe file: which model, which data, and the phases DeciDiffusion was trained in.

Validated with pydantic (unknown keys are errors); every problem becomes one :class:`ConfigError` naming the
file, the field path and the line. Relative paths inside the file are relative to the file.

```yaml
name: digits
seed: 0
model: {arch: digits}                   # fresh weights; or {pretrained: DIR} (a folder from `unet-nas export`)
teacher: {path: ../runs/quickstart/teacher}   # optional: needed by phases with distill: true
data: digits                            # or a cache folder from `unet-nas data precompute`
output_dir: ../runs/train_digits
mixed_precision: "no"                   # no | fp16 | bf16
gradient_checkpointing: false
noise: {prediction_type: v_prediction, beta_schedule: squaredcos_cap_v2, rescale_betas_zero_snr: true}
snr_gamma: 5.0                          # Min-SNR-gamma loss weighting; null: plain MSE
caption_dropout: 0.1                    # share of captions replaced by the empty caption (for CFG)
phases:
  - {name: base, steps: 400, resolution: 8, batch: 64, optimizer: adamw, lr: 2.0e-3, lr_schedule: cosine}
  - {name: ema, steps: 100, resolution: 8, batch: 64, optimizer: lamb, lr: 5.0e-3, ema: true}
checkpoint: {every: 100, keep: 2}
validation: {every: 200, num_images: 10, steps: 20, guidance: 3.0, guidance_rescale: 0.7}
pipeline_from: null                     # an SD folder: also write <output>/pipeline (its VAE, CLIP, tokenizer)
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from search_spaces import ConfigError
from search_spaces.yamlio import read_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """The model to train: an arch with fresh weights (a reference name or an arch file), or a pretrained
    FlexibleUNet / diffusers UNet folder (what ``unet-nas export`` writes)."""

    arch: str | None = None
    pretrained: str | None = None
    subfolder: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.arch is None) == (self.pretrained is None):
            raise ValueError("give exactly one of arch (fresh weights) or pretrained (a model folder)")
        return self


class TeacherSpec(_Strict):
    """A local diffusers folder (FlexibleUNet or UNet2DConditionModel) to distill from."""

    path: str
    subfolder: str | None = None
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="pins the teacher's files (written by "
                               "export): training refuses a teacher that changed since")


class NoiseSpec(_Strict):
    """The training noise schedule, built as diffusers' DDPMScheduler. The defaults are DeciDiffusion's."""

    num_train_timesteps: int = Field(1000, ge=2)
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"
    rescale_betas_zero_snr: bool = True

    @model_validator(mode="after")
    def _zero_snr_needs_v(self) -> NoiseSpec:
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            # at zero terminal SNR the noisy input is pure noise: predicting that noise teaches nothing
            raise ValueError("rescale_betas_zero_snr needs prediction_type: v_prediction")
        return self


class DistillSpec(_Strict):
    """BK-SDM knowledge distillation (output-level and feature-level MSE to the teacher), added to the task loss
    in phases with ``distill: true``."""

    output_weight: float = Field(1.0, ge=0)
    feature_weight: float = Field(1.0, ge=0)


class Phase(_Strict):
    """One training phase. ``batch`` is the global batch (all processes, all accumulation steps);
    ``micro_batch`` the items one process runs in one forward pass (default: the whole share of the batch);
    gradient accumulation makes up the rest."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    steps: int = Field(ge=1)
    resolution: int = Field(ge=1, description="image pixels; checked against the data cache")
    batch: int = Field(ge=1)
    micro_batch: int | None = Field(None, ge=1)
    optimizer: Literal["adamw", "lamb"] = "adamw"
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                         "polynomial"] = "constant"  # diffusers.optimization.get_scheduler over the phase's steps
    warmup_steps: int = Field(0, ge=0)
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    distill: bool = False
    data: str | None = None  # this phase's cache (e.g. 256 px then 512 px); default: the recipe's data


class CheckpointSpec(_Strict):
    every: int = Field(500, ge=1, description="optimizer steps between checkpoints (and at every phase end)")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class ValidationSpec(_Strict):
    """Images sampled every ``every`` steps (0: only at the end) with DDIM on trailing timesteps and rescaled
    classifier-free guidance, for the first ``num_images`` distinct captions of the validation split."""

    every: int = Field(0, ge=0)
    num_images: int = Field(8, ge=1)
    steps: int = Field(20, ge=1)
    guidance: float = Field(3.0, ge=1)
    guidance_rescale: float = Field(0.7, ge=0, le=1)
    vae: str | None = None  # a local AutoencoderKL folder to decode latents; default: show the latents
    seed: int = 0


class EvaluationSpec(_Strict):
    """The final metrics: held-out denoising loss, and on the digits data the digit accuracy of samples."""

    digit_accuracy: bool = True  # on the digits data: sample and classify (the classifier takes seconds to fit)
    samples_per_class: int = Field(10, ge=1)
    steps: int = Field(20, ge=1)
    guidance: float = Field(3.0, ge=1)
    guidance_rescale: float = Field(0.7, ge=0, le=1)
    seed: int = 7


class LoaderSpec(_Strict):
    """How a sharded dataset (a folder with ``index.json`` or an ``s3://`` URL) is read. Its samples stream in an
    order that is a pure function of (seed, epoch, position), the same on any number of processes."""

    workers: int = Field(0, ge=0, description="DataLoader worker processes per training process")
    shuffle_block: int = Field(4, ge=1, description="shards whose records are shuffled together")
    cache_dir: str | None = None  # local cache of a remote dataset's shards; default ~/.cache/unet-nas/shards
    cache_gb: float = Field(16.0, gt=0, description="bound of that cache")
    verify: Literal["hash", "size"] = "hash"  # hash: each shard's SHA-256 before its first read
    skip_bad_shards: bool = False  # leave out (and count) shards that do not match the index, instead of failing
    val_items: int = Field(256, ge=1, description="validation records held in memory")


class LogSpec(_Strict):
    every: int = Field(10, ge=1, description="steps between log lines and CSV rows")
    tensorboard: bool = True  # when tensorboard or tensorboardX is installed


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    model: ModelSpec
    teacher: TeacherSpec | None = None
    data: str
    text_encoder: str | None = None  # CLIP folder for datasets of token ids; default: the one they name
    output_dir: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    noise: NoiseSpec = Field(default_factory=NoiseSpec)
    snr_gamma: float | None = Field(5.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    phases: list[Phase] = Field(min_length=1)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    loader: LoaderSpec = Field(default_factory=LoaderSpec)
    # a Stable Diffusion folder (vae/, text_encoder/, tokenizer/): at the end the trained model is also written
    # as a diffusers pipeline, <output>/pipeline, with these parts and the recipe's scheduler (nas.pipeline)
    pipeline_from: str | None = None

    base_dir: str = "."

    def cross_check(self) -> None:
        """Checks across fields, each naming the exact field."""
        names = [p.name for p in self.phases]
        for i, p in enumerate(self.phases):
            if p.name in names[:i]:
                raise ConfigError(f"phase name {p.name!r} is used twice", field=f"phases[{i}].name")
            if p.distill and self.teacher is None:
                raise ConfigError("distill: true needs a teacher (teacher: {path: ...})", field=f"phases[{i}].distill")
            if p.micro_batch is not None and p.batch % p.micro_batch:
                raise ConfigError(f"batch {p.batch} is not a multiple of micro_batch {p.micro_batch}",
                                  field=f"phases[{i}].micro_batch")
            if p.warmup_steps >= p.steps:
                raise ConfigError(f"warm-up ({p.warmup_steps}) must be shorter than the phase ({p.steps})",
                                  field=f"phases[{i}].warmup_steps")

    # ---- derived -------------------------------------------------------------------------------------------

    def path(self, value: str) -> Path:
        """A path from the file, relative to the file's folder."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else Path(self.base_dir) / p

    def phase_starts(self) -> list[int]:
        """Global step at which each phase starts (its first optimizer step is start + 1)."""
        starts, total = [], 0
        for p in self.phases:
            starts.append(total)
            total += p.steps
        return starts

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> int:
        """Index of the phase that runs optimizer step ``step + 1`` (the last phase once all are done)."""
        for i, start in enumerate(self.phase_starts()):
            if step < start + self.phases[i].steps:
                return i
        return len(self.phases) - 1


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; one ConfigError naming file, field and line on any problem."""
    data, lines = read_file(path)
    if not isinstance(data, dict):
        raise ConfigError("a training recipe must be a mapping", source=str(path), line=1)
    data = {**data, **(overrides or {})}
    data.setdefault("base_dir", str(Path(path).parent))
    try:
        recipe = Recipe.model_validate(data)
        recipe.cross_check()
        return recipe
    except ValidationError as exc:
        from nas.experiment import _loc

        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        raise ConfigError(message, field=_loc(err["loc"])).located(str(path), lines) from None
    except ConfigError as exc:
        raise exc.located(str(path), lines) from None
