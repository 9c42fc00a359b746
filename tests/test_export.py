"""``unet-nas export``: a search trial's arch as a diffusers folder with inherited weights that reloads bit-exactly,
drops into a StableDiffusionPipeline, and comes with a train.yaml that validates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel
from typer.testing import CliRunner

from nas.cli import app
from nas.train import Trainer, load_recipe, make_noise_scheduler
from proxies.data import HashTextEncoder, digit_caption
from proxies.quality.sampling import generate
from search_spaces import FlexibleUNet2DConditionModel, UNetArch, get_arch
from search_spaces.inherit import inherit_weights
from tests.test_pipeline import _tokenizer

runner = CliRunner()

SEARCH = """name: pick
seed: 0
space: digits
objectives:
  - {name: params, kind: params}
  - {name: macs, kind: macs, batch: 2}
strategy: {name: random}
budget: {trials: 3}
data: digits
references: [digits]
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A three-trial search of the digits space, a digits teacher on disk, and trial 1 exported from the run."""
    root = tmp_path_factory.mktemp("export")
    (root / "pick.yaml").write_text(SEARCH)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = runner.invoke(app, ["search", "pick.yaml"])
        assert res.exit_code == 0, res.output
    finally:
        os.chdir(cwd)
    torch.manual_seed(5)
    teacher = FlexibleUNet2DConditionModel.from_arch(get_arch("digits"))
    teacher.save_pretrained(root / "teacher")
    out = root / "student"
    res = runner.invoke(app, ["export", str(root / "runs" / "pick"), "--trial", "1", "--teacher",
                              str(root / "teacher"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return root, out, teacher


def test_export_takes_the_trials_arch_and_inherits(exported):
    import optuna

    root, out, teacher = exported
    study = optuna.load_study(study_name="pick", storage=f"sqlite:///{root / 'runs' / 'pick' / 'study.db'}")
    trial_arch = UNetArch.from_dict(study.trials[1].user_attrs["arch"])
    model = FlexibleUNet2DConditionModel.from_pretrained(out)
    assert model.arch == trial_arch
    info = json.loads((out / "inheritance.json").read_text())
    assert info["source"] == {"run": str(root / "runs" / "pick"), "trial": 1}
    assert info["inherited_params"] > 0 and info["inherited_params"] + info["new_params"] == info["params"]
    assert {m["status"] for m in info["modules"]} <= {"inherited", "partial", "new"}
    # bit-exact: the same construction in memory gives the same tensors as the reloaded folder
    torch.manual_seed(0)
    expected = FlexibleUNet2DConditionModel.from_arch(trial_arch)
    inherit_weights(expected, teacher)
    a, b = expected.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, text = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.randn(2, 8, 16)
    assert torch.equal(expected.eval()(x, t, text).sample, model.eval()(x, t, text).sample)


def test_export_writes_a_train_yaml_that_validates(exported):
    root, out, _ = exported
    recipe = load_recipe(out / "train.yaml")
    assert recipe.model.pretrained == "." and recipe.data == "digits"
    assert Path(recipe.teacher.path) == (root / "teacher").resolve()
    assert all(p.distill for p in recipe.phases)
    trainer = Trainer(recipe, root / "train_out").check()  # loads the exported model, the teacher and the data
    assert trainer.model.arch == FlexibleUNet2DConditionModel.from_pretrained(out).arch


def test_the_exported_train_yaml_pins_its_teacher(exported, tmp_path):
    """train.yaml holds the teacher's sha256; a teacher changed since export (as re-running the search re-trains
    it in place) is refused with one clear error instead of silently distilling from another model."""
    import shutil

    import yaml

    from nas.export import teacher_digest

    root, out, _ = exported
    recipe = yaml.safe_load((out / "train.yaml").read_text())
    assert recipe["teacher"]["sha256"] == teacher_digest(root / "teacher")
    teacher = tmp_path / "teacher"
    shutil.copytree(root / "teacher", teacher)
    student = tmp_path / "student"
    shutil.copytree(out, student)
    recipe["teacher"]["path"] = str(teacher)
    (student / "train.yaml").write_text(yaml.safe_dump(recipe))
    assert Trainer(load_recipe(student / "train.yaml"), tmp_path / "ok").check().teacher is not None
    torch.manual_seed(6)
    FlexibleUNet2DConditionModel.from_arch(get_arch("digits")).save_pretrained(teacher)  # re-trained in place
    res = runner.invoke(app, ["train", str(student / "train.yaml"), "--out", str(tmp_path / "refused")])
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "teacher.sha256" in message and "changed since this student was exported" in message
    assert not (tmp_path / "refused").exists()


def test_export_errors(exported, tmp_path):
    root, out, _ = exported
    res = runner.invoke(app, ["export", str(root / "runs" / "pick"), "--trial", "99", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no trial 99" in res.output
    res = runner.invoke(app, ["export", str(root / "runs" / "pick"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--trial" in res.output
    res = runner.invoke(app, ["export", "--arch", "digits", "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(app, ["export", "--arch", "digits", "--teacher", str(tmp_path), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "no config.json" in res.output
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))
    res = runner.invoke(app, ["export", "--arch", "digits", "--teacher", str(root / "teacher"), "--new-modules",
                              "zero", "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "--new-modules: must be one of fresh, identity" in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "z").exists()


def test_export_can_start_new_modules_as_the_identity(exported, tmp_path):
    """--new-modules identity: an attention the teacher lacks starts as the identity, so the exported student
    computes what the teacher computes."""
    root, _, teacher = exported
    data = get_arch("digits").to_dict()
    data["up"][0].update(attentions=1, heads=2)  # the teacher has none there
    (tmp_path / "arch.yaml").write_text(UNetArch.from_dict(data).to_yaml())
    res = runner.invoke(app, ["export", "--arch", str(tmp_path / "arch.yaml"), "--teacher", str(root / "teacher"),
                              "--new-modules", "identity", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "s" / "inheritance.json").read_text())
    assert info["new_modules"] == "identity" and info["new_params"] > 0
    model = FlexibleUNet2DConditionModel.from_pretrained(tmp_path / "s").eval()
    x, t, text = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, teacher.eval()(x, t, text).sample)


def test_exported_model_runs_in_a_stable_diffusion_pipeline(exported):
    """The folder loads into diffusers' StableDiffusionPipeline (tiny local CLIP and a 1-channel VAE); with the
    digits' own text embeddings and the training schedule's trailing DDIM it gives exactly the latents of
    ``proxies.quality.sampling.generate``, which the digit accuracy is measured on."""
    _, out, _ = exported
    unet = FlexibleUNet2DConditionModel.from_pretrained(out).eval()
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    train_scheduler = make_noise_scheduler(load_recipe(out / "train.yaml"))
    scheduler = DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a handwritten digit three", num_inference_steps=3, guidance_scale=3.0, height=8, width=8,
                 output_type="np").images
    assert image.shape == (1, 8, 8, 1)

    encoder = HashTextEncoder(16, 8)
    text = encoder([digit_caption(3), digit_caption(7)])
    uncond = encoder([""])
    latents = pipe(prompt_embeds=text, negative_prompt_embeds=uncond.expand(2, -1, -1), num_inference_steps=5,
                   guidance_scale=3.0, guidance_rescale=0.7, height=8, width=8, output_type="latent",
                   generator=torch.Generator().manual_seed(4)).images
    ours = generate(unet, text, uncond, train_scheduler, (1, 8, 8), steps=5, guidance=3.0, guidance_rescale=0.7,
                    generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(latents, ours, rtol=1e-5, atol=1e-5)


def test_exported_train_yaml_distills_from_the_teacher(exported):
    """Three steps of the exported recipe: BK-SDM distillation runs (output + feature KD beside the task loss)."""
    root, out, _ = exported
    trainer = Trainer(load_recipe(out / "train.yaml"), root / "distill_out", log=lambda m: None, stop_after=3)
    assert trainer.run() is None
    assert len(trainer.history) == 3
    for row in trainer.history:
        assert row["kd_loss"] > 0 and row["loss"] == pytest.approx(row["task_loss"] + row["kd_loss"])
    assert (root / "distill_out" / "checkpoints" / "step-00000003" / "state.json").is_file()
