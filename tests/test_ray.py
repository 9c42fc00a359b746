"""The Ray Tune backend on a real two-node Ray cluster on loopback, driven through the real CLI.

The cluster (two ``ray start`` nodes of one CPU each, private temp dir) is started once for the module and its
processes, found by that temp dir, are stopped at the end: never ``ray stop``, which would stop every Ray of the
machine. If Ray cannot start, the fixture fails with Ray's output: no silent skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from nas.cli import app
from tests.processes import _processes, kill_when, started_with, stop_started_with

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "spaces" / "digits.yaml"
RAY = Path(sys.executable).with_name("ray")
CLUSTER: dict[str, object] = {}  # the module cluster's environment for `ray start` (temp dir, token)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=120)


# the count goes on a line of its own with a marker: Ray may print its own notices to stdout around it
DEAD_NODES = ("import ray, sys; ray.init(address=sys.argv[1]); "
              "print('dead nodes:', sum(not n['Alive'] for n in ray.nodes()))")


def _wait_for_dead_nodes(address: str, n: int, timeout: float = 120) -> None:
    """Until the cluster's GCS counts ``n`` dead nodes, asked from a driver of its own."""
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run([sys.executable, "-c", DEAD_NODES, address], env=CLUSTER["env"], capture_output=True,
                             text=True, timeout=120)
        counts = [int(line.split(":", 1)[1]) for line in res.stdout.splitlines() if line.startswith("dead nodes:")]
        if res.returncode == 0 and counts and counts[-1] >= n:
            return
        assert time.monotonic() < deadline, f"the GCS did not mark {n} node(s) dead:\n{res.stdout}{res.stderr}"
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node on 127.0.0.1, one CPU each; yields the address ``127.0.0.1:port``."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # token authentication with a token of our own, given to both nodes and to the driver (this process)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    # trials at normal priority, as the private Ray runs them: at Ray's default niceness 15 a busy CI machine
    # starves them and the searches here run into their wall-time bounds
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    CLUSTER["env"] = env
    head = _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats", env=env)
    try:
        if head.returncode != 0:
            pytest.fail(f"cannot start the Ray head node:\n{head.stdout}\n{head.stderr}")
        worker = _ray("start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                      "--disable-usage-stats", env=env)
        if worker.returncode != 0:
            pytest.fail(f"cannot start the second Ray node:\n{worker.stdout}\n{worker.stderr}")
        yield address
    finally:
        left = stop_started_with(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert not left, f"Ray processes of the test cluster still alive: {sorted(left)}"


def _experiment(tmp_path: Path, name: str, address: str, **fields) -> Path:
    exp = {"name": name, "seed": 0, "space": str(SPACE), "backend": "ray", "output_dir": str(tmp_path / "runs"),
           "references": ["digits"], "strategy": {"name": "nsga2", "population": 4},
           "ray": {"address": address, "cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 1}, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _search(*args: str):
    result = CliRunner().invoke(app, ["search", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / name / 'study.db'}")


def test_cli_search_on_two_nodes_writes_the_local_outputs_and_resumes(cluster, tmp_path):
    cheap = {"objectives": [{"name": "params", "kind": "params"},
                            {"name": "macs", "kind": "macs", "resolution": 8, "batch": 1, "text_len": 8}],
             "constraints": [{"objective": "params", "max": 400000}], "budget": {"trials": 4, "wall_time": 900}}
    path = _experiment(tmp_path, "cheap", cluster, **cheap)
    out = _search(str(path)).output
    assert "2 node(s), 2 CPUs" in out

    run = tmp_path / "runs" / "cheap"
    for name in ("pareto.json", "trials.csv", "summary.md", "pareto.png", "experiment.yaml", "study.db"):
        assert (run / name).is_file(), name
    assert (run / "best" / "all.yaml").is_file() and (run / "best" / "macs.yaml").is_file()  # params is first
    assert (run / "ray" / "search_000").is_dir()
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["objectives"] == ["params", "macs"] and pareto["trials"]
    assert "backend: ray" in (run / "summary.md").read_text()

    study = _study(tmp_path, "cheap")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # what the local backend writes
        assert {"arch", "arch_summary", "constraints", "feasible", "seconds"} <= set(t.user_attrs)
        assert t.system_attrs["constraints"] == [pytest.approx(t.values[0] - 400000)]  # where Optuna reads them
        assert t.user_attrs["feasible"] == (t.values[0] <= 400000)
        assert t.user_attrs["host"] == socket.gethostname() and len(t.user_attrs["node"]) == 56  # a Ray node id
        assert "restarts" not in t.user_attrs
    # reuse_actors (the default): the two workers run the four trials, imports and evaluator loaded once each
    assert len({t.user_attrs["pid"] for t in trials}) < len(trials)
    assert study.metric_names == ["params", "macs"]
    first = {t.number: t.values for t in trials}

    # a larger budget and --resume: the same study goes on, earlier trials untouched, a new Tune run under ray/
    data = yaml.safe_load(path.read_text())
    data["budget"]["trials"] = 6
    path.write_text(yaml.safe_dump(data))
    _search(str(path), "--resume")
    trials = _study(tmp_path, "cheap").get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.values for t in trials if t.number in first} == first
    assert (run / "ray" / "search_001").is_dir()
    rows = (run / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6

    # resuming a finished search runs nothing more; a fresh start on an existing study is refused
    _search(str(path), "--resume")
    assert len(_study(tmp_path, "cheap").get_trials()) == 6
    result = CliRunner().invoke(app, ["search", str(path)])
    assert result.exit_code == 2 and "--resume" in result.output


def test_asha_stops_short_train_trials_early(cluster, tmp_path):
    exp = {"data": "digits", "budget": {"trials": 6, "wall_time": 900},  # a bound, not a timing
           "objectives": [{"name": "quality", "kind": "quality", "proxy": "short_train",
                           "options": {"steps": 8, "eval_every": 2, "lr": 2e-3}},
                          {"name": "params", "kind": "params"}]}
    path = _experiment(tmp_path, "asha", cluster, **exp)
    data = yaml.safe_load(path.read_text())
    data["ray"]["asha"] = {"grace_period": 2, "reduction_factor": 2}
    path.write_text(yaml.safe_dump(data))
    _search(str(path))
    trials = _study(tmp_path, "asha").get_trials()
    assert len(trials) == 6
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned, [t.state for t in trials]
    assert complete
    assert all(t.user_attrs["stopped_at"] < 8 for t in pruned)
    assert all("arch" in t.user_attrs for t in trials)
    pareto = json.loads((tmp_path / "runs" / "asha" / "pareto.json").read_text())
    assert {p["number"] for p in pareto["trials"]} <= {t.number for t in complete}  # no half-trained loss


def test_a_diverging_trial_errors_in_ray_and_is_fail_with_its_reason(cluster, tmp_path):
    # lr 1e30: AdamW's first step makes the weights ~1e30, the next loss is not finite and train() raises
    exp = {"data": "digits", "budget": {"trials": 2, "wall_time": 900},
           "objectives": [{"name": "quality", "kind": "quality", "proxy": "short_train",
                           "options": {"steps": 3, "lr": 1e30, "eval_every": 0}},
                          {"name": "params", "kind": "params"}]}
    path = _experiment(tmp_path, "diverge", cluster, **exp)
    out = _search(str(path)).output
    assert "after 2 attempt(s)" in out  # FailureConfig(max_failures=1): one retry, then ERROR
    trials = _study(tmp_path, "diverge").get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    for t in trials:
        assert t.user_attrs["error"].startswith("FloatingPointError: training loss became")
    summary = (tmp_path / "runs" / "diverge" / "summary.md").read_text()
    assert "## Failed trials" in summary and "FloatingPointError" in summary
    results = list((tmp_path / "runs" / "diverge" / "ray" / "search_000").glob("trial_*/error.txt"))
    assert len(results) == 2  # errored Ray trials


def test_a_failing_refinement_on_ray_is_recorded_with_its_reason_and_not_repeated(cluster, tmp_path):
    # the search's proxy is sound; the refinement diverges (lr 1e30) in every Ray task
    exp = {"data": "digits", "budget": {"trials": 3, "wall_time": 900},
           "objectives": [{"name": "quality", "kind": "quality", "proxy": "short_train",
                           "options": {"steps": 2, "eval_every": 0}},
                          {"name": "params", "kind": "params"}],
           "refine": {"layers": 1, "max_archs": 1, "options": {"steps": 3, "lr": 1e30, "eval_every": 0}}}
    path = _experiment(tmp_path, "refail", cluster, **exp)
    assert "refinement of trial" in _search(str(path)).output
    run = tmp_path / "runs" / "refail"
    refined = json.loads((run / "refined.json").read_text())
    assert refined["refined"] == 0 and refined["pending"] == [] and refined["trials"]["errors"] == 1
    assert refined["failed"][0]["error"].startswith("FloatingPointError: training loss became")
    assert not (run / "best" / "refined.yaml").exists()
    _search(str(path), "--resume")  # a refinement that failed by its own error is not run again
    refine = optuna.load_study(study_name="refail.refine", storage=f"sqlite:///{run / 'study.db'}")
    assert [t.state for t in refine.trials] == [TrialState.FAIL]


def test_asha_without_short_train_is_one_config_error(tmp_path):
    exp = {"name": "bad", "space": str(SPACE), "backend": "ray", "output_dir": str(tmp_path / "runs"),
           "objectives": [{"name": "params", "kind": "params"}], "budget": {"trials": 2},
           "ray": {"asha": {"grace_period": 2}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(exp))
    result = CliRunner().invoke(app, ["search", str(path)])
    assert result.exit_code == 2
    assert "ray.asha" in result.output and "short_train" in result.output
    path.write_text(yaml.safe_dump({**exp, "ray": {"asha": {"grace_period": 2, "brackets": 3}}}))
    result = CliRunner().invoke(app, ["search", str(path)])
    assert result.exit_code == 2 and "ray.asha.brackets" in result.output


def test_the_quickstart_runs_on_the_two_node_cluster(cluster, tmp_path):
    """experiments/quickstart_ray.yaml itself (teacher trained here, CPU profile measured on first use, the real
    supernet proxy) on the two-node cluster, with its budget and supernet cut to keep CI short."""
    data = yaml.safe_load((ROOT / "experiments" / "quickstart_ray.yaml").read_text())
    data["ray"]["address"] = cluster
    data["budget"] = {"trials": 4, "wall_time": 900}
    data["teacher"]["train_steps"] = 40
    data["objectives"][0]["options"]["steps"] = 20  # the supernet's one-time work, done by the driver
    data["refine"] = {**data["refine"], "max_archs": 2, "options": {**data["refine"]["options"], "steps": 10}}
    data["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "quickstart_ray.yaml"
    path.write_text(yaml.safe_dump(data))
    _search(str(path))
    run = tmp_path / "runs" / "quickstart_ray"
    for name in ("pareto.json", "trials.csv", "summary.md", "pareto.png", "pareto.html", "latency_breakdown.png",
                 "cpu_profile.yaml", "teacher/config.json"):
        assert (run / name).is_file(), name
    trials = _study(tmp_path, "quickstart_ray").get_trials()
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    assert all(t.values[0] >= 0 for t in trials if t.state == TrialState.COMPLETE)  # held-out loss
    assert len(list(run.glob("supernet/*/state.pt"))) == 1  # trained once, loaded by every Ray worker
    refined = json.loads((run / "refined.json").read_text())  # the driver refined the first finalists
    assert refined["refined"] == len(refined["candidates"]) == 2 and refined["pending"] == []
    assert (run / "best" / "refined.yaml").is_file()
    refine = optuna.load_study(study_name="quickstart_ray.refine", storage=f"sqlite:///{run / 'study.db'}")
    done = [t for t in refine.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and all("node" in t.user_attrs and "pid" in t.user_attrs for t in done)  # Ray tasks


def _raylet_of(node_manager_port: int) -> int:
    """The pid of the raylet started with ``--node-manager-port``."""
    for pid, (_, cmd) in _processes().items():
        if "raylet" in cmd.split(" ", 1)[0] and f"--node_manager_port={node_manager_port}" in cmd:
            return pid
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


def _sqlite_trials(db: Path, name: str) -> list:
    """The study's trials, or none before the driver has created it (or while it holds the file locked)."""
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials()
    except (KeyError, ValueError, RuntimeError, sqlalchemy.exc.OperationalError):
        return []


def test_a_killed_node_and_a_killed_driver_show_in_the_study_and_lose_nothing(cluster, tmp_path):
    """A third node joins, and its raylet is killed (-9) while it runs a trial: Ray restarts the trial elsewhere,
    and the study and summary.md say so. Then the driver itself is killed (-9) mid-search and resumed: the
    trials it left RUNNING are FAIL ``lost`` and retried with their archs, no COMPLETE trial is evaluated again,
    nothing is left RUNNING, and the node count leaves the dead node out."""
    nm_port = _free_port()
    victim = _ray("start", "--address", cluster, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                  "--node-manager-port", str(nm_port), "--disable-usage-stats", env=CLUSTER["env"])
    assert victim.returncode == 0, victim.stdout + victim.stderr
    raylet = _raylet_of(nm_port)
    # trials of seconds (not a zero-cost proxy of a fraction of one), so that the node and the driver are killed
    # while a trial runs however fast the machine is
    exp = {"data": "digits", "budget": {"trials": 4, "wall_time": 900}, "max_retries": 2,
           "objectives": [{"name": "quality", "kind": "quality", "proxy": "short_train",
                           "options": {"steps": 40, "eval_every": 0}},
                          {"name": "params", "kind": "params"}]}
    path = _experiment(tmp_path, "faults", cluster, **exp)
    data = yaml.safe_load(path.read_text())
    data["ray"].update(max_concurrent=3, max_failures=2)
    data["strategy"] = {"name": "random"}
    path.write_text(yaml.safe_dump(data))
    db = tmp_path / "runs" / "faults" / "study.db"
    log = tmp_path / "driver.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "nas", "search", str(path)], env=env, cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:  # a trial runs on the third node: kill that node
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no trial ran on the third node within 300 s"
            on_victim = [p for p in started_with(f"--node_manager_port={nm_port}")
                         if "ImplicitFunc" in _processes().get(p, (0, ""))[1]]
            if on_victim and any(t.state == TrialState.RUNNING for t in _sqlite_trials(db, "faults")):
                break
            time.sleep(0.2)
        os.kill(raylet, signal.SIGKILL)
        def mid_search() -> bool:  # a restart, a finished trial and one evaluating
            trials = _sqlite_trials(db, "faults")
            return any(t.user_attrs.get("restarts") for t in trials) and \
                any(t.state == TrialState.COMPLETE for t in trials) and \
                any(t.state == TrialState.RUNNING and "arch" in t.user_attrs for t in trials)

        while True:  # Ray restarts the trial on another node; then the driver is killed mid-search
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no restart, then a running trial, within 300 s:\n{log.read_text()}"
            # checked again with the driver stopped, so the trial read RUNNING cannot finish before the kill
            if mid_search() and kill_when(driver.pid, mid_search):
                break
            time.sleep(0.2)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in started_with(f"--node_manager_port={nm_port}"):  # what is left of the third node
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "Ray cluster: 3 node(s), 3 CPUs" in log.read_text()
    before = {t.number: t for t in _study(tmp_path, "faults").get_trials()}
    complete = {n for n, t in before.items() if t.state == TrialState.COMPLETE}
    orphans = {n for n, t in before.items() if t.state == TrialState.RUNNING}
    assert orphans, [t.state for t in before.values()]

    _wait_for_dead_nodes(cluster, 1)  # the GCS marks a node dead only after its health checks fail (seconds)
    out = _search(str(path), "--resume").output
    assert "Ray cluster: 2 node(s), 2 CPUs, 0 GPUs (1 dead node(s) not counted)" in out
    trials = {t.number: t for t in _study(tmp_path, "faults").get_trials()}
    assert not [n for n, t in trials.items() if t.state == TrialState.RUNNING]
    for n in complete:  # untouched
        assert (trials[n].state, trials[n].values) == (TrialState.COMPLETE, before[n].values)
    retried = {}
    for t in trials.values():
        if t.system_attrs.get("retry_history"):
            retried[t.system_attrs["retry_history"][-1]] = t
    for n in orphans:
        assert trials[n].state == TrialState.FAIL and "error" not in trials[n].user_attrs
        assert trials[n].user_attrs["lost"] == "its Ray driver stopped before the trial finished"
        if "arch" in trials[n].user_attrs:  # it was evaluating: the same arch again
            assert retried[n].state == TrialState.COMPLETE and retried[n].params == trials[n].params
        else:  # killed while Optuna drew its parameters: nothing to retry
            assert n not in retried
    # the resumed driver's Ray trials evaluated no trial that was COMPLETE before
    ray_dir = tmp_path / "runs" / "faults" / "ray"
    configs = [json.loads(p.read_text()) for p in ray_dir.glob("search_001/*/params.json")]
    assert configs and not {c["nas"]["optuna_trial_id"] for c in configs} & {before[n]._trial_id for n in complete}
    # the killed node: the restarted trial says where it failed and where it ended
    restarted = [t for t in trials.values() if t.user_attrs.get("restarts")]
    assert restarted and all(t.state == TrialState.COMPLETE or t.number in orphans for t in restarted)
    reasons = " ".join(r for t in restarted for r in t.user_attrs["restart_reasons"])
    assert "Actor" in reasons and "unknown error" not in reasons, reasons  # Ray's ActorDied/ActorUnavailable
    summary = (tmp_path / "runs" / "faults" / "summary.md").read_text()
    assert "## Restarted trials" in summary
    assert f"- trial {restarted[0].number}: restarted 1 time(s) by Ray after: Actor" in summary
    for n in orphans:
        assert (f"- trial {n}: lost: its Ray driver stopped before the trial finished; retried as trial "
                f"{retried[n].number} (COMPLETE)" if n in retried else
                f"- trial {n}: lost: its Ray driver stopped before the trial finished; not retried (it was lost "
                "before it had chosen an arch)") in summary
    assert "running" not in summary.split("## ", 1)[0] and "restarted by Ray: 1" in summary


# ---- without the test cluster: the searcher pickles, a private Ray starts by itself, bad addresses are one line ----

CHEAP = {"objectives": [{"name": "params", "kind": "params"},
                        {"name": "macs", "kind": "macs", "resolution": 8, "batch": 1, "text_len": 8}],
         "constraints": [{"objective": "params", "max": 400000}], "budget": {"trials": 4, "wall_time": 600}}


@pytest.mark.parametrize("strategy", ["nsga2", "tpe", "random", "evolution"])
def test_the_searcher_ray_pickles_survives_a_round_trip_with_every_strategy(tmp_path, strategy):
    """What Ray does with the searcher (``OptunaSearch.save``/``restore``, a plain pickle of its ``__dict__``)
    after trials were asked and told, so that the sampler's caches (and NSGA-II's lock on Optuna >= 5.1) are
    set. The pickled bytes carry the storage's redacted URL only."""
    from nas.experiment import load_experiment
    from nas.search.optuna_backend import make_sampler
    from nas.search.ray_backend import _DefineByRun, _storage, _StudySearch

    path = _experiment(tmp_path, f"pickle_{strategy}", "127.0.0.1:1", **CHEAP)
    data = yaml.safe_load(path.read_text())
    data["strategy"] = {"name": strategy, "population": 4} if strategy == "nsga2" else {"name": strategy}
    path.write_text(yaml.safe_dump(data))
    exp = load_experiment(path)
    db = tmp_path / "study.db"
    storage = _storage(f"sqlite:///{db}")
    optuna.create_study(study_name=exp.name, storage=storage, directions=["minimize", "minimize"])
    from search_spaces.space import SearchSpace

    searcher = _StudySearch(_DefineByRun(SearchSpace.from_yaml(SPACE)), metric=["params", "macs"],
                            mode=["min", "min"], sampler=make_sampler(exp), study_name=exp.name, storage=storage,
                            nas_name=exp.name, nas_objectives=["params", "macs"])
    for i in range(6):  # past NSGA-II's first generation of 4, so its generation cache is in use
        config = searcher.suggest(f"t{i}")
        assert config["nas"]["arch"]
        searcher.on_trial_complete(f"t{i}", {"params": float(i), "macs": float(6 - i), "nas_final": True,
                                             "nas_constraints": "{}", "nas_seconds": 0.0})
    saved = tmp_path / "searcher.pkl"
    searcher.save(str(saved))
    blob = saved.read_bytes()
    assert str(db).encode() in blob  # a file path has no password: redact() leaves it as it is
    restored = _StudySearch(_DefineByRun(SearchSpace.from_yaml(SPACE)), metric=["params", "macs"],
                            mode=["min", "min"], sampler=make_sampler(exp), study_name=exp.name, storage=storage,
                            nas_name=exp.name, nas_objectives=["params", "macs"])
    restored.restore(str(saved))
    assert restored.suggest("t6")["nas"]["arch"]  # the restored searcher goes on asking
    lock = getattr(restored._sampler, "_thread_lock", None)
    if lock is not None:  # Optuna >= 5.1: a fresh, usable lock
        assert lock.acquire(timeout=1)
        lock.release()


def test_an_arch_a_running_trial_evaluates_is_drawn_again_not_evaluated_twice(tmp_path):
    """Under Ray every trial is asked by the driver: an arch that a RUNNING trial is evaluating is not handed to a
    second worker. The searcher drops that Optuna trial (FAIL, ``redrawn``, not counted) and draws again."""
    from nas.experiment import load_experiment
    from nas.search.accounting import failure_line
    from nas.search.optuna_backend import counted, make_sampler
    from nas.search.ray_backend import _DefineByRun, _storage, _StudySearch
    from search_spaces.space import SearchSpace

    path = _experiment(tmp_path, "redraw", "127.0.0.1:1", **CHEAP)
    data = yaml.safe_load(path.read_text())
    data["strategy"] = {"name": "random"}
    path.write_text(yaml.safe_dump(data))
    exp = load_experiment(path)
    storage = _storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name=exp.name, storage=storage, directions=["minimize", "minimize"])
    searcher = _StudySearch(_DefineByRun(SearchSpace.from_yaml(SPACE)), metric=["params", "macs"],
                            mode=["min", "min"], sampler=make_sampler(exp), study_name=exp.name, storage=storage,
                            nas_name=exp.name, nas_objectives=["params", "macs"])
    first = searcher.suggest("t0")["nas"]  # running on some worker
    study.enqueue_trial(study.trials[0].params)  # the same arch comes up again, as a sampler may draw it
    second = searcher.suggest("t1")["nas"]
    assert second["arch"] != first["arch"] and second["running_twin"] is None
    trials = study.get_trials()
    dropped = [t for t in trials if "redrawn" in t.user_attrs]
    assert len(dropped) == 1 and dropped[0].state == TrialState.FAIL
    assert dropped[0].params == trials[0].params and dropped[0].user_attrs["redrawn"] == \
        "trial 0 was evaluating the same arch"
    assert counted(study) == 0 and "drawn again" in failure_line(dropped[0], {})


def test_a_sampler_that_cannot_pickle_is_one_strategy_error():
    import threading

    from nas.search.picklable import check_picklable
    from search_spaces import ConfigError

    sampler = optuna.samplers.RandomSampler(seed=0)
    sampler.lock = threading.Lock()  # what Optuna 5.1 did to the stock NSGAIISampler
    with pytest.raises(ConfigError, match=r"cannot be pickled, which Ray needs: TypeError") as err:
        check_picklable(sampler, "nsga2")
    assert err.value.field == "strategy"


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """A new user's environment: no Ray token anywhere, a HOME of its own, a Ray temp dir of its own."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    temp = Path(tempfile.mkdtemp(prefix="rayp", dir="/tmp"))
    return {**env, "HOME": str(home), "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT)}


def test_a_private_ray_starts_with_its_own_token_on_a_fresh_machine(tmp_path):
    """``ray.address: null`` with no ~/.ray and no RAY_* variables (a fresh install): UNet-NAS starts Ray with
    token authentication and a token of its own, runs the budget, and leaves no token file and no process."""
    path = _experiment(tmp_path, "private", None, **CHEAP)
    env = _clean_env(tmp_path)
    try:
        res = subprocess.run([sys.executable, "-m", "nas", "search", str(path)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Ray cluster: 1 node(s)" in res.stdout
        assert "Traceback" not in res.stdout + res.stderr
        assert not (tmp_path / "home" / ".ray").exists()  # the token lived in the environment only
        trials = _study(tmp_path, "private").get_trials()
        assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
        sessions = list(Path(env["RAY_TMPDIR"]).glob("ray/session_*/logs/gcs_server.out")) or \
            list(Path(env["RAY_TMPDIR"]).glob("**/gcs_server.out"))
        assert sessions, "the private Ray wrote no GCS log under its temp dir"
    finally:
        left = stop_started_with(env["RAY_TMPDIR"])
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert not left, f"the private Ray left processes behind: {sorted(left)}"


def test_an_unreachable_ray_address_is_one_error_line_and_leaves_no_study(tmp_path):
    path = _experiment(tmp_path, "nowhere", f"127.0.0.1:{_free_port()}", **CHEAP)
    env = _clean_env(tmp_path)
    try:
        res = subprocess.run([sys.executable, "-m", "nas", "search", str(path)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    finally:
        stop_started_with(env["RAY_TMPDIR"])
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ray.address: cannot reach Ray at 127.0.0.1:" in errors[0], out
    assert "Traceback" not in out
    assert not (tmp_path / "runs" / "nowhere" / "study.db").exists()


def test_a_missing_token_is_named_in_the_one_error_line(cluster, tmp_path):
    """The cluster asks for a token and this machine has none: Ray's reason (InvalidAuthToken), which Ray itself
    only logs as warnings, is in the error line, with what to do."""
    path = _experiment(tmp_path, "no_token", cluster, **CHEAP)
    env = _clean_env(tmp_path)
    try:
        res = subprocess.run([sys.executable, "-m", "nas", "search", str(path)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    finally:
        stop_started_with(env["RAY_TMPDIR"])
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "InvalidAuthToken" in errors[0] and "RAY_AUTH_TOKEN" in errors[0], out
    assert "Traceback" not in out and not (tmp_path / "runs" / "no_token" / "study.db").exists()


def test_the_private_ray_runs_trials_at_normal_priority_unless_the_user_chose(monkeypatch):
    """Ray's default worker niceness (15) lets any busy process starve the trials; the private Ray sets 0, takes
    it back after shutdown, and leaves a user's own choice alone."""
    from nas.search import ray_connect

    monkeypatch.delenv(ray_connect.WORKER_NICENESS, raising=False)
    ray_connect._trial_priority()
    assert os.environ[ray_connect.WORKER_NICENESS] == "0"
    ray_connect._disconnect()
    assert ray_connect.WORKER_NICENESS not in os.environ
    monkeypatch.setenv(ray_connect.WORKER_NICENESS, "10")
    ray_connect._trial_priority()
    ray_connect._disconnect()
    assert os.environ[ray_connect.WORKER_NICENESS] == "10"
