"""ONNX export, ONNX Runtime timing and timing import, end to end on the CPU with a tiny space.

The flow a user with a vendor toolchain follows: ``profile export`` -> time the files (here ``profile run-onnx
--provider cpu``) -> ``profile import`` -> predict held-out archs, compared with those archs' whole networks
exported (``unet-nas onnx``) and timed the same way. No test asserts an accuracy target (the machine is shared
and noisy; ``benchmarks/onnx_profile.py`` measures that); they check the numbers are of the right size.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from nas.cli import app
from proxies.latency.blocks import space_blocks
from proxies.latency.lut import LUTPredictor, block_sum
from proxies.latency.onnx_export import export_checked, export_network, ort_session
from proxies.latency.onnx_manifest import load_manifest, space_hash
from proxies.latency.onnx_runtime import time_files
from proxies.latency.profile import LatencyProfile, Protocol, Settings
from search_spaces.flexible_unet import FlexibleUNet2DConditionModel
from search_spaces.space import SearchSpace
from tests.conftest import MICRO_SPACE_YAML

SPACE_YAML = MICRO_SPACE_YAML
SHAPE = ["--batch", "1", "--resolution", "64", "--text-len", "8"]
SETTINGS = Settings(dtype="fp32", batch=1, resolution=64, text_len=8, threads=None)
TIMING = Protocol(statistic="min", warmup=2, min_repeats=5, max_repeats=10)  # robust to load spikes
runner = CliRunner()


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> dict[str, Path]:
    """Export (fp32, 4 calibration networks), time with run-onnx, import: all through the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    space = root / "micro.yaml"
    space.write_text(SPACE_YAML)
    export = root / "export"
    res = _run("profile", "export", "--space", space, "--out", export, "--dtype", "fp32", *SHAPE,
               "--calibration", 4, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["networks"] == 4 and summary["max_abs_diff_fp32_check"] < 1e-4
    res = _run("profile", "run-onnx", export, "--provider", "cpu", "--warmup", 1, "--min-repeats", 3,
               "--max-repeats", 6, "--json")
    assert res.exit_code == 0, res.output
    timings = export / "timings.csv"
    profile = root / "profile.yaml"
    res = _run("profile", "import", export, "--timings", timings, "--device-name", "test CPU", "--runtime",
               "onnxruntime cpu, 1 thread", "--out", profile, "--json")
    assert res.exit_code == 0, res.output
    return {"root": root, "space": space, "export": export, "timings": timings, "profile": profile}


def test_manifest_pins_every_block_of_the_space(flow):
    manifest = load_manifest(flow["export"])
    space = SearchSpace.from_yaml(flow["space"])
    assert {m.key for m in manifest.blocks} == set(space_blocks(space, SETTINGS.latent_size))
    assert manifest.space_sha256 == space_hash(space) and manifest.opset == 17
    data = json.loads((flow["export"] / "manifest.json").read_text())
    assert data["dtype"] == "fp32" and data["settings"]["resolution"] == 64
    for m in manifest.models:
        assert len(m.sha256) == 64 and m.max_abs_diff is not None and m.max_abs_diff < 1e-4
        model = onnx.load(str(manifest.path(m)))
        names = [i.name for i in model.graph.input]
        assert names == [i["name"] for i in m.inputs]
        dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
        assert dims == [i["shape"] for i in m.inputs]  # static shapes
    by_kind = {m.kind: m for m in manifest.models}
    assert [i["name"] for i in by_kind["attention"].inputs] == ["hidden_states", "encoder_hidden_states"]
    assert by_kind["time_embedding"].inputs == [{"name": "timestep", "shape": [1], "dtype": "int64"}]
    ups = [m for m in manifest.blocks if m.kind == "resnet" and len(m.inputs) == 3]
    assert ups and ups[0].inputs[2]["name"] == "res_hidden_states"
    assert [i["name"] for i in by_kind["network"].inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert all(m.arch is not None for m in manifest.networks)


def test_imported_profile_is_an_ordinary_lut_profile(flow):
    profile = LatencyProfile.load(flow["profile"])
    manifest = load_manifest(flow["export"])
    with open(flow["timings"]) as fh:
        rows = {r["key"]: float(r["ms"]) for r in csv.DictReader(fh)}
    assert set(rows) == {m.key for m in manifest.models}
    assert profile.settings.device == "external" and profile.settings.query() == SETTINGS.query()
    assert profile.complete and profile.environment["runtime"] == "onnxruntime cpu, 1 thread"
    assert profile.environment["manifest_sha256"] == manifest.sha256
    # the profile file keeps 6 decimals of a millisecond
    assert {k: t.ms for k, t in profile.blocks.items()} == pytest.approx(
        {m.key: rows[m.key] for m in manifest.blocks}, rel=1e-4, abs=1e-6)
    assert [c.timing.ms for c in profile.calibration] == pytest.approx([rows[m.key] for m in manifest.networks],
                                                                       rel=1e-4, abs=1e-6)
    corr = profile.correction
    assert corr is not None and corr.n == 4 and corr.scale > 0
    lut = LUTPredictor(profile, SETTINGS)
    arch = profile.calibration[0].arch
    assert lut.predict(arch) == pytest.approx(corr.scale * block_sum(profile, arch) + corr.offset_ms)
    arch_file = flow["root"] / "cal0.yaml"
    arch_file.write_text(arch.to_yaml())
    res = _run("predict", arch_file, "--profile", flow["profile"], "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["predicted_ms"] == pytest.approx(lut.predict(arch))
    res = _run("predict", arch_file, "--profile", flow["profile"], "--measure")
    assert res.exit_code == 2 and "external" in res.stderr and "Traceback" not in res.output


def test_predicts_held_out_whole_networks_timed_the_same_way(flow):
    profile = LatencyProfile.load(flow["profile"])
    space = SearchSpace.from_yaml(flow["space"])
    cal = {c.arch for c in profile.calibration}
    rng = random.Random(3)
    archs = []
    while len(archs) < 3:
        a = space.sample(rng)
        if a not in cal and a not in archs:
            archs.append(a)
    paths = []
    for i, arch in enumerate(archs):
        path = flow["root"] / f"held_out_{i}.onnx"
        if i == 0:  # through the deployment command
            arch_file = flow["root"] / "held_out_0.yaml"
            arch_file.write_text(arch.to_yaml())
            res = _run("onnx", arch_file, "--out", path, "--dtype", "fp32", *SHAPE, "--json")
            assert res.exit_code == 0, res.output
            assert json.loads(res.stdout)["max_abs_diff"] < 1e-4
        else:
            export_network(arch, SETTINGS, path)
        paths.append(path)
    # The calibration networks are timed again in the same interleaved group: on a shared machine the load
    # when the profile was taken is not the load now, and their ratio says by how much the machine drifted.
    manifest = load_manifest(flow["export"])
    cal_paths = [manifest.path(m) for m in manifest.networks]
    measured = [t.ms for t in time_files([*paths, *cal_paths], "cpu", 1, TIMING, group=len(paths) + len(cal_paths))]
    drift = float(np.median([now / c.timing.ms for now, c in zip(measured[len(paths):], profile.calibration,
                                                                   strict=True)]))
    lut = LUTPredictor(profile)
    for arch, ms in zip(archs, measured, strict=False):
        assert 1 / 3 < lut.predict(arch) * drift / ms < 3, (lut.predict(arch), ms, drift)


def _tamper_manifest(export: Path, tmp: Path) -> list[str]:
    m = export / "manifest.json"
    data = json.loads(m.read_text())
    data["models"][0]["key"] = data["models"][0]["key"].replace("heads2", "heads4")
    m.write_text(json.dumps(data, indent=2))
    return []


def _tamper_file(export: Path, tmp: Path) -> list[str]:
    f = next((export / "blocks").glob("*.onnx"))
    f.write_bytes(f.read_bytes() + b"\0")
    return []


def _csv_edit(edit):
    def apply(export: Path, tmp: Path) -> list[str]:
        rows = list(csv.reader((export / "timings.csv").read_text().splitlines()))
        edit(rows)
        out = tmp / "edited.csv"
        with open(out, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        return ["--timings", str(out)]
    return apply


def _changed_space(export: Path, tmp: Path) -> list[str]:
    out = tmp / "changed.yaml"
    out.write_text(SPACE_YAML.replace("transformer_layers: [1, 2]", "transformer_layers: [1, 3]"))
    return ["--space", str(out)]


def _set(row: int, col: int, value: str):
    def edit(rows: list[list[str]]) -> None:
        rows[row][col] = value
    return edit


@pytest.mark.parametrize("break_it, message", [
    (_tamper_manifest, "manifest was changed after export"),
    (_tamper_file, "changed after export (sha256"),
    (_csv_edit(lambda rows: rows.pop(3)), "have no timing"),
    (_csv_edit(_set(2, 1, "-0.5")), ":3: ms: must be a positive time"),
    (_csv_edit(_set(2, 1, "0")), ":3: ms: must be a positive time"),
    (_csv_edit(_set(4, 1, "fast")), ":5: ms: not a number: 'fast'"),
    (_csv_edit(_set(4, 1, "nan")), ":5: ms: must be finite"),
    (_csv_edit(_set(3, 2, "2.5")), ":4: repeats: must be a positive whole number"),
    (_csv_edit(_set(1, 0, "resnet 999+0>999 @1x1")), ":2: key: unknown key"),
    (_csv_edit(lambda rows: rows.append(list(rows[1]))), "appears twice"),
    (_csv_edit(lambda rows: rows[0].__setitem__(1, "median")), ":1: the header must name"),
    (_changed_space, "space no longer matches the export"),
    (lambda export, tmp: ["--statistic", "mean"], "--statistic: must be one of"),
], ids=["tampered-manifest", "tampered-file", "missing-key", "negative-time", "zero-time", "non-numeric-time",
        "nan-time", "fractional-repeats", "unknown-key", "duplicate-key", "bad-header", "changed-space",
        "bad-statistic"])
def test_import_refuses_bad_input_and_writes_nothing(flow, tmp_path, break_it, message):
    export = tmp_path / "export"
    shutil.copytree(flow["export"], export)
    extra = break_it(export, tmp_path)
    out = tmp_path / "profiles" / "imported.yaml"
    args = ["profile", "import", export, "--timings", export / "timings.csv", "--device-name", "x",
            "--runtime", "y", "--out", out, *extra]
    if "--timings" in extra:
        args = args[:3] + args[5:]
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and message in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() and not out.parent.exists()


def test_run_onnx_user_errors(flow, tmp_path):
    res = _run("profile", "run-onnx", tmp_path)
    assert res.exit_code == 2 and "no manifest.json" in res.stderr
    res = _run("profile", "run-onnx", flow["export"], "--provider", "tensorrt", "--out", tmp_path / "t.csv")
    assert res.exit_code == 2 and "TensorrtExecutionProvider" in res.stderr and not (tmp_path / "t.csv").exists()
    res = _run("profile", "run-onnx", flow["export"], "--provider", "tpu")
    assert res.exit_code == 2 and "--provider" in res.stderr
    res = _run("profile", "run-onnx", flow["export"], "--statistic", "mean", "--out", tmp_path / "t.csv")
    assert res.exit_code == 2 and "--statistic" in res.stderr and not (tmp_path / "t.csv").exists()


def test_onnx_exports_trained_weights_and_fp16(tmp_path):
    torch.manual_seed(5)
    model = FlexibleUNet2DConditionModel.from_arch("tiny").eval()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tiny.onnx"
    res = _run("onnx", "-", "--weights", tmp_path / "model", "--out", out, "--dtype", "fp32", *SHAPE, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["max_abs_diff"] < 1e-4
    gen = torch.Generator().manual_seed(9)
    x, text = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 8, 32, generator=gen)
    t = torch.tensor([321])
    got = ort_session(out).run(None, {"sample": x.numpy(), "timestep": t.numpy(),
                                      "encoder_hidden_states": text.numpy()})[0]
    with torch.no_grad():
        ref = model(x, t, text, return_dict=False)[0].numpy()
    assert np.abs(got - ref).max() < 1e-4  # the saved weights, not a fresh initialisation

    res = _run("onnx", "bk_tiny", "--weights", tmp_path / "model", "--out", tmp_path / "x.onnx", *SHAPE)
    assert res.exit_code == 2 and "another arch" in res.stderr and not (tmp_path / "x.onnx").exists()

    out16 = tmp_path / "tiny16.onnx"
    res = _run("onnx", "tiny", "--out", out16, *SHAPE, "--json")  # fp16 is the default
    assert res.exit_code == 0, res.output
    graph = onnx.load(str(out16)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    out = ort_session(out16).run(None, {"sample": x.numpy().astype(np.float16), "timestep": t.numpy(),
                                        "encoder_hidden_states": text.numpy().astype(np.float16)})[0]
    assert out.dtype == np.float16 and np.isfinite(out).all()


def test_dynamo_exporter_matches_pytorch_on_a_block(tmp_path):
    from proxies.latency.onnx_export import _export_module

    path = tmp_path / "micro.yaml"
    path.write_text(SPACE_YAML)
    blocks = space_blocks(SearchSpace.from_yaml(path), SETTINGS.latent_size)
    arch, block = next(v for k, v in sorted(blocks.items()) if k.startswith("attention") and "layers2" in k)
    names, _, diff = export_checked(lambda dt: _export_module(arch, block, SETTINGS, dt), tmp_path / "a.onnx",
                                    "fp32", exporter="dynamo")
    assert names == ["hidden_states", "encoder_hidden_states"] and diff is not None and diff < 1e-4
    assert onnx.load(str(tmp_path / "a.onnx")).opset_import[0].version >= 18
