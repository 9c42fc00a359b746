"""Frechet distances between image sets, in the feature space of a network, through torchmetrics.

The distance itself is torchmetrics' ``FrechetInceptionDistance`` (a maintained implementation: running
means and covariances in float64, the matrix square root through eigenvalues). Features are extracted once
per image set and handed to it through an identity extractor, so that a bootstrap over prompts and seeds
resamples feature rows instead of running the network again.

Two feature spaces:

* :class:`TorchScriptFeatures`: an Inception network from a local TorchScript file the user gives (the
  ``pt_inception-2015-12-05`` file of the StyleGAN/ADM evaluations, called as ``net(x, return_features=True)``
  on 0-255 images at 299x299, gives the standard 2,048-d pool features; any TorchScript module mapping
  images to [N, D] works). Nothing is downloaded; without a file, FID against Inception is refused.
* :class:`DigitsFeatures`: for the built-in digits, the penultimate layer of a small MLP classifier trained
  deterministically (fixed seed, full batch, one thread) on the real training digits, so the whole path runs
  offline and in tests. Its logits also give the digit accuracy of samples (the digits' text-alignment score,
  where SD-scale evaluation has the CLIP score).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from search_spaces import ConfigError


class _Identity(nn.Module):
    """Pass precomputed features to torchmetrics (which asks its extractor for ``num_features``)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N, D] and [M, D] (torchmetrics' FrechetInceptionDistance)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("FID needs at least two images on each side")
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), normalize=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(float(metric.compute()), 0.0)  # eigenvalue round-off can give -1e-12 for identical sets


def bootstrap_indices(n: int, rounds: int, seed: int) -> np.ndarray:
    """``rounds`` resamples (with replacement) of ``n`` prompt/seed pairs, reproducible under ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def interval(values: list[float] | np.ndarray, level: float = 0.95, center: float | None = None) -> list[float]:
    """The central ``level`` percentile interval of bootstrap values. With ``center`` (the estimate on the full
    set) the interval is shifted so that the bootstrap median sits on it: a resample repeats images, which
    shrinks its covariance and inflates its FID, and the shift removes that bias from the interval's position
    (its width is the bootstrap's)."""
    a = (1 - level) / 2
    lo, hi = float(np.quantile(values, a)), float(np.quantile(values, 1 - a))
    if center is not None:
        shift = center - float(np.median(values))
        lo, hi = lo + shift, hi + shift
    return [lo, hi]


# ---- feature extractors ------------------------------------------------------------------------------------


class TorchScriptFeatures(nn.Module):
    """Image features from a local TorchScript network (Inception for FID). Takes uint8 or [0, 1] float
    images [N, 3, H, W]; resizes to ``size`` (bilinear, antialiased) and feeds 0-255 floats."""

    def __init__(self, path: str | os.PathLike, size: int = 299):
        super().__init__()
        p = Path(path)
        if not p.is_file():
            raise ConfigError("Inception weights not found (a TorchScript file such as pt_inception-2015-12-05.pt; "
                              "nothing is downloaded)", field="--inception", source=str(p))
        try:
            self.net = torch.jit.load(str(p), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"not a TorchScript network: {str(exc).splitlines()[0]}", field="--inception",
                              source=str(p)) from None
        self.size = size
        self.source = str(p)
        try:
            self.num_features = int(self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1])
        except Exception as exc:  # a TorchScript module that is not an image feature network
            raise ConfigError(f"the network does not map [N, 3, H, W] images to [N, D] features: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0]}", field="--inception",
                              source=str(p)) from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() if images.dtype == torch.uint8 else images.float().clamp(0, 1) * 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                          antialias=True)
        try:
            out = self.net(x, return_features=True)
        except RuntimeError as exc:
            if "return_features" not in str(exc):
                raise
            out = self.net(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.reshape(out.shape[0], -1).float()


class DigitsFeatures(nn.Module):
    """An MLP digit classifier (64 -> 128 -> 32 -> 10) on 8x8 digits in [-1, 1]; ``forward`` gives the 32-d
    penultimate features FID is computed in, :meth:`predict` the digit. Trained by :meth:`fit`."""

    num_features = 32

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float().clamp(-1, 1).reshape(images.shape[0], -1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images)).argmax(1)

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = 300) -> DigitsFeatures:
        """Full-batch Adam on the real digits under ``seed``, on one thread: the same weights on every run of
        one machine (and so the same FID for the same samples)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            g = torch.Generator().manual_seed(seed)
            model = cls()
            for p in model.parameters():  # a seeded init that does not touch the global RNG
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * (0.0 if p.ndim == 1 else (1.0 / p.shape[1]) ** 0.5))
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            x, y = images.float(), labels.long()
            for _ in range(steps):
                loss = nn.functional.cross_entropy(model.head(model(x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        return model.eval().requires_grad_(False)
