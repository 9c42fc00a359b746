"""Reference architectures and search spaces by name (timm-style): ``get_arch("sd15")``, ``list_archs()``,
``space_path("digits")``, ``list_spaces()``.

They ship as YAML files in ``search_spaces/archs/`` and ``search_spaces/spaces/`` so that a non-editable install
has them and a user can read or copy them as a starting point.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .arch import UNetArch
from .errors import ConfigError
from .yamlio import load_validated, read_file


def _arch_dir() -> Path:
    return Path(str(resources.files("search_spaces") / "archs"))


def _space_dir() -> Path:
    return Path(str(resources.files("search_spaces") / "spaces"))


def list_spaces() -> list[str]:
    """Names of the shipped search spaces."""
    return sorted(p.stem for p in _space_dir().glob("*.yaml"))


def space_path(ref: str | os.PathLike) -> Path:
    """The file of a space: a bare name (no ``/``, no ``.yaml``) is a shipped space (``digits``, ``shapes``, ...),
    anything else a path."""
    path, name = Path(ref), str(ref)
    if "/" in name or name.endswith((".yaml", ".yml", ".json")):
        return path
    shipped = _space_dir() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    if path.is_file():  # a space file without a suffix in the working directory
        return path
    raise ConfigError(f"no shipped space {name!r} (known: {', '.join(list_spaces())}; or give a file path)",
                      field="space")


def list_archs() -> list[str]:
    """Names of the shipped reference architectures."""
    return sorted(p.stem for p in _arch_dir().glob("*.yaml"))


def get_arch(name: str) -> UNetArch:
    """A shipped reference architecture by name (``sd15``, ``sd21base``, ``bk_base``, ``bk_small``,
    ``bk_tiny``, ``decidiffusion_v1``, ...)."""
    path = _arch_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown reference arch {name!r} (known: {', '.join(list_archs())})")
    return load_validated(path, UNetArch.from_dict)


def load_arch(ref: str | os.PathLike) -> UNetArch:
    """An arch from a reference name or a file: an arch YAML/JSON, a diffusers UNet2DConditionModel
    ``config.json`` or a DeciDiffusion ``flexible_unet`` ``config.json``, told apart by their keys."""
    path = Path(ref)
    if not path.exists() and isinstance(ref, str) and "/" not in ref and not ref.endswith((".yaml", ".yml", ".json")):
        return get_arch(ref)
    data, lines = read_file(path)
    try:
        if isinstance(data, dict) and "configurations" in data:
            return UNetArch.from_decidiffusion(data, name=path.stem)
        if isinstance(data, dict) and ("block_out_channels" in data
                                       or data.get("_class_name") == "UNet2DConditionModel"):
            name = path.parent.name if path.name == "config.json" else path.stem
            return UNetArch.from_unet2d_config(data, name=name)
        if isinstance(data, dict) and "arch" in data and "down" not in data:
            return UNetArch.from_dict(data["arch"])  # an experiment-style file with an arch: section
        return UNetArch.from_dict(data)
    except ConfigError as exc:
        prefix = "arch" if isinstance(data, dict) and "arch" in data and "down" not in data else ""
        raise exc.located(str(path), lines, prefix) from None
