"""The built-in quality benchmarks by name: data, teacher, space and sample-quality scorer that belong together.

``get_benchmark("digits")`` is scikit-learn's handwritten digits (1 x 8 x 8, one attribute: the digit);
``get_benchmark("shapes")`` the rendered shapes of :mod:`proxies.shapes` (3 x 16 x 16, four attributes: colour,
shape, size, position); ``get_benchmark("shapes2")`` two shapes per image (eight attributes) on the shapes teacher
and space, the harder variant. Each names its teacher arch (``search_spaces/archs/<name>.yaml``) and the block-removal
and attention-placement space around it (``search_spaces/spaces/<name>.yaml``), and scores a model's samples with
attribute classifiers fitted on its real training images (:mod:`proxies.quality.attributes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from search_spaces import ConfigError, space_path

from .data import LatentCache, digit_caption, digits_cache
from .quality.attributes import AttributeClassifier, sample_quality
from .shapes import (
    ATTRIBUTES,
    PAIR_ATTRIBUTES,
    all_combinations,
    pair_caption,
    random_pairs,
    shape_caption,
    shapes_cache,
)

BENCHMARKS = ("digits", "shapes", "shapes2")
TEACHER_STEPS = {"digits": 400, "shapes": 400, "shapes2": 4000}  # see Benchmark.teacher_steps


@dataclass
class Benchmark:
    """One built-in benchmark. ``prompts`` are the attribute labels sampled to score a model (digits: each digit
    10 times; shapes: each of the 96 combinations once; shapes2: 96 fixed random pairs); ``caption`` turns one
    row of them into its caption. ``teacher_steps``: how long the benchmark scripts train its teacher (AdamW,
    lr 2e-3, batches of 64). On digits and shapes 400 steps; on shapes2 4,000, 20x the ground truth's 200 steps,
    because with a 400-step teacher its 200-step ground truth ranks 1,000-step training at only tau 0.87 on both
    seeds, against 0.96 and 0.91 with the 4,000-step one (``benchmarks/results/proxy_gt_validity_shapes2_seed*``).
    Names of work folders and results files keep a ``_teacherN`` suffix whenever N is not 400."""

    name: str
    data: LatentCache
    teacher: str
    space: Path
    caption: Callable[[Any], str]
    prompts: torch.Tensor
    classifier: AttributeClassifier
    teacher_steps: int = 400

    def sample_quality(self, model: nn.Module, scheduler: DDPMScheduler, seed: int = 7, guidance: float = 3.0,
                       guidance_rescale: float = 0.7) -> dict[str, Any]:
        """``sample_accuracy`` (mean attribute accuracy), ``sample_all_correct`` and per-attribute accuracy of
        the model's samples for :attr:`prompts` (DDIM, 20 steps, rescaled classifier-free guidance). On shapes,
        guidance 3.0 over-saturates the samples and a clamped small shape looks large: ``guidance=1.0`` scores
        size without that artefact."""
        return sample_quality(model, self.data, scheduler, self.classifier, self.prompts, self.caption, seed=seed,
                              guidance=guidance, guidance_rescale=guidance_rescale)


def get_benchmark(name: str, seed: int = 0) -> Benchmark:
    """A built-in benchmark by name; ``seed`` shuffles (and, for shapes, renders) the data. The attribute
    classifiers are fitted here (seconds)."""
    if name == "digits":
        data = digits_cache(seed=seed)
        classifier = AttributeClassifier.fit(data, ["digit"], kind="logistic")
        prompts = torch.arange(10).repeat(10)
        caption: Callable[[Any], str] = digit_caption
    elif name == "shapes":
        data = shapes_cache(seed=seed)
        classifier = AttributeClassifier.fit(data, list(ATTRIBUTES), kind="logistic")
        prompts = all_combinations()
        caption = shape_caption
    elif name == "shapes2":
        data = shapes_cache(seed=seed, objects=2)
        classifier = AttributeClassifier.fit(data, list(PAIR_ATTRIBUTES), kind="logistic")
        prompts = random_pairs(96, np.random.default_rng(7))  # the same prompts whatever the data's seed
        caption = pair_caption
    else:
        raise ConfigError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})", field="benchmark")
    base = "shapes" if name == "shapes2" else name  # two shapes per image: the same teacher arch and space
    return Benchmark(name, data, teacher=base, space=space_path(base), caption=caption, prompts=prompts,
                     classifier=classifier, teacher_steps=TEACHER_STEPS[name])
