"""What every benchmark records beside its numbers: machine, versions, date, threads."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from proxies.latency.timing import cpu_name
from search_spaces.yamlio import atomic_write

RESULTS = Path(__file__).parent / "results"


def teacher_suffix(steps: int) -> str:
    """``_teacherN`` for a teacher of N steps other than 400, else nothing: the part of a work folder's or results
    file's name that keeps runs with another teacher (shapes2's default 4,000 included) apart from 400-step ones."""
    return "" if steps == 400 else f"_teacher{steps}"


def table_suffix(tests: str, benchmark: str) -> str:
    """``_table`` for a run whose test archs are a shapes or shapes2 table (it shares its work folder with that
    benchmark's random-test run), else nothing; digits' table run, the first, kept the plain name."""
    return "_table" if tests == "table" and benchmark != "digits" else ""


def run_stem(results_stem: str) -> str:
    """The name of a ``proxy_validity_cosine*`` run for the files other studies write about it: the results file's
    stem less ``proxy_validity_cosine_``, with ``digits`` in front where the benchmark is not named (digits' runs
    kept the plain name): ``digits``, ``digits_seed2``, ``shapes2_table_seed1_teacher4000``."""
    stem = results_stem.removeprefix("proxy_validity_cosine").lstrip("_")
    return stem if stem.startswith(("digits", "shapes")) else "_".join(["digits", stem] if stem else ["digits"])


def environment() -> dict[str, Any]:
    """Where and with what a result was measured. ``torch_cpu_capability`` is the instruction set torch's CPU
    kernels dispatch to (AVX2, AVX512, ...): two machines that differ in it sum in another order, and a long
    training run then ends elsewhere, so a CPU result reproduces bit for bit only where it matches."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "diffusers", "optuna", "unet-nas"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    """Peak GPU memory allocated since the last call, in GiB (None on the CPU); resets the peak."""
    if not device.startswith("cuda"):
        return None
    import torch

    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG, written atomically like every other result file."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write(path, buf.getvalue())


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    return atomic_write(path, json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=2) + "\n")
