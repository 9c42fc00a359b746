"""``unet-nas export --pipeline``: a complete diffusers pipeline folder (the teacher's VAE, text encoder and
tokenizer, the recipe's scheduler, the FlexibleUNet) that ``DiffusionPipeline.from_pretrained`` and
``StableDiffusionPipeline.from_pretrained`` load with no more than UNet-NAS installed, and that round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from typer.testing import CliRunner

from nas.cli import app
from search_spaces import FlexibleUNet2DConditionModel
from tests.test_pipeline import _parts

runner = CliRunner()


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    """A tiny Stable Diffusion folder (diffusers UNet2DConditionModel, CLIP text encoder, VAE, tokenizer)."""
    root = tmp_path_factory.mktemp("sd") / "teacher"
    tokenizer, text_encoder, vae, scheduler = _parts(cross_dim=32)
    torch.manual_seed(2)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def exported(sd_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    res = runner.invoke(app, ["export", "--arch", "tiny", "--teacher", str(sd_teacher), "--teacher-subfolder", "unet",
                              "--recipe", "experiments/train_decidiffusion_v1.yaml", "--out", str(out / "student"),
                              "--pipeline", str(out / "pipe")])
    assert res.exit_code == 0, res.output
    return out


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a handwritten digit seven", num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.7,
                height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_exported_pipeline_loads_and_gives_the_same_images(exported, tmp_path):
    index = json.loads((exported / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["search_spaces.flexible_unet", "FlexibleUNet2DConditionModel"]
    pipe = DiffusionPipeline.from_pretrained(exported / "pipe", local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.unet, FlexibleUNet2DConditionModel)
    s = pipe.scheduler
    assert isinstance(s, DDIMScheduler) and s.config.timestep_spacing == "trailing"
    assert s.config.prediction_type == "v_prediction" and s.config.rescale_betas_zero_snr
    assert json.loads((exported / "pipe" / "sampling.json").read_text())["guidance_rescale"] == 0.7

    # "the same images as before saving": the pipeline built in memory from the exported parts
    unet = FlexibleUNet2DConditionModel.from_pretrained(exported / "student").eval()
    from nas.pipeline import build_pipeline, load_parts

    before = _images(build_pipeline(unet, load_parts(exported / "pipe")))
    after = _images(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() == 0
    sd = StableDiffusionPipeline.from_pretrained(exported / "pipe", local_files_only=True)
    assert np.abs(_images(sd) - after).max() == 0

    pipe.save_pretrained(tmp_path / "again")  # round-trip
    again = DiffusionPipeline.from_pretrained(tmp_path / "again", local_files_only=True)
    assert np.abs(_images(again) - after).max() == 0


def test_pipeline_export_refusals(sd_teacher, tmp_path):
    res = runner.invoke(app, ["export", "--arch", "tiny", "--out", str(tmp_path / "a"), "--pipeline",
                              str(tmp_path / "p")])
    assert res.exit_code == 2 and "--pipeline-from" in res.output and not (tmp_path / "a").exists()
    res = runner.invoke(app, ["export", "--arch", "tiny", "--out", str(tmp_path / "a"), "--pipeline",
                              str(tmp_path / "p"), "--pipeline-from", str(tmp_path)])
    assert res.exit_code == 2 and "not a Stable Diffusion folder" in res.output
    # the digits arch (1 latent channel, 16-wide text) cannot use this teacher's VAE and CLIP
    res = runner.invoke(app, ["export", "--arch", "digits", "--out", str(tmp_path / "d"), "--pipeline",
                              str(tmp_path / "p"), "--pipeline-from", str(sd_teacher)])
    assert res.exit_code == 2 and "VAE's latents have 4 channels" in res.output, res.output
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()
    assert not list(tmp_path.glob(".*"))


def test_train_ends_by_writing_the_pipeline(exported, sd_teacher, tmp_path):
    """A recipe with ``pipeline_from`` (the exported train.yaml has it) writes ``<output>/pipeline`` at its end."""
    from nas.train import Trainer, load_recipe
    from proxies.data import LatentCache

    g = torch.Generator().manual_seed(0)
    n = 8
    cache = LatentCache(torch.randn(n, 4, 16, 16, generator=g), torch.full((n, 4, 16, 16), 0.1),
                        torch.randn(n, 16, 32, generator=g), [f"caption {i}" for i in range(n)],
                        {"source": "test", "resolution": 32, "splits": {"train": 6, "val": 2}},
                        uncond=torch.zeros(1, 16, 32))
    cache.save(tmp_path / "cache")
    recipe = load_recipe(exported / "student" / "train.yaml", overrides={
        "data": str(tmp_path / "cache"), "teacher": None, "evaluation": {"digit_accuracy": False},
        "mixed_precision": "no", "gradient_checkpointing": False,  # accelerate keeps one state per process
        "phases": [{"name": "a", "steps": 2, "resolution": 32, "batch": 2, "lr": 1e-4}],
        "checkpoint": {"every": 2}, "validation": {"every": 0, "num_images": 1, "steps": 2}})
    assert recipe.pipeline_from == str(sd_teacher.resolve())
    trainer = Trainer(recipe, tmp_path / "run", log=lambda m: None)
    assert trainer.run() is not None
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", local_files_only=True)
    trained = FlexibleUNet2DConditionModel.from_pretrained(tmp_path / "run" / "model")
    a, b = trained.state_dict(), pipe.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_loads_in_a_fresh_interpreter(exported, tmp_path):
    """After ``import search_spaces.flexible_unet`` diffusers loads the folder; without it diffusers refuses to
    import the module the folder names, and says to import it (its rule: a folder must not choose code to run)."""
    import subprocess
    import sys

    code = ("import sys\n{}from diffusers import DiffusionPipeline\n"
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
            "print(type(p).__name__, type(p.unet).__name__)")
    first = "import search_spaces.flexible_unet\n"
    res = subprocess.run([sys.executable, "-c", code.format(first), str(exported / "pipe")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["StableDiffusionPipeline", "FlexibleUNet2DConditionModel"]
    res = subprocess.run([sys.executable, "-c", code.format(""), str(exported / "pipe")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert res.returncode != 0 and "import search_spaces.flexible_unet" in res.stderr
