"""Is a measured profile trustworthy? The profile's own evidence, judged after it is measured.

A CPU profile measured while another job runs is wrong without looking wrong: blocks are timed at one load,
whole networks at another, and the block-sum correction absorbs the difference (a fit of ``scale 0.41, offset
7 ms, error 21%`` under load against ``1.16, -0.6 ms, 5.9%`` quiet, on the same 2-core machine). Three signs are
recorded while profiling and judged here:

* the calibration fit's error (mean absolute percentage error of ``scale x block sum + offset`` against the
  measured whole networks): the predictor is at best this accurate;
* the spread of repeated timings of each block, ``(p90 - p10) / median`` (only for blocks timed at least
  :data:`MIN_REPEATS_FOR_SPREAD` times: the spread of two or three runs says nothing);
* the machine's load average while measuring, against the CPUs the measurement did not use (CPU profiles only).

The profiler re-measures what these point at once (noisy blocks, then the calibration networks after a bad fit);
what is still bad afterwards is written into the profile's ``trust`` section and told to the user in one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from search_spaces.errors import ConfigError
from search_spaces.schema import check_keys, check_type

FIT_LIMIT_PCT = 10.0  # quiet CPU profiles here fit within ~6%; 21% was measured beside another job
SPREAD_LIMIT_PCT = 15.0  # a block whose repeats spread more than this was timed while something else ran
MIN_REPEATS_FOR_SPREAD = 5
LOAD_MARGIN = 0.5  # other runnable work, in CPUs, above which the measurement likely competed with it


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass
class LoadLog:
    """Load averages sampled while profiling (before the first block, between blocks and network groups)."""

    samples: list[float] = field(default_factory=list)

    def sample(self) -> None:
        value = load_average()
        if value is not None:
            self.samples.append(value)


@dataclass
class Trust:
    """The verdict on one profile, stored in its ``trust`` section."""

    verdict: str = "trusted"  # "trusted" or "untrusted"
    fit_mape_pct: float | None = None
    fit_limit_pct: float = FIT_LIMIT_PCT
    noisy_blocks: int = 0  # blocks still above the spread limit
    remeasured_blocks: int = 0
    remeasured_networks: int = 0
    max_load: float | None = None  # highest 1-minute load average seen while measuring
    cpus: int | None = None
    threads: int | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return self.verdict == "trusted"

    def line(self) -> str:
        """One line for a person: the verdict with its figures."""
        fit = f"fit error {self.fit_mape_pct:.1f}%" if self.fit_mape_pct is not None else "no calibration fit"
        redo = []
        if self.remeasured_blocks:
            redo.append(f"{self.remeasured_blocks} blocks")
        if self.remeasured_networks:
            redo.append(f"{self.remeasured_networks} networks")
        again = f"; re-measured {' and '.join(redo)}" if redo else ""
        if self.trusted:
            return f"trusted ({fit}{again})"
        return f"NOT trustworthy: {'; '.join(self.reasons)}{again}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("fit_mape_pct", "max_load"):
            if out[key] is not None:
                out[key] = round(out[key], 2)
        return out


def noisy(timings: Mapping[str, Any]) -> list[str]:
    """Keys of the timings whose repeat spread is above the limit (and that were repeated enough to tell)."""
    return [k for k, t in timings.items()
            if t.repeats >= MIN_REPEATS_FOR_SPREAD and t.spread_pct > SPREAD_LIMIT_PCT]


def judge(profile: Any, load: LoadLog | None = None, remeasured_blocks: int = 0,
          remeasured_networks: int = 0) -> Trust:
    """The verdict on ``profile`` (a :class:`~proxies.latency.profile.LatencyProfile` with its correction fitted)."""
    settings = profile.settings
    trust = Trust(remeasured_blocks=remeasured_blocks, remeasured_networks=remeasured_networks)
    corr = profile.correction
    if corr is not None and corr.n >= 3:
        # the figure as the profile file keeps it (to_dict rounds to 2 decimals), so that the reason's 1-decimal
        # text and every later print of the saved figure round the same number (28.347 -> 28.35 -> "28.4" in both)
        trust.fit_mape_pct = round(corr.fit_mape_pct, 2)
        if trust.fit_mape_pct > FIT_LIMIT_PCT:
            trust.reasons.append(f"calibration fit error {trust.fit_mape_pct:.1f}% (limit {FIT_LIMIT_PCT:g}%; "
                                 "whole = {:.2f} x block sum {:+.2f} ms)".format(corr.scale, corr.offset_ms))
    bad = noisy(profile.blocks)
    trust.noisy_blocks = len(bad)
    if bad:
        trust.reasons.append(f"{len(bad)} of {len(profile.blocks)} blocks spread more than {SPREAD_LIMIT_PCT:g}% "
                             "over their repeats")
    if settings.device == "cpu" and load is not None and load.samples:
        trust.cpus = os.cpu_count() or 1
        trust.threads = settings.threads or trust.cpus
        trust.max_load = max(load.samples)
        # the measurement itself keeps `threads` CPUs busy; other runnable work beyond half a CPU (a quarter of the
        # idle CPUs on a big machine) competes for cores, memory bandwidth and turbo headroom
        others = trust.max_load - trust.threads
        if others > max(LOAD_MARGIN, 0.25 * (trust.cpus - trust.threads)):
            trust.reasons.append(f"load average up to {trust.max_load:.2f} on {trust.cpus} CPUs while measuring "
                                 f"with {trust.threads} thread{'s' if trust.threads != 1 else ''}")
    if trust.reasons:
        trust.verdict = "untrusted"
    return trust


_TRUST_TYPES = {"verdict": str, "fit_mape_pct": (int, float, type(None)), "fit_limit_pct": (int, float),
                "noisy_blocks": int, "remeasured_blocks": int, "remeasured_networks": int,
                "max_load": (int, float, type(None)), "cpus": (int, type(None)), "threads": (int, type(None)),
                "reasons": list}


def trust_from_dict(data: Any, where: str = "trust") -> Trust:
    """A profile's ``trust`` section, validated like the rest of the file."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", field=where)
    check_keys(data, set(_TRUST_TYPES), where)
    kwargs = {k: check_type(v, _TRUST_TYPES[k], f"{where}.{k}") for k, v in data.items()}
    if kwargs.get("verdict", "trusted") not in ("trusted", "untrusted"):
        raise ConfigError(f"must be trusted or untrusted, got {kwargs['verdict']!r}", field=f"{where}.verdict")
    kwargs["reasons"] = [str(r) for r in kwargs.get("reasons", [])]
    return Trust(**kwargs)
