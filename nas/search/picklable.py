"""Samplers that survive pickling, which Ray Tune needs: it pickles the searcher, and the sampler with it, into
its experiment state (``Tuner.restore``) and checkpoints it while trials run.

Optuna 5.1 gave the genetic samplers (``NSGAIISampler``, ``NSGAIIISampler``) a ``threading.Lock`` that guards
their generation cache; a lock cannot be pickled, so an unmodified ``NSGAIISampler`` fails inside Ray with
``TypeError: cannot pickle '_thread.lock' object``. The lock only serialises threads of one process, so the
pickled form leaves it out and unpickling makes a fresh one; the cache it guards is pickled as before (Optuna
resets it by itself when the study differs). Optuna 5.0, which has no lock, pickles the same way.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import optuna

from search_spaces import ConfigError

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


class _FreshLocksOnUnpickle:
    """Pickle every lock attribute as its kind and recreate it unlocked when unpickled."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, _LOCK_TYPES):
                state[key] = _LockPlaceholder(reentrant=not isinstance(value, _LOCK_TYPES[0]))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if isinstance(value, _LockPlaceholder):
                state[key] = threading.RLock() if value.reentrant else threading.Lock()
        self.__dict__.update(state)


class _LockPlaceholder:
    """What a lock pickles as: only whether it was reentrant."""

    def __init__(self, reentrant: bool):
        self.reentrant = reentrant


class NSGAIISampler(_FreshLocksOnUnpickle, optuna.samplers.NSGAIISampler):
    """Optuna's ``NSGAIISampler``, picklable on every Optuna release (see the module docstring)."""


def check_picklable(sampler: optuna.samplers.BaseSampler, strategy: str) -> None:
    """Refuse, as one ``strategy:`` error, a sampler that Ray could not pickle: found here, before Ray starts,
    rather than as a traceback from inside ``Tuner.fit`` after the study was created."""
    try:
        pickle.loads(pickle.dumps(sampler))
    except Exception as exc:  # pickling raises TypeError, AttributeError, PicklingError... by what it meets
        raise ConfigError(f"the {strategy} sampler ({type(sampler).__name__}, optuna {optuna.__version__}) cannot "
                          f"be pickled, which Ray needs: {type(exc).__name__}: {exc}; use backend: optuna, or an "
                          "optuna release inside the tested range (see constraints.txt)", field="strategy") from None
