"""Search throughput with several local workers on one PostgreSQL study: distinct archs evaluated per minute.

Workers of one study draw from distinct seeds and never evaluate an arch twice (``nas.search.workers``); this
measures what that buys and costs. For 1, 2 and 4 workers (``unet-nas search --workers N``, one thread each)
on a throwaway PostgreSQL server on 127.0.0.1 (started and stopped here; PostgreSQL's server binaries must be
installed: initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin), the same experiment runs: the
``digits`` space, a zero-cost quality proxy (grad_norm) and the parameter count, random search, 20/30/40 trials.

Reported per worker count: trials, archs evaluated, distinct archs evaluated, archs evaluated more than once
(should be 0), duplicate trials (an earlier result reused, nothing evaluated), trials that waited for another
worker's evaluation of the same arch, the search's span (first trial start to last trial end, from the study)
and distinct archs per minute over it, plus the process wall time (start-up, data, report included) and the
load average before and after. One run per count: the machine is shared, so read the load beside the rates.

    nice python benchmarks/search_throughput.py [--workers 1 2 4] [--trials 20 30 40]

Writes ``benchmarks/results/search_throughput.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
from common import write_result
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENT = """name: {name}
seed: 1
space: digits
data: digits
objectives:
  - {{name: quality, kind: quality, proxy: grad_norm}}
  - {{name: params, kind: params}}
strategy: {{name: random}}
budget: {{trials: {trials}}}
storage: {{env: NAS_BENCH_DB}}
"""


def _pg_bin() -> Path:
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    sys.exit("PostgreSQL server binaries (initdb, pg_ctl) not found")


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (as the ``postgres`` user when run as root); yields its URL."""
    import psycopg2

    bin_dir, base = _pg_bin(), Path(tempfile.mkdtemp(prefix="unet-nas-bench-pg-"))
    as_user: dict = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    admin = secrets.token_hex(12)
    (base / "pw").write_text(admin + "\n")
    if as_user:
        os.chown(base / "pw", as_user["user"], as_user["group"])

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=base, capture_output=True, text=True, timeout=120, **as_user)

    data = base / "data"
    init = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "admin", "--auth=scram-sha-256",
               f"--pwfile={base / 'pw'}", "-E", "UTF8", "--no-sync")
    if init.returncode != 0:
        sys.exit(f"initdb failed: {init.stderr[-500:]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "start",
                "-o", f"-h 127.0.0.1 -p {port} -k {base}")
    try:
        if start.returncode != 0:
            sys.exit(f"PostgreSQL did not start: {start.stderr[-500:]}")
        password = secrets.token_hex(12)
        con = psycopg2.connect(host="127.0.0.1", port=port, user="admin", password=admin, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE ROLE bench LOGIN PASSWORD %s", (password,))
            cur.execute("CREATE DATABASE bench OWNER bench")
        con.close()
        yield f"postgresql+psycopg2://bench:{password}@127.0.0.1:{port}/bench"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(base, ignore_errors=True)


def one_run(url: str, workers: int, trials: int, folder: Path) -> dict:
    name = f"throughput_{workers}w"
    path = folder / f"{name}.yaml"
    path.write_text(EXPERIMENT.format(name=name, trials=trials))
    env = {**os.environ, "NAS_BENCH_DB": url, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    load_before = os.getloadavg()
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "nas", "search", str(path), "--workers", str(workers)],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if res.returncode != 0:
        sys.exit(f"the {workers}-worker search failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    evaluated = [t for t in done if "duplicate_of" not in t.user_attrs]
    per_arch = Counter(json.dumps(t.user_attrs["arch"], sort_keys=True) for t in evaluated)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in study.trials)).total_seconds()
    return {
        "workers": workers, "budget": trials, "trials": len(study.trials),
        "states": dict(Counter(t.state.name for t in study.trials)),
        "evaluated": len(evaluated), "distinct_archs_evaluated": len(per_arch),
        "archs_evaluated_more_than_once": sum(n > 1 for n in per_arch.values()),
        "duplicate_trials": len(done) - len(evaluated),
        "waited_for_another_worker": sum("waited_for" in t.user_attrs for t in study.trials),
        "worker_processes": len({t.user_attrs.get("worker") for t in study.trials}),
        "search_span_s": round(span, 2), "distinct_archs_per_minute": round(60 * len(per_arch) / span, 2),
        "process_wall_s": round(wall, 2),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, nargs="+", default=[20, 30, 40])
    args = parser.parse_args()
    if len(args.trials) != len(args.workers):
        sys.exit("--trials needs one budget per --workers count")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    with postgres() as url, tempfile.TemporaryDirectory(prefix="unet-nas-bench-") as folder:
        for workers, trials in zip(args.workers, args.trials, strict=True):
            runs.append(one_run(url, workers, trials, Path(folder)))
            print(json.dumps(runs[-1]))
    out = write_result("search_throughput", {
        "what": "unet-nas search --workers N on one PostgreSQL study (127.0.0.1): digits space, grad_norm + "
                "params, random search; distinct archs evaluated per minute of the search's span",
        "threads_per_worker": 1, "runs": runs,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
