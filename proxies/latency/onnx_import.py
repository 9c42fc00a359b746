"""Import per-model timings of an ONNX export (from any toolchain) as an ordinary LUT latency profile.

The result is a :class:`~proxies.latency.profile.LatencyProfile` like a PyTorch-measured one: the same block
keys, the same calibration networks and the same ``scale x block sum + offset`` correction fitted on them
(:func:`~proxies.latency.lut.fit_profile_correction`), so ``LUTPredictor``, ``unet-nas predict`` and a search's
``latency`` objective use it unchanged. Its ``settings.device`` is ``external`` and its ``environment`` records
where the numbers came from (runtime, device, the CSV's and the manifest's checksums, exporter and opset).

Everything is checked before anything is written: the export folder (manifest checksum, every file's sha256),
the space (same hash as at export, same blocks), and the CSV (header, numbers, every key once, no key missing,
no unknown key); the first problem is one ConfigError naming the file, line and field.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any

from search_spaces.errors import ConfigError

from .blocks import space_blocks
from .lut import fit_profile_correction
from .onnx_manifest import Manifest, load_manifest, sha256_file, space_hash
from .onnx_runtime import CSV_COLUMNS
from .profile import EXTERNAL, CalibrationSample, LatencyProfile, Protocol, Settings, Timing


def read_timings(path: str | os.PathLike, expected: list[str]) -> dict[str, Timing]:
    """Validated ``key,ms,repeats,spread`` rows; exactly the ``expected`` keys, each once."""
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=src) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=src) from None
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise ConfigError(f"empty; expected a header {','.join(CSV_COLUMNS)} and one row per model", source=src)
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise ConfigError(f"the header must name the columns {','.join(CSV_COLUMNS)} once each, got "
                          f"{','.join(header)}", source=src, line=1)
    col = {name: header.index(name) for name in CSV_COLUMNS}
    wanted = set(expected)
    out: dict[str, Timing] = {}
    for line, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ConfigError(f"expected {len(header)} columns, got {len(row)}", source=src, line=line)
        key = row[col["key"]].strip()
        if key not in wanted:
            raise ConfigError(f"unknown key {key!r}: not a model of this export", field="key", source=src, line=line)
        if key in out:
            raise ConfigError(f"key {key!r} appears twice", field="key", source=src, line=line)
        ms = _number(row[col["ms"]], "ms", src, line)
        if ms <= 0:
            raise ConfigError(f"must be a positive time in milliseconds, got {row[col['ms']].strip()}", field="ms",
                              source=src, line=line)
        repeats = _number(row[col["repeats"]], "repeats", src, line)
        if repeats < 1 or repeats != int(repeats):
            raise ConfigError(f"must be a positive whole number, got {row[col['repeats']].strip()}", field="repeats",
                              source=src, line=line)
        spread = _number(row[col["spread"]], "spread", src, line)
        if spread < 0:
            raise ConfigError(f"must be >= 0 (percent), got {row[col['spread']].strip()}", field="spread",
                              source=src, line=line)
        out[key] = Timing(ms=ms, median_ms=ms, spread_pct=spread, repeats=int(repeats))
    absent = [k for k in expected if k not in out]
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        raise ConfigError(f"{len(absent)} model(s) of the export have no timing: "
                          f"{', '.join(repr(k) for k in absent[:3])}{more}", field="key", source=src)
    return out


def _number(text: str, name: str, src: str, line: int) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"not a number: {text.strip()!r}", field=name, source=src, line=line) from None
    if not math.isfinite(value):
        raise ConfigError(f"must be finite, got {text.strip()}", field=name, source=src, line=line)
    return value


def check_space(manifest: Manifest, space_file: str | os.PathLike | None = None) -> Any:
    """The export's space, refused unless it still hashes as at export and yields the exported blocks."""
    from search_spaces.registry import space_path
    from search_spaces.space import SearchSpace

    ref = space_file if space_file is not None else manifest.space_file
    try:
        path = space_path(str(ref))  # a shipped space name, or a file
    except ConfigError:
        path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"the space file {str(path)!r} recorded at export is not found here; pass --space FILE",
                          field="--space")
    space = SearchSpace.from_yaml(path)
    if space_hash(space) != manifest.space_sha256:
        raise ConfigError(f"the space no longer matches the export (its hash changed since "
                          f"{manifest.root / 'manifest.json'} was written); export it again", source=str(path))
    keys = set(space_blocks(space, manifest.settings.latent_size, manifest.extra_archs))
    have = {m.key for m in manifest.blocks}
    if keys != have:
        raise ConfigError(f"the space's blocks no longer match the export ({len(keys - have)} not exported, "
                          f"{len(have - keys)} no longer produced: block keys changed with this UNet-NAS version); "
                          "export it again", source=str(path))
    return space


def import_profile(root: str | os.PathLike, timings: str | os.PathLike, device_name: str, runtime: str,
                   out: str | os.PathLike | None = None, space_file: str | os.PathLike | None = None,
                   statistic: str = "median") -> LatencyProfile:
    """Build (and with ``out``, write atomically) the LUT profile of an export's timings; see the module docstring.
    ``statistic`` says what the CSV's ``ms`` summarises (recorded in the profile's protocol)."""
    for name, value in (("--device-name", device_name), ("--runtime", runtime)):
        if not value.strip():
            raise ConfigError("must not be empty", field=name)
    try:
        Protocol(statistic=statistic)
    except ConfigError as exc:
        raise ConfigError(exc.message, field="--statistic") from None
    manifest = load_manifest(root)
    check_space(manifest, space_file)
    times = read_timings(timings, [m.key for m in manifest.models])
    s = manifest.settings
    repeats = [t.repeats for t in times.values()]
    profile = LatencyProfile(
        settings=Settings(device=EXTERNAL, dtype=s.dtype, batch=s.batch, resolution=s.resolution,
                          text_len=s.text_len, threads=None),
        # the CSV carries one number per model (its median, or the named statistic), the repeat counts and the
        # spread; warm-up is the runtime's own and not known here
        protocol=Protocol(statistic=statistic, warmup=0, min_repeats=min(repeats), max_repeats=max(repeats)),
        device_name=device_name.strip(),
        environment={
            "source": "onnx import",
            "runtime": runtime.strip(),
            "timings_file": Path(timings).name,
            "timings_sha256": sha256_file(timings),
            "manifest_sha256": manifest.sha256,
            "exporter": manifest.exporter,
            "opset": manifest.opset,
            "export_environment": manifest.environment,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        space=manifest.space_file,
        blocks={m.key: times[m.key] for m in manifest.blocks},
        calibration=[CalibrationSample(m.arch, times[m.key]) for m in manifest.networks if m.arch is not None],
    )
    profile.correction = fit_profile_correction(profile)
    profile.complete = True
    if out is not None:
        profile.save(out)
    return profile
