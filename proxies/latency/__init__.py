"""Hardware-aware latency: per-device profiles and three predictors behind one interface.

* :mod:`.profile` - the profile file (settings, protocol, measured blocks, calibration networks, correction);
* :mod:`.profiler` - measuring one (``unet-nas profile``), resumable;
* :class:`LUTPredictor` - sum of measured blocks plus a fitted correction;
* :class:`RooflinePredictor` - analytic, from a device spec (``devices/*.yaml``), calibratable from measurements;
* :class:`LearnedPredictor` - gradient-boosted trees on arch and block features, trained on measured networks.
"""

from .lut import LUTPredictor, block_sum, fit_correction
from .predictor import LatencyPredictor
from .profile import Correction, LatencyProfile, Protocol, Settings, Timing

__all__ = [
    "Correction",
    "LUTPredictor",
    "LatencyPredictor",
    "LatencyProfile",
    "Protocol",
    "Settings",
    "Timing",
    "block_sum",
    "fit_correction",
]
