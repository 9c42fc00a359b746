"""The built-in shapes benchmark: deterministic data whose captions say what the pixels show, attribute
classifiers that read them back, a teacher and a space that build, and the benchmark registry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nas.cli import app
from proxies.benchmark import Benchmark, get_benchmark
from proxies.data import LatentCache
from proxies.quality import QualityContext
from proxies.quality.attributes import AttributeClassifier, sample_quality
from proxies.shapes import (
    ATTRIBUTES,
    COLOURS,
    PAIR_ATTRIBUTES,
    all_combinations,
    pair_caption,
    render,
    shape_caption,
    shapes_cache,
)
from search_spaces import ConfigError, get_arch, list_archs, list_spaces, space_path
from search_spaces.space import SearchSpace

runner = CliRunner()
POSITION_INDEX = {name: i for i, name in enumerate(ATTRIBUTES["position"])}


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return get_benchmark("shapes")  # renders the data and fits the attribute classifiers (seconds)


@pytest.fixture(scope="module")
def cache(bench) -> LatentCache:
    return bench.data


def test_shapes_cache_layout(cache):
    assert len(cache) == 96 * 36 and cache.latent_shape == (3, 16, 16)
    assert cache.text.shape == (len(cache), 8, 16) and cache.labels.shape == (len(cache), 4)
    assert float(cache.mean.min()) >= -1 and float(cache.mean.max()) <= 1
    assert len(cache.split("train")) == len(cache) - round(len(cache) / 6)
    # every combination of attributes equally often, and in both splits
    counts = torch.unique(cache.labels, dim=0, return_counts=True)[1]
    assert len(counts) == 96 and set(counts.tolist()) == {36}
    assert len(torch.unique(cache.split("val").labels, dim=0)) > 80
    cache.check_compatible(get_arch("shapes"))


def test_shapes_cache_is_deterministic_under_its_seed(cache):
    again = shapes_cache()
    assert torch.equal(again.mean, cache.mean) and torch.equal(again.labels, cache.labels)
    assert again.captions == cache.captions and torch.equal(again.text, cache.text)
    other = shapes_cache(seed=1)
    assert not torch.equal(other.labels, cache.labels)
    # same attributes, other jitter: the renderings differ too
    assert not torch.equal(shapes_cache(per_combination=1, seed=1).mean, shapes_cache(per_combination=1).mean)


def test_captions_name_the_attributes():
    assert shape_caption([0, 0, 0, 0]) == "small red circle top left"
    assert shape_caption([3, 2, 1, 3]) == "large yellow triangle bottom right"
    combos = all_combinations()
    assert len({shape_caption(row.tolist()) for row in combos}) == 96


def _measure(image: torch.Tensor) -> dict:
    """What the pixels of one image show, read without the renderer: the colour of its brightest pixel, and
    from the anti-aliased coverage the shape's centre, its area, how much of the box spanned by its widest row
    and tallest column it fills (a square fills it, a circle about pi / 4, a triangle about half) and the skew of
    its row profile (an upright triangle is wide at the bottom; circles and squares are symmetric)."""
    rgb01 = (image.numpy() + 1) / 2  # [3, H, W], black background
    brightness = rgb01.max(axis=0)
    peak = np.unravel_index(brightness.argmax(), brightness.shape)
    coverage = brightness / brightness.max()
    area = coverage.sum()
    rows, cols = coverage.sum(axis=1), coverage.sum(axis=0)
    centres = np.arange(16) + 0.5
    cy, cx = (rows * centres).sum() / area, (cols * centres).sum() / area
    sd = np.sqrt((rows * (centres - cy) ** 2).sum() / area)
    skew = (rows * (centres - cy) ** 3).sum() / area / sd**3
    return {"colour": rgb01[:, peak[0], peak[1]], "cx": cx, "cy": cy, "area": area,
            "fill": area / (rows.max() * cols.max()), "skew": skew}


def test_pixels_show_what_the_caption_says(cache):
    names = {k: list(v) for k, v in ATTRIBUTES.items()}
    # the smallest "large" shape covers clearly more than the largest "small" one of the same kind
    small_area = {"circle": (15, 28), "square": (13, 27), "triangle": (9, 19)}
    for i in range(0, len(cache), 5):
        colour, shape, size, position = (names[k][j] for k, j in zip(names, cache.labels[i].tolist(), strict=True))
        caption = cache.captions[i]
        assert caption == f"{size} {colour} {shape} {position}"
        m = _measure(cache.mean[i])
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - m["colour"]).sum())
        assert nearest == colour, (caption, m)
        assert (m["cy"] < 8) == position.startswith("top") and (m["cx"] < 8) == position.endswith("left"), (caption, m)
        lo, hi = small_area[shape]
        assert (lo < m["area"] < hi) if size == "small" else (m["area"] > hi + 2), (caption, m)
        if shape == "square":
            assert m["fill"] > 0.95 and abs(m["skew"]) < 0.2, (caption, m)
        elif shape == "circle":
            assert 0.7 < m["fill"] < 0.9 and abs(m["skew"]) < 0.2, (caption, m)
        else:
            assert m["fill"] < 0.9 and m["skew"] < -0.3, (caption, m)


def test_attribute_classifiers_read_real_held_out_images(bench, cache):
    clf = bench.classifier
    assert set(clf.real_accuracy) == set(ATTRIBUTES)
    assert min(clf.real_accuracy.values()) >= 0.97, clf.real_accuracy
    val = cache.split("val")
    score = clf.score(val.mean, val.labels)
    assert score["sample_accuracy"] >= 0.97 and score["sample_all_correct"] >= 0.9
    # shuffled captions are scored near chance: the score follows the captions, not the image quality
    wrong = clf.score(val.mean, val.labels[torch.randperm(len(val), generator=torch.Generator().manual_seed(0))])
    assert wrong["sample_all_correct"] < 0.1 and wrong["sample_accuracy"] < 0.5


def test_two_shapes_per_image_say_both_in_the_caption_and_the_pixels():
    bench = get_benchmark("shapes2")
    cache = bench.data
    assert len(cache) == 96 * 36 and cache.labels.shape == (len(cache), 8) and cache.text.shape == (len(cache), 16, 16)
    assert cache.manifest["objects"] == 2 and list(cache.manifest["attributes"]) == list(PAIR_ATTRIBUTES)
    again = shapes_cache(objects=2)
    assert torch.equal(again.mean, cache.mean) and again.captions == cache.captions
    assert not torch.equal(shapes_cache(objects=2, seed=1).labels, cache.labels)
    first, second = cache.labels[:, 3], cache.labels[:, 7]
    assert bool((first < second).all())  # two quadrants, the first in reading order first
    assert len(torch.unique(cache.labels[:, [3, 7]], dim=0)) == 6
    # most captions are rare: a model has to compose words, not memorise captions
    assert len(set(cache.captions)) > len(cache) / 2
    names = [list(v) for v in ATTRIBUTES.values()]
    for i in range(0, len(cache), 97):
        row = cache.labels[i].tolist()
        assert cache.captions[i] == pair_caption(row)
        # each shape alone, drawn with the jitter it got: where it is, the pair image shows its colour
        for j in (0, 4):
            colour, _, _, position = (names[k][row[j + k]] for k in range(4))
            r, c = divmod(POSITION_INDEX[position], 2)
            quadrant = (cache.mean[i][:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] + 1) / 2
            peak = quadrant.amax(dim=(1, 2)).numpy()
            nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - peak).sum())
            assert nearest == colour, (cache.captions[i], peak)
    assert bench.teacher == "shapes" and bench.space == space_path("shapes")
    assert bench.teacher_steps == 4000  # 20x the ground truth's steps: what validates shapes2's ground truth
    assert bench.classifier.names == tuple(PAIR_ATTRIBUTES) and len(bench.prompts) == 96
    assert min(bench.classifier.real_accuracy.values()) >= 0.95, bench.classifier.real_accuracy
    assert torch.equal(bench.prompts, get_benchmark("shapes2", seed=1).prompts)  # prompts do not follow the data
    with pytest.raises(ValueError, match="objects must be 1 or 2"):
        shapes_cache(objects=3)
    with pytest.raises(ValueError, match="a pair of shapes has 8 attribute indices"):
        pair_caption([0, 0, 0, 0])
    with pytest.raises(ValueError, match="two have 8"):
        render(np.zeros((2, 6), dtype=int), np.random.default_rng(0))


def test_teacher_and_space_build_and_run(cache):
    teacher = get_arch("shapes")
    assert "shapes" in list_archs() and "shapes" in list_spaces()
    space = SearchSpace.from_yaml(space_path("shapes"))
    assert space.teacher == "shapes" and space.cardinality() > 100
    assert space.contains(teacher)
    ctx = QualityContext(data=cache, seed=0, batch_size=4)
    arch = space.sample(random.Random(3))
    model = ctx.build(arch)
    x0, text, t, _ = ctx.batch(torch.Generator().manual_seed(0))
    out = model(x0, t, text).sample
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()
    assert any(name.startswith(("down", "mid", "up")) and ".attentions" in name and "transformer_blocks" in name
               and "attn2" in name for name, _ in ctx.build(teacher).named_parameters())


def test_benchmark_registry_and_sample_quality_runs(bench):
    assert bench.teacher == "shapes" and bench.space == space_path("shapes") and len(bench.prompts) == 96
    assert bench.teacher_steps == 400
    ctx = QualityContext(data=bench.data, seed=0)
    model = ctx.build(get_arch(bench.teacher))
    prompts = bench.prompts[:8]
    result = sample_quality(model, bench.data, ctx.scheduler, bench.classifier, prompts, bench.caption, steps=2)
    assert result["samples"] == 8 and set(result["sample_accuracy_per_attribute"]) == set(ATTRIBUTES)
    assert 0.0 <= result["sample_all_correct"] <= result["sample_accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        get_benchmark("nope")


def test_digits_benchmark_scores_with_one_attribute():
    bench = get_benchmark("digits")
    assert bench.teacher == "digits" and bench.space == space_path("digits") and len(bench.prompts) == 100
    assert bench.classifier.names == ("digit",) and bench.classifier.real_accuracy["digit"] > 0.9
    val = bench.data.split("val")
    score = bench.classifier.score(val.mean, val.labels)
    assert score["sample_accuracy"] == score["sample_all_correct"] == bench.classifier.real_accuracy["digit"]
    with pytest.raises(ValueError, match="1 attribute names for labels of 4"):
        AttributeClassifier.fit(shapes_cache(per_combination=1), ["colour"])


def test_cli_knows_the_shapes_arch_and_space():
    result = runner.invoke(app, ["arch", "describe", "shapes"])
    assert result.exit_code == 0, result.output
    assert "shapes:" in result.output and "params" in result.output
    result = runner.invoke(app, ["space", "count", "shapes"])
    assert result.exit_code == 0, result.output
    assert f"{SearchSpace.from_yaml(space_path('shapes')).cardinality():,} architectures" in result.output
    result = runner.invoke(app, ["space", "count", "nope"])
    assert result.exit_code == 2 and "no shipped space 'nope'" in result.output
    assert "shapes" in runner.invoke(app, ["arch", "list"]).output


def test_cli_writes_the_shapes_cache(tmp_path):
    result = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "shapes"), "--per-combination", "2",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    loaded = LatentCache.load(tmp_path / "shapes")
    expected = shapes_cache(per_combination=2, seed=3)
    assert torch.equal(loaded.mean, expected.mean) and torch.equal(loaded.labels, expected.labels)
    assert loaded.captions == expected.captions and loaded.manifest["attributes"]["shape"] == list(ATTRIBUTES["shape"])
    loaded.check_compatible(get_arch("shapes"))
    result = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "x"), "--per-combination", "0"])
    assert result.exit_code == 2 and not (tmp_path / "x").exists()
    result = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "pairs"), "--per-combination", "1",
                                 "--objects", "2"])
    assert result.exit_code == 0, result.output
    pairs = LatentCache.load(tmp_path / "pairs")
    assert pairs.captions == shapes_cache(per_combination=1, objects=2).captions and pairs.labels.shape == (96, 8)
    result = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "y"), "--objects", "3"])
    assert result.exit_code == 2 and "--objects" in result.output and not (tmp_path / "y").exists()
