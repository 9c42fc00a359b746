"""Every command takes every form the project writes: archs as names, YAML, config.json (FlexibleUNet with
diffusers' keys, diffusers UNet2DConditionModel), model and pipeline folders; spaces as shipped names, space files
and experiment files. And the command line starts without the heavy libraries and prints plain help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nas.cli import app
from proxies.cost import arch_costs
from search_spaces import ConfigError, FlexibleUNet2DConditionModel, get_arch, load_arch
from search_spaces.space import SearchSpace
from tests.conftest import MICRO_SPACE_YAML

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _params(*args: object) -> int:
    res = run("arch", "describe", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["params"]


# ---- archs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, int]:
    """A FlexibleUNet folder as export and teacher training write it (save_pretrained: config.json with
    _class_name and _diffusers_version, safetensors), and the digits arch's exact parameter count."""
    folder = tmp_path_factory.mktemp("models") / "student"
    torch.manual_seed(0)
    FlexibleUNet2DConditionModel.from_arch(get_arch("digits")).save_pretrained(folder)
    return folder, arch_costs(get_arch("digits")).params


def test_an_exported_flexible_unet_config_describes(saved):
    folder, params = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "FlexibleUNet2DConditionModel" and "_diffusers_version" in config
    assert _params(folder / "config.json") == params
    assert _params(folder) == params  # the model folder itself
    assert load_arch(folder) == load_arch(folder / "config.json") == get_arch("digits")


def test_a_pipeline_folder_describes_through_its_unet(saved, tmp_path):
    folder, params = saved
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for f in folder.iterdir():
        (pipeline / "unet" / f.name).write_bytes(f.read_bytes())
    assert _params(pipeline) == params
    assert load_arch(pipeline).name == "digits"


def test_a_diffusers_unet_folder_describes(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "cross_attention_dim": 768}))
    assert _params(tmp_path / "sd" / "unet") == _params(tmp_path / "sd") == 859_520_964


def test_other_commands_take_a_model_folder(saved):
    """predict reads archs through the same loader: a folder gets as far as the profile check."""
    folder, _ = saved
    res = run("predict", folder, "--predictor", "roofline", "--spec", "a100_sxm", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["arch"] == "digits"


def test_wrong_model_folders_are_one_clear_error(saved, tmp_path):
    res = run("arch", "describe", tmp_path)
    assert res.exit_code == 2 and "not a model folder" in res.output
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "down": []}))
    res = run("arch", "describe", tmp_path)
    assert res.exit_code == 2 and "_class_name" in res.output and "AutoencoderKL" in res.output
    config = json.loads((saved[0] / "config.json").read_text())
    config["down"][0]["channels"] = -3
    (tmp_path / "config.json").write_text(json.dumps(config, indent=1))
    with pytest.raises(ConfigError) as info:
        load_arch(tmp_path)
    assert info.value.source.endswith("config.json") and info.value.field == "down[0].channels"
    assert info.value.line is not None


# ---- spaces --------------------------------------------------------------------------------------------------


def test_space_takes_a_name_a_space_file_and_an_experiment_file(tmp_path):
    counts = {}
    for ref in ("digits", ROOT / "search_spaces" / "spaces" / "digits.yaml", ROOT / "experiments" / "quickstart.yaml"):
        res = run("space", "count", ref, "--json")
        assert res.exit_code == 0, res.output
        counts[str(ref)] = json.loads(res.stdout)["cardinality"]
    assert len(set(counts.values())) == 1
    # an experiment whose space is a file beside it, and one with the space inline
    (tmp_path / "micro.yaml").write_text(MICRO_SPACE_YAML)
    (tmp_path / "exp.yaml").write_text("name: e\nspace: micro.yaml\n")
    inline = "name: e\nspace:\n" + "".join(f"  {line}\n" for line in MICRO_SPACE_YAML.splitlines())
    (tmp_path / "inline.yaml").write_text(inline)
    micro = SearchSpace.from_yaml(tmp_path / "micro.yaml").cardinality()
    assert SearchSpace.from_yaml(tmp_path / "exp.yaml").cardinality() == micro
    assert SearchSpace.from_yaml(tmp_path / "inline.yaml").cardinality() == micro
    (tmp_path / "bad.yaml").write_text("name: e\nspace: nowhere\n")
    res = run("space", "count", tmp_path / "bad.yaml")
    assert res.exit_code == 2 and "bad.yaml:2: space:" in res.output and "no shipped space 'nowhere'" in res.output


def test_profile_space_takes_an_experiment_file(tmp_path):
    """`unet-nas profile --space EXPERIMENT` measures the experiment's space (here a micro space, few repeats)."""
    (tmp_path / "micro.yaml").write_text(MICRO_SPACE_YAML)
    (tmp_path / "exp.yaml").write_text("name: e\nspace: micro.yaml\n")
    out = tmp_path / "p.yaml"
    res = run("profile", "--space", tmp_path / "exp.yaml", "--out", out, "--batch", "1", "--resolution", "64",
              "--text-len", "8", "--calibration", "3", "--warmup", "0", "--min-repeats", "1", "--max-repeats", "2",
              "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["blocks"] > 0
    res = run("profile", "--space", "no_such_space", "--out", tmp_path / "q.yaml")
    assert res.exit_code == 2 and "no shipped space" in res.output and not (tmp_path / "q.yaml").exists()


# ---- start-up and help ---------------------------------------------------------------------------------------


def test_importing_the_cli_loads_no_heavy_library():
    """What `unet-nas --help` and argument errors pay for: none of torch, diffusers, optuna, Ray, transformers,
    matplotlib or plotly may be imported by `import nas.cli` (its subcommand modules included)."""
    heavy = ["torch", "diffusers", "optuna", "ray", "transformers", "matplotlib", "plotly", "accelerate"]
    code = f"import sys, nas.cli; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == ""


def _all_commands() -> list[list[str]]:
    import typer.main

    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def test_help_is_plain_text():
    """No `<bool>` type on flags, no `{name}` arguments, no reStructuredText, and --stop-after is documented."""
    commands = _all_commands()
    assert ["train"] in commands and ["profile", "export"] in commands
    for path in commands:
        res = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert res.exit_code == 0, (path, res.output)
        for bad in ("<bool>", "{", "``", ":class:", ":func:"):
            assert bad not in res.output, (path, bad, res.output)
    assert "--stop-after" in runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "Usage: unet-nas search [OPTIONS] FILE" in runner.invoke(app, ["search", "--help"]).output


def test_progress_bars_keep_the_elapsed_time_at_80_columns():
    """The search's bar with a long status line: at 80 columns the status is shortened, the elapsed time is not."""
    import io

    from rich.console import Console

    from nas.cli import progress_bar

    bar = progress_bar("status")
    task = bar.add_task("search quickstart", total=20, completed=7,
                        status="failed 0  feasible 5  best quality 0.01234 " + "x" * 60)
    console = Console(file=io.StringIO(), width=80)
    console.print(bar.make_tasks_table([bar.tasks[task]]))
    line = console.file.getvalue().rstrip("\n")
    assert len(line) <= 80 and "search quickstart" in line and "7/20" in line and "0:00:0" in line
    assert line.rstrip().endswith("…")
