"""The one place UNet-NAS reads and writes weights: safetensors by default, pickle only when asked, strict always.

Why: a pickle checkpoint (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) is a program, not data: unpickling it can run
any code its author put there. Checkpoints come from other people (a teacher from a model hub, a colleague's
fine-tune), so UNet-NAS reads safetensors, which holds tensors only. A pickle is refused with a clear error unless
the user passes ``--allow-pickle`` (``allow_pickle=True``), and even then it goes through
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only: a payload still does not run.

A checkpoint that does not fit the model (missing, unexpected or wrong-shape tensors) is one error listing them,
and the model is left untouched: a half-loaded network would train or score silently wrong. Only a caller that
asks for it (``strict=False``, e.g. inheriting what fits from a teacher) gets a partial load, with the list.

API (small on purpose; every weight load in the code base goes through it):

* :func:`load_state_dict` ``(path, allow_pickle=False)``: one file -> ``{name: tensor}``.
* :func:`load_into` ``(model, state_dict, strict=True)``: check, then copy; returns what did not fit.
* :func:`load_pretrained` ``(cls, folder, subfolder=None, allow_pickle=False)``: a diffusers or transformers
  model folder (``from_pretrained``, local files only, never falling back to pickle weights unless allowed).
* :func:`load_unet` ``(folder, subfolder=None, allow_pickle=False)``: a FlexibleUNet or SD-family
  ``UNet2DConditionModel`` folder as a :class:`FlexibleUNet2DConditionModel`, told apart by ``config.json``.
* :func:`save_state_dict` ``(state_dict, path)`` and :func:`save_pretrained` ``(model, folder)``: atomic
  writers (a temporary name, then a rename), so a crash leaves the old checkpoint or none, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError
from .yamlio import atomic_dir, atomic_file

if TYPE_CHECKING:
    from .flexible_unet import FlexibleUNet2DConditionModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_SUFFIX = ".safetensors"
_LISTED = 8  # names shown per category in a mismatch error


class CheckpointError(ConfigError):
    """A checkpoint that is refused (pickle without permission, a payload) or does not fit the model."""


def pickle_refused(what: str, source: str) -> CheckpointError:
    return CheckpointError(
        f"{what} is a pickle, which can run code when it is loaded, so it is refused: convert it to "
        "safetensors, or pass --allow-pickle if you trust it (it is then read with torch.load(weights_only=True), "
        "tensors only)", source=source)


# ---- one file ---------------------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read one weights file into ``{name: tensor}``.

    ``.safetensors`` is read with safetensors. Anything else is treated as a pickle: refused unless
    ``allow_pickle``, then read with ``torch.load(weights_only=True)`` (a Lightning-style ``{"state_dict": ...}``
    wrapper is unwrapped). Every failure is a :class:`CheckpointError` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError("checkpoint not found" if not p.exists() else "not a file", source=str(p))
    if p.suffix == SAFE_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(p, device=str(device))
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError types
            raise CheckpointError(f"not a readable safetensors file: {_first_line(exc)}", source=str(p)) from None
    if not allow_pickle:
        raise pickle_refused(f"this checkpoint ({p.suffix or 'no suffix'})", str(p))
    try:
        obj = torch.load(p, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            "torch.load(weights_only=True) refused it: the pickle holds Python objects other than tensors (code "
            f"would run if it were loaded without weights_only; UNet-NAS never does): {_first_line(exc)}",
            source=str(p)) from None
    except Exception as exc:  # a truncated or foreign file: zipfile, EOF, runtime errors
        raise CheckpointError(f"cannot read the checkpoint: {type(exc).__name__}: {_first_line(exc)}",
                              source=str(p)) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a mapping of tensor names to tensors, got {type(obj).__name__}",
                              source=str(p))
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a state dict: {len(bad)} entries are not tensors ({', '.join(bad[:_LISTED])})",
                              source=str(p))
    return dict(obj)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` as safetensors, atomically (temporary name in the same folder, then a rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != SAFE_SUFFIX:
        raise ValueError(f"checkpoints are written as safetensors: {p} should end in {SAFE_SUFFIX}")
    with atomic_file(p) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)
    return p


# ---- fitting a state dict to a model ----------------------------------------------------------------------------


@dataclass
class LoadResult:
    """How a state dict fits a model: names the model has and the checkpoint lacks, names the model does not
    have, and ``(name, checkpoint shape, model shape)`` for tensors of another shape."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One line listing every problem (the first few names of each kind)."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_names(self.unexpected)})")
        if self.mismatched:
            shown = [f"{n}: checkpoint {list(a)}, model {list(b)}" for n, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} of the wrong shape ({_names(shown)})")
        return "; ".join(parts)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> LoadResult:
    """Compare a state dict with a model's without touching the model."""
    expected = model.state_dict()
    result = LoadResult(missing=sorted(set(expected) - set(state_dict)),
                        unexpected=sorted(set(state_dict) - set(expected)))
    for name in sorted(set(expected) & set(state_dict)):
        got = state_dict[name]
        if not isinstance(got, torch.Tensor):
            result.mismatched.append((name, (), tuple(expected[name].shape)))
        elif tuple(got.shape) != tuple(expected[name].shape):
            result.mismatched.append((name, tuple(got.shape), tuple(expected[name].shape)))
    return result


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
              assign: bool = False, source: str | None = None) -> LoadResult:
    """Copy ``state_dict`` into ``model``.

    ``strict`` (the default): any missing, unexpected or wrong-shape tensor is one :class:`CheckpointError`
    listing them all, raised *before* anything is copied, so the model is left exactly as it was.
    ``strict=False`` is for inheritance: the tensors that fit are copied, the rest keep the model's values, and
    the returned :class:`LoadResult` lists what did not fit. ``assign`` is ``nn.Module.load_state_dict``'s (keep
    the checkpoint's tensors, dtype and device, e.g. into a model built on the meta device).
    """
    result = check_state_dict(model, state_dict)
    if not result.ok and strict:
        raise CheckpointError(f"the checkpoint does not fit the model: {result.describe()}", source=source)
    if result.ok:
        model.load_state_dict(dict(state_dict), strict=True, assign=assign)
    else:
        skip = {n for n, _, _ in result.mismatched} | set(result.unexpected)
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in skip}, strict=False, assign=assign)
    return result


# ---- model folders (diffusers / transformers from_pretrained) --------------------------------------------------


def weight_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) directly in a model folder."""
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    return ([p for p in files if p.suffix == SAFE_SUFFIX],
            [p for p in files if p.suffix in PICKLE_SUFFIXES])


def load_pretrained(cls: Any, path: str | os.PathLike, *, subfolder: str | None = None, allow_pickle: bool = False,
                    strict: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on a local folder (a diffusers ``ModelMixin`` or a transformers
    ``PreTrainedModel`` class), hardened:

    * local files only (no download);
    * safetensors only (``use_safetensors=True``): a folder holding only pickle weights is refused unless
      ``allow_pickle``, and then the library reads them with ``torch.load(weights_only=True)``;
    * with ``strict``, weights that do not fit the config (missing, unexpected, wrong shape) are one
      :class:`CheckpointError` listing them, instead of the library's warning and a partly random model.
    """
    root = Path(path)
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"not a model folder (no config.json in {folder})", source=str(root))
    safe, pickled = weight_files(folder)
    if not safe and pickled and not allow_pickle:
        raise pickle_refused(f"the weights ({', '.join(p.name for p in pickled)})", str(folder))
    from diffusers import ModelMixin

    diffusers_model = issubclass(cls, ModelMixin)
    kwargs = {"local_files_only": True, "use_safetensors": True if (safe or not allow_pickle) else None,
              "output_loading_info": True, **({"subfolder": subfolder} if subfolder else {}), **kwargs}
    # transformers *reports* wrong shapes with ignore_mismatched_sizes; diffusers only without its fast
    # low_cpu_mem_usage path (which raises at the first wrong shape), so there that costly path is taken only to
    # list the problems once the fast load has failed
    listing = {"ignore_mismatched_sizes": True, **({"low_cpu_mem_usage": False} if diffusers_model else {})}
    try:
        with _quiet_libraries():
            model, info = cls.from_pretrained(str(root), **kwargs, **({} if diffusers_model else listing))
    except Exception as exc:  # the libraries raise OSError, ValueError, RuntimeError, EnvironmentError, ...
        if allow_pickle and not safe:  # say *why* a pickle failed: weights_only refuses a payload
            for p in pickled:
                load_state_dict(p, allow_pickle=True)
        info = None
        if diffusers_model and "shape" in str(exc):
            try:
                with _quiet_libraries():
                    model, info = cls.from_pretrained(str(root), **kwargs, **listing)
            except Exception:
                info = None
        if info is None or not info.get("mismatched_keys"):
            raise CheckpointError(f"cannot load {cls.__name__}: {type(exc).__name__}: {_first_line(exc)}",
                                  source=str(folder)) from None
    result = LoadResult(missing=sorted(info.get("missing_keys") or []),
                        unexpected=sorted(info.get("unexpected_keys") or []),
                        mismatched=[(str(n), tuple(a), tuple(b)) for n, a, b in info.get("mismatched_keys") or []])
    if strict and not result.ok:
        raise CheckpointError(f"the weights do not fit the {cls.__name__} config: {result.describe()}",
                              source=str(folder))
    return model


def load_unet(path: str | os.PathLike, *, subfolder: str | None = None,
              allow_pickle: bool = False) -> FlexibleUNet2DConditionModel:
    """A U-Net folder as a FlexibleUNet: a FlexibleUNet's own, or an SD-family ``UNet2DConditionModel``'s
    (converted exactly, :meth:`FlexibleUNet2DConditionModel.from_unet2d`). Which one is read from
    ``config.json``'s ``_class_name``; anything else is refused."""
    from diffusers import UNet2DConditionModel

    from .flexible_unet import FlexibleUNet2DConditionModel

    folder = Path(path) / subfolder if subfolder else Path(path)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"not a model folder (no config.json in {folder})", source=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json is not readable JSON: {_first_line(exc)}", source=str(config_path)) \
            from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name == FlexibleUNet2DConditionModel.__name__:
        return load_pretrained(FlexibleUNet2DConditionModel, path, subfolder=subfolder, allow_pickle=allow_pickle)
    if name == "UNet2DConditionModel":
        unet = load_pretrained(UNet2DConditionModel, path, subfolder=subfolder, allow_pickle=allow_pickle)
        return FlexibleUNet2DConditionModel.from_unet2d(unet)
    raise CheckpointError(f"expected a FlexibleUNet2DConditionModel or UNet2DConditionModel folder, config.json "
                          f"says _class_name {name!r}", field="_class_name", source=str(config_path))


def save_pretrained(model: Any, folder: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained`` (safetensors) into a temporary sibling folder, then renamed over ``folder``."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    return Path(folder)


# ---- helpers ----------------------------------------------------------------------------------------------------


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers and transformers log 'newly initialized' warnings for what the strict check reports as one
    error; keep them out of the user's way while loading."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
