"""Analytic roofline predictor from a device spec, for devices the user cannot measure (yet).

Each kernel of each block (:mod:`.kernels`) takes ``max(flops / (peak x compute_eff), bytes / (bandwidth x
memory_eff)) + kernel_overhead``. Weights stream from DRAM unless the whole model fits in on-chip memory;
activations stream from DRAM unless the spec says the device keeps them on chip (``onchip_activations``, true
for Qualcomm Cloud AI 100 whose compiler tiles activations into its SRAM) and the kernel's working set fits.

The efficiencies and the per-kernel overhead are the soft part of any roofline. Specs ship with stated
assumptions; :meth:`RooflinePredictor.calibrate` fits all three to measured whole-network latencies (from a
profile's calibration set, or any (arch, ms) pairs) by least squares on log error, and the calibrated spec can
be saved and shipped like the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.arch import UNetArch
from search_spaces.errors import ConfigError
from search_spaces.schema import check_keys, check_type
from search_spaces.yamlio import atomic_write, dump_yaml, load_validated

from .blocks import block_key
from .kernels import block_kernels, kernel_array
from .predictor import LatencyPredictor
from .profile import LatencyProfile, Settings

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass(frozen=True)
class DeviceSpec:
    """A device's datasheet figures plus the efficiency assumptions that turn them into time."""

    name: str
    source: str
    peak_tflops: dict[str, float]  # dense (no sparsity) per dtype: fp16, bf16, fp32, int8
    memory_bandwidth_gbs: float
    onchip_memory_mb: float = 0.0
    onchip_activations: bool = False
    kernel_overhead_us: float = 5.0
    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.7
    notes: str = ""
    calibrated_from: dict[str, Any] | None = None

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s at ``dtype``; a dtype the spec gives no figure for is refused."""
        if dtype not in self.peak_tflops:
            raise ConfigError(f"{self.name} has no {dtype} peak in its spec (it has {', '.join(self.peak_tflops)})",
                              field="peak_tflops")
        return self.peak_tflops[dtype] * 1e12

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["calibrated_from"] is None:
            out.pop("calibrated_from")
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, dump_yaml(self.to_dict()))


_SPEC_TYPES: dict[str, Any] = {
    "name": str, "source": str, "peak_tflops": dict, "memory_bandwidth_gbs": (int, float),
    "onchip_memory_mb": (int, float), "onchip_activations": bool, "kernel_overhead_us": (int, float),
    "compute_efficiency": (int, float), "memory_efficiency": (int, float), "notes": str,
    "calibrated_from": (dict, type(None)),
}


def spec_from_dict(data: Any) -> DeviceSpec:
    """Validate a device spec mapping (unknown keys, missing figures and impossible values are errors)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a device spec must be a mapping, got {type(data).__name__}")
    check_keys(data, set(_SPEC_TYPES), "")
    for key in ("name", "source", "peak_tflops", "memory_bandwidth_gbs"):
        if key not in data:
            raise ConfigError("missing" + (" (say where the figures come from)" if key == "source" else ""),
                              field=key)
    kwargs = {k: check_type(v, _SPEC_TYPES[k], k) for k, v in data.items()}
    peaks = {}
    for dtype, value in kwargs["peak_tflops"].items():
        if dtype not in BYTES:
            raise ConfigError(f"unknown dtype (known: {', '.join(BYTES)})", field=f"peak_tflops.{dtype}")
        check_type(value, (int, float), f"peak_tflops.{dtype}")
        if value <= 0:
            raise ConfigError(f"must be positive, got {value}", field=f"peak_tflops.{dtype}")
        peaks[dtype] = float(value)
    if not peaks:
        raise ConfigError("needs at least one dtype's peak", field="peak_tflops")
    kwargs["peak_tflops"] = peaks
    for key in ("memory_bandwidth_gbs", "compute_efficiency", "memory_efficiency"):
        if key in kwargs and kwargs[key] <= 0:
            raise ConfigError(f"must be positive, got {kwargs[key]}", field=key)
    for key in ("compute_efficiency", "memory_efficiency"):
        if key in kwargs and kwargs[key] > 1:
            raise ConfigError(f"an efficiency is a fraction of the peak, at most 1, got {kwargs[key]}", field=key)
    for key in ("onchip_memory_mb", "kernel_overhead_us"):
        if key in kwargs and kwargs[key] < 0:
            raise ConfigError(f"must be >= 0, got {kwargs[key]}", field=key)
    for key in ("memory_bandwidth_gbs", "onchip_memory_mb", "kernel_overhead_us", "compute_efficiency",
                "memory_efficiency"):
        if key in kwargs:
            kwargs[key] = float(kwargs[key])
    return DeviceSpec(**kwargs)


def _spec_dir() -> Path:
    return Path(str(resources.files("proxies.latency") / "devices"))


def list_specs() -> list[str]:
    """Names of the shipped device specs (``cloud_ai_100_standard``, ``a100_sxm``, ...)."""
    return sorted(p.stem for p in _spec_dir().glob("*.yaml"))


def load_spec(ref: str | os.PathLike) -> DeviceSpec:
    """A shipped spec by name, or a spec YAML file."""
    path = Path(ref)
    if not path.exists() and isinstance(ref, str) and not ref.endswith((".yaml", ".yml")):
        path = _spec_dir() / f"{ref}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown device spec {ref!r} (shipped: {', '.join(list_specs())}; or give a file)",
                              field="spec")
    return load_validated(path, spec_from_dict)


@dataclass
class _Terms:
    """Per-arch roofline inputs, so calibration can re-evaluate cheaply: flops, DRAM bytes per kernel, stages."""

    flops: np.ndarray
    dram_bytes: np.ndarray
    stage_of_kernel: list[str] = field(default_factory=list)


class RooflinePredictor(LatencyPredictor):
    """Analytic per-kernel roofline of a :class:`DeviceSpec` at :class:`Settings` (dtype, batch, size, text)."""

    name = "roofline"

    def __init__(self, spec: DeviceSpec, settings: Settings):
        self.spec = spec
        self.settings = settings
        self.peak = spec.peak(settings.dtype)
        self.bytes_per = BYTES[settings.dtype]
        self._cache: dict[tuple[str, bool], float] = {}  # (block key, weights resident) -> ms

    def _block_terms(self, k: np.ndarray, weights_resident: bool) -> _Terms:
        """FLOPs and DRAM bytes of one block's kernels (``k`` from :func:`kernel_array`)."""
        act = k[:, 1] * self.bytes_per
        if self.spec.onchip_activations:
            act = np.where(act <= self.spec.onchip_memory_mb * 1e6, 0.0, act)
        weights = 0.0 if weights_resident else k[:, 2] * self.bytes_per
        return _Terms(k[:, 0], act + weights)

    def _terms(self, arch: UNetArch) -> _Terms:
        s = self.settings
        sizes = arch.sizes(s.latent_size)
        per_block = [(b, kernel_array(block_kernels(arch, b, sizes, s.text_len), s.batch)) for b in arch.blocks]
        weights_total = sum(float(k[:, 2].sum()) for _, k in per_block) * self.bytes_per
        resident = self.spec.onchip_memory_mb > 0 and weights_total <= self.spec.onchip_memory_mb * 1e6
        parts = [self._block_terms(k, resident) for _, k in per_block]
        stages = [b.stage or "stem" for b, k in per_block for _ in range(len(k))]
        return _Terms(np.concatenate([p.flops for p in parts]), np.concatenate([p.dram_bytes for p in parts]), stages)

    def _kernel_ms(self, t: _Terms, ce: float, me: float, overhead_us: float) -> np.ndarray:
        compute = t.flops / (self.peak * ce)
        memory = t.dram_bytes / (self.spec.memory_bandwidth_gbs * 1e9 * me)
        return 1e3 * np.maximum(compute, memory) + overhead_us * 1e-3

    def breakdown(self, arch: UNetArch) -> dict[str, float]:
        """Per-stage ms; block times are cached by block key, so a search pays numpy work once per shape."""
        s, spec = self.settings, self.spec
        sizes = arch.sizes(s.latent_size)
        keys = [block_key(arch, b, sizes) for b in arch.blocks]
        resident = (spec.onchip_memory_mb > 0
                    and sum(_weights(arch, b) for b in arch.blocks) * self.bytes_per <= spec.onchip_memory_mb * 1e6)
        out: dict[str, float] = {}
        for b, key in zip(arch.blocks, keys, strict=True):
            ms = self._cache.get((key, resident))
            if ms is None:
                k = kernel_array(block_kernels(arch, b, sizes, s.text_len), s.batch)
                ms = float(self._kernel_ms(self._block_terms(k, resident), spec.compute_efficiency,
                                           spec.memory_efficiency, spec.kernel_overhead_us).sum())
                self._cache[(key, resident)] = ms
            stage = b.stage or "stem"
            out[stage] = out.get(stage, 0.0) + ms
        return out

    def bound(self, arch: UNetArch) -> dict[str, float]:
        """Share of predicted time in compute-bound kernels, memory-bound kernels and per-kernel overhead."""
        t = self._terms(arch)
        compute = t.flops / (self.peak * self.spec.compute_efficiency)
        memory = t.dram_bytes / (self.spec.memory_bandwidth_gbs * 1e9 * self.spec.memory_efficiency)
        over = len(t.flops) * self.spec.kernel_overhead_us * 1e-6
        total = float(np.maximum(compute, memory).sum()) + over
        return {"compute": float(compute[compute >= memory].sum()) / total,
                "memory": float(memory[memory > compute].sum()) / total, "overhead": over / total}

    def calibrate(self, archs: Sequence[UNetArch], measured_ms: Sequence[float],
                  label: str = "") -> RooflinePredictor:
        """A predictor whose compute/memory efficiency and per-kernel overhead are fitted to measured samples
        (least squares on log(predicted / measured); efficiencies kept in (0, 1], overhead in [0, 10 ms])."""
        from scipy.optimize import least_squares

        if len(archs) < 3:
            raise ConfigError(f"calibrating a roofline needs at least 3 measured networks, got {len(archs)}",
                              field="calibration")
        terms = [self._terms(a) for a in archs]
        target = np.log(np.asarray(measured_ms, float))

        def residuals(x: np.ndarray) -> np.ndarray:
            ce, me, ov = np.exp(x[0]), np.exp(x[1]), x[2]
            return np.array([np.log(self._kernel_ms(t, ce, me, ov).sum()) for t in terms]) - target

        spec = self.spec
        x0 = [*np.log([spec.compute_efficiency, spec.memory_efficiency]).tolist(), spec.kernel_overhead_us]
        fit = least_squares(residuals, x0, bounds=([np.log(1e-5)] * 2 + [0.0], [0.0, 0.0, 1e4]))
        ce, me, ov = float(np.exp(fit.x[0])), float(np.exp(fit.x[1])), float(fit.x[2])
        err = np.abs(np.exp(residuals(fit.x)) - 1)
        new = replace(spec, compute_efficiency=round(ce, 6), memory_efficiency=round(me, 6),
                      kernel_overhead_us=round(ov, 4),
                      calibrated_from={"samples": len(archs), "source": label, "fit_mape_pct": round(
                          100 * float(err.mean()), 2), **self.settings.query()})
        return RooflinePredictor(new, self.settings)

    def calibrate_from_profile(self, profile: LatencyProfile) -> RooflinePredictor:
        """Calibrate on a profile's whole-network samples (its settings must match this predictor's)."""
        profile.check_settings(self.settings)
        return self.calibrate([c.arch for c in profile.calibration], [c.timing.ms for c in profile.calibration],
                              label=profile.source or profile.device_name)


def _weights(arch: UNetArch, b: Any) -> float:
    return float(sum(k[2] for k in block_kernels(arch, b, arch.sizes(), 1)))


def measure_local_spec(settings: Settings, size: int = 1024, repeats: int = 5) -> DeviceSpec:
    """A spec for the local device from two micro-benchmarks: a square matmul (peak FLOP/s) and a large copy
    (bandwidth), at the settings' dtype and thread count. A starting point for :meth:`RooflinePredictor.calibrate`
    on machines without a datasheet entry (e.g. this CPU)."""
    import torch

    from .timing import describe_device, make_timer, measuring, torch_device, torch_dtype

    device, dtype = torch_device(settings), torch_dtype(settings.dtype)
    timer = make_timer(settings)
    a = torch.randn(size, size, device=device).to(dtype)
    big = torch.empty(32 * 2**20 // BYTES[settings.dtype], device=device, dtype=dtype)
    with measuring(settings):
        mm = min(timer(lambda: a @ a) for _ in range(repeats))
        cp = min(timer(lambda: big.clone()) for _ in range(repeats))
    return DeviceSpec(
        name=describe_device(settings), source="measured locally: matmul and copy micro-benchmarks",
        peak_tflops={settings.dtype: 2 * size**3 / (mm * 1e-3) / 1e12},
        memory_bandwidth_gbs=2 * big.numel() * BYTES[settings.dtype] / (cp * 1e-3) / 1e9,
        kernel_overhead_us=5.0, compute_efficiency=1.0, memory_efficiency=1.0,
        notes="peak = best matmul, bandwidth = best copy; calibrate the efficiencies from measured networks",
    )
