"""Quality proxies: how good an arch looks before it is fully trained. Lower scores are better.

``make_proxy("grad_norm")``, ``make_proxy("distill", steps=20)``, ``make_proxy("short_train", steps=50)``,
``make_proxy("surrogate", anchors=8, steps=5)`` (multi-fidelity: needs the context's space and teacher),
``make_proxy("supernet", steps=2000, split=["down[1].resnets"])`` (weight sharing: the same); call
the proxy with an arch and a :class:`QualityContext` to get a :class:`QualityScore` (score, seconds, details).
"""

from __future__ import annotations

from typing import Any

from search_spaces import ConfigError

from .base import QualityContext, QualityProxy, QualityScore, evaluate, make_scheduler
from .distill import Distill
from .short_train import ShortTrain
from .supernet import Supernet
from .surrogate import Surrogate
from .zero_cost import GradNorm, JacobCov, Snip, SynFlow

PROXIES: dict[str, type[QualityProxy]] = {
    "grad_norm": GradNorm, "snip": Snip, "synflow": SynFlow, "jacob_cov": JacobCov,
    "distill": Distill, "short_train": ShortTrain, "surrogate": Surrogate, "supernet": Supernet,
}


def make_proxy(name: str, **options: Any) -> QualityProxy:
    """A proxy by name with its options; unknown names or options are a ConfigError."""
    if name not in PROXIES:
        raise ConfigError(f"unknown quality proxy {name!r} (known: {', '.join(PROXIES)})", field="proxy")
    try:
        return PROXIES[name](**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for {name}: {exc}", field="proxy") from None


__all__ = ["PROXIES", "QualityContext", "QualityProxy", "QualityScore", "evaluate", "make_proxy", "make_scheduler"]
