"""``unet-nas evaluate``: FID behaves as a distance, the digits evaluation is deterministic and resumable and
writes its JSON, plots and grids, pipelines are scored with a local TorchScript feature network and a local CLIP,
and bad input is one clear error with exit code 2."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nas.cli import app
from proxies.data import digits_cache
from proxies.quality.fid import DigitsFeatures, TorchScriptFeatures, frechet_distance
from search_spaces import FlexibleUNet2DConditionModel, UNetArch, get_arch

runner = CliRunner()

# two small digits models (1 channel, 16-wide text): fast to sample on one thread
SMALL = {**get_arch("digits").to_dict(), "name": "small",
         "down": [{"channels": 16, "resnets": 1, "attentions": 1, "heads": 2, "downsample": True},
                  {"channels": 16, "resnets": 1, "attentions": 0, "downsample": False}],
         "mid": None,
         "up": [{"channels": 16, "resnets": 2, "attentions": 0, "upsample": True},
                {"channels": 16, "resnets": 2, "attentions": 1, "heads": 2, "upsample": False}]}


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        FlexibleUNet2DConditionModel.from_arch(UNetArch.from_dict(SMALL)).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def classifier():
    train = digits_cache().split("train")
    return DigitsFeatures.fit(train.mean, train.labels, steps=100)


def test_fid_of_a_set_with_itself_is_zero_and_rises_with_noise(classifier):
    images = digits_cache().mean[:400]
    with torch.no_grad():
        real = classifier(images)
        assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(images.shape, generator=g)
        fids = [frechet_distance(real, classifier(images + s * noise)) for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    assert fids[0] > 1e-3


class _TinyNet(nn.Module):
    """A stand-in for the TorchScript Inception: same call convention (0-255 floats, return_features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.tanh(self.conv(x / 128 - 1)).mean(dim=(2, 3)) if return_features else x.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def torchscript_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.pt"
    torch.jit.script(_TinyNet()).save(str(path))
    return path


def test_torchscript_features_load_and_fid_rises_with_noise(torchscript_net):
    net = TorchScriptFeatures(torchscript_net, size=64)
    assert net.num_features == 8
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    real = net(images)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(images.shape, generator=g)
    fids = [frechet_distance(real, net((images.float() + s * noise).clamp(0, 255).to(torch.uint8)))
            for s in (10, 40, 120)]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


def _evaluate(models: Path, out: Path, *extra: str):
    return runner.invoke(app, [
        "evaluate", f"student={models / 'student'}", "--teacher", f"teacher={models / 'teacher'}", "--out", str(out),
        "--steps", "1,2,3,4", "--images-per-class", "2", "--bootstrap", "10", "--timing-repeats", "1",
        "--batch-size", "10", *extra])


def _quality(result: dict, sampler: str) -> dict:
    """The deterministic part of the JSON for one sampler: everything but the timings and the date."""
    out = {}
    for name, by_sampler in result["results"].items():
        for r in by_sampler[sampler]:
            out[(name, r["steps"])] = {k: v for k, v in r.items() if k != "seconds_per_image"}
    for h in result["headline"]:
        if h["sampler"] == sampler:
            out[("headline", h["student"])] = (h["matching_steps"], h["teacher_fid"],
                                               [(s["steps"], s["fid"], s["matches"]) for s in h["sweep"]])
    return out


def test_digits_evaluation_writes_json_plots_grids_deterministically(digits_models, tmp_path):
    res = _evaluate(digits_models, tmp_path / "a", "--sampler", "ddim,dpmpp")
    assert res.exit_code == 0, res.output
    out = tmp_path / "a"
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "quality_vs_steps.png").stat().st_size > 1000 and (out / "quality_vs_seconds.png").is_file()
    for model in ("teacher", "student"):
        for sampler in ("ddim", "dpmpp"):
            for steps in (1, 2, 3, 4):
                assert (out / "grids" / model / f"{sampler}-{steps:03d}.png").is_file()
    rows = result["results"]["student"]["ddim"]
    assert [r["steps"] for r in rows] == [1, 2, 3, 4] and result["images_per_setting"] == 20
    for r in rows:
        assert r["fid"] > 0 and r["fid_interval"][0] <= r["fid_interval"][1]
        assert 0 <= r["digit_accuracy"] <= 1 and r["relative_fid"] >= 0
        s = r["seconds_per_image"]
        assert 0 < s["unet_min"] <= s["pipeline_min"]
    teacher_ref = next(r for r in result["results"]["teacher"]["ddim"] if r["steps"] == 4)
    assert teacher_ref["relative_fid"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
    heads = {(h["student"], h["sampler"]) for h in result["headline"]}
    assert heads == {("student", "ddim"), ("student", "dpmpp")}
    for h in result["headline"]:
        assert h["teacher_steps"] == 4 and len(h["sweep"]) == 4
        expected = next((s["steps"] for s in h["sweep"] if s["fid"] <= 1.1 * h["teacher_fid"]), None)
        assert h["matching_steps"] == expected

    # resumable: the same folder reuses every image, and the numbers do not move
    again = _evaluate(digits_models, tmp_path / "a", "--sampler", "ddim,dpmpp")
    assert again.exit_code == 0 and "0 batches generated" in again.output, again.output
    for sampler in ("ddim", "dpmpp"):
        assert _quality(json.loads((out / "evaluation.json").read_text()), sampler) == _quality(result, sampler)
    # deterministic: a fresh folder generates everything again and gets the same numbers
    fresh = _evaluate(digits_models, tmp_path / "b", "--sampler", "ddim")
    assert fresh.exit_code == 0, fresh.output
    assert _quality(json.loads((tmp_path / "b" / "evaluation.json").read_text()), "ddim") == _quality(result, "ddim")
    # other settings in the same folder are refused, not mixed
    other = _evaluate(digits_models, tmp_path / "a", "--sampler", "ddim", "--seed", "3")
    assert other.exit_code == 2 and "other settings (seed)" in other.output


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "\n\n", "empty.txt:1: --prompts: the prompt file holds no prompts"),
    ("bad.jsonl", '{"text": "a cat"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    ("nocap.jsonl", '{"text": "a cat"}\n{"image": "x.png"}\n', "nocap.jsonl:2: no caption"),
    ("noimg.jsonl", '{"text": "a cat", "image": "missing.png"}\n', "noimg.jsonl:1: image missing.png not found"),
    ("coco.json", '{"annotations": [{"image_id": 1}]}', "annotations[0]: an annotation needs a non-empty caption"),
])
def test_bad_prompt_files(digits_models, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    res = _evaluate(digits_models, tmp_path / "out", "--prompts", str(tmp_path / name))
    assert res.exit_code == 2, res.output
    assert len(_lines(res)) == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_missing_inception_and_mismatched_models(digits_models, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "p.txt"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and len(_lines(res)) == 1 and "--inception" in res.output, res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "p.txt"),
                              "--inception", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Inception weights not found" in res.output
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "p.txt"),
                              "--inception", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a TorchScript network" in res.output
    # a 4-channel, 32-wide-text U-Net beside a digits teacher
    FlexibleUNet2DConditionModel.from_arch(get_arch("tiny")).save_pretrained(tmp_path / "tiny")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "tiny"), "--teacher", str(digits_models / "teacher"),
                              "--out", str(tmp_path / "o"), "--steps", "1"])
    assert res.exit_code == 2 and len(_lines(res)) == 1 and "does not fit the built-in digits" in res.output
    res = _evaluate(digits_models, tmp_path / "o", "--teacher-steps", "7")
    assert res.exit_code == 2 and "--teacher-steps" in res.output
    res = _evaluate(digits_models, tmp_path / "o", "--sampler", "euler")
    assert res.exit_code == 2 and "unknown sampler" in res.output


# ---- pipelines: Inception-style features from a local TorchScript file, CLIP score from a local CLIP -------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.test_pipeline import _tokenizer

    path = tmp_path_factory.mktemp("clip")
    tok = _tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=8))
    model.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path


def test_pipeline_evaluation_with_torchscript_features_and_clip(torchscript_net, clip_dir, tmp_path):
    from PIL import Image

    from tests.test_pipeline import _parts, _pipe

    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        _pipe(FlexibleUNet2DConditionModel.from_arch(get_arch("tiny")).eval(), _parts(32)).save_pretrained(
            tmp_path / name)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"caption": f"a photo number {i}", "file_name": f"{i}.png"}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                              "--prompts", str(tmp_path / "prompts.jsonl"), "--inception", str(torchscript_net),
                              "--clip", str(clip_dir), "--steps", "1,2", "--bootstrap", "10", "--timing-repeats", "1",
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert result["backend"] == "pipeline" and result["text_score"] == "clip_score"
    for r in result["results"]["student"]["ddim"]:
        assert r["fid"] >= 0 and r["relative_fid"] >= 0 and r["clip_score"] >= 0
    assert (tmp_path / "out" / "grids" / "student" / "ddim-002.png").is_file()
    assert len(result["headline"]) == 1
