"""UNet-NAS search spaces: the architecture description, the model built from it, and the spaces searched.

Imports go one way: ``nas`` -> ``proxies`` -> ``search_spaces``; nothing here imports the other two.
"""

from .arch import BlockSpec, DownStage, MidBlock, UNetArch, UpStage, interleave
from .errors import ConfigError
from .registry import get_arch, list_archs, list_spaces, load_arch, space_path

__all__ = [
    "BlockSpec",
    "ConfigError",
    "DownStage",
    "MidBlock",
    "UNetArch",
    "UpStage",
    "get_arch",
    "interleave",
    "list_archs",
    "list_spaces",
    "load_arch",
    "space_path",
]


def __getattr__(name: str):
    # the model pulls in torch and diffusers; load it only when asked, so the cost model and the CLI stay fast
    if name == "FlexibleUNet2DConditionModel":
        from .flexible_unet import FlexibleUNet2DConditionModel

        return FlexibleUNet2DConditionModel
    if name == "SearchSpace":
        from .space import SearchSpace

        return SearchSpace
    if name in ("inherit_weights", "InheritanceReport"):
        from . import inherit

        return getattr(inherit, name)
    raise AttributeError(name)
