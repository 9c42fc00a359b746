"""The back ends of ``unet-nas evaluate``: what generates images for prompts and scores them.

Kept apart from the run (:mod:`nas.evaluate`) because each back end is its own world: the built-in digits with a
hashed text encoder and a classifier trained on the real digits, and diffusers pipelines with Inception and CLIP
models read from local files. The run only sees the :class:`Backend` interface.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search_spaces import ConfigError

from .prompts import Prompt

DIGIT_CAPTION = re.compile(r"^a handwritten digit (zero|one|two|three|four|five|six|seven|eight|nine)$")


@dataclass
class EvalConfig:
    """What to sweep and how to score it."""

    steps: list[int] = field(default_factory=lambda: [10, 20, 30, 50])
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    teacher_steps: int | None = None  # the teacher's reference step count; default: the largest of ``steps``
    guidance: float = 3.0
    guidance_rescale: float = 0.7
    seed: int = 0
    batch_size: int = 50
    bootstrap: int = 200
    tolerance: float = 0.10  # a student "matches" at FID <= (1 + tolerance) x the teacher's reference FID
    timing_repeats: int = 3
    images_per_class: int = 20  # digits: images per digit when no prompt file is given

    @property
    def reference_steps(self) -> int:
        return self.teacher_steps if self.teacher_steps is not None else max(self.steps)


@dataclass
class ModelSpec:
    name: str
    path: Path
    role: str  # "teacher" or "student"


# ---- back ends -------------------------------------------------------------------------------------------------


class Backend:
    """Generates images for prompts and scores them; one per evaluation (shared by all models)."""

    kind = ""
    prompts: list[Prompt]

    def load(self, spec: ModelSpec) -> Any: ...
    def check(self, models: dict[str, Any]) -> None: ...
    def generate(self, model: Any, idx: list[int], sampler: str, steps: int) -> torch.Tensor: ...
    def features(self, images: torch.Tensor) -> torch.Tensor: ...
    def reference_features(self) -> torch.Tensor | None: ...
    def text_scores(self, images: torch.Tensor, idx: list[int]) -> torch.Tensor | None: ...
    def unet(self, model: Any) -> torch.nn.Module: ...
    def grid_images(self, images: torch.Tensor) -> torch.Tensor: ...  # [N, C, H, W] in [0, 1]

    def noise(self, idx: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        """Starting noise of prompts ``idx``: item i is seeded by (seed, i), whatever the batch and the model."""
        out = []
        for i in idx:
            state = np.random.SeedSequence([self.cfg.seed, i]).generate_state(2, dtype=np.uint32)
            g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            out.append(torch.randn(shape, generator=g))
        return torch.stack(out)


class DigitsBackend(Backend):
    """The built-in digits: hashed text embeddings, identity "VAE", classifier features and digit accuracy."""

    kind = "digits"

    def __init__(self, cfg: EvalConfig, prompts: list[Prompt] | None, allow_pickle: bool = False):
        from nas.train.digits import is_digits
        from proxies.data import DIGIT_WORDS, HashTextEncoder, digit_caption, digits_cache
        from proxies.quality.fid import DigitsFeatures

        self.cfg = cfg
        self.allow_pickle = allow_pickle
        self.data = digits_cache()
        assert is_digits(self.data)
        if prompts is None:
            labels = torch.arange(10).repeat(cfg.images_per_class)
            prompts = [Prompt(digit_caption(int(y))) for y in labels]
        self.prompts = prompts
        self.labels = [DIGIT_WORDS.index(m.group(1)) if (m := DIGIT_CAPTION.match(p.text)) else None
                       for p in prompts]
        self.encoder = HashTextEncoder(self.data.text.shape[-1], self.data.text.shape[1])
        self.uncond = self.encoder([""])
        train = self.data.split("train")
        self.classifier = DigitsFeatures.fit(train.mean, train.labels, seed=0)
        self.feature_space = "digits classifier features (MLP 64-128-32-10 fitted to the 1,497 real training digits)"
        self.reference = "the 1,797 real digits (scikit-learn)"
        self.text_score_name = "digit_accuracy"

    def load(self, spec: ModelSpec) -> Any:
        from search_spaces.checkpoints import load_unet

        if (spec.path / "model_index.json").is_file():
            raise ConfigError("a pipeline folder cannot be evaluated on the built-in digits beside U-Net folders: "
                              "evaluate pipelines together, or pass --pipeline-from", source=str(spec.path))
        model = load_unet(spec.path, allow_pickle=self.allow_pickle).eval()
        try:
            self.data.check_compatible(model.arch)
        except ConfigError as exc:
            raise ConfigError(f"does not fit the built-in digits ({exc.message}); for your own data give a "
                              "pipeline folder or --pipeline-from", field=exc.field, source=str(spec.path)) from None
        return model

    def generate(self, model: Any, idx: list[int], sampler: str, steps: int) -> torch.Tensor:
        from proxies.quality.sampling import generate

        text = self.encoder([self.prompts[i].text for i in idx])
        return generate(model, text, self.uncond, self.scheduler, self.data.latent_shape, steps=steps,
                        guidance=self.cfg.guidance, guidance_rescale=self.cfg.guidance_rescale, sampler=sampler,
                        latents=self.noise(idx, self.data.latent_shape)).float().clamp(-1, 1)

    @property
    def scheduler(self) -> Any:
        """The recipes' training schedule (v-prediction, cosine, zero terminal SNR), which the samplers step."""
        if not hasattr(self, "_scheduler"):
            from diffusers import DDPMScheduler

            from nas.train.recipe import NoiseSpec

            n = NoiseSpec()
            self._scheduler = DDPMScheduler(num_train_timesteps=n.num_train_timesteps, beta_schedule=n.beta_schedule,
                                            prediction_type=n.prediction_type,
                                            rescale_betas_zero_snr=n.rescale_betas_zero_snr, clip_sample=False)
        return self._scheduler

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def reference_features(self) -> torch.Tensor:
        return self.features(self.data.mean)

    def text_scores(self, images: torch.Tensor, idx: list[int]) -> torch.Tensor | None:
        labels = [self.labels[i] for i in idx]
        if any(y is None for y in labels):
            return None
        return (self.classifier.predict(images) == torch.tensor(labels)).float()

    def unet(self, model: Any) -> torch.nn.Module:
        return model

    def grid_images(self, images: torch.Tensor) -> torch.Tensor:
        return (images.clamp(-1, 1) + 1) / 2


class PipelineBackend(Backend):
    """diffusers pipelines (or U-Nets with a Stable Diffusion folder's parts): Inception FID, CLIP score."""

    kind = "pipeline"

    def __init__(self, cfg: EvalConfig, prompts: list[Prompt], inception: Path | None, clip: Path | None,
                 pipeline_from: Path | None, device: str, allow_pickle: bool = False, no_fid: bool = False):
        from proxies.quality.fid import TorchScriptFeatures

        self.cfg, self.prompts, self.device, self.allow_pickle = cfg, prompts, device, allow_pickle
        self.pipeline_from = pipeline_from
        if inception is None and not no_fid:
            raise ConfigError("FID against Inception needs its weights: pass --inception FILE (a local TorchScript "
                              "Inception, e.g. pt_inception-2015-12-05.pt; nothing is downloaded), or --no-fid",
                              field="--inception")
        self.extractor = TorchScriptFeatures(inception).to(device) if inception is not None else None
        self.feature_space = f"TorchScript network {inception}" if inception is not None else None
        self.reference = "the prompt file's images" if prompts[0].image is not None else None
        self.clip = None
        self.text_score_name = "clip_score" if clip is not None else None
        if clip is not None:
            self.clip = _clip_scorer(clip, device, allow_pickle)
        self._parts = None

    def load(self, spec: ModelSpec) -> Any:
        from nas.pipeline import build_pipeline, check_fits, is_pipeline, load_parts, load_pipeline
        from search_spaces.checkpoints import load_unet

        if is_pipeline(spec.path):
            pipe = load_pipeline(spec.path, allow_pickle=self.allow_pickle)
        else:
            if self.pipeline_from is None:
                raise ConfigError("a U-Net folder beside pipelines needs --pipeline-from (a Stable Diffusion folder "
                                  "for the VAE, text encoder and tokenizer)", source=str(spec.path))
            if self._parts is None:
                self._parts = load_parts(self.pipeline_from, allow_pickle=self.allow_pickle)
            unet = load_unet(spec.path, allow_pickle=self.allow_pickle).eval()
            check_fits(unet, self._parts["vae"], self._parts["text_encoder"], source=str(spec.path))
            pipe = build_pipeline(unet, self._parts)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device)
        self.train_schedulers = getattr(self, "train_schedulers", {})
        self.train_schedulers[id(pipe)] = pipe.scheduler  # the samplers are built on the pipeline's own schedule
        return pipe

    def check(self, models: dict[str, Any]) -> None:
        sizes = {name: (p.unet.config.sample_size * p.vae_scale_factor) for name, p in models.items()}
        if len(set(sizes.values())) > 1:
            raise ConfigError("mismatched models: they make images of different sizes ("
                              + ", ".join(f"{n}: {s} px" for n, s in sizes.items()) + ")", field="MODELS")
        self.size = next(iter(sizes.values()))

    def generate(self, model: Any, idx: list[int], sampler: str, steps: int) -> torch.Tensor:
        from proxies.quality.sampling import make_sampler

        pipe = model
        pipe.scheduler = make_sampler(sampler, self.train_schedulers[id(pipe)])
        c = pipe.unet.config.in_channels
        s = pipe.unet.config.sample_size
        latents = self.noise(idx, (c, s, s)).to(self.device, pipe.unet.dtype)
        out = pipe([self.prompts[i].text for i in idx], num_inference_steps=steps, guidance_scale=self.cfg.guidance,
                   guidance_rescale=self.cfg.guidance_rescale, latents=latents, output_type="pt").images
        return (out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.extractor is None:
            return None
        feats = [self.extractor(images[i:i + 32].to(self.device)).cpu() for i in range(0, len(images), 32)]
        return torch.cat(feats)

    def reference_features(self) -> torch.Tensor | None:
        if self.reference is None or self.extractor is None:
            return None
        from PIL import Image

        from proxies.data import _center_crop_resize

        images = []
        for p in self.prompts:
            try:
                img = _center_crop_resize(Image.open(p.image).convert("RGB"), self.size)
            except OSError as exc:
                raise ConfigError(f"cannot read image: {exc}", source=str(p.image)) from None
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        return self.features(torch.stack(images))

    @torch.no_grad()
    def text_scores(self, images: torch.Tensor, idx: list[int]) -> torch.Tensor | None:
        if self.clip is None:
            return None
        return self.clip(images, [self.prompts[i].text for i in idx])

    def unet(self, model: Any) -> torch.nn.Module:
        return model.unet

    def grid_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255


def _clip_scorer(path: Path, device: str,
                 allow_pickle: bool = False) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """Per-image CLIP scores with a local CLIP model folder (``CLIPModel`` + ``CLIPProcessor``, local files
    only): 100 x the cosine of the image and caption embeddings, floored at 0, as torchmetrics' ``clip_score``
    defines it. (torchmetrics 1.9's own function reads ``get_image_features`` as a tensor, which transformers 5
    no longer returns, so the score is taken from ``CLIPModel``'s projected embeddings here.)"""
    from transformers import CLIPModel, CLIPProcessor

    from search_spaces.checkpoints import load_pretrained

    model = load_pretrained(CLIPModel, path, allow_pickle=allow_pickle).to(device).eval()
    try:
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the CLIP processor: {str(exc).splitlines()[0]}", field="--clip",
                          source=str(path)) from None
    max_len = getattr(model.config.text_config, "max_position_embeddings", 77)

    @torch.no_grad()
    def score(images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        inputs = processor(text=texts, images=[img.permute(1, 2, 0).numpy() for img in images.cpu()],
                           return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        return (100 * cos).clamp(min=0).float().cpu()

    return score
