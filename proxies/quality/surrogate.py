"""Multi-fidelity surrogate proxy: a few full-fidelity runs done once, a regression over cheap features for
every trial.

One-time work (once per run, whatever the number of workers): choose ``anchors`` archs spread over the search
space (farthest-point design over the arch encoding and log MACs, starting from the largest arch of a seeded
pool), train each with the ground-truth protocol (:func:`~proxies.quality.fidelity.full_fidelity`) and measure
its cheap features; fit a ridge regression (features standardised, penalty chosen by leave-one-out) from the
cheap features to the log of the full-fidelity loss. With a ``cache_dir`` in the context every finished anchor
is one JSON file written atomically, a file lock makes the processes of one machine do the work once, and a
killed run resumes losing at most the anchor in flight.

Per trial: the cheap features (inheritance, ``steps`` distillation steps, one small held-out evaluation) and
the regression's prediction. Archs that break inheritance start far worse and recover steeply; the surrogate
learns from the anchors how much a given start-of-curve and parameter share are worth at full fidelity.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import random
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from proxies.cost import arch_costs
from search_spaces import ConfigError, UNetArch
from search_spaces.inherit import check_new_modules
from search_spaces.yamlio import atomic_write

from .base import QualityContext, QualityProxy, Report
from .fidelity import FEATURES, cheap_features, feature_vector, full_fidelity


def design(space: Any, n: int, seed: int, pool: int = 256, text_len: int = 8) -> list[UNetArch]:
    """``n`` archs spread over ``space``: farthest-point sampling (each next arch the one farthest from those
    chosen) over a seeded pool, in the choice-index encoding scaled to [0, 1] plus standardised log MACs."""
    rng = random.Random(seed)
    archs: list[UNetArch] = []
    keys: set[str] = set()
    for _ in range(pool * 20):
        if len(archs) >= pool:
            break
        a = space.sample(rng)
        k = arch_key(a)
        if k not in keys:
            keys.add(k)
            archs.append(a)
    if len(archs) < n:
        raise ConfigError(f"the space has only {len(archs)} distinct archs, fewer than {n} anchors", field="anchors")
    sizes = [len(d.choices) for d in space.decisions]
    enc = np.array([[(k + 1) / s for k, s in zip(space.encode(a), sizes, strict=True)] for a in archs])
    macs = np.log([arch_costs(a, batch=1, text_len=text_len).macs for a in archs])
    x = np.column_stack([enc, (macs - macs.mean()) / (macs.std() or 1.0)])
    chosen = [int(np.argmax(macs))]
    dist = np.linalg.norm(x - x[chosen[0]], axis=1)
    while len(chosen) < n:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return [archs[i] for i in chosen]


def arch_key(arch: UNetArch) -> str:
    return hashlib.sha1(json.dumps(arch.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def fit_ridge(features: list[dict[str, Any]], losses: list[float], names: tuple[str, ...] = FEATURES) -> Any:
    """Ridge regression from standardised features to log loss, its penalty chosen by leave-one-out."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.array([feature_vector(f, names) for f in features])
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 25)))
    return model.fit(x, np.log(losses))


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` for the processes of one machine; the OS releases it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Surrogate(QualityProxy):
    """``anchors`` full-fidelity runs of ``anchor_steps`` once (evaluated on ``anchor_eval_items`` held-out items,
    default all), then per trial ``steps`` distillation steps at ``lr`` (``schedule`` constant, or cosine to zero
    after ``warmup``: the ground-truth protocol shrunk) scored on ``eval_items`` items, and a ridge regression of
    the full-fidelity held-out loss on ``features`` (a subset of ``loss@0``, ``loss@K``, ``new_fraction``,
    ``macs``, ``params``; few features generalise from few anchors) (lower is better). ``new_modules``: how
    inheritance starts what the teacher lacks, in the anchors' runs and the trials' alike."""

    kind = "surrogate"

    def __init__(self, anchors: int = 8, anchor_steps: int = 200, anchor_lr: float = 1e-3, warmup: float = 0.1,
                 steps: int = 5, lr: float = 5e-4, eval_items: int = 64, pool: int = 256,
                 anchor_eval_items: int | None = None, features: list[str] | tuple[str, ...] = FEATURES,
                 schedule: str = "constant", new_modules: str = "fresh"):
        check_new_modules(new_modules)
        for field, value, low in (("anchors", anchors, 3), ("anchor_steps", anchor_steps, 1), ("steps", steps, 0),
                                  ("eval_items", eval_items, 1), ("pool", pool, 1),
                                  ("anchor_eval_items", 1 if anchor_eval_items is None else anchor_eval_items, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"must be an integer >= {low}, got {value!r}", field=field)
        for field, value in (("anchor_lr", anchor_lr), ("lr", lr)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"must be a number > 0, got {value!r}", field=field)
        if not isinstance(warmup, int | float) or not 0 <= warmup < 1:
            raise ConfigError(f"must be a fraction in [0, 1), got {warmup!r}", field="warmup")
        if pool < anchors:
            raise ConfigError(f"must be >= anchors ({anchors}), got {pool}", field="pool")
        if (isinstance(features, str) or not isinstance(features, list | tuple) or not features
                or any(f not in FEATURES for f in features) or len(set(features)) != len(features)):
            raise ConfigError(f"must be a list of distinct names from {', '.join(FEATURES)}, got {features!r}",
                              field="features")
        if schedule not in ("constant", "cosine"):
            raise ConfigError(f"must be constant or cosine, got {schedule!r}", field="schedule")
        self.options = {"anchors": anchors, "anchor_steps": anchor_steps, "anchor_lr": float(anchor_lr),
                        "warmup": float(warmup), "steps": steps, "lr": float(lr), "eval_items": eval_items,
                        "pool": pool, "anchor_eval_items": anchor_eval_items}
        if tuple(features) != FEATURES or schedule != "constant":  # cache keys of the defaults stay as they were
            self.options.update(features=list(features), schedule=schedule)
        if new_modules != "fresh":
            self.options["new_modules"] = new_modules
        self.new_modules = new_modules
        self.features, self.schedule = tuple(features), schedule
        self.name = f"surrogate{anchors}x{anchor_steps}@{steps}" + ("_cosine" if schedule == "cosine" else "")
        self._model: Any = None

    # ---- one-time work ---------------------------------------------------------------------------------------

    def anchor_records(self, ctx: QualityContext) -> list[dict[str, Any]]:
        """The anchors' full-fidelity losses and cheap features, from the cache where it has them."""
        if ctx.space is None:
            raise ConfigError("the surrogate proxy needs the search space to place its anchors", field="space")
        ctx = replace(ctx, new_modules=self.new_modules)
        o = self.options
        archs = design(ctx.space, o["anchors"], ctx.seed, o["pool"], text_len=ctx.data.text.shape[1])
        folder = self.cache_folder(ctx)
        if folder is None:
            return [self._anchor(a, ctx) for a in archs]
        with _locked(folder / ".lock"):
            records = []
            for i, arch in enumerate(archs):
                path = folder / f"anchor-{i:03d}.json"
                record = json.loads(path.read_text()) if path.is_file() else None
                if record is None or record["arch"] != arch.to_dict():
                    record = self._anchor(arch, ctx)
                    atomic_write(path, json.dumps(record, indent=1) + "\n")
                records.append(record)
            return records

    def cache_folder(self, ctx: QualityContext) -> Path | None:
        if ctx.cache_dir is None:
            return None
        digest = hashlib.sha1(json.dumps({**self.options, "seed": ctx.seed}, sort_keys=True).encode())
        return Path(ctx.cache_dir) / "surrogate" / f"{self.name}-{digest.hexdigest()[:8]}"

    def _anchor(self, arch: UNetArch, ctx: QualityContext) -> dict[str, Any]:
        o = self.options
        gt = full_fidelity(arch, ctx, o["anchor_steps"], lr=o["anchor_lr"], warmup=o["warmup"],
                           eval_items=o["anchor_eval_items"])
        return {"arch": arch.to_dict(), "full_fidelity": gt, "features": self._features(arch, ctx)}

    def _features(self, arch: UNetArch, ctx: QualityContext) -> dict[str, Any]:
        o = self.options
        return cheap_features(arch, ctx, o["steps"], lr=o["lr"], eval_items=o["eval_items"], schedule=self.schedule,
                              warmup=o["warmup"] if self.schedule == "cosine" else 0.0)

    def fit(self, ctx: QualityContext) -> Any:
        """The fitted regression (the one-time work on first use in this process)."""
        if self._model is None:
            records = self.anchor_records(ctx)
            self._model = fit_ridge([r["features"] for r in records],
                                    [r["full_fidelity"]["task_loss"] for r in records], self.features)
        return self._model

    # ---- per trial -------------------------------------------------------------------------------------------

    def compute(self, arch: UNetArch, ctx: QualityContext, report: Report | None) -> tuple[float, dict[str, Any]]:
        model = self.fit(ctx)
        feats = self._features(arch, replace(ctx, new_modules=self.new_modules))
        predicted = math.exp(float(model.predict(np.array([feature_vector(feats, self.features)]))[0]))
        return predicted, {"predicted_task_loss": predicted, **{k: feats[k] for k in FEATURES}}
