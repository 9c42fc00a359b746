"""A fuzzed front door: random and mutated YAML, arch dicts, space files, latency profiles, device specs, experiment
files and CSV-like junk thrown at the loaders and at the CLI.

The property everywhere: a loader returns a value or raises the project's ``ConfigError``, never anything else;
the CLI exits 0 or 2, and on 2 prints one ``error:`` line, no traceback, and writes nothing. Example counts are
bounded (``max_examples``) so CI runs the file in well under a minute; ``HYPOTHESIS_PROFILE=deep`` runs more.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nas.cli import app
from nas.experiment import load_experiment
from nas.train.recipe import load_recipe
from proxies.latency import LatencyProfile
from proxies.latency.profile import FORMAT
from proxies.latency.roofline import load_spec
from search_spaces import ConfigError, UNetArch, load_arch
from search_spaces.space import SearchSpace
from search_spaces.yamlio import parse_text

ROOT = Path(__file__).parents[1]
runner = CliRunner()

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ---- valid seeds that the mutators start from -------------------------------------------------------------------

ARCH_TEXT = (ROOT / "search_spaces" / "archs" / "tiny.yaml").read_text()
SPACE_TEXT = (ROOT / "search_spaces" / "spaces" / "tiny.yaml").read_text()
SPEC_TEXT = (ROOT / "proxies" / "latency" / "devices" / "a10g.yaml").read_text()
PROFILE = {
    "format": FORMAT, "device_name": "test cpu", "space": "tiny", "complete": True,
    "settings": {"device": "cpu", "dtype": "fp32", "batch": 2, "resolution": 128, "text_len": 8, "threads": 1,
                 "channels_last": False, "compile": False},
    "protocol": {"statistic": "min", "warmup": 1, "min_repeats": 2, "max_repeats": 3, "rel_tol": 0.02},
    "environment": {"torch": "2"},
    "correction": {"scale": 1.1, "offset_ms": 0.2, "n": 2, "fit_mape_pct": 3.0},
    "blocks": {"conv_in:4>32@16": {"ms": 0.1, "median_ms": 0.1, "spread_pct": 1.0, "repeats": 3}},
    "calibration": [{"timing": {"ms": 5.0, "median_ms": 5.1, "spread_pct": 2.0, "repeats": 3},
                     "arch": yaml.safe_load(ARCH_TEXT)}],
}
PROFILE_TEXT = yaml.safe_dump(PROFILE, sort_keys=False)
EXPERIMENT_TEXT = """name: fuzzed
seed: 0
space: tiny
objectives:
  - {name: params, kind: params}
  - {name: macs, kind: macs, batch: 1, resolution: 8}
constraints:
  - {objective: params, max: 3000000}
  - {objective: macs, max_ratio: 0.9, of: tiny}
strategy: {name: random, population: 2}
budget: {trials: 2}
references: [tiny]
"""
RECIPE_TEXT = (ROOT / "experiments" / "train_digits.yaml").read_text()
CSV_TEXT = "number,state,params,arch_json\n0,COMPLETE,12345,\"{\"\"down\"\": []}\"\n1,FAIL,,\n"
SEEDS = {"arch": ARCH_TEXT, "space": SPACE_TEXT, "profile": PROFILE_TEXT, "spec": SPEC_TEXT,
         "experiment": EXPERIMENT_TEXT, "recipe": RECIPE_TEXT, "csv": CSV_TEXT}

# ---- strategies -------------------------------------------------------------------------------------------------

# YAML tokens that stress a loader: tags (a safe loader must refuse Python objects), anchors, huge and odd numbers,
# flow collections left open, duplicate keys, rich-markup-looking text, non-string keys
TOKENS = ["!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "&a", "*a", "*nowhere",
          "{", "}", "[", "]", ": ", "- ", "? ", "~", "null", ".nan", ".inf", "-.inf", "1e400", "-1", "0",
          "99999999999999999999", "3.5", "true", "'", '"', "\t", "\\x00", "[/x]", "[bold]", "%YAML 1.1", "---",
          "...", "<<: *a", "=", "|", ">", "#", "@", "`", "1: 2", "null: 3", "channels: 0", "heads: 7",
          "resnets: -2", "attentions: 1000", "down: []", "up: {}", "mid: 5", "format: x", "ms: -1"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["", "[/x]", "sd15", "tiny", "fp16", "cpu", "min"]))
# values a hand-written file gets wrong, drawn often: non-finite and huge numbers, wrong types, empty things
nasty = st.sampled_from([math.nan, math.inf, -math.inf, 10**12, 10**9, -1, 0, 1, 0.5, "", "x", None, True, False,
                         [], {}, [1, 2], {"a": 1}, "[/x]", 2**63])
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=10), st.integers(0, 3), st.none(),
                                                         st.booleans()), children, max_size=4)),
    max_leaves=20,
)


@st.composite
def mutated_text(draw: Any, seed: str) -> str:
    """A valid document with a few line- and character-level edits."""
    lines = seed.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "token", "char", "indent", "swap", "truncate"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "token":
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.sampled_from(TOKENS)) + lines[i][pos:]
        elif op == "char" and lines[i]:
            pos = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:pos] + draw(st.characters(codec="utf-8")) + lines[i][pos + 1:]
        elif op == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "  ", "    ", "\t"])) + lines[i].lstrip()
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "truncate":
            lines = lines[:i]
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


@st.composite
def mutated_data(draw: Any, seed: Any) -> Any:
    """A valid document (as data) with one value somewhere replaced, removed or given an extra key."""
    data = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        parent, key = _resolve(data, path)
        op = draw(st.sampled_from(["replace", "delete", "extra"]))
        if parent is None:
            return draw(json_values)
        if op == "replace":
            parent[key] = draw(st.one_of(nasty, json_values))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    return data


def _paths(data: Any, prefix: tuple = ()) -> Any:
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


def _resolve(data: Any, path: tuple) -> tuple[Any, Any]:
    if not path:
        return None, None
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    return parent, path[-1]


def texts(kind: str) -> st.SearchStrategy[str]:
    """Random text, mutated text of the kind's seed, and the seed's data mutated then dumped (as YAML or JSON)."""
    data = yaml.safe_load(SEEDS[kind]) if kind != "csv" else None
    dumped = [] if data is None else [
        mutated_data(data).map(lambda d: yaml.safe_dump(d, sort_keys=False, allow_unicode=True)),
        mutated_data(data).map(lambda d: json.dumps(d, allow_nan=True)),
    ]
    return st.one_of(st.text(max_size=200), mutated_text(SEEDS[kind]), mutated_text(CSV_TEXT), *dumped)


# ---- the property --------------------------------------------------------------------------------------------------


def only_config_errors(load: Callable[[], Any]) -> Any:
    """``load()`` either returns or raises ConfigError; the error names something a user can act on."""
    try:
        out = load()
    except ConfigError as exc:
        assert str(exc).strip(), "an empty error message"
        event("refused with ConfigError")
        return exc
    event("loaded")
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(args: list[str], root: Path) -> Any:
    """Run the CLI in-process in ``root``; check the front-door contract; return the result."""
    before = _tree(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    event(f"exit {res.exit_code}")
    assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert _tree(root) == before, "a failed command wrote files"
    return res


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


# ---- loaders --------------------------------------------------------------------------------------------------------


@given(st.one_of(texts("arch"), texts("space"), texts("profile"), texts("experiment"), st.binary(max_size=64).map(
    lambda b: b.decode("latin-1"))))
def test_the_yaml_reader_parses_or_raises_a_located_config_error(text):
    out = only_config_errors(lambda: parse_text(text, "f.yaml"))
    if isinstance(out, ConfigError):
        assert out.source == "f.yaml"


def test_the_yaml_reader_never_constructs_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    for text in (f"!!python/object/apply:os.system ['touch {marker}']",
                 f"a: !!python/object/apply:subprocess.call [['touch', '{marker}']]",
                 "!!python/name:os.system", "a: !!python/object:collections.OrderedDict {}"):
        with pytest.raises(ConfigError, match="not valid YAML"):
            parse_text(text, "evil.yaml")
    assert not marker.exists()


@given(st.one_of(json_values, mutated_data(yaml.safe_load(ARCH_TEXT))))
def test_arch_dicts_load_or_raise_config_error(data):
    arch = only_config_errors(lambda: UNetArch.from_dict(data))
    if isinstance(arch, UNetArch):  # what loads round-trips
        assert UNetArch.from_dict(arch.to_dict()) == arch


@given(st.one_of(json_values, mutated_data(yaml.safe_load(SPACE_TEXT))))
def test_space_dicts_load_or_raise_config_error(data):
    space = only_config_errors(lambda: SearchSpace(data))
    if isinstance(space, SearchSpace):
        assert space.cardinality() >= 1


@given(st.one_of(json_values, mutated_data(PROFILE)))
def test_latency_profiles_load_or_raise_config_error(data):
    profile = only_config_errors(lambda: LatencyProfile.from_dict(data))
    if isinstance(profile, LatencyProfile):
        assert all(math.isfinite(t.ms) and t.ms > 0 for t in profile.blocks.values())
        assert LatencyProfile.from_dict(profile.to_dict()).blocks.keys() == profile.blocks.keys()


@given(st.sampled_from(["arch", "space", "profile", "spec", "experiment", "recipe"]), st.data())
def test_every_file_loader_takes_any_text(kind, data):
    text = data.draw(texts(kind))
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), f"{kind}.yaml", text)
        load = {"arch": lambda: load_arch(path), "space": lambda: SearchSpace.from_yaml(path),
                "profile": lambda: LatencyProfile.load(path), "spec": lambda: load_spec(path),
                "experiment": lambda: load_experiment(path), "recipe": lambda: load_recipe(path)}[kind]
        out = only_config_errors(load)
        if isinstance(out, ConfigError):
            assert out.source == str(path), str(out)


# ---- the CLI ----------------------------------------------------------------------------------------------------


@settings(max_examples=80)
@given(st.sampled_from(["arch", "space", "csv"]), st.data())
def test_cli_inspection_commands_fail_cleanly(kind, data):
    text = data.draw(texts(kind))
    suffix = data.draw(st.sampled_from([".yaml", ".json", ".csv"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = _write(root, f"input{suffix}", text)
        command = data.draw(st.sampled_from([["arch", "describe", str(path), "--json"], ["space", "count", str(path)],
                                             ["space", "show", str(path)], ["space", "sample", str(path), "-n", "1"]]))
        cli(command, root)


@settings(max_examples=40)
@given(st.data())
def test_cli_predict_takes_any_profile(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = _write(root, "profile.yaml", data.draw(texts("profile")))
        arch = _write(root, "arch.yaml", data.draw(st.one_of(st.just(ARCH_TEXT), texts("arch"))))
        cli(["predict", str(arch), "--profile", str(path), "--json"], root)


@settings(max_examples=40)
@given(st.data())
def test_cli_search_takes_any_experiment_and_writes_nothing_when_it_fails(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = _write(root, "exp.yaml", data.draw(texts("experiment")))
        cli(["search", str(path)], root)


@settings(max_examples=40)
@given(st.data())
def test_cli_train_check_takes_any_recipe(data):
    """``train --check`` validates a recipe (the data and model too) and trains nothing: exit 0 or one error."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = _write(root, "recipe.yaml", data.draw(texts("recipe")))
        cli(["train", str(path), "--check"], root)
