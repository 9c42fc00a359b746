"""A built-in compositional text-to-image dataset: rendered shapes, 16x16 RGB, captioned "small red circle top left".

Every image holds one shape on a black background, drawn from four independent attributes:

* colour: red, green, blue, yellow;
* shape: circle, square, triangle;
* size: small or large;
* position: the quadrant its centre lies in (top left, top right, bottom left, bottom right).

That is 96 combinations; ``shapes_cache`` renders each ``per_combination`` times (36 by default: 3,456 images)
with a jittered centre, size and hue, so that a model has to read *every* word of the caption to draw the right
image, unlike the digits, where one word decides it. Rendering is numpy only (4x4 supersampled coverage, so edges
are anti-aliased) and deterministic under the seed: no download, no font, no image library. Pixels are in
[-1, 1] with std 0.02, standing in for a VAE posterior, like the digits; captions are embedded by the digits'
:class:`~proxies.data.HashTextEncoder`.

``labels`` of the cache are [N, 4] attribute indices in the order of :data:`ATTRIBUTES`, which is what the
attribute classifiers (:mod:`proxies.quality.attributes`) learn and sample quality is scored against.

``objects=2`` is the harder variant (benchmark ``shapes2``): two shapes in two different quadrants, captioned
"small red circle top left and large blue square bottom right" (the first in reading order first), labels
[N, 8] (:data:`PAIR_ATTRIBUTES`). Its 3,456 attribute pairs per quadrant pair cannot all be seen in a few
thousand images, so a model has to compose the words it learnt (and bind each colour to its shape), and every
distinct caption is about as rare as an image: why it exists is that on one shape per image every arch of the
shapes space ends within 2% of the others after long training, too close for a ranking to mean anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import HashTextEncoder, LatentCache

COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.10), "green": (0.15, 0.85, 0.20), "blue": (0.15, 0.30, 0.95), "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES,
                                          "position": POSITIONS}
# two shapes per image: the first's attributes, then the second's (the first lies earlier in reading order)
PAIR_ATTRIBUTES: dict[str, tuple[str, ...]] = {f"{k}_{j}": v for j in (1, 2) for k, v in ATTRIBUTES.items()}

RESOLUTION = 16
# the shape's "radius" in pixels per size (a circle's radius; a square's half side is 0.85 of it, a triangle's
# circumradius 1.25 of it: squares cover 0.9 of a circle's area, triangles 0.65), and how far its centre may move
# from the quadrant's; the ranges keep every large shape clearly bigger than any small one of its kind
_RADIUS = {"small": (2.4, 2.8), "large": (3.4, 3.8)}
_JITTER = {"small": 0.8, "large": 0.3}
_SUPERSAMPLE = 4
SOURCE = "proxies.shapes (rendered)"


def shape_caption(labels: Sequence[int]) -> str:
    """The caption of attribute indices (colour, shape, size, position): ``"small red circle top left"``."""
    colour, shape, size, position = (names[int(i)] for names, i in zip(ATTRIBUTES.values(), labels, strict=True))
    return f"{size} {colour} {shape} {position}"


def pair_caption(labels: Sequence[int]) -> str:
    """The caption of two shapes' attribute indices (8: the first's, then the second's):
    ``"small red circle top left and large blue square bottom right"``."""
    labels = [int(i) for i in labels]
    if len(labels) != 8:
        raise ValueError(f"a pair of shapes has 8 attribute indices, got {len(labels)}")
    return f"{shape_caption(labels[:4])} and {shape_caption(labels[4:])}"


def random_pairs(n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random pairs of shapes [n, 8]: two different quadrants (the first earlier in reading order), each
    shape's colour, kind and size drawn independently and uniformly."""
    quadrants = np.array([(a, b) for a in range(len(POSITIONS)) for b in range(a + 1, len(POSITIONS))])
    first, second = quadrants[rng.integers(0, len(quadrants), n)].T  # each of the 6 quadrant pairs equally likely
    out = np.zeros((n, 8), dtype=np.int64)
    for j, position in ((0, first), (4, second)):
        out[:, j] = rng.integers(0, len(COLOURS), n)
        out[:, j + 1] = rng.integers(0, len(SHAPES), n)
        out[:, j + 2] = rng.integers(0, len(SIZES), n)
        out[:, j + 3] = position
    return torch.tensor(out)


def all_combinations() -> torch.Tensor:
    """Every (colour, shape, size, position) index tuple once, [96, 4], in a fixed order."""
    grids = np.meshgrid(*(np.arange(len(v)) for v in ATTRIBUTES.values()), indexing="ij")
    return torch.tensor(np.stack([g.ravel() for g in grids], axis=1), dtype=torch.long)


def _coverage(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The fraction of each pixel the shapes cover, [N, H, W] in [0, 1] (pixel i spans [i, i + 1)), for shape
    indices, centres and radii [N]."""
    n = RESOLUTION * _SUPERSAMPLE
    sub = (np.arange(n) + 0.5) / _SUPERSAMPLE
    inside = np.zeros((len(shape), n, n), dtype=bool)
    for kind in range(len(SHAPES)):
        at = np.flatnonzero(shape == kind)
        dx = sub[None, None, :] - cx[at, None, None]
        dy = sub[None, :, None] - cy[at, None, None]
        rr = r[at, None, None]
        if SHAPES[kind] == "circle":
            inside[at] = dx * dx + dy * dy <= rr * rr
        elif SHAPES[kind] == "square":
            inside[at] = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * rr
        else:  # an upright equilateral triangle with its bounding box centred: circumradius R, the box 1.5 R
            big = 1.25 * rr  # high, so the circumcentre sits R / 4 below the box's middle; y grows downwards
            ty = dy - big / 4
            inside[at] = (ty <= big / 2) & (np.sqrt(3) * dx - ty <= big) & (-np.sqrt(3) * dx - ty <= big)
    return inside.reshape(-1, RESOLUTION, _SUPERSAMPLE, RESOLUTION, _SUPERSAMPLE).mean(axis=(2, 4))


def _layer(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One shape per row of attribute indices [N, 4]: its coverage [N, 16, 16] and colour [N, 3], the jitter
    (centre, radius, hue) drawn from ``rng``."""
    colour, shape, size, position = labels.T
    n = len(labels)
    half = RESOLUTION / 2
    row, col = np.divmod(position, 2)
    small = size == SIZES.index("small")
    jitter = np.where(small, _JITTER["small"], _JITTER["large"])
    lo = np.where(small, _RADIUS["small"][0], _RADIUS["large"][0])
    hi = np.where(small, _RADIUS["small"][1], _RADIUS["large"][1])
    cx = half * col + half / 2 + rng.uniform(-1, 1, n) * jitter
    cy = half * row + half / 2 + rng.uniform(-1, 1, n) * jitter
    r = lo + rng.uniform(0, 1, n) * (hi - lo)
    rgb = np.clip(np.array(list(COLOURS.values()))[colour] + rng.uniform(-0.05, 0.05, (n, 3)), 0.0, 1.0)
    return _coverage(shape, cx, cy, r), rgb


def render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images [N, 3, 16, 16] in [-1, 1] for attribute indices [N, 4] (colour, shape, size, position) or [N, 8]
    (two shapes, the second drawn over the first), their jitter (centre, radius, hue) drawn from ``rng``."""
    labels = np.asarray(labels)
    labels = labels.reshape(len(labels), -1) if labels.ndim > 1 else labels.reshape(-1, 4)
    if labels.shape[1] not in (4, 8):
        raise ValueError(f"one shape has 4 attribute indices and two have 8, got {labels.shape[1]}")
    images = np.zeros((len(labels), 3, RESOLUTION, RESOLUTION))  # black
    for j in range(0, labels.shape[1], 4):
        alpha, rgb = _layer(labels[:, j: j + 4], rng)
        images = alpha[:, None] * rgb[:, :, None, None] + (1.0 - alpha[:, None]) * images  # "over"
    return (images * 2.0 - 1.0).astype(np.float32)


def shapes_cache(per_combination: int = 36, text_dim: int = 16, text_len: int | None = None,
                 val_fraction: float = 1 / 6, seed: int = 0, objects: int = 1) -> LatentCache:
    """The rendered shapes as an offline text-to-image dataset (3 x 16 x 16 "latents"), shuffled and split like
    :func:`~proxies.data.digits_cache`. One shape per image: every combination of attributes appears
    ``per_combination`` times. Two (``objects=2``): as many images (96 x ``per_combination``), each a random
    pair of :func:`random_pairs`. ``text_len`` defaults to what the longest caption needs (8 and 16 tokens)."""
    if per_combination < 1:
        raise ValueError(f"per_combination must be >= 1, got {per_combination}")
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, got {objects}")
    text_len = text_len or 8 * objects
    rng = np.random.default_rng(seed)
    if objects == 1:
        labels = all_combinations().repeat(per_combination, 1)
        labels = labels[torch.tensor(rng.permutation(len(labels)))]
        caption, attributes = shape_caption, ATTRIBUTES
    else:
        labels = random_pairs(len(all_combinations()) * per_combination, rng)
        caption, attributes = pair_caption, PAIR_ATTRIBUTES
    images = torch.tensor(render(labels.numpy(), rng))
    captions = [caption(row.tolist()) for row in labels]
    encoder = HashTextEncoder(text_dim, text_len)
    n_val = round(len(images) * val_fraction)
    manifest = {
        "source": SOURCE, "encoder": f"HashTextEncoder(dim={text_dim}, max_len={text_len})",
        "vae": "identity (pixels in [-1, 1], std 0.02)", "scaling_factor": 1.0,
        "splits": {"train": len(images) - n_val, "val": n_val}, "seed": seed,
        "attributes": {k: list(v) for k, v in attributes.items()}, "per_combination": per_combination,
        **({} if objects == 1 else {"objects": objects}),
    }
    return LatentCache(images, torch.full_like(images, 0.02), encoder(captions), captions, manifest, labels,
                       encoder([""]))
