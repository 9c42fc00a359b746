"""The manifest of an ONNX export folder: what was exported, pinned so that nothing changes unnoticed.

``manifest.json`` records the settings, opset, exporter, dtype, each file's sha256, the space's hash and a
checksum of the manifest itself. :func:`load_manifest` refuses a folder whose files or manifest changed after
export, and the importer (:mod:`.onnx_import`) refuses timings for a space that no longer matches. Kept apart from
the exporter because the runner and the importer need the manifest but not torch's ONNX exporter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces.arch import UNetArch
from search_spaces.errors import ConfigError
from search_spaces.yamlio import atomic_write

from .profile import Settings

FORMAT = "unet-nas-onnx-export/1"
CHECK_TOLERANCE = 1e-3  # max abs diff allowed, relative to max(1, max |reference|)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def space_hash(space: Any) -> str:
    """sha256 of what defines a space's archs: its choices and the resolved global fields of its base arch
    (formatting and comments of the YAML do not count; a changed base arch does)."""
    return hashlib.sha256(_canonical({"space": space.data, "globals": space.globals})).hexdigest()


# ---- the manifest --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One exported ONNX file: a block (``kind`` = its block kind) or a calibration network (``network``)."""

    key: str
    kind: str
    file: str
    inputs: list[dict[str, Any]]
    sha256: str
    max_abs_diff: float | None
    arch: UNetArch | None = None  # networks only

    @property
    def is_network(self) -> bool:
        return self.kind == "network"

    def to_dict(self) -> dict[str, Any]:
        out = {"key": self.key, "kind": self.kind, "file": self.file, "inputs": self.inputs,
               "sha256": self.sha256, "max_abs_diff": self.max_abs_diff}
        if self.arch is not None:
            out["arch"] = self.arch.to_dict()
        return out


@dataclass
class Manifest:
    """What an export folder holds; see the module docstring. ``root`` is the folder."""

    root: Path
    settings: Settings
    opset: int
    exporter: str
    space_file: str
    space_sha256: str
    extra_archs: list[UNetArch]
    models: list[ModelEntry]
    environment: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def blocks(self) -> list[ModelEntry]:
        return [m for m in self.models if not m.is_network]

    @property
    def networks(self) -> list[ModelEntry]:
        return [m for m in self.models if m.is_network]

    def path(self, entry: ModelEntry) -> Path:
        return self.root / entry.file

    def body(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": FORMAT,
            "settings": {"dtype": s.dtype, "batch": s.batch, "resolution": s.resolution, "text_len": s.text_len},
            "dtype": s.dtype,
            "opset": self.opset,
            "exporter": self.exporter,
            "space": {"file": self.space_file, "sha256": self.space_sha256},
            "extra_archs": [a.to_dict() for a in self.extra_archs],
            "environment": self.environment,
            "check": {"dtype": "fp32", "runtime": "onnxruntime CPUExecutionProvider", "tolerance": CHECK_TOLERANCE,
                      "max_abs_diff": max((m.max_abs_diff or 0.0 for m in self.models), default=0.0)},
            "models": [m.to_dict() for m in self.models],
        }

    def save(self) -> Path:
        body = self.body()
        self.sha256 = hashlib.sha256(_canonical(body)).hexdigest()
        return atomic_write(self.root / "manifest.json", json.dumps({**body, "manifest_sha256": self.sha256},
                                                                    indent=2) + "\n")


_MANIFEST_KEYS = {"format", "settings", "dtype", "opset", "exporter", "space", "extra_archs", "environment", "check",
                  "models", "manifest_sha256"}
_ENTRY_KEYS = {"key", "kind", "file", "inputs", "sha256", "max_abs_diff", "arch"}


def load_manifest(root: str | os.PathLike, verify_files: bool = True) -> Manifest:
    """Read and verify an export folder: the manifest's own checksum, its fields, and (``verify_files``) that every
    file exists with the sha256 recorded at export. Any mismatch is a ConfigError naming what changed."""
    root = Path(root)
    path = root / "manifest.json"
    src = str(path)
    if not path.is_file():
        raise ConfigError(f"no manifest.json in {root}: not a folder written by `unet-nas profile export` (or the "
                          "export did not finish)", source=str(root))
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"not valid JSON: {exc}", source=src) from None
    if not isinstance(data, Mapping):
        raise ConfigError("expected a JSON object", source=src)
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}", field=unknown[0], source=src)
    missing = sorted(_MANIFEST_KEYS - set(data))
    if missing:
        raise ConfigError("missing", field=missing[0], source=src)
    if data["format"] != FORMAT:
        raise ConfigError(f"expected {FORMAT!r}, got {data['format']!r}", field="format", source=src)
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != data["manifest_sha256"]:
        raise ConfigError("the manifest was changed after export (its checksum does not match its contents); "
                          "export again with `unet-nas profile export`", field="manifest_sha256", source=src)
    # past the checksum the content is what the exporter wrote; the checks below guard against a different version
    try:
        s = data["settings"]
        settings = Settings(device="cpu", dtype=s["dtype"], batch=s["batch"], resolution=s["resolution"],
                            text_len=s["text_len"], threads=None)
        models = []
        for i, m in enumerate(data["models"]):
            unknown = sorted(set(m) - _ENTRY_KEYS)
            if unknown:
                raise ConfigError(f"unknown field(s) {', '.join(unknown)}", field=f"models[{i}].{unknown[0]}")
            arch = UNetArch.from_dict(m["arch"]) if m.get("arch") is not None else None
            models.append(ModelEntry(m["key"], m["kind"], m["file"], m["inputs"], m["sha256"], m["max_abs_diff"],
                                     arch))
        manifest = Manifest(root=root, settings=settings, opset=int(data["opset"]), exporter=str(data["exporter"]),
                            space_file=str(data["space"]["file"]), space_sha256=str(data["space"]["sha256"]),
                            extra_archs=[UNetArch.from_dict(a) for a in data["extra_archs"]], models=models,
                            environment=dict(data["environment"]), sha256=str(data["manifest_sha256"]))
    except ConfigError as exc:
        raise ConfigError(exc.message, field=exc.field, source=src) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed manifest ({type(exc).__name__}: {exc})", source=src) from None
    keys = [m.key for m in models]
    if len(set(keys)) != len(keys):
        raise ConfigError("duplicate model keys", field="models", source=src)
    if verify_files:
        for m in models:
            f = root / m.file
            if Path(m.file).is_absolute() or ".." in Path(m.file).parts:
                raise ConfigError(f"file {m.file!r} is outside the export folder", field="models", source=src)
            if not f.is_file():
                raise ConfigError(f"{m.file} ({m.key}) is missing from the export folder", field="models",
                                  source=src)
            if sha256_file(f) != m.sha256:
                raise ConfigError(f"{m.file} ({m.key}) changed after export (sha256 does not match the manifest); "
                                  "export again", field="models", source=src)
    return manifest
