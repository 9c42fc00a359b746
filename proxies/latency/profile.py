"""The latency profile file: what was measured, on which device, under which settings and protocol.

A profile is a YAML file that a user measures once per device (``unet-nas profile``) and that the lookup-table,
roofline-calibration and learned predictors read. It is validated like every other input of UNet-NAS: unknown
keys, wrong types and impossible values are a :class:`ConfigError` naming the file, the field and the line.

Why every setting is recorded: a block measured at batch 2 in fp16 says nothing about batch 1 in fp32, and a
number taken with 16 threads is not comparable with one taken with 1. A predictor refuses a profile whose
dtype, batch, resolution or text length differ from the query (:meth:`LatencyProfile.check_settings`) instead
of silently answering for the wrong shape.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from search_spaces.arch import UNetArch
from search_spaces.errors import ConfigError
from search_spaces.schema import check_keys, check_type
from search_spaces.yamlio import atomic_write, dump_yaml, load_validated

from .trust import trust_from_dict

FORMAT = "unet-nas-latency-profile/1"
DTYPES = ("fp32", "fp16", "bf16")
VAE_SCALE = 8  # SD-family VAEs downsample images 8x: a 512 px image is a 64x64 latent
_PROFILE_DIR = Path(__file__).parent / "profiles"
STATISTICS = ("min", "p5", "p10", "p20", "p25", "median")
EXTERNAL = "external"  # the device of a profile imported from timings taken outside PyTorch (ONNX toolchains)


@dataclass(frozen=True)
class Settings:
    """The shape and numerics a latency is measured or predicted for.

    ``resolution`` is the *image* size in pixels (512 for SD1.5); the U-Net runs on ``resolution // 8`` latents.
    ``device``/``threads``/``channels_last``/``compile``/``cuda_graph`` describe how the measurement ran
    (``device: external``: imported from another toolchain's timings, see ``proxies.latency.onnx_import``); only
    ``dtype``, ``batch``, ``resolution`` and ``text_len`` define the query a profile may answer.

    ``cuda_graph`` times replays of a captured CUDA graph instead of eager launches. Measured on an H100 at
    512 px, batch 2, fp16, an eager SD-class U-Net step is bound by the CPU launching its ~1,000 kernels, so the
    timing carries host jitter and block sums miss the fusion of launch gaps; deployments (TensorRT, compiled
    graphs, vendor runtimes) do not pay that cost either.
    """

    device: str = "cpu"
    dtype: str = "fp32"
    batch: int = 2
    resolution: int = 512
    text_len: int = 77
    threads: int | None = 1
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if not (self.device in ("cpu", "cuda", EXTERNAL) or self.device.startswith("cuda:")):
            raise ConfigError(f"must be cpu, cuda, cuda:N or {EXTERNAL}, got {self.device!r}", field="device")
        if self.dtype not in DTYPES:
            raise ConfigError(f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}", field="dtype")
        for key in ("batch", "resolution", "text_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"must be positive, got {getattr(self, key)}", field=key)
        if self.resolution % VAE_SCALE:
            raise ConfigError(f"the image resolution must be a multiple of {VAE_SCALE} (the VAE's downsampling), "
                              f"got {self.resolution}", field="resolution")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"must be positive, got {self.threads}", field="threads")
        if self.cuda_graph and not self.is_cuda:
            raise ConfigError("CUDA graphs need a cuda device", field="cuda_graph")

    @property
    def latent_size(self) -> int:
        return self.resolution // VAE_SCALE

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def query(self) -> dict[str, Any]:
        """The fields a profile must share with a prediction request."""
        return {"dtype": self.dtype, "batch": self.batch, "resolution": self.resolution, "text_len": self.text_len}


@dataclass(frozen=True)
class Protocol:
    """How each number was taken: warm-up runs, then repeats until the statistic is stable."""

    statistic: str = "min"  # "min", "pNN" (a low percentile) or "median"
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 50
    rel_tol: float = 0.02  # stop once the statistic moved less than this over the last min_repeats // 2 runs

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ConfigError(f"must be one of {', '.join(STATISTICS)}, got {self.statistic!r}", field="statistic")
        if self.warmup < 0:
            raise ConfigError(f"must be >= 0, got {self.warmup}", field="warmup")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ConfigError(f"need 1 <= min_repeats ({self.min_repeats}) <= max_repeats ({self.max_repeats})",
                              field="min_repeats")
        if not 0 < self.rel_tol < 1:
            raise ConfigError(f"must be between 0 and 1, got {self.rel_tol}", field="rel_tol")


@dataclass(frozen=True)
class Timing:
    """One measured quantity: the protocol's statistic, the median and the repeat spread (p90 - p10) / median."""

    ms: float
    median_ms: float
    spread_pct: float
    repeats: int


@dataclass(frozen=True)
class CalibrationSample:
    """A whole network measured at the profile's settings (interleaved with the others of its group)."""

    arch: UNetArch
    timing: Timing


@dataclass(frozen=True)
class Correction:
    """Whole network = ``scale`` x (sum of its measured blocks) + ``offset_ms``: launch overhead, the skip
    concatenations and caching effects between blocks, fitted on the calibration set."""

    scale: float = 1.0
    offset_ms: float = 0.0
    n: int = 0
    fit_mape_pct: float = 0.0


@dataclass
class LatencyProfile:
    """A measured latency profile; see the module docstring. ``source`` is the file it was read from."""

    settings: Settings
    protocol: Protocol
    device_name: str
    environment: dict[str, Any] = field(default_factory=dict)
    space: str = ""
    blocks: dict[str, Timing] = field(default_factory=dict)
    calibration: list[CalibrationSample] = field(default_factory=list)
    correction: Correction | None = None
    complete: bool = False
    trust: Any = None  # a proxies.latency.trust.Trust: the verdict on the measurements (None: not judged)
    source: str | None = None

    # ---- checks ------------------------------------------------------------------------------------------

    def check_settings(self, wanted: Settings | Mapping[str, Any]) -> None:
        """Refuse to answer a query at another dtype, batch, resolution or text length than measured."""
        query = wanted.query() if isinstance(wanted, Settings) else dict(wanted)
        have = self.settings.query()
        for key, value in query.items():
            if value is not None and value != have[key]:
                raise ConfigError(
                    f"the profile was measured at {key} {have[key]}, the request is for {value}; "
                    f"measure a profile at these settings (unet-nas profile --{key.replace('_', '-')} {value})",
                    field=f"settings.{key}", source=self.source)

    # ---- serialisation -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "device_name": self.device_name,
            "settings": asdict(self.settings),
            "protocol": asdict(self.protocol),
            "environment": dict(self.environment),
            "space": self.space,
            "complete": self.complete,
            "correction": None if self.correction is None else asdict(self.correction),
            "blocks": {k: _timing_dict(t) for k, t in sorted(self.blocks.items())},
            "calibration": [{"timing": _timing_dict(c.timing), "arch": c.arch.to_dict()} for c in self.calibration],
        }
        if self.trust is not None:
            out["trust"] = self.trust.to_dict()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename), so an interrupted run never leaves half a profile."""
        p = atomic_write(path, dump_yaml(self.to_dict()))
        self.source = str(p)
        return p

    @classmethod
    def from_dict(cls, data: Any) -> LatencyProfile:
        return _profile_from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyProfile:
        profile = load_validated(path, _profile_from_dict)
        profile.source = str(path)
        return profile

    def with_correction(self, correction: Correction) -> LatencyProfile:
        return replace(self, correction=correction)


def shipped_profiles() -> list[str]:
    """Names of the measured profiles that ship inside the package (``proxies/latency/profiles/*.yaml``)."""
    return sorted(p.stem for p in _PROFILE_DIR.glob("*.yaml"))


def find_profile(ref: str | os.PathLike) -> Path:
    """``ref`` itself when it is a file, else the shipped profile of that name (``h100_sd15_fp16_b2_512``).

    Why both: a user's own measurement is a path; a profile measured by the project on hardware the user may not
    have (an H100) is a name, so experiments can point at it without a copy.
    """
    path = Path(ref)
    if path.is_file():
        return path
    shipped = _PROFILE_DIR / f"{ref}.yaml"
    if path.suffix not in (".yaml", ".yml") and shipped.is_file():
        return shipped
    raise ConfigError(f"profile {str(ref)!r} not found: not a file, nor a shipped profile "
                      f"({', '.join(shipped_profiles()) or 'none'})", field="profile")


def _timing_dict(t: Timing) -> dict[str, Any]:
    return {"ms": round(t.ms, 6), "median_ms": round(t.median_ms, 6), "spread_pct": round(t.spread_pct, 2),
            "repeats": t.repeats}


def environment(settings: Settings) -> dict[str, Any]:
    """Versions and date recorded with every profile."""
    import diffusers
    import torch

    return {
        "torch": str(torch.__version__),
        "diffusers": str(diffusers.__version__),
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda) if settings.is_cuda else None,
        "attention_backend": attention_backend(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def attention_backend() -> str:
    """The attention processor diffusers picks by default (SDPA on torch 2), as used by every measured block."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=8, heads=1, dim_head=8)
    return type(attn.processor).__name__


# ---- validation ---------------------------------------------------------------------------------------------


def _number(value: Any, where: str, positive: bool = False) -> float:
    check_type(value, (int, float), where)
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"must be {'positive' if positive else '>= 0'}, got {value}", field=where)
    return float(value)


def _timing_from_dict(data: Any, where: str) -> Timing:
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping {ms, median_ms, spread_pct, repeats}", field=where)
    check_keys(data, {"ms", "median_ms", "spread_pct", "repeats"}, where)
    for key in ("ms", "median_ms", "spread_pct", "repeats"):
        if key not in data:
            raise ConfigError("missing", field=f"{where}.{key}")
    repeats = check_type(data["repeats"], int, f"{where}.repeats")
    if repeats <= 0:
        raise ConfigError(f"must be positive, got {repeats}", field=f"{where}.repeats")
    return Timing(_number(data["ms"], f"{where}.ms", positive=True),
                  _number(data["median_ms"], f"{where}.median_ms", positive=True),
                  _number(data["spread_pct"], f"{where}.spread_pct"), repeats)


def _dataclass_from(cls: type, data: Any, where: str, types: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", field=where)
    check_keys(data, set(types), where)
    kwargs = {k: check_type(v, types[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=f"{where}.{exc.field}" if exc.field else where) from None


_SETTINGS_TYPES = {"device": str, "dtype": str, "batch": int, "resolution": int, "text_len": int,
                   "threads": (int, type(None)), "channels_last": bool, "compile": bool,
                   "cuda_graph": bool}
_PROTOCOL_TYPES = {"statistic": str, "warmup": int, "min_repeats": int, "max_repeats": int,
                   "rel_tol": (int, float)}
_CORRECTION_TYPES = {"scale": (int, float), "offset_ms": (int, float), "n": int, "fit_mape_pct": (int, float)}
_TOP_KEYS = {"format", "device_name", "settings", "protocol", "environment", "space", "complete", "correction",
             "blocks", "calibration", "trust"}


def _profile_from_dict(data: Any) -> LatencyProfile:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a latency profile must be a mapping, got {type(data).__name__}")
    check_keys(data, _TOP_KEYS, "")
    for key in ("format", "device_name", "settings", "protocol"):
        if key not in data:
            raise ConfigError("missing", field=key)
    if data["format"] != FORMAT:
        raise ConfigError(f"expected {FORMAT!r}, got {data['format']!r}", field="format")
    settings = _dataclass_from(Settings, data["settings"], "settings", _SETTINGS_TYPES)
    protocol = _dataclass_from(Protocol, data["protocol"], "protocol", _PROTOCOL_TYPES)
    env = data.get("environment") or {}
    if not isinstance(env, Mapping):
        raise ConfigError("expected a mapping", field="environment")
    blocks_data = data.get("blocks") or {}
    if not isinstance(blocks_data, Mapping):
        raise ConfigError("expected a mapping from block key to timing", field="blocks")
    blocks = {str(k): _timing_from_dict(v, f"blocks.{k}") for k, v in blocks_data.items()}
    calibration = []
    cal_data = data.get("calibration") or []
    if not isinstance(cal_data, list):
        raise ConfigError("expected a list of {timing, arch}", field="calibration")
    for i, item in enumerate(cal_data):
        where = f"calibration[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError("expected a mapping {timing, arch}", field=where)
        check_keys(item, {"timing", "arch"}, where)
        if "arch" not in item or "timing" not in item:
            raise ConfigError("needs both timing and arch", field=where)
        try:
            arch = UNetArch.from_dict(item["arch"])
        except ConfigError as exc:
            inner = f"{where}.arch.{exc.field}" if exc.field else f"{where}.arch"
            raise ConfigError(exc.message, field=inner) from None
        calibration.append(CalibrationSample(arch, _timing_from_dict(item["timing"], f"{where}.timing")))
    correction = None
    if data.get("correction") is not None:
        correction = _dataclass_from(Correction, data["correction"], "correction", _CORRECTION_TYPES)
        if correction.scale <= 0:
            raise ConfigError(f"must be positive, got {correction.scale}", field="correction.scale")
    return LatencyProfile(
        settings=settings, protocol=protocol,
        device_name=str(check_type(data["device_name"], str, "device_name")), environment=dict(env),
        space=str(check_type(data.get("space", ""), str, "space")),
        blocks=blocks, calibration=calibration, correction=correction,
        complete=check_type(data.get("complete", False), bool, "complete"),
        trust=None if data.get("trust") is None else trust_from_dict(data["trust"]),
    )
