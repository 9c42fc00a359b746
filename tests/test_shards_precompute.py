"""`unet-nas data precompute --format shards`: image folders and webdataset tars, unreadable images counted and
named, two processes killed with SIGKILL midway and resumed on one to the uninterrupted result, token ids."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from typer.testing import CliRunner

from nas.cli import app
from proxies.data import precompute
from proxies.shards import ShardedDataset
from tests.test_pipeline import _parts

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def _png(rng: np.random.Generator, h: int = 40, w: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny VAE and CLIP text encoder saved locally, an image folder, and img2dataset-style tars."""
    root = tmp_path_factory.mktemp("enc")
    tokenizer, text_encoder, _, _ = _parts(cross_dim=32)
    text_encoder.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4
                  ).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(_png(rng))
        (folder / f"{i}.txt").write_text(f"a picture number {i}")
    tars = root / "tars"
    tars.mkdir()
    for t in range(6):
        with tarfile.open(tars / f"{t:05d}.tar", "w") as tar:
            for k in range(10):
                key = f"{t:05d}{k:04d}"
                _add(tar, f"{key}.jpg", b"not an image" if (t, k) == (1, 3) else _png(rng))
                _add(tar, f"{key}.txt", f"tar {t} image {k}".encode())
                _add(tar, f"{key}.json", json.dumps({"caption": "x", "original_height": 400,
                                                     "original_width": 480}).encode())
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nas", "data", "precompute", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _args(enc: Path, source: Path, out: Path) -> list[str]:
    return [str(source), "--vae", str(enc / "vae"), "--text-encoder", str(enc / "clip"), "--out", str(out),
            "--resolution", "32", "--format", "shards", "--batch-size", "4", "--shard-records", "6"]


def _hashes(out: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in json.loads((out / "index.json").read_text())["shards"]]


def test_folder_precompute_matches_the_cache_and_reads_back(encoders, tmp_path):
    res = runner.invoke(app, ["data", "precompute", *_args(encoders, encoders / "images", tmp_path / "d"),
                              "--val-units", "1"])
    assert res.exit_code == 0, res.output
    ds = ShardedDataset(tmp_path / "d")
    assert [s.count for s in ds.train] == [6] and [s.count for s in ds.val] == [1]
    cache = precompute(encoders / "images", encoders / "vae", encoders / "clip", resolution=32, batch_size=4,
                       val_fraction=0.0)
    rec = np.concatenate([ds.records("train"), ds.records("val")])
    assert np.allclose(rec["mean"], cache.mean.numpy(), atol=2e-3)  # fp16 of the same posterior
    assert np.allclose(rec["text"], cache.text.numpy(), atol=2e-3)
    assert [bytes(c).decode() for c in rec["caption"]] == cache.captions
    assert rec["size"].tolist() == [[40, 48]] * 7 and rec["crop"].tolist() == [[0, 4]] * 7
    shown = json.loads(runner.invoke(app, ["data", "show", str(tmp_path / "d"), "--json"]).stdout)
    assert shown["n"] == 7 and shown["record"]["latent_shape"] == [4, 16, 16]


def test_tars_with_unreadable_images_are_counted_and_named(encoders, tmp_path):
    tars = tmp_path / "tars"
    shutil.copytree(encoders / "tars", tars)
    data = (tars / "00004.tar").read_bytes()
    (tars / "00004.tar").write_bytes(data[: len(data) // 2])  # a truncated download
    res = runner.invoke(app, ["data", "precompute", *_args(encoders, tars, tmp_path / "d"), "--text", "tokens"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    items = [c["item"] for c in report["unreadable_items"]]
    assert "00001.tar:000010003" in items and any(i.startswith("00004.tar:after 00004") for i in items)
    ds = ShardedDataset(tmp_path / "d")
    assert ds.text_mode == "tokens" and len(ds) == report["records"] < 60
    ids = ds.records("train")["id"]
    assert (1 << 32 | 3) not in ids.tolist() and (1 << 32 | 4) in ids.tolist()  # stable ids skip the bad one
    assert ds.records("train")["size"][0].tolist() == [400, 480]  # img2dataset's original size


def test_two_processes_killed_midway_resume_on_one_to_the_uninterrupted_result(encoders, tmp_path):
    """Two torchrun processes (one copy of the encoders each) are killed with SIGKILL midway; one process resumes
    the job: finished units are kept, the rest redone, and every shard hash equals an uninterrupted run's."""
    ref = tmp_path / "ref"
    assert runner.invoke(app, ["data", "precompute", *_args(encoders, encoders / "tars", ref)]).exit_code == 0
    for attempt in range(3):  # a loaded machine may starve this process until the job is done: start again
        out, log = tmp_path / f"out{attempt}", tmp_path / f"log{attempt}.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
               "-m", "nas", "data", "precompute", *_args(encoders, encoders / "tars", out)]
        with open(log, "w") as fh:  # its own session: the kill reaches the launcher and both workers, nothing else
            proc = subprocess.Popen(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not ((out / "unit-00000.json").is_file() and (out / "unit-00001.json").is_file()):  # both started
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not (out / "index.json").exists():
            break
    assert "process 1/2" in log.read_text()  # both workers ran
    assert not (out / "index.json").exists() and len(list(out.glob("unit-*.json"))) < 6  # killed midway
    res = runner.invoke(app, ["data", "precompute", *_args(encoders, encoders / "tars", out)])
    assert res.exit_code == 0, res.output
    assert "already done" in res.output and _hashes(out) == _hashes(ref)
    assert not list(out.glob(".*.tmp"))
    changed = runner.invoke(app, ["data", "precompute", *_args(encoders, encoders / "tars", out)[:-1], "7"])
    assert changed.exit_code == 2 and "other settings (shard_records)" in changed.output


def test_training_on_token_ids_runs_the_frozen_text_encoder(encoders, tmp_path):
    """A dataset of token ids: the trainer loads the CLIP text encoder the index names and embeds every batch."""
    from nas.train import Trainer, load_recipe

    assert runner.invoke(app, ["data", "precompute", *_args(encoders, encoders / "tars", tmp_path / "d"),
                               "--text", "tokens", "--val-units", "1"]).exit_code == 0
    (tmp_path / "recipe.yaml").write_text("""name: tokens
model: {arch: tiny}
data: d
phases:
  - {name: a, steps: 3, resolution: 32, batch: 4, optimizer: adamw, lr: 1.0e-3}
evaluation: {digit_accuracy: false}
log: {every: 1, tensorboard: false}
loader: {val_items: 4}
""")
    trainer = Trainer(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", log=lambda m: None)
    metrics = trainer.run()
    assert trainer.text_encoder is not None and metrics["steps"] == 3 and np.isfinite(metrics["val_loss"])
    assert not any(p.requires_grad for p in trainer.text_encoder.parameters())
