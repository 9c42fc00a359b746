"""Checkpoint loading (search_spaces.checkpoints): safetensors by default, pickle refused unless allowed and then
weights-only, strict fitting with one error and no partial load, atomic writers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nas.cli import app
from search_spaces import FlexibleUNet2DConditionModel, get_arch
from search_spaces.checkpoints import (
    CheckpointError,
    load_into,
    load_pretrained,
    load_state_dict,
    load_unet,
    save_pretrained,
    save_state_dict,
)

runner = CliRunner()


class Payload:
    """What a malicious checkpoint carries: unpickling it runs code (here: it writes ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def _payload_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A checkpoint that looks like a state dict and carries the payload beside real tensors."""
    obj = {"conv_in.weight": torch.zeros(2, 2), "extra": Payload(marker)}
    if legacy:  # a plain pickle, as older tools write it
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    else:
        torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def small() -> FlexibleUNet2DConditionModel:
    torch.manual_seed(0)
    return FlexibleUNet2DConditionModel.from_arch(get_arch("digits")).eval()


# ---- must show: a payload never runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,legacy", [(".pt", False), (".bin", False), (".ckpt", True)])
def test_a_pickle_with_a_payload_is_refused_and_even_with_allow_pickle_the_payload_does_not_run(tmp_path, suffix,
                                                                                              legacy):
    marker = tmp_path / "pwned.txt"
    ckpt = _payload_checkpoint(tmp_path / f"model{suffix}", marker, legacy)

    with pytest.raises(CheckpointError, match=r"is a pickle, which can run code.*--allow-pickle"):
        load_state_dict(ckpt)
    assert not marker.exists()

    with pytest.raises(CheckpointError, match=r"torch.load\(weights_only=True\) refused it"):
        load_state_dict(ckpt, allow_pickle=True)
    assert not marker.exists()

    # the control: the payload is live, an ordinary unpickling runs it
    torch.load(ckpt, weights_only=False) if not legacy else pickle.loads(ckpt.read_bytes())
    assert marker.read_text() == "the payload ran"


TEACHER_EXP = """name: pickled_teacher
space: digits
data: digits
teacher: {path: teacher}
objectives:
  - {name: quality, kind: quality, proxy: distill, options: {steps: 0}}
  - {name: params, kind: params}
budget: {trials: 2}
"""


def test_cli_search_refuses_a_pickle_teacher_and_allow_pickle_still_does_not_run_its_payload(tmp_path, monkeypatch,
                                                                                             small):
    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    small.save_config(teacher)
    marker = tmp_path / "pwned.txt"
    _payload_checkpoint(teacher / "diffusion_pytorch_model.bin", marker)
    exp = tmp_path / "exp.yaml"
    exp.write_text(TEACHER_EXP)

    res = runner.invoke(app, ["search", str(exp)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "diffusion_pytorch_model.bin) is a pickle" in lines[0] and "--allow-pickle" in lines[0]
    assert not marker.exists()

    res = runner.invoke(app, ["search", str(exp), "--resume", "--allow-pickle"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "weights_only=True) refused it" in lines[0], lines
    assert not marker.exists()


def test_data_precompute_refuses_a_pickle_vae(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, latent_channels=4)
    folder = tmp_path / "vae"
    vae.save_pretrained(folder, safe_serialization=False)  # diffusion_pytorch_model.bin, as old checkpoints ship
    assert [p.name for p in folder.iterdir() if p.suffix != ".json"] == ["diffusion_pytorch_model.bin"]
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    (images / "a.txt").write_text("a picture")
    args = ["data", "precompute", str(images), "--vae", str(folder), "--text-encoder", str(tmp_path / "clip"),
            "--out", str(tmp_path / "cache")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "cannot load the vae" in res.output and "is a pickle" in res.output, res.output
    # allowed, the (clean) pickle loads and the run stops at the next missing piece, the text encoder
    res = runner.invoke(app, [*args, "--allow-pickle"])
    assert res.exit_code == 2 and "cannot load the text_encoder" in res.output, res.output
    assert not (tmp_path / "cache").exists()


# ---- single files ------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_and_pickle_allowed_loads_plain_tensors(tmp_path, small):
    state = small.state_dict()
    path = save_state_dict(state, tmp_path / "w.safetensors")
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.ckpt")  # Lightning-style wrapper
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(tmp_path / "w.ckpt")
    assert load_state_dict(tmp_path / "w.ckpt", allow_pickle=True).keys() == state.keys()
    with pytest.raises(ValueError, match="safetensors"):
        save_state_dict(state, tmp_path / "w.bin")
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(tmp_path / "torn.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict(tmp_path / "none.safetensors")


# ---- fitting: one error, no partial load ---------------------------------------------------------------------


def _broken(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() + 1 for k, v in state.items()}
    names = sorted(out)
    del out[names[0]]                                   # missing
    out["extra.weight"] = torch.zeros(3)                # unexpected
    out[names[1]] = torch.zeros(7, 7)                   # wrong shape
    return out


def test_load_into_lists_every_problem_in_one_error_and_leaves_the_model_untouched(small):
    before = {k: v.clone() for k, v in small.state_dict().items()}
    names = sorted(before)
    with pytest.raises(CheckpointError) as err:
        load_into(small, _broken(before))
    message = str(err.value)
    assert f"1 missing ({names[0]})" in message and "1 unexpected (extra.weight)" in message
    assert f"1 of the wrong shape ({names[1]}: checkpoint [7, 7], model {list(before[names[1]].shape)})" in message
    assert all(torch.equal(small.state_dict()[k], before[k]) for k in before)  # nothing was copied

    # inheritance asks for a partial load: what fits is copied, the rest is listed and keeps its values
    model = FlexibleUNet2DConditionModel.from_arch(get_arch("digits"))
    model.load_state_dict(before)
    result = load_into(model, _broken(before), strict=False)
    assert (result.missing, result.unexpected, [m[0] for m in result.mismatched]) == (
        [names[0]], ["extra.weight"], [names[1]])
    after = model.state_dict()
    assert torch.equal(after[names[0]], before[names[0]]) and torch.equal(after[names[1]], before[names[1]])
    assert torch.equal(after[names[2]], before[names[2]] + 1)


def test_model_folders_load_strictly_safetensors_first_pickle_only_when_allowed(tmp_path, small):
    def same(model: torch.nn.Module) -> bool:
        state = model.state_dict()
        return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)

    folder = save_pretrained(small, tmp_path / "unet")
    expected = small.state_dict()
    assert same(load_unet(folder))

    # the same weights as a pickle only: refused, then loaded (weights only) when allowed
    pickled = tmp_path / "pickled"
    small.save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin\) is a pickle"):
        load_unet(pickled)
    assert same(load_unet(pickled, allow_pickle=True))

    # weights that do not fit the config: one error listing them, instead of a partly random model
    from safetensors.torch import load_file, save_file

    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(_broken(load_file(weights)), weights)
    with pytest.raises(CheckpointError, match=r"do not fit the FlexibleUNet2DConditionModel config: 1 missing.*"
                                              r"1 unexpected.*1 of the wrong shape"):
        load_unet(folder)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_pretrained(FlexibleUNet2DConditionModel, tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(CheckpointError, match="_class_name"):
        load_unet(tmp_path / "other")


def test_an_sd_family_unet2d_folder_loads_as_an_exact_flexible_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2).eval()
    unet.save_pretrained(tmp_path / "sd" / "unet")
    flex = load_unet(tmp_path / "sd", subfolder="unet").eval()
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 3, 8)
    with torch.no_grad():
        assert torch.allclose(flex(x, t, text).sample, unet(x, t, text).sample, atol=1e-6)


def test_save_pretrained_replaces_a_folder_whole_or_not_at_all(tmp_path, small):
    folder = save_pretrained(small, tmp_path / "m")
    original = (folder / "diffusion_pytorch_model.safetensors").read_bytes()

    class Broken:
        def save_pretrained(self, path, **kwargs):
            (Path(path) / "config.json").write_text("{}")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(Broken(), folder)
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
