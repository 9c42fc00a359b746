"""A trained or exported U-Net shipped as a complete diffusers pipeline folder.

``write_pipeline`` takes the VAE, text encoder and tokenizer of a teacher's Stable Diffusion folder (the layout
``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``, ``vae/``, ``text_encoder/``,
``tokenizer/``), adds the U-Net and a DDIM scheduler configured as the recipe samples (trailing timesteps, the
training noise schedule: v-prediction on a zero-terminal-SNR cosine schedule), and saves a
``StableDiffusionPipeline``. Its ``model_index.json`` names the U-Net ``["search_spaces.flexible_unet",
"FlexibleUNet2DConditionModel"]``, as diffusers' own ``save_pretrained`` records a component defined outside
its libraries. diffusers resolves such a name from the modules the caller has imported (it never imports a
module because a folder names it: that would run the folder's choice of code), and finds the loading method
through the base classes that module imports (``ModelMixin``). So a fresh interpreter does ``import
search_spaces.flexible_unet`` (or ``from search_spaces import FlexibleUNet2DConditionModel``) first, then
``DiffusionPipeline.from_pretrained(DIR)`` loads it: no remote code, no ``trust_remote_code``. (The bare
package name ``search_spaces`` would not do: diffusers looks ``ModelMixin`` up in the named module itself.)

diffusers has no config-driven default for call arguments, so the recipe's guidance (scale and the rescale of
Lin et al. 2023) is written to ``sampling.json`` beside ``model_index.json``; :func:`sampling_defaults` reads
it, and ``unet-nas evaluate`` uses it for pipeline folders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from search_spaces import ConfigError
from search_spaces.yamlio import atomic_write, dump_json

SAMPLING_FILE = "sampling.json"
PARTS = ("vae", "text_encoder", "tokenizer")


def recipe_scheduler(noise: Any | None = None) -> Any:
    """diffusers' DDIMScheduler as the recipe samples: the training schedule (``noise``: a recipe's
    :class:`~nas.train.recipe.NoiseSpec`; default: DeciDiffusion's) with trailing timestep spacing, so the first
    step starts from pure noise as a zero-terminal-SNR schedule needs."""
    from diffusers import DDIMScheduler

    from nas.train.recipe import NoiseSpec

    n = noise if noise is not None else NoiseSpec()
    return DDIMScheduler(num_train_timesteps=n.num_train_timesteps, beta_schedule=n.beta_schedule,
                         prediction_type=n.prediction_type, rescale_betas_zero_snr=n.rescale_betas_zero_snr,
                         timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)


def find_parts(folder: str | os.PathLike) -> Path:
    """The Stable Diffusion folder holding ``vae/``, ``text_encoder/`` and ``tokenizer/``: ``folder`` itself,
    or its parent when ``folder`` is that checkpoint's ``unet/``."""
    root = Path(folder)
    for candidate in (root, root.parent):
        if all((candidate / p).is_dir() for p in PARTS):
            return candidate
    missing = [p for p in PARTS if not (root / p).is_dir()]
    raise ConfigError(f"not a Stable Diffusion folder: no {', '.join(p + '/' for p in missing)} (a pipeline needs "
                      "the teacher's VAE, text encoder and tokenizer)", field="--pipeline-from", source=str(root))


def load_parts(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """The VAE, text encoder and tokenizer of a Stable Diffusion folder, loaded from local files only."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    from search_spaces.checkpoints import load_pretrained

    root = find_parts(folder)
    vae = load_pretrained(AutoencoderKL, root, subfolder="vae", allow_pickle=allow_pickle).eval()
    text_encoder = load_pretrained(CLIPTextModel, root, subfolder="text_encoder", allow_pickle=allow_pickle).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer: {str(exc).splitlines()[0]}",
                          source=str(root / "tokenizer")) from None
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def check_fits(unet: torch.nn.Module, vae: Any, text_encoder: Any, source: str | None = None) -> None:
    """Refuse parts that cannot drive ``unet``: latent channels or text width differ."""
    latent = int(vae.config.latent_channels)
    if latent != unet.config.in_channels or latent != unet.config.out_channels:
        raise ConfigError(f"the VAE's latents have {latent} channels but the U-Net takes {unet.config.in_channels} "
                          f"in and gives {unet.config.out_channels} out", field="vae", source=source)
    width = int(text_encoder.config.hidden_size)
    if width != unet.config.cross_attention_dim:
        raise ConfigError(f"the text encoder is {width} wide but the U-Net's cross_attention_dim is "
                          f"{unet.config.cross_attention_dim}", field="text_encoder", source=source)


def check_parts(unet: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Before any long job: ``folder`` is a Stable Diffusion folder whose VAE and text encoder fit ``unet``
    (read from their config files; nothing is loaded). Returns the folder holding the parts."""
    from types import SimpleNamespace

    root = find_parts(folder)
    configs = {}
    for part in ("vae", "text_encoder"):
        path = root / part / "config.json"
        try:
            configs[part] = SimpleNamespace(config=SimpleNamespace(**json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"cannot read the {part} config: {exc}", source=str(path)) from None
    try:
        check_fits(unet, configs["vae"], configs["text_encoder"], source=str(root))
    except AttributeError as exc:
        raise ConfigError(f"not a VAE / CLIP text encoder config: {exc}", source=str(root)) from None
    return root


def build_pipeline(unet: torch.nn.Module, parts: dict[str, Any], noise: Any | None = None) -> Any:
    """A StableDiffusionPipeline of ``unet``, the teacher's ``parts`` and the recipe's scheduler."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # "Expected types for unet: UNet2DConditionModel": a FlexibleUNet is a drop-in
    try:
        return StableDiffusionPipeline(unet=unet, scheduler=recipe_scheduler(noise), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)
    finally:
        logging.set_verbosity(level)


def write_pipeline(unet: torch.nn.Module, out: str | os.PathLike, parts_from: str | os.PathLike,
                   noise: Any | None = None, sampling: dict[str, Any] | None = None,
                   allow_pickle: bool = False) -> Path:
    """Save ``unet`` with the VAE, text encoder and tokenizer of ``parts_from`` as a pipeline folder ``out``
    (written to a temporary folder and renamed: a crash leaves no half-written pipeline)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("the pipeline folder exists and is not empty", field="--pipeline", source=str(out))
    parts = load_parts(parts_from, allow_pickle=allow_pickle)
    check_fits(unet, parts["vae"], parts["text_encoder"], source=str(parts_from))
    pipe = build_pipeline(unet, parts, noise)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        defaults = {"num_inference_steps": 20, "guidance_scale": 3.0, "guidance_rescale": 0.7, **(sampling or {})}
        atomic_write(tmp / SAMPLING_FILE, dump_json(defaults))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_pipeline(folder: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (``model_index.json``) rather than a bare model folder."""
    return (Path(folder) / "model_index.json").is_file()


def sampling_defaults(folder: str | os.PathLike) -> dict[str, Any]:
    """The guidance a pipeline folder was written with (``sampling.json``); {} for one without it."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", source=str(path), line=exc.lineno) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", source=str(path), line=1)
    return data


def load_pipeline(folder: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local folder (safetensors unless ``allow_pickle``); one
    ConfigError if it cannot be loaded."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                 use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, KeyError, ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the pipeline: {str(exc).splitlines()[0]}", source=str(folder)) from None
    finally:
        logging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe
