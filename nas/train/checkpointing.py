"""Whole checkpoints of a training run, and the exact resume from the newest one.

A checkpoint (``accelerator.save_state``: model, optimizer, LR schedule, EMA, every RNG state; plus
``state.json`` with the step and phase) is written to a temporary folder and renamed, so a kill at any moment
leaves whole checkpoints only. Resuming drops the loss-curve rows written after the checkpoint, so the curve
continues as the uninterrupted run's did. A mixin of :class:`nas.train.trainer.Trainer`, whose state it reads.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

from search_spaces import ConfigError
from search_spaces.yamlio import atomic_write

from .outputs import CSV_FIELDS


class Checkpointing:
    """Save, find and load the whole checkpoints of ``self.out / 'checkpoints'``."""

    def _resume_point(self, resume: bool) -> Path | None:
        """The newest whole checkpoint with ``--resume``; refuse to train over an existing run without it."""
        found = self.checkpoints()
        if resume and not found:
            raise ConfigError(f"nothing to resume: no checkpoint in {self.out / 'checkpoints'}")
        if not resume and (found or (self.out / "metrics.json").exists()):
            raise ConfigError(f"{self.out} already holds a run: pass --resume to continue it, or choose another "
                              "--out")
        self._pending = found[-1] if resume else None
        return self._pending

    def checkpoints(self) -> list[Path]:
        """Whole checkpoints (``state.json`` is written last, inside the renamed folder), oldest first."""
        root = self.out / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())

    def _save_checkpoint(self, phase_index: int) -> None:
        acc = self.accelerator
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "phase": phase_index, "phase_name": self.recipe.phases[phase_index].name,
                     "recipe": self.recipe.name, "seconds": round(time.perf_counter() - self._started, 3)}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-self.recipe.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load(self, ckpt: Path) -> None:
        """Restore the step from ``ckpt``. Inside a phase, the phase sets itself up and loads the whole state
        (``self._pending``); at a phase's end only the weights, EMA and RNG states carry over, so they are loaded
        here with no optimizer prepared (the next phase builds its own)."""
        state = json.loads((ckpt / "state.json").read_text())
        self.step = int(state["step"])
        self._elapsed = float(state.get("seconds", 0.0))
        r, acc = self.recipe, self.accelerator
        index = int(state["phase"])
        phase_end = r.phase_starts()[index] + r.phases[index].steps
        if self.step >= phase_end:
            self.model = acc.prepare(self.model)
            self._prepared = True
            acc.load_state(str(ckpt))
            self._pending = None
            self.log(f"resumed at step {self.step} (end of phase {state['phase_name']})")
        if acc.is_main_process:  # the loss curve continues from the checkpoint: later rows were never saved
            with open(self._csv, newline="") as fh:
                rows = [row for row in csv.DictReader(fh) if int(row["step"]) <= self.step]
            lines = [",".join(CSV_FIELDS)] + [",".join(row[k] for k in CSV_FIELDS) for row in rows]
            atomic_write(self._csv, "\n".join(lines) + "\n")
