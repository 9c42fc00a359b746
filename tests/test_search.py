"""The local search: experiment validation, strategies, outputs, failures recorded, resume, workers."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from nas.cli import app
from nas.experiment import load_experiment
from nas.report import redact
from nas.search.objectives import Evaluation, Evaluator
from nas.search.optuna_backend import arch_params, counted, run_worker, suggest_arch
from search_spaces import ConfigError, UNetArch

ROOT = Path(__file__).parents[1]
runner = CliRunner()

CHEAP = """name: {name}
seed: 3
space: digits
objectives:
  - {{name: params, kind: params}}
  - {{name: macs, kind: macs, batch: 2}}
constraints:
  - {{objective: params, max: 350000}}
  - {{objective: macs, max_ratio: 0.9, of: digits}}
strategy: {{name: {strategy}, population: 4, prefilter: 4}}
budget: {{trials: {trials}}}
references: [digits]
heartbeat_interval: 1
heartbeat_grace: 3
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("strategy", ["nsga2", "tpe", "random", "evolution"])
def test_every_strategy_runs_and_writes_the_outputs(in_tmp, strategy):
    path = write(in_tmp, CHEAP.format(name=f"s_{strategy}", strategy=strategy, trials=14))
    res = runner.invoke(app, ["search", str(path)])
    assert res.exit_code == 0, res.output
    run = in_tmp / "runs" / f"s_{strategy}"
    for f in ("study.db", "trials.csv", "pareto.json", "pareto.png", "pareto.html", "summary.md",
              "latency_breakdown.png", "experiment.yaml"):
        assert (run / f).is_file(), f
    study = optuna.load_study(study_name=f"s_{strategy}", storage=f"sqlite:///{run / 'study.db'}")
    assert counted(study) == 14
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["objectives"] == ["params", "macs"] and pareto["trials"]
    for t in pareto["trials"]:
        assert all(v <= 0 for v in t["constraints"].values())
        UNetArch.from_dict(t["arch"])
    assert "digits" in pareto["references"]
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert len(rows) == len(study.trials)
    best = UNetArch.from_yaml((run / "best" / "all.yaml").read_text())
    assert best.name == "" and len(best.down) in (2, 3)
    assert (run / "best" / "macs.yaml").is_file()  # the feasible trial lowest on the second objective


def test_evolution_enqueues_cost_filtered_children(in_tmp):
    path = write(in_tmp, CHEAP.format(name="evo", strategy="evolution", trials=16))
    assert runner.invoke(app, ["search", str(path)]).exit_code == 0
    study = optuna.load_study(study_name="evo", storage=f"sqlite:///{in_tmp / 'runs/evo/study.db'}")
    # trials after the first population were proposed by the strategy (enqueued), not sampled at random
    enqueued = [t for t in study.trials if t.system_attrs.get("fixed_params")]
    assert len(enqueued) >= 8


def test_resume_continues_and_refuses_clashes(in_tmp):
    path = write(in_tmp, CHEAP.format(name="res", strategy="nsga2", trials=6))
    assert runner.invoke(app, ["search", str(path), "--resume"]).exit_code == 2  # nothing to resume yet
    assert runner.invoke(app, ["search", str(path)]).exit_code == 0
    clash = runner.invoke(app, ["search", str(path)])
    assert clash.exit_code == 2 and "--resume" in clash.output
    storage = f"sqlite:///{in_tmp / 'runs/res/study.db'}"
    first = {t.number: t.values for t in optuna.load_study(study_name="res", storage=storage).trials}
    path.write_text(path.read_text().replace("trials: 6", "trials: 10"))
    assert runner.invoke(app, ["search", str(path), "--resume"]).exit_code == 0
    study = optuna.load_study(study_name="res", storage=storage)
    assert counted(study) == 10
    assert all(study.trials[n].values == v for n, v in first.items())


def test_report_regenerates_the_outputs(in_tmp):
    path = write(in_tmp, CHEAP.format(name="rep", strategy="random", trials=5))
    assert runner.invoke(app, ["search", str(path)]).exit_code == 0
    run = in_tmp / "runs" / "rep"
    before = json.loads((run / "pareto.json").read_text())
    (run / "pareto.json").unlink()
    (run / "summary.md").unlink()
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "pareto.json").read_text()) == before and (run / "summary.md").is_file()
    assert runner.invoke(app, ["report", str(in_tmp / "nope")]).exit_code == 2


def test_two_local_workers_share_the_study(in_tmp):
    path = write(in_tmp, CHEAP.format(name="two", strategy="random", trials=12))
    res = runner.invoke(app, ["search", str(path), "--workers", "2"])
    assert res.exit_code == 0, res.output
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{in_tmp / 'runs/two/study.db'}")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert 12 <= counted(study) <= 13  # the budget is checked after each trial: at most one per extra worker over


class Flaky(Evaluator):
    """The real evaluator, but some archs raise (as a crashed proxy or an out-of-memory would) or give NaN."""

    def __call__(self, arch: UNetArch) -> Evaluation:
        if arch.mid is None:
            raise MemoryError("CUDA out of memory (simulated by the test for archs without a mid block)")
        ev = super().__call__(arch)
        if len(arch.down) == 2:
            return Evaluation({k: math.nan for k in ev.values}, ev.constraints, ev.seconds)
        return ev


def test_failures_are_recorded_with_their_reason_and_the_search_goes_on(in_tmp):
    exp = load_experiment(write(in_tmp, CHEAP.format(name="flaky", strategy="random", trials=20)))
    (in_tmp / "runs" / "flaky").mkdir(parents=True)
    study = run_worker(exp, Flaky(exp).prepare(), exp.storage_url(), resume=False)
    states = {s: [t for t in study.trials if t.state == s] for s in (TrialState.COMPLETE, TrialState.FAIL)}
    assert states[TrialState.COMPLETE] and states[TrialState.FAIL]
    reasons = [t.user_attrs.get("error", "") for t in states[TrialState.FAIL]]
    assert any("MemoryError" in r for r in reasons)
    assert counted(study) == 20
    nan_failed = [t for t in states[TrialState.FAIL] if "FloatingPointError" in t.user_attrs["error"]]
    assert nan_failed and all(len(UNetArch.from_dict(t.user_attrs["arch"]).down) == 2 for t in nan_failed)


def test_suggest_and_enqueue_round_trip():
    exp = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    space = Evaluator(exp).space
    study = optuna.create_study(directions=["minimize"])
    arch = space.sample(__import__("random").Random(4))
    study.enqueue_trial(arch_params(space, arch))
    trial = study.ask()
    assert suggest_arch(space, trial) == arch


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda t: t + "colour: red\n", "colour"),
        (lambda t: t.replace("trials: 5", "trials: many"), "budget.trials"),
        (lambda t: t.replace("objective: params, max: 350000", "objective: size, max: 3"),
         "constraints[0].objective"),
        (lambda t: t.replace("name: nsga2", "name: annealing"), "strategy.name"),
        (lambda t: t.replace("kind: macs", "kind: fid"), "objectives[1].kind"),
        (lambda t: t + "quality_context: {mixed_precision: fp8}\n", "quality_context.mixed_precision"),
        (lambda t: t + "quality_context: {batch_size: 0}\n", "quality_context.batch_size"),
    ],
)
def test_experiment_errors_name_the_field_and_line(tmp_path, change, field):
    path = write(tmp_path, change(CHEAP.format(name="bad", strategy="nsga2", trials=5)))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert err.value.field == field and err.value.line is not None and err.value.source == str(path)


def test_impossible_and_unknown_references_are_refused(tmp_path):
    text = CHEAP.format(name="bad", strategy="nsga2", trials=5)
    exp = load_experiment(write(tmp_path, text.replace("max: 350000", "max: -1")))
    with pytest.raises(ConfigError, match="cannot be met"):
        Evaluator(exp).check()
    exp = load_experiment(write(tmp_path, text.replace("of: digits", "of: sd99")))
    with pytest.raises(ConfigError) as err:
        Evaluator(exp).check()
    assert err.value.field == "constraints[1].of"


def test_quality_context_reaches_the_proxies(tmp_path):
    """The experiment's quality_context is the context every quality objective scores in."""
    text = CHEAP.format(name="ctx", strategy="random", trials=2).replace(
        "objectives:\n", "objectives:\n  - {name: quality, kind: quality, proxy: grad_norm}\n")
    text += "data: digits\nquality_context: {batch_size: 8, micro_batch: 4, eval_items: 16, eval_timesteps: 2, " \
            "mixed_precision: bf16}\n"
    ctx = Evaluator(load_experiment(write(tmp_path, text)))._quality_context()
    assert (ctx.batch_size, ctx.micro_batch, ctx.eval_items, ctx.eval_timesteps, ctx.mixed_precision) == \
        (8, 4, 16, 2, "bf16")
    default = Evaluator(load_experiment(write(tmp_path, CHEAP.format(name="d", strategy="random", trials=2)
                                              + "data: digits\n", "d.yaml")))._quality_context()
    assert (default.batch_size, default.eval_items, default.mixed_precision) == (64, 256, "no")


def test_the_proxies_context_carries_the_searchs_cost_bounds(tmp_path):
    """A proxy's one-time work is spent on the archs the search can pick: the context's ``feasible`` is the
    experiment's cost constraints (a ratio of a reference arch included), and its label names their bounds."""
    ev = Evaluator(load_experiment(write(tmp_path, CHEAP.format(name="b", strategy="random", trials=2)
                                         + "data: digits\n")))
    ctx = ev._quality_context()
    macs_bound = 0.9 * ev.reference_values["digits"]["macs"]
    assert ctx.feasible_label == f"params_le_350000 (350000), macs_le_0.9x_digits ({macs_bound:.6g})"
    archs = [ev.space.sample(random.Random(i)) for i in range(40)]
    verdicts = [ctx.feasible(a) for a in archs]
    assert verdicts == [all(v <= 0 for v in ev.constraint_values(ev.objectives(a, cheap_only=True)).values())
                        for a in archs]
    assert 0 < sum(verdicts) < len(archs)
    unbounded = CHEAP.format(name="u", strategy="random", trials=2).replace(
        "constraints:\n  - {objective: params, max: 350000}\n  - {objective: macs, max_ratio: 0.9, of: digits}\n",
        "") + "data: digits\n"
    assert "constraints" not in unbounded
    assert Evaluator(load_experiment(write(tmp_path, unbounded, "u.yaml")))._quality_context().feasible is None


def test_shipped_experiments_validate():
    for name in ("quickstart", "decidiffusion_v1", "decidiffusion_v2_ai100"):
        exp = load_experiment(ROOT / "experiments" / f"{name}.yaml")
        Evaluator(exp).check()


def test_storage_urls_are_redacted(monkeypatch, tmp_path):
    assert redact("postgresql://nas:s3cret@db.example:5432/nas") == "postgresql://nas:***@db.example:5432/nas"
    monkeypatch.setenv("NAS_DB", "postgresql://nas:s3cret@localhost/nas")
    text = CHEAP.format(name="env", strategy="nsga2", trials=5) + "storage: {env: NAS_DB}\n"
    exp = load_experiment(write(tmp_path, text))
    assert exp.storage_url() == "postgresql://nas:s3cret@localhost/nas"
    monkeypatch.delenv("NAS_DB")
    with pytest.raises(ConfigError, match="NAS_DB is not set"):
        exp.storage_url()


def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path):
    """SIGINT in the middle of a search: exit 130 after writing the report; --resume finishes the budget."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    from contextlib import closing

    text = """name: intr
space: digits
data: digits
objectives:
  - {name: quality, kind: quality, proxy: short_train, options: {steps: 8, eval_every: 8}}
  - {name: params, kind: params}
strategy: {name: random}
budget: {trials: 6}
"""
    path = write(tmp_path, text)
    db = tmp_path / "runs" / "intr" / "study.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one core each, as the suite runs
    # SIGINT as a terminal's Ctrl-C delivers it: a test run started in the background of a non-interactive shell
    # ignores SIGINT, and a child would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "nas", "search", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if db.is_file():
            # read-only: optuna.load_study here would create the schema too and race the search doing the same
            try:
                with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                    if con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]:
                        break
            except sqlite3.Error:  # the study is being created
                pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "--resume" in out and "Traceback" not in out
    assert (tmp_path / "runs" / "intr" / "summary.md").is_file()
    done = {t.number: t.values for t in optuna.load_study(study_name="intr", storage=f"sqlite:///{db}").trials
            if t.state == TrialState.COMPLETE}
    assert done
    res = subprocess.run([sys.executable, "-m", "nas", "search", str(path), "--resume"], cwd=tmp_path,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    study = optuna.load_study(study_name="intr", storage=f"sqlite:///{db}")
    assert counted(study) == 6
    assert all(study.trials[n].values == v for n, v in done.items())
