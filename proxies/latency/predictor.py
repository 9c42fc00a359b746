"""The one interface every latency predictor implements: ``predict(arch) -> ms`` and a per-stage breakdown.

A search calls ``predict`` tens of thousands of times, so implementations keep per-block work cached and never
build a model. ``breakdown`` answers "where does the time go": stage name (``"down[0]"``, ``"mid"``, ``"up[2]"``,
``"stem"`` for time embedding, conv in and the output head, ``"overhead"`` for what is not tied to a block) to
ms; its values sum to ``predict``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from search_spaces.arch import UNetArch

from .profile import Settings


class LatencyPredictor(ABC):
    """Predicts the latency of one U-Net forward pass (one denoising step) at fixed :class:`Settings`."""

    name: str = "base"
    settings: Settings

    @abstractmethod
    def breakdown(self, arch: UNetArch) -> dict[str, float]:
        """Milliseconds per stage; the values sum to :meth:`predict`."""

    def predict(self, arch: UNetArch) -> float:
        """Predicted milliseconds for one forward pass of ``arch`` at ``self.settings``."""
        return float(sum(self.breakdown(arch).values()))

    def __call__(self, arch: UNetArch) -> float:
        return self.predict(arch)
