"""Training recipe (issue: export and train): LAMB against the paper, the noise schedule, loss going down on the
digits, EMA only in its phase, exact resume after a kill, recipe errors with file:line:field, shipped recipes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nas.cli import app
from nas.train import Trainer, load_recipe, make_noise_scheduler
from nas.train.lamb import Lamb

ROOT = Path(__file__).parents[1]
runner = CliRunner()

# a 42k-parameter digits U-Net: 1-channel 8x8 "latents", 16-wide text, two levels
TINY_ARCH = """name: tiny_digits
sample_size: 8
in_channels: 1
out_channels: 1
cross_attention_dim: 16
norm_num_groups: 4
time_embedding_dim: 16
attention: {heads: 2, transformer_layers: 1}
down:
- {channels: 8, resnets: 1, attentions: 1, downsample: true}
- {channels: 16, resnets: 1, attentions: 0, downsample: false}
mid: {resnets: 1, attentions: 1, upsample: false}
up:
- {channels: 16, resnets: 2, attentions: 0, upsample: true}
- {channels: 8, resnets: 2, attentions: 1, upsample: false}
"""

# three phases: AdamW with gradient accumulation, LAMB with EMA, AdamW again
PHASED = """name: phased
seed: 1
model: {arch: arch.yaml}
data: digits
phases:
  - {name: a, steps: 10, resolution: 8, batch: 16, micro_batch: 8, optimizer: adamw, lr: 2.0e-3,
     lr_schedule: cosine, warmup_steps: 2}
  - {name: b, steps: 10, resolution: 8, batch: 16, optimizer: lamb, lr: 5.0e-3, ema: true, ema_decay: 0.9}
  - {name: c, steps: 10, resolution: 8, batch: 16, optimizer: adamw, lr: 1.0e-4}
checkpoint: {every: 5, keep: 10}
evaluation: {digit_accuracy: false}
log: {every: 1, tensorboard: false}
"""


def _write(folder: Path, recipe: str) -> Path:
    (folder / "arch.yaml").write_text(TINY_ARCH)
    path = folder / "recipe.yaml"
    path.write_text(recipe)
    return path


def _rows(out: Path) -> list[dict[str, str]]:
    """loss.csv without its wall-clock column (losses are written exactly: repr of the float)."""
    with open(out / "loss.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the phased recipe."""
    folder = tmp_path_factory.mktemp("ref")
    torch.set_num_threads(1)
    trainer = Trainer(load_recipe(_write(folder, PHASED)), folder / "out", log=lambda m: None)
    trainer.run()
    return trainer, folder / "out"


# ---- LAMB ---------------------------------------------------------------------------------------------------


def _lamb_reference(x: np.ndarray, grads: list[np.ndarray], lr: float, b1: float, b2: float, eps: float,
                    wd: float) -> np.ndarray:
    """You et al. 2019, Algorithm 2, written out in NumPy (float64), phi(z) = z."""
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        u = r + wd * x
        ratio = np.linalg.norm(x) / np.linalg.norm(u)
        x = x - lr * ratio * u
    return x


def test_lamb_follows_the_paper_update():
    rng = np.random.default_rng(0)
    x0 = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    grads = [[rng.standard_normal(a.shape) for _ in range(6)] for a in x0]
    params = [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in x0]
    opt = Lamb(params, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    for step in range(6):
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g[step], dtype=torch.float64)
        opt.step()
    for p, a, g in zip(params, x0, grads, strict=True):
        expected = _lamb_reference(a, g, 0.05, 0.9, 0.99, 1e-6, 0.1)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)  # state kept in fp32


def test_lamb_trust_ratio_is_one_for_zero_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lamb([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    # Adam's first step is sign(g) (up to eps); ratio 1 because ||x|| = 0
    np.testing.assert_allclose(p.detach().numpy(), [-0.1, 0.1, -0.1], rtol=1e-4)


# ---- the noise schedule ---------------------------------------------------------------------------------------


def test_noise_schedule_is_v_prediction_cosine_zero_terminal_snr(reference):
    trainer, _ = reference
    for scheduler in (make_noise_scheduler(load_recipe(ROOT / "experiments" / "train_digits.yaml")), trainer.noise):
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
        assert scheduler.config.rescale_betas_zero_snr is True
        assert float(scheduler.alphas_cumprod[-1]) == 0.0  # zero terminal SNR
        assert float(scheduler.alphas_cumprod[0]) > 0.99


# ---- training -------------------------------------------------------------------------------------------------


def test_loss_decreases_on_digits(tmp_path):
    recipe = """name: down
model: {arch: arch.yaml}
data: digits
snr_gamma: null
phases:
  - {name: a, steps: 200, resolution: 8, batch: 16, optimizer: adamw, lr: 3.0e-3}
checkpoint: {every: 1000}
evaluation: {digit_accuracy: false}
log: {every: 50, tensorboard: false}
"""
    trainer = Trainer(load_recipe(_write(tmp_path, recipe)), tmp_path / "out", log=lambda m: None)
    metrics = trainer.run()
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 200
    first, last = np.mean(losses[:25]), np.mean(losses[-25:])
    assert last < 0.75 * first, (first, last)
    assert metrics["steps"] == 200 and np.isfinite(metrics["val_loss"])
    assert (tmp_path / "out" / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_ema_runs_only_in_its_phase(reference):
    trainer, out = reference
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert {r["phase"]: set() for r in rows}.keys() == {"a", "b", "c"}
    for r in rows:
        assert r["ema"] == ("1" if r["phase"] == "b" else "0"), r
    assert trainer.ema.optimization_step == 10  # stepped in phase b only, never in a or c
    # the end of phase b hands its EMA weights on: the checkpoint at step 20 holds them as the model
    saved = load_file(out / "checkpoints" / "step-00000020" / "model.safetensors")
    model = trainer.accelerator.unwrap_model(trainer.model)
    names = [n for n, _ in model.named_parameters()]
    for name, shadow in zip(names, trainer.ema.shadow_params, strict=True):
        assert torch.equal(saved[name], shadow), name  # untouched by phase c
    # the learning rate follows each phase's own schedule: warm-up then cosine in a, constant in b and c
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(2e-3) and lrs[9] < 2e-3
    assert set(lrs[10:20]) == {5e-3} and set(lrs[20:]) == {1e-4}


def test_resume_at_a_phase_end_continues_exactly(reference, tmp_path):
    """Stopped right after the checkpoint that ends phase a (in-process), then resumed: same steps, same loss
    at every step, bit-identical final weights."""
    _, ref_out = reference
    path = _write(tmp_path, PHASED)
    assert Trainer(load_recipe(path), tmp_path / "out", log=lambda m: None, stop_after=10).run() is None
    resumed = Trainer(load_recipe(path), tmp_path / "out", log=lambda m: None)
    resumed.run(resume=True)
    assert _rows(tmp_path / "out") == _rows(ref_out)
    a = load_file(tmp_path / "out" / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(ref_out / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_continues_the_loss_curve(reference, tmp_path):
    """A real kill: SIGKILL the training process once a mid-phase checkpoint exists; --resume continues from
    that step and the loss curve matches the uninterrupted run step for step."""
    _, ref_out = reference
    path = _write(tmp_path, PHASED.replace("steps: 10, resolution: 8, batch: 16, optimizer: adamw, lr: 1.0e-4",
                                           "steps: 60, resolution: 8, batch: 16, optimizer: adamw, lr: 1.0e-4"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nas", "train", str(path), "--out", str(out), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-00000025" / "state.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    assert proc.poll() is None  # still training when killed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    newest = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert newest >= 25
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed at step {newest}" in res.stdout
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 81))  # no step lost, none twice
    # the first 30 steps are the reference run's (same recipe up to there), resumed part included
    assert rows[:30] == _rows(ref_out)
    assert not list((out / "checkpoints").glob(".tmp-*"))


# ---- recipe files and the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "line"),
    [
        (lambda t: t.replace("seed: 1", "seed: 1\nwarmup: 5"), "warmup", 3),
        (lambda t: t.replace("optimizer: lamb", "optimizer: sgd"), "phases[1].optimizer", 8),
        (lambda t: t.replace("lr: 1.0e-4", "lr: -1.0"), "phases[2].lr", 9),
        (lambda t: t.replace("micro_batch: 8", "micro_batch: 5"), "phases[0].micro_batch", 6),
        (lambda t: t.replace("evaluation: {digit_accuracy: false}", "evaluation: {digits: 3}"),
         "evaluation.digits", 11),
    ],
)
def test_bad_recipe_exits_2_with_file_line_field(tmp_path, change, field, line):
    path = _write(tmp_path, change(PHASED))
    res = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"{path}:{line}: {field}:" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()


def test_recipe_checks_against_the_data_before_training(tmp_path):
    path = _write(tmp_path, PHASED.replace("resolution: 8, batch: 16, optimizer: lamb", "resolution: 16, batch: 16, "
                                                                                       "optimizer: lamb"))
    res = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "phases[1].resolution" in res.output and "8 px" in res.output
    path = _write(tmp_path, PHASED.replace("phases:", "phases:\n  - {name: d, steps: 1, resolution: 8, batch: 4, "
                                                      "lr: 1.0e-3, distill: true}"))
    res = runner.invoke(app, ["train", str(path)])
    assert res.exit_code == 2 and "phases[0].distill: distill: true needs a teacher" in " ".join(res.output.split())


def test_resume_refusals(tmp_path, reference):
    path = _write(tmp_path, PHASED)
    res = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "none"), "--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.output
    _, ref_out = reference
    res = runner.invoke(app, ["train", str(path), "--out", str(ref_out)])
    assert res.exit_code == 2 and "already holds a run" in res.output


def test_resume_keeps_the_runs_threads(tmp_path):
    """Started with --threads 2 and stopped; --resume without --threads trains with 2 again (the resumed part of
    the issue's run used torch's default); an explicit --threads on a later resume wins and is kept."""
    path = _write(tmp_path, PHASED)
    out = tmp_path / "out"
    res = runner.invoke(app, ["train", str(path), "--out", str(out), "--threads", "2", "--stop-after", "5"])
    assert res.exit_code == 0, res.output
    torch.set_num_threads(1)  # what a new process would have before the resume decides
    res = runner.invoke(app, ["train", str(path), "--out", str(out), "--resume", "--stop-after", "10"])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 2 and "--threads 2: the run's own setting" in res.output
    res = runner.invoke(app, ["train", str(path), "--out", str(out), "--resume", "--threads", "1",
                              "--stop-after", "15"])
    assert res.exit_code == 0 and torch.get_num_threads() == 1
    assert json.loads((out / "run_settings.json").read_text()) == {"threads": 1}  # what the next --resume takes


def test_shipped_recipes_hold_the_published_phase_table():
    for name in ("train_decidiffusion_v1.yaml", "train_decidiffusion_v2.yaml", "train_digits.yaml"):
        res = runner.invoke(app, ["train", str(ROOT / "experiments" / name), "--check"])
        assert res.exit_code == 0, res.output
    for name in ("train_decidiffusion_v1.yaml", "train_decidiffusion_v2.yaml"):
        r = load_recipe(ROOT / "experiments" / name)
        p1, p2, p3, p4 = r.phases
        assert (p1.steps, p1.resolution, p1.optimizer, p1.lr, p1.batch) == (1_280_000, 256, "adamw", 1e-4, 8192)
        assert (p2.steps, p2.resolution, p2.optimizer, p2.lr, p2.batch) == (870_000, 512, "lamb", 5e-3, 6144)
        assert p3.steps == 65_000 and p3.ema and not (p1.ema or p2.ema or p4.ema)
        assert p4.optimizer == "lamb" and p3.optimizer == "lamb"
        assert r.noise.prediction_type == "v_prediction" and r.noise.rescale_betas_zero_snr
        assert r.noise.beta_schedule == "squaredcos_cap_v2" and r.snr_gamma is not None
    digits = load_recipe(ROOT / "experiments" / "train_digits.yaml")
    assert [p.optimizer for p in digits.phases] == ["adamw", "lamb", "lamb", "lamb"]
    assert [p.ema for p in digits.phases] == [False, False, True, False]
