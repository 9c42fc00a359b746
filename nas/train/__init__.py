"""Training a chosen architecture with the DeciDiffusion recipe (``unet-nas train``).

The recipe (pydantic, light) loads on its own; the trainer (torch, diffusers, accelerate) only when asked for, so
that ``unet-nas train --check`` and ``--help`` start at once.
"""

from .recipe import Recipe, load_recipe

__all__ = ["Recipe", "Trainer", "load_recipe", "make_noise_scheduler"]


def __getattr__(name: str):
    if name in ("Trainer", "make_noise_scheduler"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
