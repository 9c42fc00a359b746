"""How long ``unet-nas`` takes to answer when it has nothing heavy to do: ``--help``, a subcommand's ``--help``,
argument errors and a light command, each a fresh process as a user runs it.

Target: ``unet-nas --help`` under 0.5 s. The commands are run interleaved, round after round, so a change in
machine load hits all of them alike; each gets the minimum and the median of its rounds, and ``python -c pass``
is timed beside them as the floor no command can go under (interpreter start-up). Wall time is what a user
waits; the CPU time (user + system, of the child process) is recorded too, since on a loaded machine the wall time
mostly measures the other jobs. The noise floor printed is the median spread of the repeats, (median - min) / min.
Load averages before and after are recorded.

    python benchmarks/startup_time.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

TARGET_S = 0.5


def _commands() -> dict[str, list[str]]:
    exe = shutil.which("unet-nas", path=str(Path(sys.executable).parent)) or shutil.which("unet-nas")
    cli = [exe] if exe else [sys.executable, "-m", "nas"]
    return {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "unet-nas --help": [*cli, "--help"],
        "unet-nas search --help": [*cli, "search", "--help"],
        "unet-nas train --help": [*cli, "train", "--help"],
        "unet-nas search --workers 0 x.yaml (argument error)": [*cli, "search", "--workers", "0", "x.yaml"],
        "unet-nas arch describe nope (unknown arch)": [*cli, "arch", "describe", "nope"],
        "unet-nas space count digits": [*cli, "space", "count", "digits"],
    }


def _time(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit code of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ,
                                                                                          "COLUMNS": "100"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, res.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    commands = _commands()
    load_before = os.getloadavg()
    for cmd in commands.values():  # warm the page cache once, untimed
        _time(cmd)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    codes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            seconds, cpu_s, code = _time(cmd)
            samples[name].append(seconds)
            cpu[name].append(cpu_s)
            codes[name] = code
    load_after = os.getloadavg()
    rows = {}
    for name, s in samples.items():
        c = cpu[name]
        rows[name] = {"min_s": round(min(s), 4), "median_s": round(statistics.median(s), 4),
                      "spread_pct": round(100 * (statistics.median(s) - min(s)) / min(s), 1),
                      "cpu_min_s": round(min(c), 4), "cpu_median_s": round(statistics.median(c), 4),
                      "exit_code": codes[name], "samples_s": [round(x, 4) for x in s]}
        print(f"{name:52s} wall min {min(s):.3f} s, median {statistics.median(s):.3f} s; CPU min {min(c):.3f} s, "
              f"median {statistics.median(c):.3f} s (exit {codes[name]})")
    noise = statistics.median(r["spread_pct"] for r in rows.values())
    head = rows["unet-nas --help"]
    met = head["median_s"] < TARGET_S
    print(f"noise floor (median of (median - min) / min): {noise:.1f}%; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    print(f"unet-nas --help: wall median {head['median_s']:.3f} s, min {head['min_s']:.3f} s, CPU median "
          f"{head['cpu_median_s']:.3f} s; target < {TARGET_S} s (wall median) {'met' if met else 'NOT met'}")
    write_result("startup_time", {
        "target_s": TARGET_S, "target_met_median": met, "target_met_min": head["min_s"] < TARGET_S,
        "repeats": args.repeats, "noise_floor_pct": noise, "commands": rows,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    })


if __name__ == "__main__":
    main()
