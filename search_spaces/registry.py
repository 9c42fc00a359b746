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


# keys diffusers' ConfigMixin adds to every config.json it writes; they say which class and library wrote it
_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def model_config_path(path: Path) -> Path:
    """The ``config.json`` a model folder stands for: the folder's own (a FlexibleUNet or diffusers U-Net folder,
    as ``export`` and teacher training write them), or its ``unet/`` one (a pipeline folder)."""
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError("not a model folder: no config.json, nor unet/config.json (a pipeline folder)",
                      source=str(path))


def load_arch(ref: str | os.PathLike) -> UNetArch:
    """An arch from a reference name, a file or a model folder, told apart by their keys:

    * an arch YAML/JSON (``arch.yaml``, ``space sample --json``), or a file with an ``arch:`` section;
    * a FlexibleUNet ``config.json`` (written by ``export`` and teacher training; diffusers' ``_class_name``
      and ``_diffusers_version`` keys are accepted), a diffusers UNet2DConditionModel ``config.json`` or a
      DeciDiffusion ``flexible_unet`` ``config.json``;
    * a model folder holding one of those ``config.json``, or a pipeline folder with ``unet/``.

    Every command that takes an arch reads it here, so all of them accept the same forms."""
    path = Path(ref)
    if not path.exists() and isinstance(ref, str) and "/" not in ref and not ref.endswith((".yaml", ".yml", ".json")):
        return get_arch(ref)
    if path.is_dir():
        path = model_config_path(path)
    data, lines = read_file(path)
    name = path.parent.name if path.name == "config.json" else path.stem
    if path.name == "config.json" and name == "unet":  # a pipeline folder's U-Net: name it after the pipeline
        name = path.parent.parent.name
    nested = isinstance(data, dict) and "arch" in data and "down" not in data
    try:
        if isinstance(data, dict) and "configurations" in data:
            return UNetArch.from_decidiffusion(data, name=path.stem)
        if isinstance(data, dict) and ("block_out_channels" in data
                                       or data.get("_class_name") == "UNet2DConditionModel"):
            return UNetArch.from_unet2d_config(data, name=name)
        if nested:
            return UNetArch.from_dict(data["arch"])  # an experiment-style file with an arch: section
        if isinstance(data, dict) and "_class_name" in data:  # a FlexibleUNet config.json
            if data["_class_name"] != "FlexibleUNet2DConditionModel":
                raise ConfigError(f"expected FlexibleUNet2DConditionModel or UNet2DConditionModel, got "
                                  f"{data['_class_name']!r}", field="_class_name")
            arch = {k: v for k, v in data.items() if k not in _DIFFUSERS_META}
            return UNetArch.from_dict({**arch, "name": arch.get("name") or name})
        return UNetArch.from_dict(data)
    except ConfigError as exc:
        raise exc.located(str(path), lines, "arch" if nested else "") from None


def _space_dir() -> Path:
    return Path(str(resources.files("search_spaces") / "spaces"))


def list_spaces() -> list[str]:
    """Names of the shipped search spaces (``search_spaces/spaces/*.yaml``)."""
    return sorted(p.stem for p in _space_dir().glob("*.yaml"))


def space_path(ref: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The file a space reference names: a shipped space name (``digits``), else a path (relative to ``base``,
    the folder of the file that names it, when given)."""
    path = Path(ref)
    if isinstance(ref, str) and "/" not in ref and not ref.endswith((".yaml", ".yml", ".json")):
        shipped = _space_dir() / f"{ref}.yaml"
        local = Path(base) / path if base is not None else path
        if shipped.is_file() and not local.is_file():
            return shipped
        if not local.exists():
            raise ConfigError(f"no shipped space {ref!r} (known: {', '.join(list_spaces())}) and no such file",
                              source=str(local))
        return local
    return Path(base) / path if base is not None and not path.is_absolute() else path
