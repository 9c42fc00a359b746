"""`unet-nas train` on sharded datasets: exact resume mid-phase, and a dataset larger than the memory the
training process may allocate."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nas.train import Trainer, load_recipe
from proxies.data import digits_cache
from proxies.shards import convert_cache
from proxies.shards.writer import write_synthetic
from tests.test_train import PHASED, TINY_ARCH, _rows, _write

ROOT = Path(__file__).parents[1]


def test_training_on_shards_resumes_mid_phase_exactly(tmp_path):
    """Today's digits cache converted to shards; a run stopped mid-phase and resumed has the uninterrupted run's
    loss at every step and its final weights, bit for bit."""
    convert_cache(digits_cache(), tmp_path / "digits_shards", shard_bytes=64 << 10)
    recipe = PHASED.replace("data: digits", "data: digits_shards\nloader: {shuffle_block: 2}")
    path = _write(tmp_path, recipe)
    Trainer(load_recipe(path), tmp_path / "ref", log=lambda m: None).run()
    assert Trainer(load_recipe(path), tmp_path / "out", log=lambda m: None, stop_after=15).run() is None
    Trainer(load_recipe(path), tmp_path / "out", log=lambda m: None).run(resume=True)
    assert _rows(tmp_path / "out") == _rows(tmp_path / "ref")
    a = load_file(tmp_path / "out" / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "ref" / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# 4-channel 4x4 latents and CLIP-L-wide text (77 x 768, fp16: 118 KB a record, as LAION embeddings are)
WIDE_ARCH = TINY_ARCH.replace("in_channels: 1", "in_channels: 4").replace("out_channels: 1", "out_channels: 4") \
    .replace("cross_attention_dim: 16", "cross_attention_dim: 768").replace("sample_size: 8", "sample_size: 4")

LIMIT = 768 << 20  # bytes of heap and anonymous memory the training process may allocate (RLIMIT_DATA)
RECORDS = 7424  # 7424 x 119.4 KB = 886 MB of shards, more than LIMIT


def _limited(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=600)


def test_train_on_a_sharded_dataset_larger_than_its_memory_limit(tmp_path):
    """RLIMIT_DATA caps what the process can allocate (heap, anonymous maps; not the page cache): reading the
    dataset into memory fails under the limit, while `unet-nas train` streams a whole epoch of it and finishes."""
    data = tmp_path / "big"
    write_synthetic(data, RECORDS, latent_shape=(4, 4, 4), text_shape=(77, 768), shard_records=512, n_val=16,
                    resolution=32)
    size = sum(p.stat().st_size for p in data.glob("*.npy"))
    assert size > LIMIT
    # the control: the same limit refuses the whole dataset in memory
    load_all = _limited([sys.executable, "-c", "import sys; from proxies.shards import ShardedDataset; "
                         "ShardedDataset(sys.argv[1]).records('train')", str(data)], tmp_path)
    assert load_all.returncode != 0 and "MemoryError" in load_all.stderr, load_all.stderr[-500:]
    (tmp_path / "arch.yaml").write_text(WIDE_ARCH)
    steps = RECORDS // 256  # one epoch: every record is read once
    (tmp_path / "recipe.yaml").write_text(f"""name: big
model: {{arch: arch.yaml}}
data: big
phases:
  - {{name: a, steps: {steps}, resolution: 32, batch: 256, optimizer: adamw, lr: 1.0e-3}}
checkpoint: {{every: 10, keep: 1}}
evaluation: {{digit_accuracy: false}}
log: {{every: 10, tensorboard: false}}
loader: {{workers: 0, val_items: 16}}
""")
    res = _limited([sys.executable, "-m", "nas", "train", "recipe.yaml", "--out", "out", "--threads", "1"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"done: {steps} steps" in res.stdout


def test_two_processes_resumed_on_one_continue_the_one_process_run(tmp_path):
    """Elastic resume: 2 CPU processes (torchrun) train to step 15, mid-phase; 1 process resumes. Every step sees
    the same global batch and learning rate as an uninterrupted 1-process run, so the loss curves agree (to float
    rounding: the gradient is averaged across processes in another order)."""
    import csv

    convert_cache(digits_cache(), tmp_path / "digits_shards", shard_bytes=64 << 10)
    path = _write(tmp_path, PHASED.replace("data: digits", "data: digits_shards"))
    Trainer(load_recipe(path), tmp_path / "ref", log=lambda m: None).run()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29637",
           "-m", "nas", "train", str(path), "--out", str(tmp_path / "out"), "--threads", "1", "--stop-after", "15"]
    res = subprocess.run(two, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch 16 = 2 x 1 x 8" in res.stdout
    lines: list[str] = []
    Trainer(load_recipe(path), tmp_path / "out", log=lines.append).run(resume=True)  # here: one process
    assert "resumed at step 15 (phase b)" in lines

    def rows(out: Path) -> list[dict[str, str]]:
        with open(out / "loss.csv", newline="") as fh:
            return list(csv.DictReader(fh))

    got, ref = rows(tmp_path / "out"), rows(tmp_path / "ref")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [str(i) for i in range(1, 31)]
    assert [float(r["lr"]) for r in got] == [float(r["lr"]) for r in ref]
    assert np.allclose([float(r["loss"]) for r in got], [float(r["loss"]) for r in ref], rtol=1e-4, atol=1e-6)


def test_train_refuses_a_changed_shard_with_one_error_naming_it(tmp_path):
    from typer.testing import CliRunner

    from nas.cli import app

    convert_cache(digits_cache(), tmp_path / "digits_shards", shard_bytes=64 << 10)
    victim = sorted((tmp_path / "digits_shards").glob("train-*.npy"))[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    path = _write(tmp_path, PHASED.replace("data: digits", "data: digits_shards\nloader: {workers: 1}"))
    res = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"{victim.name}: changed since the index was written" in res.output
    assert "Traceback" not in res.output and len([ln for ln in res.output.splitlines() if "error" in ln]) == 1
