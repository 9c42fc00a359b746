"""Cached training data: VAE latents (mean and std) and text embeddings, plus a built-in digits dataset.

Quality proxies and training never run the VAE or the text encoder: they read a cache written once. Like
DeciDiffusion's training, the cache stores the VAE posterior's mean and std, so every step draws a fresh latent
``(mean + std * noise) * scaling_factor``. A cache is a folder::

    manifest.json         shapes, source, encoders, scaling factor, split sizes, format version
    latents.safetensors   mean [N, C, H, W], std [N, C, H, W], optional labels [N]
    text.safetensors      embeddings [N, L, D], optional uncond [1, L, D] (the empty caption's, for
                          caption dropout and classifier-free guidance)
    captions.json         the N captions

``LatentCache.check_compatible(arch)`` refuses, with one clear error, a cache whose channels or text width do
not match a model.

The built-in dataset (``digits_cache``) needs no download: scikit-learn's 8x8 handwritten digits as 1-channel
"latents" in [-1, 1] (std 0.02, standing in for a VAE posterior), captioned "a handwritten digit seven" and
embedded by :class:`HashTextEncoder`, a small deterministic text embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from search_spaces import ConfigError, UNetArch
from search_spaces.yamlio import atomic_dir

FORMAT_VERSION = 1
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---- a deterministic text embedding ------------------------------------------------------------------------


class HashTextEncoder:
    """Words -> fixed vectors seeded by a hash of the word; a sentence is the sequence of its word vectors plus
    a position code, padded to ``max_len``. Deterministic on every machine, no weights, no download: the text
    conditioning of the built-in digits data."""

    def __init__(self, dim: int = 16, max_len: int = 8):
        self.dim = dim
        self.max_len = max_len
        pos = np.arange(max_len)[:, None] / np.power(100.0, np.arange(dim)[None, :] / dim)
        self._pos = 0.1 * np.where(np.arange(dim) % 2 == 0, np.sin(pos), np.cos(pos))
        self._words: dict[str, np.ndarray] = {}  # a caption set repeats a few words thousands of times

    def word(self, word: str) -> np.ndarray:
        key = word.lower()
        if key not in self._words:
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
            self._words[key] = np.random.default_rng(seed).standard_normal(self.dim) / np.sqrt(self.dim)
        return self._words[key]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = np.zeros((len(texts), self.max_len, self.dim))
        for i, text in enumerate(texts):
            words = [*["<start>", *text.split()][: self.max_len - 1], "<end>"]
            for j, w in enumerate(words):
                out[i, j] = self.word(w)
            out[i] += self._pos
        return torch.tensor(out, dtype=torch.float32)


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


# ---- the cache -----------------------------------------------------------------------------------------------


@dataclass
class LatentCache:
    """An in-memory latent/text cache with its manifest."""

    mean: torch.Tensor  # [N, C, H, W]
    std: torch.Tensor  # [N, C, H, W]
    text: torch.Tensor  # [N, L, D]
    captions: list[str]
    manifest: dict[str, Any]
    labels: torch.Tensor | None = None
    uncond: torch.Tensor | None = None  # [1, L, D]: the empty caption's embedding

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape[1:])  # type: ignore[return-value]

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest.get("scaling_factor", 1.0))

    def check_compatible(self, arch: UNetArch) -> None:
        """Refuse a cache that cannot feed ``arch``: latent channels or text width differ."""
        c = self.latent_shape[0]
        if c != arch.in_channels or c != arch.out_channels:
            raise ConfigError(f"cached latents have {c} channels but the arch takes {arch.in_channels} in and gives "
                              f"{arch.out_channels} out", field="in_channels", source=self.manifest.get("path"))
        d = self.text.shape[-1]
        if d != arch.cross_attention_dim:
            raise ConfigError(f"cached text embeddings are {d} wide but the arch's cross_attention_dim is "
                              f"{arch.cross_attention_dim}", field="cross_attention_dim",
                              source=self.manifest.get("path"))

    def split(self, name: str) -> LatentCache:
        """The ``train`` or ``val`` part (the manifest's ``splits`` gives the number of training items)."""
        n_train = int(self.manifest.get("splits", {}).get("train", len(self)))
        part = slice(0, n_train) if name == "train" else slice(n_train, len(self))
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}")
        return LatentCache(self.mean[part], self.std[part], self.text[part], self.captions[part], self.manifest,
                           None if self.labels is None else self.labels[part], self.uncond)

    def sample_latents(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents for items ``idx`` from the stored posterior: (mean + std * noise) * scaling_factor."""
        mean, std = self.mean[idx].float(), self.std[idx].float()
        noise = torch.randn(mean.shape, generator=generator)
        return (mean + std * noise) * self.scaling_factor

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache folder atomically: a crash leaves the old folder or none, never a torn one."""
        out = Path(path)
        with atomic_dir(out) as tmp:
            tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
            if self.labels is not None:
                tensors["labels"] = self.labels.contiguous()
            save_file(tensors, tmp / "latents.safetensors")
            text = {"embeddings": self.text.contiguous()}
            if self.uncond is not None:
                text["uncond"] = self.uncond.contiguous()
            save_file(text, tmp / "text.safetensors")
            (tmp / "captions.json").write_text(json.dumps(self.captions))
            manifest = {k: v for k, v in self.manifest.items() if k != "path"}
            manifest.update(version=FORMAT_VERSION, n=len(self), latent_shape=list(self.latent_shape),
                            text_shape=list(self.text.shape[1:]))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentCache:
        """Read and check a cache folder; anything missing or inconsistent is one ConfigError."""
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise ConfigError("not a latent cache (no manifest.json)", source=str(root))
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"manifest.json is not valid JSON: {exc.msg}", source=str(manifest_path)) from None
        version = manifest.get("version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise ConfigError(f"unsupported cache version {version!r} (expected {FORMAT_VERSION})", field="version",
                              source=str(manifest_path))
        try:
            lat = load_file(root / "latents.safetensors")
            text_file = load_file(root / "text.safetensors")
            text, uncond = text_file["embeddings"], text_file.get("uncond")
            captions = json.loads((root / "captions.json").read_text())
        except (OSError, KeyError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own types
            raise ConfigError(f"cannot read the cache files: {exc}", source=str(root)) from None
        for key in ("mean", "std"):
            if key not in lat:
                raise ConfigError(f"latents.safetensors has no {key!r} tensor", source=str(root))
        n = manifest.get("n")
        checks = [
            ("latent_shape", list(lat["mean"].shape[1:])),
            ("text_shape", list(text.shape[1:])),
        ]
        for key, actual in checks:
            if manifest.get(key) != actual:
                raise ConfigError(f"manifest says {manifest.get(key)} but the files hold {actual}", field=key,
                                  source=str(manifest_path))
        if lat["std"].shape != lat["mean"].shape or not (lat["mean"].shape[0] == text.shape[0] == len(captions) == n):
            raise ConfigError(f"item counts disagree: manifest {n}, latents {lat['mean'].shape[0]}, std "
                              f"{lat['std'].shape[0]}, text {text.shape[0]}, captions {len(captions)}",
                              field="n", source=str(manifest_path))
        if uncond is not None and tuple(uncond.shape) != (1, *text.shape[1:]):
            raise ConfigError(f"the empty caption's embedding is {list(uncond.shape)}, expected "
                              f"{[1, *text.shape[1:]]}", field="uncond", source=str(root))
        manifest["path"] = str(root)
        return cls(lat["mean"], lat["std"], text, captions, manifest, lat.get("labels"), uncond)


# ---- built-in digits -------------------------------------------------------------------------------------------


def digits_cache(text_dim: int = 16, text_len: int = 8, val_fraction: float = 1 / 6, seed: int = 0) -> LatentCache:
    """scikit-learn's 1,797 handwritten digits as an offline text-to-image dataset (1 x 8 x 8 "latents")."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    captions = [digit_caption(int(y)) for y in labels]
    encoder = HashTextEncoder(text_dim, text_len)
    text = encoder(captions)
    n_val = round(len(images) * val_fraction)
    manifest = {
        "source": "sklearn.datasets.load_digits", "encoder": f"HashTextEncoder(dim={text_dim}, max_len={text_len})",
        "vae": "identity (pixels in [-1, 1], std 0.02)", "scaling_factor": 1.0,
        "splits": {"train": len(images) - n_val, "val": n_val}, "seed": seed,
    }
    return LatentCache(images, torch.full_like(images, 0.02), text, captions, manifest, labels, encoder([""]))


# ---- precompute from an image folder ---------------------------------------------------------------------------


def read_image_folder(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, caption) pairs: ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}`` (the diffusers
    training-script layout) or, failing that, a ``NAME.txt`` caption beside each image."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError("image folder not found", source=str(root))
    meta = root / "metadata.jsonl"
    pairs: list[tuple[Path, str]] = []
    if meta.is_file():
        for i, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((root / row["file_name"], str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError('expected {"file_name": ..., "text": ...}', source=str(meta), line=i) from None
    else:
        for img in sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            cap = img.with_suffix(".txt")
            if not cap.is_file():
                raise ConfigError(f"no caption {cap.name} beside {img.name} (or give a metadata.jsonl)",
                                  source=str(root))
            pairs.append((img, cap.read_text().strip()))
    if not pairs:
        raise ConfigError("no images found", source=str(root))
    for img, _ in pairs:
        if not img.is_file():
            raise ConfigError(f"listed image {img.name} does not exist", source=str(root))
    return pairs


@torch.no_grad()
def precompute(folder: str | os.PathLike, vae_path: str | os.PathLike, text_encoder_path: str | os.PathLike,
               resolution: int = 512, batch_size: int = 8, val_fraction: float = 0.05,
               device: str = "cpu", allow_pickle: bool = False) -> LatentCache:
    """Encode an image+caption folder with a local VAE (``AutoencoderKL.from_pretrained``) and a local CLIP
    text encoder and tokenizer (``from_pretrained`` on a folder holding both, or with ``text_encoder/`` and
    ``tokenizer/`` subfolders as in an SD checkpoint). Weights load through :mod:`search_spaces.checkpoints`:
    safetensors only unless ``allow_pickle``, and strictly."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel

    pairs = read_image_folder(folder)
    vae = _load_model(AutoencoderKL, vae_path, "vae", allow_pickle).to(device).eval()
    text_model = _load_model(CLIPTextModel, text_encoder_path, "text_encoder", allow_pickle).to(device).eval()
    tokenizer = _load(lambda p, **kw: AutoTokenizer.from_pretrained(p, **kw), text_encoder_path, "tokenizer")

    means, stds, embs = [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        pixels = []
        for img_path, _ in chunk:
            try:
                img = Image.open(img_path).convert("RGB")
            except OSError as exc:
                raise ConfigError(f"cannot read image: {exc}", source=str(img_path)) from None
            img = _center_crop_resize(img, resolution)
            arr = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1.0
            pixels.append(arr)
        dist = vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        tokens = tokenizer([c for _, c in chunk], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        embs.append(text_model(tokens.input_ids.to(device))[0].float().cpu())
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt")
    uncond = text_model(empty.input_ids.to(device))[0].float().cpu()
    n = len(pairs)
    n_val = round(n * val_fraction)
    manifest = {
        "source": str(Path(folder).resolve()), "vae": str(vae_path), "text_encoder": str(text_encoder_path),
        "resolution": resolution, "scaling_factor": float(getattr(vae.config, "scaling_factor", 1.0)),
        "splits": {"train": n - n_val, "val": n_val},
    }
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(embs), [c for _, c in pairs], manifest,
                       uncond=uncond)


def _load_model(cls: Any, path: str | os.PathLike, subfolder: str, allow_pickle: bool) -> Any:
    """A model from ``path``, or from its ``subfolder`` (an SD checkpoint layout) when ``path`` has no config."""
    from search_spaces.checkpoints import load_pretrained

    root = Path(path)
    sub = None if (root / "config.json").is_file() or not (root / subfolder).is_dir() else subfolder
    try:
        return load_pretrained(cls, root, subfolder=sub, allow_pickle=allow_pickle)
    except ConfigError as exc:
        raise type(exc)(f"cannot load the {subfolder}: {exc.message}", field=exc.field, source=exc.source) from None


def _load(fn: Any, path: str | os.PathLike, subfolder: str) -> Any:
    """``from_pretrained`` on ``path``, or on its ``subfolder`` (an SD checkpoint layout); one clear error."""
    errors = []
    for kwargs in ({}, {"subfolder": subfolder}):
        try:
            return fn(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise ConfigError(f"cannot load the {subfolder} from a local folder: {errors[-1]}", source=str(path))


def _center_crop_resize(img: Any, size: int) -> Any:
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC)
