"""Training a chosen architecture with the DeciDiffusion recipe (``unet-nas train``)."""

from .recipe import Recipe, load_recipe
from .trainer import Trainer, make_noise_scheduler

__all__ = ["Recipe", "Trainer", "load_recipe", "make_noise_scheduler"]
