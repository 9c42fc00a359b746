"""Atomic outputs: a writer killed (SIGKILL) in the middle of a write leaves the old file or none, never a torn one.

The writer is a real child process running the project's own writers (``LatencyProfile.save``, ``atomic_write``
as used by the reports, ``atomic_dir`` as used for model folders and caches). Its file object is made to stall
after putting half of the bytes on disk, so the kill lands mid-write every time rather than by luck. The same
kill against a plain ``open(path, "wb")`` does leave a torn file: the test can tell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxies.latency import LatencyProfile
from proxies.latency.profile import FORMAT
from search_spaces.yamlio import atomic_dir, atomic_write, dump_yaml

ROOT = Path(__file__).parents[1]

WRITER = r"""
import builtins, os, sys, time
from pathlib import Path
import search_spaces.yamlio as yamlio

target, marker, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


class Stalling:
    '''A real file whose write() puts half of the bytes on disk, then stalls until the parent kills us.'''

    def __init__(self, *args, **kwargs):
        self.fh = builtins.open(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        marker.write_text("half written")
        time.sleep(120)

    def flush(self):
        self.fh.flush()

    def fileno(self):
        return self.fh.fileno()


yamlio.open = Stalling  # the open() inside atomic_write
if mode == "profile":
    from proxies.latency import LatencyProfile
    LatencyProfile.from_dict(yamlio.read_file(sys.argv[4])[0]).save(target)
elif mode == "report":
    yamlio.atomic_write(target, Path(sys.argv[4]).read_text())
elif mode == "folder":
    with yamlio.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
        with Stalling(tmp / "weights.safetensors", "wb") as fh:
            fh.write(b"w" * 1_000_000)
elif mode == "naive":  # what a non-atomic writer does
    with Stalling(target, "wb") as fh:
        fh.write(Path(sys.argv[4]).read_bytes())
"""


def _profile(blocks: int) -> dict:
    return {
        "format": FORMAT, "device_name": "test cpu",
        "settings": {"device": "cpu", "dtype": "fp32", "batch": 2, "resolution": 64, "text_len": 8, "threads": 1,
                     "channels_last": False, "compile": False},
        "protocol": {"statistic": "min", "warmup": 1, "min_repeats": 2, "max_repeats": 3, "rel_tol": 0.02},
        "blocks": {f"block_{i}": {"ms": 1.0 + i, "median_ms": 1.0 + i, "spread_pct": 1.0, "repeats": 3}
                   for i in range(blocks)},
    }


def _kill_mid_write(tmp_path: Path, mode: str, target: Path, source: Path | None = None) -> None:
    marker = tmp_path / f"{mode}.marker"
    args = [sys.executable, "-c", WRITER, str(target), str(marker), mode] + ([str(source)] if source else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_profile_killed_mid_write_leaves_the_old_profile_or_none(tmp_path):
    old, new = _profile(3), _profile(4000)
    target = tmp_path / "cpu.yaml"
    source = atomic_write(tmp_path / "new_source.yaml", dump_yaml(new))

    _kill_mid_write(tmp_path, "profile", target, source)  # no old file: none is left
    assert not target.exists()

    LatencyProfile.from_dict(old).save(target)
    before = target.read_bytes()
    _kill_mid_write(tmp_path, "profile", target, source)
    assert target.read_bytes() == before
    assert len(LatencyProfile.load(target).blocks) == 3
    torn = [p for p in tmp_path.iterdir() if p.name.startswith(".cpu.yaml.tmp")]
    assert torn and 0 < torn[0].stat().st_size < len(dump_yaml(new))  # the kill really landed mid-write


def test_a_report_killed_mid_write_keeps_the_old_one_and_a_naive_write_would_not(tmp_path):
    source = tmp_path / "big.json"
    source.write_text('{"trials": [' + ",".join(['{"number": 1}'] * 50_000) + "]}\n")
    target = tmp_path / "pareto.json"
    atomic_write(target, '{"trials": []}\n')
    _kill_mid_write(tmp_path, "report", target, source)
    assert target.read_text() == '{"trials": []}\n'

    # the control: the same kill against a plain open(path, "wb") leaves half a file behind
    _kill_mid_write(tmp_path, "naive", target, source)
    assert 0 < target.stat().st_size < source.stat().st_size


def test_a_model_folder_killed_mid_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "unet"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"old": true}')
        (tmp / "weights.safetensors").write_bytes(b"old weights")
    _kill_mid_write(tmp_path, "folder", target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.safetensors"]
    assert (target / "config.json").read_text() == '{"old": true}'
    assert (target / "weights.safetensors").read_bytes() == b"old weights"
