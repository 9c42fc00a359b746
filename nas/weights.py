"""The one place where export and training read U-Net weights from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from search_spaces import ConfigError, FlexibleUNet2DConditionModel


def load_unet(path: str | os.PathLike, subfolder: str | None = None) -> FlexibleUNet2DConditionModel:
    """A FlexibleUNet from a local folder holding a FlexibleUNet or an SD-family ``UNet2DConditionModel``
    (``config.json`` + safetensors weights; pickle weights are not read). The config's ``_class_name`` says
    which. Any failure is one ConfigError naming the folder."""
    root = Path(path) / subfolder if subfolder else Path(path)
    config = root / "config.json"
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except FileNotFoundError:
        raise ConfigError("not a model folder (no config.json)", source=str(root)) from None
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"cannot read config.json: {exc}", source=str(config)) from None
    try:
        if class_name == "FlexibleUNet2DConditionModel":
            return FlexibleUNet2DConditionModel.from_pretrained(root, use_safetensors=True)
        if class_name == "UNet2DConditionModel":
            return FlexibleUNet2DConditionModel.from_unet2d_pretrained(root, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot load the U-Net: {str(exc).splitlines()[0]}", source=str(root)) from None
    raise ConfigError(f"config.json describes a {class_name!r}, not a U-Net (FlexibleUNet2DConditionModel or "
                      "UNet2DConditionModel)", source=str(config))
