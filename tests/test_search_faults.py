"""Fault tolerance of the local search, with real processes and real databases.

* ``kill -9`` of a search in the middle of a trial, then an immediate ``--resume``: finished trials survive
  unchanged, the killed trial is failed at once (its worker provably gone, long before ``heartbeat_grace``)
  and its arch retried, and the budget is met exactly.
* Two worker processes on one study in a throwaway PostgreSQL server on 127.0.0.1: they draw from distinct
  seeds and evaluate no arch twice, every evaluation lands in exactly one trial, the last report is right,
  ``report``/``export`` read the ``{env: ...}`` storage, plain Optuna opens the study with its constraints, and
  the password (given through an environment variable) is written nowhere.
* Broken experiment files: exit code 2, one line naming the field and line, and no run folder.

The PostgreSQL tests fail (they do not skip) when no server binaries can be found: ``.ci/run`` installs them.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from nas.cli import app
from nas.search.optuna_backend import counted, with_driver
from tests.processes import kill_when

runner = CliRunner()

# a proxy that takes seconds per trial (a kill lands inside one), an objective that is free
SLOW = """name: {name}
seed: 1
space: digits
data: digits
objectives:
  - {{name: quality, kind: quality, proxy: short_train, options: {{steps: 1}}}}
  - {{name: params, kind: params}}
strategy: {{name: {strategy}, population: 4}}
budget: {{trials: {trials}}}
heartbeat_interval: 1
heartbeat_grace: 2
max_retries: 2
"""


def _env(**extra: str) -> dict[str, str]:
    """The worker processes' environment: one thread each (the CPU is shared), plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _sqlite_states(db: Path, study: str, timeout: float = 30) -> dict[int, str]:
    """Trial number -> state, read straight from the SQLite file (read-only; no Optuna, no schema check). A
    running trial that has its arch (all parameters suggested: the proxy is running) reads EVALUATING."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
    try:
        rows = con.execute(
            "SELECT t.number, CASE WHEN t.state = 'RUNNING' AND EXISTS (SELECT 1 FROM trial_user_attributes a "
            "WHERE a.trial_id = t.trial_id AND a.key = 'arch') THEN 'EVALUATING' ELSE t.state END "
            "FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = ?", (study,)).fetchall()
    except sqlite3.OperationalError:  # the worker has not created the tables yet, or holds the file locked
        rows = []
    finally:
        con.close()
    return dict(rows)


# ---- kill -9, then --resume ------------------------------------------------------------------------------------


def test_kill_9_then_resume_keeps_finished_trials_retries_the_killed_one_and_meets_the_budget(tmp_path):
    budget = 4
    path = tmp_path / "exp.yaml"
    # a grace far longer than the resumed search: only the proof that the worker is gone can fail its trial
    path.write_text(SLOW.format(name="killed", strategy="nsga2", trials=budget).replace("heartbeat_grace: 2",
                                                                                          "heartbeat_grace: 600"))
    db = tmp_path / "runs" / "killed" / "study.db"
    cmd = [sys.executable, "-m", "nas", "search", str(path)]
    out = tmp_path / "first.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    def mid_search(timeout: float) -> bool:  # two finished trials and a third one in the middle of its evaluation
        states = _sqlite_states(db, "killed", timeout).values()
        return sum(s == "COMPLETE" for s in states) >= 2 and "EVALUATING" in states

    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"the search ended before it could be killed:\n{out.read_text()}"
            assert time.monotonic() < deadline, "no trial was running after two finished ones within 150 s"
            # checked again with the search stopped, so the trial read EVALUATING cannot finish before the kill
            if db.is_file() and mid_search(30) and kill_when(proc.pid, lambda: mid_search(1)):
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    storage = f"sqlite:///{db}"
    before = optuna.load_study(study_name="killed", storage=storage)
    finished = {t.number: (t.values, t.params) for t in before.trials if t.state == TrialState.COMPLETE}
    running = [t for t in before.trials if t.state == TrialState.RUNNING]
    assert len(finished) >= 2 and len(running) == 1, [t.state for t in before.trials]
    killed = running[0]
    assert "arch" in killed.user_attrs and "seconds" not in killed.user_attrs  # killed while evaluating

    # at once: the killed worker ran on this host and its pid is gone, which --resume can prove
    res = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"trial {killed.number} FAIL: its worker {killed.user_attrs['worker']} no longer runs" in res.stdout

    after = optuna.load_study(study_name="killed", storage=storage)
    trials = {t.number: t for t in after.trials}
    for number, (values, params) in finished.items():  # every trial finished before the kill, unchanged
        assert trials[number].state == TrialState.COMPLETE
        assert (trials[number].values, trials[number].params) == (values, params)
    assert not [t.number for t in after.trials if t.state == TrialState.RUNNING]  # nothing left RUNNING
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and "error" not in dead.user_attrs  # lost, not failed by its own error
    assert "no longer runs" in dead.user_attrs["lost"]
    retries = [t for t in after.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params  # the same arch, run again
    assert retries[0].state == TrialState.COMPLETE and retries[0].user_attrs["arch"] == killed.user_attrs["arch"]
    # the budget: one worker, so exactly budget.trials count; the dead worker's trial is not one of them
    assert counted(after) == budget
    assert sum(t.state == TrialState.COMPLETE for t in after.trials) == budget
    assert len(after.trials) == budget + 1
    rows = (tmp_path / "runs" / "killed" / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + budget + 1 and f"{killed.number},FAIL" in "\n".join(rows)
    summary = (tmp_path / "runs" / "killed" / "summary.md").read_text()
    assert f"- trial {killed.number}: lost: its worker" in summary
    assert f"retried as trial {retries[0].number} (COMPLETE)" in summary and "running" not in summary


# ---- PostgreSQL ------------------------------------------------------------------------------------------------


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def _pg_bin() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in [*candidates, *versions]:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
                "install Debian's postgresql package (.ci/run does this on a clean machine)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL server on 127.0.0.1 and a free port, with a password-protected user and database.
    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` (or ``nobody``) user."""
    try:
        import psycopg2
    except ImportError:
        pytest.fail("psycopg2 is not installed: pip install -e '.[test]' (or '.[postgres]')")
    bin_dir = _pg_bin()
    base = Path(tempfile.mkdtemp(prefix="unet-nas-pg-"))  # not under pytest's tmp_path: that is private to root
    as_user: dict = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    admin_password = secrets.token_hex(12)
    (base / "pw").write_text(admin_password + "\n")
    if as_user:
        os.chown(base / "pw", as_user["user"], as_user["group"])
    data, log = base / "data", base / "server.log"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=base, capture_output=True, text=True, timeout=120, **as_user)

    init = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "admin", "--auth=scram-sha-256",
               f"--pwfile={base / 'pw'}", "-E", "UTF8", "--no-sync")
    if init.returncode != 0:
        pytest.fail(f"initdb failed: {init.stderr.strip()[-800:]}")
    port = 0
    for _attempt in range(3):  # another process may take the free port before the server binds it
        port = _free_port()
        start = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
                    "-o", f"-h 127.0.0.1 -p {port} -k {base}")
        if start.returncode == 0:
            break
    else:
        server_log = log.read_text()[-1500:] if log.is_file() else ""
        pytest.fail(f"PostgreSQL did not start: {start.stderr.strip()[-500:]}\n{server_log}")
    try:
        pg = Postgres("127.0.0.1", port, "nas", secrets.token_hex(12), "nas_test")
        con = psycopg2.connect(host=pg.host, port=port, user="admin", password=admin_password, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE ROLE {pg.user} LOGIN PASSWORD %s", (pg.password,))
            cur.execute(f"CREATE DATABASE {pg.database} OWNER {pg.user}")
        con.close()
        yield pg
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _pg_has_study(pg: Postgres, name: str) -> bool:
    """Whether the study exists, asked with plain SQL: opening an Optuna storage here would race the worker
    creating the schema."""
    import psycopg2

    con = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.database)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT 1 FROM studies WHERE study_name = %s", (name,))
            return cur.fetchone() is not None
    except psycopg2.errors.UndefinedTable:
        return False
    finally:
        con.close()


# Runs the real CLI and notes every evaluation the process makes (pid and arch) in a ledger file, so the test can
# tell an evaluation recorded in two trials, or in none, from the study alone. The evaluator itself is untouched.
# After its first evaluation a worker waits (at most 240 s) until the other has noted one too: on a loaded machine
# the first worker could otherwise use the whole budget while the second is still importing torch, and the test
# would not see two workers share a study at all.
LEDGER_CLI = """
import json, os, sys, time
from nas.search.objectives import Evaluator
evaluate = Evaluator.__call__
def noted(self, arch):
    ev = evaluate(self, arch)
    ledger = os.environ["NAS_TEST_LEDGER"]
    with open(ledger, "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "arch": arch.to_dict()}, sort_keys=True) + "\\n")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with open(ledger) as fh:
            if len({json.loads(line)["pid"] for line in fh}) >= 2:
                break
        time.sleep(0.1)
    return ev
Evaluator.__call__ = noted
from nas.cli import main
sys.argv[0] = "unet-nas"
main()
"""


# two cheap objectives and a zero-cost quality proxy: 30 trials take seconds, so duplicates, not proxy time, show
TWO_WORKERS = """name: {name}
seed: 1
space: digits
data: digits
objectives:
  - {{name: quality, kind: quality, proxy: grad_norm}}
  - {{name: params, kind: params}}
constraints:
  - {{objective: params, max: 300000}}
strategy: {{name: random}}
budget: {{trials: {trials}}}
heartbeat_interval: 1
heartbeat_grace: 5
storage: {{env: NAS_TEST_DB}}
"""


def test_two_workers_on_one_postgres_study_evaluate_distinct_archs_and_lose_nothing(tmp_path, postgres):
    budget = 30
    path = tmp_path / "exp.yaml"
    path.write_text(TWO_WORKERS.format(name="pg_two", trials=budget))
    ledger = tmp_path / "ledger.jsonl"
    env = _env(NAS_TEST_DB=postgres.url, NAS_TEST_LEDGER=str(ledger))
    cmd = [sys.executable, "-c", LEDGER_CLI, "search", str(path)]
    logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    procs: list[subprocess.Popen] = []
    try:
        with open(logs[0], "wb") as log:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while not _pg_has_study(postgres, "pg_two"):  # the second worker joins the study the first created
            assert procs[0].poll() is None, logs[0].read_text()
            assert time.monotonic() < deadline, "the first worker did not create the study within 120 s"
            time.sleep(0.2)
        with open(logs[1], "wb") as log:
            procs.append(subprocess.Popen([*cmd, "--resume"], cwd=tmp_path, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [f.read_text() for f in logs]
    assert codes == [0, 0], "\n".join(outputs)
    first, second = procs

    study = optuna.load_study(study_name="pg_two", storage=with_driver(postgres.url))
    trials = study.trials
    assert len({t.number for t in trials}) == len(trials) == len({t._trial_id for t in trials})
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    pids = {t.number: int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials}
    assert set(pids.values()) == {first.pid, second.pid}  # both workers took part
    # each evaluation is in exactly one trial, and each trial that evaluated did so once
    evaluations = [json.loads(line) for line in ledger.read_text().splitlines()]
    noted = Counter((e["pid"], json.dumps(e["arch"], sort_keys=True)) for e in evaluations)
    evaluated = Counter((pids[t.number], json.dumps(t.user_attrs["arch"], sort_keys=True))
                        for t in trials if "duplicate_of" not in t.user_attrs)
    assert noted == evaluated
    # distinct seeds, and no arch evaluated twice by the two workers together
    archs = Counter(json.dumps(e["arch"], sort_keys=True) for e in evaluations)
    assert max(archs.values()) == 1, [n for n in archs.values() if n > 1]
    assert len(archs) >= budget - 1, f"{len(archs)} distinct archs evaluated in {len(trials)} trials"
    by_number = {t.number: t for t in trials}
    for t in trials:  # a re-suggested arch reuses an earlier trial's values instead of evaluating again
        if "duplicate_of" in t.user_attrs:
            earlier = by_number[t.user_attrs["duplicate_of"]]
            assert (earlier.params, earlier.values) == (t.params, t.values)
    # the budget is checked after each trial, so each extra worker may finish one trial more (see the docs)
    assert budget <= counted(study) <= budget + 1
    run = tmp_path / "runs" / "pg_two"
    files = [f for f in run.rglob("*") if f.is_file()]
    assert {"trials.csv", "summary.md", "experiment.yaml", "pareto.json"} <= {f.name for f in files}
    leaked = [str(f) for f in files if postgres.password.encode() in f.read_bytes()]
    assert not leaked, f"the database password is written in {leaked}"
    assert all(postgres.password not in out for out in outputs)

    # both workers wrote the report; the files hold the final state, whichever finished last
    summary = (run / "summary.md").read_text()
    assert f"- trials: {len(trials)} (complete {len(trials)})" in summary, summary
    assert len((run / "trials.csv").read_text().strip().splitlines()) == 1 + len(trials)
    duplicates = sum("duplicate_of" in t.user_attrs for t in trials)
    assert f"{len(archs)} distinct archs; duplicates (an earlier result reused, nothing evaluated): {duplicates};" \
        in summary

    # report and export read the {env: NAS_TEST_DB} storage as search does: no --storage, no password typed
    os.environ["NAS_TEST_DB"] = postgres.url
    try:
        reported = runner.invoke(app, ["report", str(run)])
        from nas.export import arch_from_run

        chosen = arch_from_run(run, trials[0].number)
    finally:
        del os.environ["NAS_TEST_DB"]
    assert reported.exit_code == 0, reported.output
    assert chosen.arch.to_dict() == trials[0].user_attrs["arch"]
    unset = runner.invoke(app, ["report", str(run)])
    assert unset.exit_code == 2 and "storage.env: environment variable NAS_TEST_DB is not set" in unset.output

    # plain Optuna, on the URL summary.md names, sees the constraints: best_trials holds feasible trials only
    url = summary.split("- storage: `", 1)[1].split("`", 1)[0]
    assert url.startswith("postgresql+psycopg2://nas:***@"), url
    plain = optuna.load_study(study_name="pg_two", storage=url.replace("***", postgres.password))
    feasible = {t.number for t in plain.trials if all(c <= 0 for c in t.system_attrs["constraints"])}
    assert 0 < len(feasible) < len(plain.trials)  # the bound splits the trials
    for t in plain.trials:
        assert t.system_attrs["constraints"] == [t.values[1] - 300000]  # where optuna-dashboard reads them
        assert list(t.constraints.values()) == [t.values[1] - 300000]
    assert plain.best_trials and {t.number for t in plain.best_trials} <= feasible


def test_a_wrong_postgres_password_is_one_clear_error_that_shows_no_password(tmp_path, monkeypatch, postgres):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(SLOW.format(name="pg_wrong", strategy="random", trials=2))
    wrong = postgres.url.replace(postgres.password, "not-the-password-42")
    res = runner.invoke(app, ["search", str(path), "--storage", wrong])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "storage" in lines[0] and "password authentication failed" in lines[0], lines
    assert "not-the-password-42" not in res.output and ":***@" in lines[0]
    assert not (tmp_path / "runs").exists()


CHEAP_PG = """name: {name}
seed: 0
space: digits
objectives:
  - {{name: params, kind: params}}
  - {{name: macs, kind: macs, batch: 2}}
constraints:
  - {{objective: params, max: 350000}}
strategy: {{name: evolution, population: 2, prefilter: 2}}
budget: {{trials: 4}}
references: [digits]
storage: {{env: NAS_TEST_DB}}
"""


def test_a_postgres_search_leaves_the_password_in_no_file_no_output_and_no_log_record(tmp_path, monkeypatch,
                                                                                      postgres):
    """The must-show of the hardening issue, in process so that every log record of every library is seen: with
    debug logging on for the root, optuna, sqlalchemy and ray loggers, a search and a resume (the second with
    the password on the command line, the worst case) leave the password nowhere under runs/, in no output and in
    no log record."""
    import logging
    from urllib.parse import quote

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NAS_TEST_DB", postgres.url)
    path = tmp_path / "exp.yaml"
    path.write_text(CHEAP_PG.format(name="pg_secret"))
    records: list[logging.LogRecord] = []
    make_record = logging.getLogRecordFactory()

    def capture(*args, **kwargs):  # every record any logger creates, whatever its handlers
        record = make_record(*args, **kwargs)
        records.append(record)
        return record

    logging.setLogRecordFactory(capture)
    loggers = [logging.getLogger(n) for n in ("", "optuna", "sqlalchemy", "sqlalchemy.engine", "ray", "nas")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    try:
        first = runner.invoke(app, ["search", str(path)])
        resumed = runner.invoke(app, ["search", str(path), "--resume", "--storage", postgres.url])
        reported = runner.invoke(app, ["report", str(tmp_path / "runs" / "pg_secret"), "--storage", postgres.url])
        # a library that logs a connection string: the record is scrubbed too
        logging.getLogger("some.library").warning("connecting to %s", postgres.url)
    finally:
        logging.setLogRecordFactory(make_record)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    for res in (first, resumed, reported):
        assert res.exit_code == 0, res.output
    secrets_ = {postgres.password, quote(postgres.password, safe="")}
    files = [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    assert {"trials.csv", "summary.md", "experiment.yaml", "pareto.json", "pareto.html"} <= {f.name for f in files}
    leaked = [str(f) for f in files for s in secrets_ if s.encode() in f.read_bytes()]
    assert not leaked, f"the database password is written in {leaked}"
    assert ":***@" in (tmp_path / "runs" / "pg_secret" / "summary.md").read_text()
    assert all(s not in res.output for res in (first, resumed, reported) for s in secrets_)
    assert len(records) > 50  # logging was live: optuna and sqlalchemy logged at debug level
    messages = [r.getMessage() + (r.exc_text or "") for r in records]
    assert not [m for m in messages if any(s in m for s in secrets_)]
    assert "connecting to postgresql://nas:***@127.0.0.1" in messages[-1]


def test_the_ray_searcher_pickles_its_storage_without_the_password(postgres):
    """Ray pickles the searcher (and so the storage) into runs/<name>/ray/ for Tuner.restore."""
    import pickle

    from nas.search.ray_backend import _storage

    storage = _storage(postgres.url)
    blob = pickle.dumps(storage)
    assert postgres.password.encode() not in blob and b":***@" in blob
    restored = pickle.loads(blob)  # on the driver, which has opened the storage, the real URL is found again
    assert restored.url == storage.url and restored.get_all_studies() is not None


# ---- broken experiment files -----------------------------------------------------------------------------------

CHEAP = """name: broken
seed: 0
space: digits
objectives:
  - {name: params, kind: params}
  - {name: macs, kind: macs, batch: 2}
constraints:
  - {objective: params, max: 350000}
budget: {trials: 3}
"""


@pytest.mark.parametrize(
    "old,new,field,line",
    [
        ("seed: 0\n", "seed: 0\nbudgett: {trials: 3}\n", "budgett", 3),                    # unknown key
        ("seed: 0", "seed: zero", "seed", 2),                                                 # wrong type
        ("{trials: 3}", "{trials: -3}", "budget.trials", 9),                                  # out of range
        ("max: 350000", "max: -1", "constraints[0].max", 8),                                  # impossible
        ("objective: params, max", "objective: latency, max", "constraints[0].objective", 8),  # unknown objective
        ("max: 350000}", "max_ratio: 0.5, of: sd99}", "constraints[0].of", 8),               # unknown reference
        ("budget:", "references: [digits, sd99]\nbudget:", "references[1]", 9),               # unknown reference
        ("space: digits", "space: {base: digits, down: [{channels: 16, resnets: [1, 9]}]}", "space.up", 3),
        ("budget:", "heartbeat_interval: 10\nheartbeat_grace: 5\nbudget:", "heartbeat_grace", 10),
        ("budget:", "storage: {env: NAS_TEST_UNSET_VARIABLE}\nbudget:", "storage.env", 9),
        ("budget:", "storage: not-a-url\nbudget:", "storage", 9),
    ],
)
def test_a_broken_experiment_exits_2_with_one_located_message_and_writes_nothing(tmp_path, monkeypatch, old, new,
                                                                                   field, line):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NAS_TEST_UNSET_VARIABLE", raising=False)
    assert old in CHEAP
    path = tmp_path / "exp.yaml"
    path.write_text(CHEAP.replace(old, new, 1))
    res = runner.invoke(app, ["search", str(path)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception  # no traceback
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:{line}: {field}: "), lines
    assert list(tmp_path.iterdir()) == [path]  # no runs/ folder, no study.db


def test_resuming_a_run_that_does_not_exist_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(CHEAP)
    res = runner.invoke(app, ["search", str(path), "--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.output, res.output
    assert list(tmp_path.iterdir()) == [path]


def test_reports_are_written_one_at_a_time_from_a_fresh_snapshot(tmp_path, monkeypatch):
    """Two writers of one run folder (two workers stopping together): the one that waited for the lock reads the
    study after the other's trial finished, so the last files written are never older than the study."""
    import threading

    from filelock import FileLock

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(CHEAP.replace("name: broken", "name: locked"))
    assert runner.invoke(app, ["search", str(path)]).exit_code == 0
    run = tmp_path / "runs" / "locked"
    study = optuna.load_study(study_name="locked", storage=f"sqlite:///{run / 'study.db'}")
    other = study.ask()  # another worker's trial, still running
    results = []
    with FileLock(run / ".report.lock"):  # the other worker is writing its report
        writer = threading.Thread(target=lambda: results.append(runner.invoke(app, ["report", str(run)])))
        writer.start()
        writer.join(timeout=3)
        assert writer.is_alive(), "the report was written while another writer held the run folder's lock"
        other.set_user_attr("error", "RuntimeError: the other worker's trial failed")
        study.tell(other, state=TrialState.FAIL)
    writer.join(timeout=120)
    assert results and results[0].exit_code == 0, results
    summary = (run / "summary.md").read_text()
    assert "- trials: 4 (complete 3, fail 1)" in summary and "running" not in summary, summary


def test_resume_fails_provably_dead_trials_at_once_and_names_the_ones_it_leaves(tmp_path, monkeypatch):
    """What ``--resume`` (any worker's start) does with RUNNING trials, without waiting for heartbeat_grace: the
    trial of a process of this host that is gone, or whose pid now belongs to another process, is failed and
    retried; a live process's trial and another host's are left alone, named in one line."""
    from nas.experiment import load_experiment
    from nas.search.optuna_backend import make_storage
    from nas.search.workers import STARTED_KEY, fail_dead_trials

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(CHEAP.replace("name: broken", "name: dead").replace("budget:", "heartbeat_grace: 600\nbudget:"))
    exp = load_experiment(path)
    exp.run_dir.mkdir(parents=True)
    with warnings.catch_warnings():  # trials asked by hand, not by optimize(), on a storage with heartbeats
        warnings.simplefilter("ignore", UserWarning)
        study = optuna.create_study(study_name="dead", storage=make_storage(exp.storage_url(), exp),
                                    directions=["minimize", "minimize"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent = psutil_process(os.getppid())
    host = socket.gethostname()
    workers = {"gone": (f"{host}:{gone.pid}", 0.0), "reused": (f"{host}:{parent.pid}", parent.create_time() - 60),
               "alive": (f"{host}:{parent.pid}", parent.create_time()), "elsewhere": ("another-host:1", 0.0)}
    numbers = {}
    for label, (worker, started) in workers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        trial.suggest_categorical("x", list(workers))
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("arch", {"label": label})
        study._storage.set_trial_system_attr(trial._trial_id, STARTED_KEY, started)
        numbers[label] = trial.number
    lines: list[str] = []
    left = fail_dead_trials(study, lines.append)
    trials = {t.number: t for t in study.get_trials()}
    for label in ("gone", "reused"):
        t = trials[numbers[label]]
        assert t.state == TrialState.FAIL and "no longer runs" in t.user_attrs["lost"], label
        assert any(f"trial {t.number} FAIL: its worker" in line and "its arch is retried" in line for line in lines)
        retry = [r for r in trials.values() if r.system_attrs.get("failed_trial") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.WAITING and "worker" not in retry[0].user_attrs
    assert "pid" in trials[numbers["reused"]].user_attrs["lost"]  # the pid belongs to another process now
    for label in ("alive", "elsewhere"):
        assert trials[numbers[label]].state == TrialState.RUNNING
    assert left is not None and left.startswith("left 2 RUNNING trial(s) alone: ") and "\n" not in left
    assert f"{numbers['alive']} ({host}:{parent.pid}, alive)" in left and "another-host:1" in left


def psutil_process(pid: int):
    import psutil

    return psutil.Process(pid)
