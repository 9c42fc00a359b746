"""Refining a search's finalists (``refine`` in the experiment): which archs, the values, resume, failures,
several workers, and the bad-input errors."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from nas.cli import app
from nas.experiment import load_experiment
from nas.report import write_report
from nas.search.objectives import Evaluator
from nas.search.optuna_backend import run_worker
from nas.search.refine import candidates, nondominated_layers, refine_study_name, run_refine
from search_spaces import ConfigError, UNetArch

runner = CliRunner()

EXP = """name: {name}
seed: 3
space: digits
data: digits
objectives:
  - {{name: quality, kind: quality, proxy: short_train, options: {{steps: 2, eval_every: 2}}}}
  - {{name: params, kind: params}}
constraints:
  - {{objective: params, max: 350000}}
strategy: {{name: random}}
budget: {{trials: {trials}}}
refine: {{layers: 2, options: {{steps: 6, eval_every: 6}}}}
quality_context: {{batch_size: 16, eval_items: 32, eval_timesteps: 2}}
heartbeat_interval: 1
heartbeat_grace: 3
"""


def _write(folder: Path, name: str, trials: int = 10, text: str | None = None) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text if text is not None else EXP.format(name=name, trials=trials))
    return path


def _studies(folder: Path, name: str) -> tuple[optuna.Study, optuna.Study]:
    url = f"sqlite:///{folder / 'runs' / name / 'study.db'}"
    return (optuna.load_study(study_name=name, storage=url),
            optuna.load_study(study_name=f"{name}.refine", storage=url))


def _search_only(folder: Path, name: str, trials: int = 10):
    """A finished search without its refinement (the tests then refine it themselves)."""
    exp = load_experiment(_write(folder, name, trials))
    exp.run_dir.mkdir(parents=True)
    evaluator = Evaluator(exp).prepare()
    run_worker(exp, evaluator, exp.storage_url(), resume=False)
    return exp, evaluator


def test_nondominated_layers():
    values = [(1, 5), (2, 2), (5, 1), (2, 6), (3, 3), (6, 6)]
    assert nondominated_layers(values) == [[0, 1, 2], [3, 4], [5]]


def test_search_refines_its_first_two_layers_and_reports_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["search", str(_write(tmp_path, "rf"))])
    assert res.exit_code == 0, res.output
    exp = load_experiment(tmp_path / "rf.yaml")
    search, refine = _studies(tmp_path, "rf")
    cands = candidates(exp, search)
    # the first two non-dominated layers of the feasible trials, one trial per distinct arch
    feasible = [t for t in search.trials if t.state == TrialState.COMPLETE and t.user_attrs["feasible"]]
    layers = nondominated_layers([tuple(t.values) for t in feasible])
    firsts = {feasible[i].number for layer in layers[:2] for i in layer}
    assert {t.number for t, _ in cands} <= firsts and len(cands) >= 2
    done = [t for t in refine.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["source_trial"] for t in done) == sorted(t.number for t, _ in cands)
    # the refined value is the refine proxy's score, reproduced by a fresh evaluator (deterministic under the seed)
    fresh = Evaluator(exp).prepare()
    t = done[0]
    assert fresh.refined_quality(UNetArch.from_dict(t.user_attrs["arch"])) == pytest.approx(t.value, abs=1e-6)
    run = tmp_path / "runs" / "rf"
    report = json.loads((run / "refined.json").read_text())
    assert report["refined"] == len(cands) and report["pending"] == [] and report["fidelity"]["proxy"] == "short_train"
    best = min(report["rows"], key=lambda r: (r["values"]["quality"], r["values"]["params"]))
    assert report["best"] == best["source_trial"]
    assert UNetArch.from_yaml((run / "best" / "refined.yaml").read_text()) == UNetArch.from_dict(best["arch"])
    summary = (run / "summary.md").read_text()
    assert "## Refined finalists" in summary and f"{len(cands)} refined, 0 pending" in summary
    # --resume has nothing left to refine; `report` rewrites the same refined.json
    again = runner.invoke(app, ["search", str(tmp_path / "rf.yaml"), "--resume"])
    assert again.exit_code == 0 and "0 queued now" in again.output
    assert len(_studies(tmp_path, "rf")[1].trials) == len(refine.trials)
    (run / "refined.json").unlink()
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    assert json.loads((run / "refined.json").read_text())["rows"] == report["rows"]


def test_an_interrupted_refinement_resumes_with_what_is_left(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp, evaluator = _search_only(tmp_path, "intr")
    calls: list[UNetArch] = []
    real = Evaluator.refined_quality

    def interrupted(self, arch):
        calls.append(arch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, arch)

    monkeypatch.setattr(Evaluator, "refined_quality", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_refine(exp, evaluator, exp.storage_url())
    monkeypatch.setattr(Evaluator, "refined_quality", lambda self, arch: calls.append(arch) or real(self, arch))
    study = run_refine(exp, evaluator, exp.storage_url())
    n = len(candidates(exp, optuna.load_study(study_name="intr", storage=exp.storage_url())))
    assert len(calls) == n + 1  # the first arch is not refined again; the interrupted one is
    assert calls[1] in calls[2:] and calls[0] not in calls[1:]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == n and len({t.user_attrs["source_trial"] for t in done}) == n
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1  # the interrupted attempt, kept as lost


def test_a_failed_refinement_is_recorded_and_not_repeated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp, evaluator = _search_only(tmp_path, "flaky")
    real, seen = Evaluator.refined_quality, []

    def flaky(self, arch):
        seen.append(arch)
        if len(seen) == 1:
            raise RuntimeError("out of memory in the refine proxy")
        return real(self, arch)

    monkeypatch.setattr(Evaluator, "refined_quality", flaky)
    run_refine(exp, evaluator, exp.storage_url())
    calls = len(seen)
    run_refine(exp, evaluator, exp.storage_url())  # a resume does not repeat a refinement that failed by itself
    assert len(seen) == calls
    search = optuna.load_study(study_name="flaky", storage=exp.storage_url())
    write_report(exp.run_dir, exp, search, exp.storage_url(), {})
    report = json.loads((exp.run_dir / "refined.json").read_text())
    assert report["trials"]["errors"] == 1 and "out of memory" in report["failed"][0]["error"]
    assert report["refined"] == len(report["candidates"]) - 1 and report["pending"] == []
    assert "failed: RuntimeError: out of memory" in (exp.run_dir / "summary.md").read_text()


def _refine_in_process(path: str) -> None:
    exp = load_experiment(path)
    run_refine(exp, Evaluator(exp).prepare(), exp.storage_url())


def test_two_workers_refine_each_arch_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp, _ = _search_only(tmp_path, "two", trials=14)
    path = str((tmp_path / "two.yaml").resolve())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_refine_in_process, args=(path,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    search, refine = _studies(tmp_path, "two")
    done = [t for t in refine.trials if t.state == TrialState.COMPLETE]
    evaluated = [t for t in done if "duplicate_of" not in t.user_attrs]
    assert sorted(t.user_attrs["source_trial"] for t in evaluated) == sorted(t.number for t, _ in
                                                                            candidates(exp, search))
    # whatever else the two workers recorded is told apart: a reused result, or an empty trial
    assert all("duplicate_of" in t.user_attrs or "empty" in t.user_attrs for t in refine.trials
               if t not in evaluated)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda t: t.replace("layers: 2,", "layers: 0,"), "refine.layers"),
        (lambda t: t.replace("refine: {", "refine: {objective: params, "), "refine.objective"),
        (lambda t: t.replace("refine: {", "refine: {colour: red, "), "refine.colour"),
        (lambda t: t.replace("options: {steps: 6, eval_every: 6}", "options: {stepz: 6}"), "refine.options"),
        (lambda t: t.replace("refine: {", "refine: {proxy: nope, "), "refine.proxy"),
        (lambda t: t.replace("refine: {", "refine: {proxy: distill, ").replace("eval_every: 6}", "schedule: x}"),
         "refine.options.schedule"),
    ],
)
def test_bad_refine_options_are_refused_with_file_line_field(tmp_path, monkeypatch, change, field):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "bad", text=change(EXP.format(name="bad", trials=4)))
    res = runner.invoke(app, ["search", str(path)])
    assert res.exit_code == 2, res.output
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("refine:"))
    assert f"{path}:{line}: {field}:" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "runs" / "bad").exists()  # nothing half-written


def test_refine_needs_a_quality_objective_and_keeps_its_fidelity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = EXP.format(name="q", trials=4).replace(
        "  - {name: quality, kind: quality, proxy: short_train, options: {steps: 2, eval_every: 2}}\n", "")
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, "q", text=text))
    assert err.value.field == "refine" and err.value.line is not None
    path = _write(tmp_path, "fid", trials=4)
    assert runner.invoke(app, ["search", str(path)]).exit_code == 0
    path.write_text(path.read_text().replace("steps: 6, eval_every: 6", "steps: 8, eval_every: 8"))
    res = runner.invoke(app, ["search", str(path), "--resume"])
    assert res.exit_code == 2 and "refine" in res.output and "rename the experiment" in " ".join(res.output.split())
    assert refine_study_name(load_experiment(path)) == "fid.refine"
