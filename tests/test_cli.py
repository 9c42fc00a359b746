"""The unet-nas command line: JSON outputs, tables, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nas.cli import app
from search_spaces import UNetArch

ROOT = Path(__file__).parents[1]
SPACE = ROOT / "search_spaces" / "spaces" / "tiny.yaml"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_describe_reference_json():
    res = run("arch", "describe", "sd15", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["params"] == 859_520_964
    assert round(data["macs"] / 1e9, 1) == 401.6
    res = run("arch", "describe", "decidiffusion_v1", "--json")
    assert json.loads(res.stdout)["params"] == 814_746_884


def test_describe_table_and_options():
    res = run("arch", "describe", "bk_tiny", "--batch", "2", "--resolution", "96", "--text-len", "10")
    assert res.exit_code == 0, res.output
    assert "323,384,964" in res.stdout and "96x96" in res.stdout
    one = json.loads(run("arch", "describe", "bk_tiny", "--json").stdout)["macs"]
    two = json.loads(run("arch", "describe", "bk_tiny", "--json", "--batch", "2").stdout)["macs"]
    assert two == 2 * one


def test_describe_accepts_the_three_file_formats(tmp_path):
    deci = run("arch", "describe", ROOT / "tests" / "data" / "decidiffusion_v1_flexible_unet_config.json", "--json")
    assert json.loads(deci.stdout)["params"] == 814_746_884
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}))
    assert json.loads(run("arch", "describe", cfg, "--json").stdout)["params"] == 859_520_964


def test_space_commands():
    show = json.loads(run("space", "show", SPACE, "--json").stdout)
    count = json.loads(run("space", "count", SPACE, "--json").stdout)
    assert show["cardinality"] == count["cardinality"] > 1000
    assert any(d["decision"] == "down[0].attentions" for d in show["decisions"])
    assert "archs" in run("space", "show", SPACE).stdout


def test_space_sample_json_feeds_arch_describe(tmp_path):
    res = run("space", "sample", SPACE, "-n", "3", "--seed", "4", "--json")
    assert res.exit_code == 0, res.output
    archs = json.loads(res.stdout)
    assert len(archs) == 3
    again = json.loads(run("space", "sample", SPACE, "-n", "3", "--seed", "4", "--json").stdout)
    assert archs == again
    for i, a in enumerate(archs):
        path = tmp_path / f"arch{i}.json"
        path.write_text(json.dumps(a))
        out = json.loads(run("arch", "describe", path, "--json").stdout)
        assert out["params"] <= 3_000_000  # the space's constraint
        assert UNetArch.from_dict(out["arch"]) == UNetArch.from_dict(a)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["arch", "describe", "sd99"], "unknown reference arch 'sd99'"),
        (["arch", "describe", "missing.yaml"], "missing.yaml: file not found"),
        (["space", "count", "nowhere.yaml"], "file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expect):
    res = run(*args)
    assert res.exit_code == 2
    assert expect in res.output and "Traceback" not in res.output


def test_bad_arch_file_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("down:\n  - {channels: 32, resnets: 1}\nup:\n  - {channels: 32, resnets: 2, upsample: maybe}\n")
    res = run("arch", "describe", bad)
    assert res.exit_code == 2
    assert f"{bad}:4: up[0].upsample: expected bool" in " ".join(res.output.split())


def test_console_script_and_module_entry_points():
    """Through a real process: `python -m nas` exits 2 on bad input with no traceback, 0 on good input."""
    bad = subprocess.run([sys.executable, "-m", "nas", "arch", "describe", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "error:" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "nas", "arch", "describe", "tiny", "--json"], capture_output=True,
                          text=True)
    assert good.returncode == 0 and json.loads(good.stdout)["params"] == 1_733_348
    usage = subprocess.run([sys.executable, "-m", "nas", "arch", "describe", "tiny", "--batch", "zero"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
