"""Latent/text caches: the digits dataset, precompute from an image folder with local encoders, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from typer.testing import CliRunner

from nas.cli import app
from proxies.data import HashTextEncoder, LatentCache, digits_cache, precompute
from search_spaces import ConfigError, get_arch
from tests.test_pipeline import _parts

runner = CliRunner()


def test_digits_cache_shapes_and_split():
    cache = digits_cache()
    assert len(cache) == 1797 and cache.latent_shape == (1, 8, 8)
    assert cache.text.shape == (1797, 8, 16)
    assert cache.captions[0].startswith("a handwritten digit ")
    assert len(cache.split("train")) + len(cache.split("val")) == 1797
    cache.check_compatible(get_arch("digits"))
    assert float(cache.mean.min()) >= -1 and float(cache.mean.max()) <= 1


def test_hash_text_encoder_is_deterministic_and_distinguishes_words():
    enc = HashTextEncoder()
    a = enc(["a handwritten digit seven"])
    assert torch.equal(a, HashTextEncoder()(["a handwritten digit seven"]))
    assert not torch.equal(a, enc(["a handwritten digit one"]))


def test_save_load_round_trip(tmp_path):
    cache = digits_cache()
    cache.save(tmp_path / "digits")
    loaded = LatentCache.load(tmp_path / "digits")
    assert torch.equal(loaded.mean, cache.mean) and torch.equal(loaded.labels, cache.labels)
    assert loaded.captions == cache.captions and loaded.manifest["splits"] == cache.manifest["splits"]


def test_mismatched_cache_is_refused(tmp_path):
    cache = digits_cache()
    with pytest.raises(ConfigError, match="1 channels but the arch takes 4"):
        cache.check_compatible(get_arch("tiny"))
    cache.save(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["latent_shape"] = [4, 8, 8]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="latent_shape"):
        LatentCache.load(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LatentCache.load(tmp_path / "c")
    with pytest.raises(ConfigError, match="no manifest"):
        LatentCache.load(tmp_path / "nowhere")


@pytest.fixture
def encoders(tmp_path):
    """A tiny VAE and CLIP text encoder + tokenizer saved to local folders, as users would have them."""
    tokenizer, text_encoder, _, _ = _parts(cross_dim=32)
    text_encoder.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    return tmp_path


def test_precompute_from_local_encoders(encoders):
    cache = precompute(encoders / "images", encoders / "vae", encoders / "clip", resolution=32, batch_size=2,
                       val_fraction=0.2)
    assert len(cache) == 5 and cache.latent_shape == (4, 16, 16)
    assert cache.text.shape == (5, 16, 32)
    assert (cache.std > 0).all() and cache.manifest["splits"] == {"train": 4, "val": 1}
    assert cache.captions[3] == "a picture number 3"


def test_data_cli(encoders, tmp_path):
    res = runner.invoke(app, ["data", "precompute", str(encoders / "images"), "--vae", str(encoders / "vae"),
                              "--text-encoder", str(encoders / "clip"), "--out", str(tmp_path / "cache"),
                              "--resolution", "32"])
    assert res.exit_code == 0, res.output
    shown = json.loads(runner.invoke(app, ["data", "show", str(tmp_path / "cache"), "--json"]).stdout)
    assert shown["n"] == 5 and shown["latent_shape"] == [4, 16, 16]
    bad = runner.invoke(app, ["data", "precompute", str(tmp_path / "none"), "--vae", str(encoders / "vae"),
                              "--text-encoder", str(encoders / "clip"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "image folder not found" in bad.output
    assert not (tmp_path / "x").exists()
    missing = runner.invoke(app, ["data", "precompute", str(encoders / "images"), "--vae", str(tmp_path / "novae"),
                                  "--text-encoder", str(encoders / "clip"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "cannot load the vae" in missing.output
    assert not (tmp_path / "y").exists()
