"""Shared helpers: small random configs and archs so the CPU suite stays fast."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from search_spaces import UNetArch

# The longest test files, longest first (measured with --durations). `pytest -n 3 --dist loadfile` hands out whole
# files in collection order (pyproject.toml turns off xdist's reordering by test count): a long file that starts
# last runs alone at the end while the other workers idle, so the long ones start first.
LONGEST_FIRST = ("test_ray.py", "test_flexible_unet.py", "test_search.py", "test_search_faults.py",
                 "test_shards_train.py", "test_train.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the files of ``LONGEST_FIRST`` first, in that order; every other order is kept (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def random_unet2d_config(rng: random.Random) -> dict[str, Any]:
    """A random UNet2DConditionModel config that diffusers can build: 1-4 stages, tiny widths."""
    n = rng.randint(1, 4)
    groups = rng.choice([4, 8])
    channels = [groups * rng.choice([2, 4, 6, 8]) for _ in range(n)]
    cross = [rng.random() < 0.7 for _ in range(n)]
    heads = [rng.choice([h for h in (1, 2, 4) if c % h == 0]) for c in channels]
    cfg: dict[str, Any] = {
        "sample_size": 16,
        "in_channels": rng.choice([3, 4]),
        "out_channels": rng.choice([3, 4]),
        "block_out_channels": channels,
        "layers_per_block": [rng.randint(1, 3) for _ in range(n)] if rng.random() < 0.5 else rng.randint(1, 2),
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "mid_block_type": rng.choice(["UNetMidBlock2DCrossAttn", None]),
        "norm_num_groups": groups,
        "cross_attention_dim": rng.choice([16, 24]),
        "attention_head_dim": heads,
        "transformer_layers_per_block": [rng.randint(1, 2) for _ in range(n)],
        "use_linear_projection": rng.random() < 0.5,
        "upcast_attention": rng.random() < 0.3,
        "flip_sin_to_cos": rng.random() < 0.8,
        "freq_shift": rng.choice([0, 1]),
    }
    if rng.random() < 0.3:
        cfg["time_embedding_dim"] = rng.choice([32, 48])
    return cfg


def random_flexible_arch(rng: random.Random, sample_size: int = 16) -> UNetArch:
    """A random arch that only FlexibleUNet can express: per-stage counts, attention counts above ResNet counts,
    up stages that do not mirror the down side, optional Deci-style deep mid block and skip convention."""
    n = rng.randint(1, 3)
    groups = 4
    mid_up = n > 1 and rng.random() < 0.4
    down = []
    for i in range(n):
        down.append({"channels": groups * rng.choice([2, 3, 4, 6]), "resnets": rng.randint(1, 3),
                     "attentions": rng.randint(0, 4), "heads": rng.choice([1, 2]),
                     "transformer_layers": rng.randint(1, 2), "downsample": i < n - 1 or mid_up})
    skips = [1 + d["resnets"] for d in down]
    up = []
    for k in range(n):
        up.append({"channels": groups * rng.choice([2, 3, 4, 6]), "resnets": skips[n - 1 - k],
                   "attentions": rng.randint(0, 7), "heads": rng.choice([1, 2, 4]),
                   "transformer_layers": rng.randint(1, 2), "upsample": k < n - 1})
    mid = None
    if rng.random() < 0.8 or mid_up:
        mid = {"resnets": rng.randint(0, 4), "attentions": rng.randint(0, 3), "heads": 2, "transformer_layers": 1,
               "upsample": mid_up}
    return UNetArch.from_dict({
        "sample_size": sample_size, "cross_attention_dim": 12, "norm_num_groups": groups,
        "use_linear_projection": rng.random() < 0.5,
        "down_skip": rng.choice(["after_attention", "after_resnet"]),
        "down": down, "mid": mid, "up": up,
    })


def scaled_reference(name: str, width: int = 32) -> dict[str, Any]:
    """A reference arch's layout with widths divided down (320 -> width), for fast numerical checks."""
    from search_spaces import get_arch

    data = get_arch(name).to_dict()
    scale = 320 // width
    for stage in data["down"] + data["up"]:
        stage["channels"] //= scale
    data["cross_attention_dim"] = 32
    data["norm_num_groups"] = 8
    data["time_embedding_dim"] = 4 * width
    data["sample_size"] = 16
    return data


# a space small enough to profile in seconds (2 stages, 16/32 channels); latency and ONNX tests share it
MICRO_SPACE_YAML = """
name: micro
base: tiny
stages: [2]
attention: {heads: [2], transformer_layers: [1, 2]}
down:
  - {channels: 16, resnets: [1, 2], attentions: [0, 1]}
  - {channels: 32, resnets: 1, attentions: [0, 1]}
mid: {resnets: [0, 1], attentions: [0, 1]}
up:
  - {channels: 32, attentions: [0, 1]}
  - {channels: 16, attentions: [0, 1]}
"""
