"""Measure a latency profile: every distinct block of a space, then a calibration set of whole networks.

The profile is written after every measured block and every group of calibration networks (atomically: temp
file + rename), so an interrupted run loses at most the block in flight; running the same command again
resumes from the file. A file measured under other settings or another protocol is never mixed in: it is
refused with an error naming the differing field.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from search_spaces.arch import BlockSpec, UNetArch
from search_spaces.errors import ConfigError

from .blocks import block_inputs, build_block, space_blocks
from .lut import fit_profile_correction
from .profile import CalibrationSample, LatencyProfile, Protocol, Settings, Timing, environment
from .timing import describe_device, measure_callable, measure_networks, measuring, torch_device, torch_dtype
from .trust import FIT_LIMIT_PCT, LoadLog, judge, noisy

ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, label)


def measure_block(arch: UNetArch, b: BlockSpec, settings: Settings, protocol: Protocol) -> Timing:
    """Build one block standalone at the profile's dtype/layout and time it with the protocol."""
    import torch

    device, dtype = torch_device(settings), torch_dtype(settings.dtype)
    torch.manual_seed(0)
    with torch.device(device) if settings.is_cuda else contextlib.nullcontext():
        module = build_block(arch, b).to(device=device, dtype=dtype).eval()
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)
    inputs = block_inputs(arch, b, module, arch.sizes(settings.latent_size), settings.batch, settings.text_len,
                          dtype, device, settings.channels_last)
    if settings.compile:
        module = torch.compile(module)
    with measuring(settings):
        return measure_callable(lambda: module(*inputs), settings, protocol)


def calibration_archs(space: Any, n: int, seed: int) -> list[UNetArch]:
    """``n`` distinct archs sampled from the space (honouring its constraints) with a fixed seed, so a resumed
    profile measures the same calibration set."""
    from proxies.cost import constraint_filter

    rng = random.Random(seed)
    accept = constraint_filter(space.constraints)
    out: list[UNetArch] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        arch = space.sample(rng, accept=accept)
        if arch not in out:
            out.append(arch)
    return out


def open_profile(out: Path, settings: Settings, protocol: Protocol, space_label: str,
                 restart: bool) -> LatencyProfile:
    """The profile to continue: the existing file if it was measured the same way, else a fresh one."""
    fresh = LatencyProfile(settings=settings, protocol=protocol, device_name=describe_device(settings),
                           environment=environment(settings), space=space_label)
    if restart or not out.exists():
        return fresh
    old = LatencyProfile.load(out)
    for name, have, want in (("settings", old.settings, settings), ("protocol", old.protocol, protocol)):
        for key, value in asdict(want).items():
            if getattr(have, key) != value:
                raise ConfigError(
                    f"{out} was measured with {key} {getattr(have, key)!r}, this run asks for {value!r}; "
                    "pass --restart to discard it, or choose another --out", field=f"{name}.{key}", source=str(out))
    if old.device_name != fresh.device_name:
        raise ConfigError(f"{out} was measured on {old.device_name!r}, this is {fresh.device_name!r}; pass "
                          "--restart to discard it, or choose another --out", field="device_name", source=str(out))
    old.space = space_label
    old.complete = False
    return old


def run_profile(space: Any, settings: Settings, out: str | os.PathLike, *, protocol: Protocol | None = None,
                extra_archs: Sequence[UNetArch] = (), calibration: int = 12, seed: int = 0, restart: bool = False,
                space_label: str = "", group: int = 6, progress: ProgressFn | None = None,
                max_blocks: int | None = None, remeasure: bool = True) -> LatencyProfile:
    """Measure (or resume) a profile of ``space`` (a ``SearchSpace``, or None to profile ``extra_archs`` only).

    ``max_blocks`` stops after that many newly measured blocks, leaving an incomplete profile on disk (used to
    test resuming, and handy to spread a long GPU profile over several sessions).

    Then the measurements are judged (:mod:`.trust`): with ``remeasure``, blocks whose repeats spread too much
    are timed once more, and after a calibration fit worse than the limit the calibration networks are; the
    verdict that remains is stored in the profile's ``trust`` section.
    """
    protocol = protocol or Protocol()
    out = Path(out)
    profile = open_profile(out, settings, protocol, space_label, restart)
    profile.save(out)
    load = LoadLog()
    load.sample()
    latent = settings.latent_size
    if space is not None:
        wanted = space_blocks(space, latent, extra_archs)
    else:
        from .blocks import block_key

        wanted = {block_key(a, b, a.sizes(latent)): (a, b) for a in extra_archs for b in a.blocks}
    todo = [(k, ab) for k, ab in sorted(wanted.items()) if k not in profile.blocks]
    for done, (key, (arch, b)) in enumerate(todo):
        if max_blocks is not None and done >= max_blocks:
            profile.save(out)
            return profile
        if progress:
            progress("blocks", done, len(todo), key)
        profile.blocks[key] = measure_block(arch, b, settings, protocol)
        profile.save(out)  # after every block: an interrupt loses only the block in flight
        load.sample()
    if progress:
        progress("blocks", len(todo), len(todo), "")
    redone_blocks = _remeasure_noisy(profile, wanted, settings, protocol, out, load, progress) if remeasure else 0

    cal = calibration_archs(space, calibration, seed) if space is not None else []
    cal += [a for a in extra_archs if a not in cal]
    measured = {c.arch for c in profile.calibration}
    pending = [a for a in cal if a not in measured]

    finished = 0

    def saved(results: list[tuple[UNetArch, Timing]]) -> None:
        nonlocal finished
        profile.calibration.extend(CalibrationSample(a, t) for a, t in results)
        profile.save(out)
        load.sample()
        finished += len(results)
        if progress:
            progress("networks", finished, len(pending), "")

    if pending:
        if progress:
            progress("networks", 0, len(pending), "")
        measure_networks(pending, settings, protocol, group=group, on_group=saved)
    profile.correction = fit_profile_correction(profile)
    redone_networks = 0
    if remeasure and profile.correction.n >= 3 and profile.correction.fit_mape_pct > FIT_LIMIT_PCT:
        # blocks and networks were timed at different moments, so under a changing load they disagree: time the
        # whole networks again (interleaved) and keep each one's faster run
        archs = [c.arch for c in profile.calibration]
        if progress:
            progress("re-measure networks", 0, len(archs), "calibration fit error "
                     f"{profile.correction.fit_mape_pct:.1f}%")
        again = measure_networks(archs, settings, protocol, group=group)
        load.sample()
        profile.calibration = [CalibrationSample(c.arch, _better(c.timing, t))
                               for c, t in zip(profile.calibration, again, strict=True)]
        redone_networks = len(archs)
        profile.correction = fit_profile_correction(profile)
        if progress:
            progress("re-measure networks", len(archs), len(archs), "")
    profile.trust = judge(profile, load, redone_blocks, redone_networks)
    profile.complete = True
    profile.save(out)
    return profile


def _better(old: Timing, new: Timing) -> Timing:
    """Of two timings of the same thing, the one taken with less interference: the lower (other work on the
    machine only ever adds time)."""
    return new if new.ms <= old.ms else old


def _remeasure_noisy(profile: LatencyProfile, wanted: dict[str, tuple[UNetArch, BlockSpec]], settings: Settings,
                     protocol: Protocol, out: Path, load: LoadLog, progress: ProgressFn | None) -> int:
    """Time once more the blocks whose repeats spread above the limit; returns how many were re-measured."""
    redo = [k for k in noisy(profile.blocks) if k in wanted]
    for done, key in enumerate(redo):
        if progress:
            progress("re-measure blocks", done, len(redo), key)
        arch, b = wanted[key]
        profile.blocks[key] = _better(profile.blocks[key], measure_block(arch, b, settings, protocol))
        profile.save(out)
        load.sample()
    if progress and redo:
        progress("re-measure blocks", len(redo), len(redo), "")
    return len(redo)
