"""Stop exactly the processes a test started, found by a marker only they carry, never by name.

``ray stop`` (with or without ``--force``) stops every Ray process of the machine, a user's own cluster
included. A test's Ray nodes are instead found by their private temp dir, which every Ray daemon has on its
command line, together with all their descendants (Ray's agents and workers rename themselves ``ray::...``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process this user can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmdline)
    return table


def started_with(marker: str) -> set[int]:
    """The processes whose command line contains ``marker``, and all their descendants."""
    table = _processes()
    found = {pid for pid, (_, cmd) in table.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def stop_started_with(marker: str, grace: float = 15.0) -> set[int]:
    """SIGTERM the processes ``started_with(marker)``, then SIGKILL what is left after ``grace`` seconds.
    Returns the pids still alive at the end (normally none)."""
    pids = started_with(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            pids = {pid for pid in pids if _alive(pid)}
            if not pids:
                return set()
            time.sleep(0.2)
        pids |= started_with(marker)  # workers started meanwhile
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent (not ours, for daemons) reaps it


def kill_when(pid: int, ready: Callable[[], bool]) -> bool:
    """SIGKILL ``pid`` if ``ready()`` holds while the process is stopped (SIGSTOP); otherwise let it go on
    (SIGCONT). Returns whether it was killed.

    Reading a state and then killing leaves a window in which the process moves on (a trial read RUNNING is
    told COMPLETE before the kill lands, and the test sees nothing left to recover). A stopped process writes
    nothing, so what ``ready`` read is exactly what the kill leaves behind. ``ready`` must not wait on the
    process (e.g. on a database lock it holds): it should give up quickly and say not ready."""
    os.kill(pid, signal.SIGSTOP)
    killed = False
    try:
        killed = ready()
    finally:
        os.kill(pid, signal.SIGKILL if killed else signal.SIGCONT)
    return killed
