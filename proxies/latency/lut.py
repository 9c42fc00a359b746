"""Lookup-table predictor: the sum of an arch's measured blocks, corrected to whole-network time.

Summed block times miss what happens between blocks (kernel launches of the glue ops, skip concatenations,
caches warm or cold from the previous block, fusion under ``torch.compile``). Rather than pretend they add up,
the profile measures a calibration set of whole networks and fits ``whole = scale x block_sum + offset``
(:func:`fit_correction`); the correction and its fit error are stored in the profile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search_spaces.arch import UNetArch
from search_spaces.errors import ConfigError

from .blocks import arch_block_keys
from .predictor import LatencyPredictor
from .profile import Correction, LatencyProfile, Settings


def block_times(profile: LatencyProfile, arch: UNetArch) -> dict[str, float]:
    """Measured ms of ``arch``'s blocks summed per stage; a block the profile lacks is a ConfigError."""
    out: dict[str, float] = {}
    for b, key in arch_block_keys(arch, profile.settings.latent_size):
        timing = profile.blocks.get(key)
        if timing is None:
            raise ConfigError(
                f"block {key!r} ({b.module}) of arch {arch.name or '<unnamed>'} was not measured: the arch is "
                "outside the profiled space; profile a space (or --arch) that contains it",
                field="blocks", source=profile.source)
        stage = b.stage or "stem"
        out[stage] = out.get(stage, 0.0) + timing.ms
    return out


def block_sum(profile: LatencyProfile, arch: UNetArch) -> float:
    return float(sum(block_times(profile, arch).values()))


def fit_correction(sums: Sequence[float], measured: Sequence[float]) -> Correction:
    """Least-squares ``measured = scale * sum + offset`` in relative terms (each sample weighted by 1/measured,
    so small and large networks count alike). Fewer than 3 samples, or a fit that would need a non-positive
    scale, fall back to the mean ratio with no offset."""
    s, m = np.asarray(sums, float), np.asarray(measured, float)
    if len(s) == 0:
        return Correction()
    scale, offset = float(np.mean(m / s)), 0.0
    if len(s) >= 3 and np.ptp(s) > 0:
        w = 1.0 / m
        a = np.stack([s * w, w], axis=1)
        (fs, fo), *_ = np.linalg.lstsq(a, m * w, rcond=None)
        if fs > 0 and np.all(fs * s + fo > 0):
            scale, offset = float(fs), float(fo)
    pred = scale * s + offset
    mape = float(100 * np.mean(np.abs(pred - m) / m))
    return Correction(scale=scale, offset_ms=offset, n=len(s), fit_mape_pct=mape)


def fit_profile_correction(profile: LatencyProfile) -> Correction:
    """The correction fitted on the profile's own calibration networks."""
    sums = [block_sum(profile, c.arch) for c in profile.calibration]
    return fit_correction(sums, [c.timing.ms for c in profile.calibration])


class LUTPredictor(LatencyPredictor):
    """Sum of measured blocks plus the profile's fitted correction.

    Args:
        profile: a measured profile that contains every block of the archs to be predicted.
        settings: the query; refused (ConfigError) unless dtype, batch, resolution and text length match.
        correction: override the profile's correction (e.g. one fitted on more samples); None = the profile's.
    """

    name = "lut"

    def __init__(self, profile: LatencyProfile, settings: Settings | None = None,
                 correction: Correction | None = None):
        if settings is not None:
            profile.check_settings(settings)
        self.profile = profile
        self.settings = profile.settings
        self.correction = correction or profile.correction or Correction()

    def breakdown(self, arch: UNetArch) -> dict[str, float]:
        stages = block_times(self.profile, arch)
        out = {k: v * self.correction.scale for k, v in stages.items()}
        out["overhead"] = self.correction.offset_ms
        return out
