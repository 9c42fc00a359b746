"""Time exported ONNX models with ONNX Runtime: the reference runner behind ``unet-nas profile run-onnx``.

It writes the CSV any other toolchain's timings are imported from (``key,ms,repeats,spread``: the median
per-inference milliseconds, the number of timed runs and the (p90 - p10) / median spread in percent), so a
user's own numbers and these go through the same importer.

Protocol, as for the PyTorch profile: a fixed intra-op thread count (1 on the CPU by default) and no inter-op
parallelism, warm-up runs, then timed runs until the median moves less than 2%; whole networks are timed
interleaved (one run of each in turn, in groups) so a burst of load from another process hits all of them alike.
Inputs and outputs are bound to the execution device once (I/O binding), so a GPU run times the model, not
host-device copies.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.errors import ConfigError
from search_spaces.yamlio import atomic_write

from .onnx_export import ort_session, require_onnx
from .onnx_manifest import Manifest
from .profile import Protocol, Timing
from .timing import _stable, summarise

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
CSV_COLUMNS = ("key", "ms", "repeats", "spread")
DEFAULT_PROTOCOL = Protocol(statistic="median", warmup=3, min_repeats=10, max_repeats=50)
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}

ProgressFn = Callable[[str, int, int, str], None]


def providers_for(provider: str, fp16: bool) -> list[Any]:
    """ONNX Runtime provider list for ``cpu``, ``cuda`` or ``tensorrt`` (TensorRT falls back to CUDA for nodes it
    cannot take, as ORT does); a provider this ONNX Runtime build lacks is a ConfigError listing what it has."""
    _, ort = require_onnx()
    if provider not in PROVIDERS:
        raise ConfigError(f"must be one of {', '.join(PROVIDERS)}, got {provider!r}", field="--provider")
    name = PROVIDERS[provider]
    have = ort.get_available_providers()
    if name not in have:
        raise ConfigError(f"this onnxruntime build has no {name} (it has {', '.join(have)}); install "
                          "onnxruntime-gpu for cuda/tensorrt", field="--provider")
    if provider == "tensorrt":
        return [(name, {"trt_fp16_enable": fp16}), "CUDAExecutionProvider"]
    return [name]


class OrtModel:
    """One session with seeded random inputs bound on the execution device; calling it runs one inference."""

    def __init__(self, path: str | os.PathLike, providers: list[Any], threads: int | None):
        _, ort = require_onnx()
        self.session = ort_session(path, providers, threads)
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.session.get_providers()[0] != wanted:
            raise ConfigError(f"ONNX Runtime could not run {path} on {wanted} (it used "
                              f"{self.session.get_providers()[0]})", field="--provider")
        device = "cpu" if wanted == "CPUExecutionProvider" else "cuda"
        rng = np.random.default_rng(0)
        self.binding = self.session.io_binding()
        self._keep = []
        for inp in self.session.get_inputs():
            if inp.type not in _NP or not all(isinstance(d, int) for d in inp.shape):
                raise ConfigError(f"{path}: input {inp.name} has type {inp.type} and shape {inp.shape}; the runner "
                                  "times float32/float16 models with static shapes (time others with their toolchain)",
                                  field="inputs")
            dt = _NP[inp.type]
            arr = (np.full(inp.shape, 500, dtype=dt) if dt == np.int64
                   else rng.standard_normal(inp.shape).astype(dt))
            value = ort.OrtValue.ortvalue_from_numpy(arr, device, 0)
            self._keep.append(value)
            self.binding.bind_ortvalue_input(inp.name, value)
        for out in self.session.get_outputs():
            self.binding.bind_output(out.name, device)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)


def _ms(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()  # ORT synchronises the device at the end of a run, so wall time is the inference time
    return (time.perf_counter() - t) * 1e3


def time_interleaved(models: Sequence[Callable[[], Any]], protocol: Protocol,
                     samples_out: list[list[float]] | None = None) -> list[Timing]:
    """Warm up, then round after round one run of each model, until every model's statistic is stable
    (``samples_out`` receives each model's raw milliseconds, for other statistics of the same runs)."""
    for _ in range(protocol.warmup):
        for m in models:
            m()
    samples: list[list[float]] = [[] for _ in models]
    while len(samples[0]) < protocol.max_repeats:
        for k, m in enumerate(models):
            samples[k].append(_ms(m))
        if all(_stable(s, protocol) for s in samples):
            break
    if samples_out is not None:
        samples_out.extend(samples)
    return [summarise(s, protocol) for s in samples]


def time_files(paths: Sequence[str | os.PathLike], provider: str = "cpu", threads: int | None = 1,
               protocol: Protocol = DEFAULT_PROTOCOL, group: int = 6, fp16: bool = False,
               on_group: Callable[[int], None] | None = None,
               samples_out: list[list[float]] | None = None) -> list[Timing]:
    """Time ONNX files interleaved in groups of ``group`` (``group=1``: one at a time)."""
    providers = providers_for(provider, fp16)
    out: list[Timing] = []
    for start in range(0, len(paths), group):
        models = [OrtModel(p, providers, threads) for p in paths[start:start + group]]
        out.extend(time_interleaved(models, protocol, samples_out))
        del models
        if on_group is not None:
            on_group(len(out))
    return out


def time_manifest(manifest: Manifest, provider: str = "cpu", threads: int | None = 1,
                  protocol: Protocol = DEFAULT_PROTOCOL, group: int = 6,
                  progress: ProgressFn | None = None,
                  samples_out: dict[str, list[float]] | None = None) -> dict[str, Timing]:
    """Every model of a verified export: blocks one at a time, calibration networks interleaved
    (``samples_out`` receives each model's raw milliseconds by key)."""
    if manifest.settings.dtype == "bf16":
        raise ConfigError("the ONNX Runtime runner times fp32 and fp16 exports; time a bf16 export with your "
                          "toolchain and import its CSV", field="dtype", source=str(manifest.root))
    fp16 = manifest.settings.dtype == "fp16"
    out: dict[str, Timing] = {}
    blocks, networks = manifest.blocks, manifest.networks
    for i, entry in enumerate(blocks):
        if progress:
            progress("blocks", i, len(blocks), entry.key)
        raw: list[list[float]] = []
        out[entry.key] = time_files([manifest.path(entry)], provider, threads, protocol, 1, fp16, samples_out=raw)[0]
        if samples_out is not None:
            samples_out[entry.key] = raw[0]
    if progress:
        progress("blocks", len(blocks), len(blocks), "")
        progress("networks", 0, len(networks), "")

    def done(n: int) -> None:
        if progress:
            progress("networks", n, len(networks), "")

    raw = []
    timings = time_files([manifest.path(e) for e in networks], provider, threads, protocol, group, fp16, done, raw)
    out.update({e.key: t for e, t in zip(networks, timings, strict=True)})
    if samples_out is not None:
        samples_out.update({e.key: r for e, r in zip(networks, raw, strict=True)})
    return out


def timings_csv(timings: dict[str, Timing]) -> str:
    """The CSV text: ``key,ms,repeats,spread`` with ms the run's statistic and spread in percent."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for key, t in timings.items():
        writer.writerow([key, f"{t.ms:.6g}", t.repeats, f"{t.spread_pct:.2f}"])
    return buf.getvalue()


def write_timings(path: str | os.PathLike, timings: dict[str, Timing]) -> Path:
    return atomic_write(path, timings_csv(timings))
