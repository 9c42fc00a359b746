"""Sample quality by attribute classifiers: does a generated image show what its caption asked for?

One classifier per attribute (the digit of the built-in digits; colour, shape, size and position of the built-in
shapes) is fitted on the *real* training images as the cache stores them (posterior means, flattened), and
classifies generated samples the same way: clamped to the data's [-1, 1], flattened. The identity "VAE" of the
built-in data makes a sample's latent its image. The score of a batch is the mean over attributes of the share
of samples classified as their caption said (``sample_accuracy``) and the share with every attribute right
(``sample_all_correct``); the classifiers' accuracy on the real held-out split is the ceiling for both.

Fitting is deterministic (scikit-learn's lbfgs, a fixed ``random_state``), so two runs score the same samples
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from ..data import HashTextEncoder, LatentCache
from .sampling import generate

CLASSIFIERS = ("logistic", "mlp")


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.float().clamp(-1, 1).reshape(images.shape[0], -1).cpu().numpy()


def _labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as [N, A]: the digits' [N] is one attribute."""
    return labels[:, None] if labels.ndim == 1 else labels


class AttributeClassifier:
    """One scikit-learn classifier per attribute on flattened pixels. ``real_accuracy`` holds each one's
    accuracy on the real held-out split."""

    def __init__(self, names: Sequence[str], models: Sequence[Any], real_accuracy: dict[str, float]):
        self.names = tuple(names)
        self.models = list(models)
        self.real_accuracy = real_accuracy

    @classmethod
    def fit(cls, data: LatentCache, names: Sequence[str], kind: str = "logistic",
            seed: int = 0) -> AttributeClassifier:
        """Fit on ``data``'s training split (its ``labels``, [N] or [N, len(names)]) and measure on its
        validation split. ``kind``: ``logistic`` (multinomial logistic regression) or ``mlp`` (one hidden layer
        of 256, Adam, early stopping off)."""
        if data.labels is None:
            raise ValueError("attribute classifiers need labelled data")
        if kind not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {kind!r} (known: {', '.join(CLASSIFIERS)})")
        train, val = data.split("train"), data.split("val")
        y_train, y_val = _labels(train.labels), _labels(val.labels)
        if y_train.shape[1] != len(names):
            raise ValueError(f"{len(names)} attribute names for labels of {y_train.shape[1]} attributes")
        x_train, x_val = _flat(train.mean), _flat(val.mean)
        models, real = [], {}
        for a, name in enumerate(names):
            model = _make(kind, seed).fit(x_train, y_train[:, a].numpy())
            models.append(model)
            real[name] = float(model.score(x_val, y_val[:, a].numpy())) if len(val) else float("nan")
        return cls(names, models, real)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted attribute indices [N, A] of images [N, C, H, W] (any range: clamped to [-1, 1])."""
        x = _flat(images)
        return torch.stack([torch.as_tensor(m.predict(x)) for m in self.models], dim=1).long()

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """How well ``images`` show the attributes ``labels`` ([N] or [N, A]) asked for."""
        right = self.predict(images) == _labels(labels).long()
        per = {name: float(right[:, a].double().mean()) for a, name in enumerate(self.names)}
        return {"sample_accuracy": float(np.mean(list(per.values()))),
                "sample_all_correct": float(right.all(dim=1).double().mean()),
                "sample_accuracy_per_attribute": per, "samples": int(right.shape[0])}


def _make(kind: str, seed: int) -> Any:
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=3000)
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(256,), max_iter=400, random_state=seed)


@torch.no_grad()
def sample_quality(model: nn.Module, data: LatentCache, scheduler: DDPMScheduler, classifier: AttributeClassifier,
                   labels: torch.Tensor, caption: Callable[[Any], str], seed: int = 7, steps: int = 20,
                   guidance: float = 3.0, guidance_rescale: float = 0.7) -> dict[str, Any]:
    """Sample one image per row of ``labels`` from its caption (DDIM on trailing timesteps, rescaled
    classifier-free guidance, the cache's own text embedding) and score it with ``classifier``."""
    encoder = HashTextEncoder(data.text.shape[-1], data.text.shape[1])
    rows = labels.tolist()
    text = encoder([caption(row) for row in rows])
    uncond = data.uncond if data.uncond is not None else encoder([""])
    x = generate(model, text, uncond, scheduler, data.latent_shape, steps=steps, guidance=guidance,
                 guidance_rescale=guidance_rescale, generator=torch.Generator().manual_seed(seed))
    return classifier.score(x, labels)
