"""Learned predictor: gradient-boosted trees on arch encodings and per-block features, trained on measured networks.

Trees cannot extrapolate: fitted on raw milliseconds they would predict a constant for every arch larger than
those seen. So the trees learn a *ratio* on top of a baseline that already scales with the network: the
lookup-table block sum when the profile has the blocks (the trees then learn what the linear correction misses:
interactions between neighbouring blocks, cache effects per level), otherwise a linear fit on MACs. Features
are the arch's MACs, attention MACs, params, kernel count and activation traffic, per-level MACs and block
counts, the per-kind block-sum shares, and, given a search space, its ``encode`` vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from proxies.cost import arch_costs
from search_spaces.arch import UNetArch
from search_spaces.errors import ConfigError

from .blocks import arch_block_keys
from .kernels import block_kernels, kernel_array
from .predictor import LatencyPredictor
from .profile import LatencyProfile, Settings

MAX_LEVELS = 5
KINDS = ("resnet", "attention", "downsample", "upsample")


def arch_features(arch: UNetArch, settings: Settings, profile: LatencyProfile | None = None,
                  space: Any = None) -> np.ndarray:
    """The feature vector of one arch at ``settings`` (see the module docstring)."""
    s = settings
    cost = arch_costs(arch, s.batch, s.latent_size, s.text_len)
    sizes = arch.sizes(s.latent_size)
    level_macs = np.zeros(MAX_LEVELS)
    counts = dict.fromkeys(KINDS, 0.0)
    kernels, traffic = 0.0, 0.0
    for b in arch.blocks:
        k = kernel_array(block_kernels(arch, b, sizes, s.text_len), s.batch)
        kernels += len(k)
        traffic += float(k[:, 1].sum())
        level_macs[min(b.level, MAX_LEVELS - 1)] += float(k[:, 0].sum()) / 2
        if b.kind in counts:
            counts[b.kind] += b.transformer_layers if b.kind == "attention" else 1
    shares = np.zeros(len(KINDS) + 1)
    if profile is not None and profile.blocks:
        times = np.zeros(len(KINDS) + 1)
        for b, key in arch_block_keys(arch, s.latent_size):
            t = profile.blocks.get(key)
            times[KINDS.index(b.kind) if b.kind in KINDS else len(KINDS)] += t.ms if t else 0.0
        shares = times / max(times.sum(), 1e-12)
    base = [np.log(cost.macs), cost.attention_macs / cost.macs, np.log(cost.params), kernels, np.log(traffic)]
    parts = [np.asarray(base), level_macs / cost.macs, np.asarray([counts[k] for k in KINDS]), shares]
    if space is not None:
        parts.append(np.asarray(space.encode(arch), float))
    return np.concatenate(parts)


class LearnedPredictor(LatencyPredictor):
    """Baseline (LUT block sum or linear-in-MACs) x exp(gradient-boosted correction).

    Build it with :meth:`fit` from measured (arch, ms) pairs, or :meth:`from_profile` from a profile's
    calibration networks. Its breakdown spreads the prediction over stages in the proportions of the LUT (or
    of the MACs when there is no LUT).
    """

    name = "learned"

    def __init__(self, settings: Settings, profile: LatencyProfile | None = None, space: Any = None,
                 seed: int = 0):
        self.settings = settings
        if profile is not None:
            profile.check_settings(settings)
        self.profile = profile if profile is not None and profile.blocks else None
        self.space = space
        self.seed = seed
        self.model: Any = None
        self.macs_fit = (0.0, 0.0)
        self.n_train = 0

    # ---- baseline ----------------------------------------------------------------------------------------

    def _stage_baseline(self, arch: UNetArch) -> dict[str, float]:
        if self.profile is not None:
            from .lut import block_times

            return block_times(self.profile, arch)
        s = self.settings
        a, b = self.macs_fit
        cost = arch_costs(arch, s.batch, s.latent_size, s.text_len)
        out = {k: a * c.macs / 1e9 for k, c in cost.stages.items()}
        out["overhead"] = b
        return out

    def baseline(self, arch: UNetArch) -> float:
        return float(sum(self._stage_baseline(arch).values()))

    # ---- training ----------------------------------------------------------------------------------------

    def fit(self, archs: Sequence[UNetArch], measured_ms: Sequence[float]) -> LearnedPredictor:
        """Train on measured whole networks (at this predictor's settings); needs at least 4 of them."""
        from sklearn.ensemble import GradientBoostingRegressor

        if len(archs) < 4:
            raise ConfigError(f"the learned predictor needs at least 4 measured networks to train, got "
                              f"{len(archs)}; profile with a larger --calibration", field="calibration")
        y_ms = np.asarray(measured_ms, float)
        if self.profile is None:
            s = self.settings
            g = np.array([arch_costs(a, s.batch, s.latent_size, s.text_len).macs / 1e9 for a in archs])
            slope, intercept = np.polyfit(g, y_ms, 1)
            if slope <= 0:
                slope, intercept = float(np.mean(y_ms / g)), 0.0
            self.macs_fit = (float(slope), float(intercept))
        x = np.stack([arch_features(a, self.settings, self.profile, self.space) for a in archs])
        y = np.log(y_ms / np.array([self.baseline(a) for a in archs]))
        self.model = GradientBoostingRegressor(
            n_estimators=150, max_depth=2, learning_rate=0.05, subsample=0.8, min_samples_leaf=2,
            random_state=self.seed,
        ).fit(x, y)
        self.n_train = len(archs)
        return self

    @classmethod
    def from_profile(cls, profile: LatencyProfile, space: Any = None, extra: Sequence[tuple[UNetArch, float]] = (),
                     seed: int = 0) -> LearnedPredictor:
        """Trained on the profile's calibration networks (plus ``extra`` measured (arch, ms) pairs)."""
        archs = [c.arch for c in profile.calibration] + [a for a, _ in extra]
        ms = [c.timing.ms for c in profile.calibration] + [m for _, m in extra]
        return cls(profile.settings, profile, space, seed).fit(archs, ms)

    # ---- prediction --------------------------------------------------------------------------------------

    def breakdown(self, arch: UNetArch) -> dict[str, float]:
        if self.model is None:
            raise RuntimeError("LearnedPredictor.fit() first")
        ratio = float(np.exp(self.model.predict(arch_features(arch, self.settings, self.profile,
                                                               self.space)[None])[0]))
        return {k: v * ratio for k, v in self._stage_baseline(arch).items()}
