"""Digit accuracy: does a model trained on the built-in digits draw the digit its caption asks for?

A small classifier (multinomial logistic regression, scikit-learn) is fitted on the *real* training digits as
the digits cache stores them (8x8 pixels in [-1, 1], the posterior means), and classifies generated samples the
same way: clamp to [-1, 1], flatten. The digits "VAE" is the identity, so a sample's latent is its image.
``digit_accuracy`` is the share of samples classified as the digit their caption named (chance: 10%).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from proxies.data import HashTextEncoder, LatentCache, digit_caption
from proxies.quality.sampling import generate


def is_digits(data: LatentCache) -> bool:
    """The built-in digits data (``proxies.data.digits_cache``), labelled."""
    return data.manifest.get("source") == "sklearn.datasets.load_digits" and data.labels is not None


def fit_classifier(data: LatentCache) -> tuple[Any, float]:
    """A logistic-regression digit classifier on the training split; returns it and its held-out accuracy on
    real digits (the ceiling for generated ones)."""
    from sklearn.linear_model import LogisticRegression

    train, val = data.split("train"), data.split("val")
    clf = LogisticRegression(max_iter=3000).fit(train.mean.reshape(len(train), -1).numpy(), train.labels.numpy())
    real = float(clf.score(val.mean.reshape(len(val), -1).numpy(), val.labels.numpy())) if len(val) else float("nan")
    return clf, real


def classify(clf: Any, samples: torch.Tensor) -> torch.Tensor:
    """Predicted digit of each sample [N, 1, 8, 8] (pixels, any range: clamped to the data's [-1, 1])."""
    flat = samples.float().clamp(-1, 1).reshape(samples.shape[0], -1).cpu().numpy()
    return torch.as_tensor(clf.predict(flat))


def digit_accuracy(model: nn.Module, data: LatentCache, scheduler: DDPMScheduler, samples_per_class: int = 10,
                   steps: int = 20, guidance: float = 3.0, guidance_rescale: float = 0.7,
                   seed: int = 7) -> dict[str, Any]:
    """Sample ``samples_per_class`` digits of each class from their captions (DDIM on trailing timesteps,
    rescaled classifier-free guidance) and classify them."""
    clf, real = fit_classifier(data)
    encoder = HashTextEncoder(data.text.shape[-1], data.text.shape[1])  # the cache's own text embedding
    labels = torch.arange(10).repeat(samples_per_class)
    text = encoder([digit_caption(int(y)) for y in labels])
    uncond = data.uncond if data.uncond is not None else encoder([""])
    x = generate(model, text, uncond, scheduler, data.latent_shape, steps=steps, guidance=guidance,
                 guidance_rescale=guidance_rescale, generator=torch.Generator().manual_seed(seed))
    predicted = classify(clf, x)
    per_class = [float((predicted[labels == k] == k).float().mean()) for k in range(10)]
    return {"digit_accuracy": float((predicted == labels).float().mean()), "digit_accuracy_per_class": per_class,
            "digit_samples": len(labels), "classifier_accuracy_on_real": real}
