"""UNet-NAS search spaces: the architecture description, the model built from it, and the spaces searched.

Imports go one way: ``nas`` -> ``proxies`` -> ``search_spaces``; nothing here imports the other two.
"""

from .errors import ConfigError

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


_ARCH = ("BlockSpec", "DownStage", "MidBlock", "UNetArch", "UpStage", "interleave")
_REGISTRY = ("get_arch", "list_archs", "list_spaces", "load_arch", "space_path")


def __getattr__(name: str):
    # loaded when first asked for: the model pulls in torch and diffusers, and even the arch classes and the YAML
    # parser cost start-up time that `unet-nas --help` and argument errors should not pay
    if name in _ARCH:
        from . import arch

        return getattr(arch, name)
    if name in _REGISTRY:
        from . import registry

        return getattr(registry, name)
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
