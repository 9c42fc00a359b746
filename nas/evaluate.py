"""``unet-nas evaluate``: quality against sampling steps and seconds, the way the DeciDiffusion claims are made.

For a teacher and its students, each sampler and each step count, images are generated for the same prompts
and the same per-prompt starting noise, then scored:

* **FID** against a set of real images, and **relative FID** against the teacher's own samples at its reference
  step count (:mod:`proxies.quality.fid`, torchmetrics), each with a bootstrap interval over prompt/seed pairs;
* a **text-alignment score**: the CLIP score with a local CLIP model (torchmetrics), or on the built-in digits the
  digit accuracy of a classifier trained on the real digits;
* **seconds per image** on the device, measured separately (one image, classifier-free guidance as a batch of 2,
  after a warm-up, the minimum and median of ``timing_repeats``, the models taking turns within each repeat): the
  U-Net steps alone and the whole pipeline;
* the **headline**: the fewest steps at which each student's FID is within ``tolerance`` of the teacher's at its
  reference step count, the paired bootstrap interval of the FID difference, and the speed-up per image.

Two back ends. A U-Net folder (FlexibleUNet or diffusers) on its own is evaluated on the built-in digits (its
identity "VAE" and hashed text embedding are built in; FID is in the feature space of a digit classifier trained
deterministically on the real images). A diffusers pipeline folder, or U-Net folders with ``pipeline_from`` (a
Stable Diffusion folder's VAE, text encoder and tokenizer), is evaluated with Inception features from a local
TorchScript file; without one, FID is refused.

Output folder: ``evaluation.json``, ``quality_vs_steps.png``, ``quality_vs_seconds.png``,
``grids/<model>/<sampler>-<steps>.png`` and ``samples/<model>/<sampler>-<steps>/batch-*.safetensors``: images
already generated are reused by a rerun with the same settings, so an interrupted evaluation resumes. Quality
numbers are a pure function of the models, prompts, settings and seed on one machine and thread count; seconds
are measurements and vary with load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from search_spaces import ConfigError
from search_spaces.yamlio import atomic_write, dump_json

from .eval_backends import DIGIT_CAPTION, Backend, DigitsBackend, EvalConfig, ModelSpec, PipelineBackend

__all__ = ["DIGIT_CAPTION", "Backend", "DigitsBackend", "EvalConfig", "Evaluation", "ModelSpec", "PipelineBackend",
           "fingerprint"]


# ---- the run ---------------------------------------------------------------------------------------------------


@contextmanager
def _timed(module: torch.nn.Module, into: list[float]) -> Iterator[None]:
    """Seconds spent inside ``module``'s forward calls, appended to ``into``."""
    start: list[float] = []
    pre = module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    post = module.register_forward_hook(lambda *_: into.append(time.perf_counter() - start.pop()))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def fingerprint(path: Path) -> str:
    """A model folder's identity for the sample cache: its config files and the size and mtime of its weights."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            rel = str(f.relative_to(path))
            if f.suffix in (".json", ".yaml", ".txt"):
                h.update(rel.encode() + f.read_bytes())
            else:
                st = f.stat()
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Evaluation:
    """One evaluation into ``out``; :meth:`run` returns the JSON it writes."""

    def __init__(self, models: list[ModelSpec], backend: Backend, cfg: EvalConfig, out: str | os.PathLike,
                 log: Callable[[str], None] = print, progress: bool = True):
        self.models, self.backend, self.cfg, self.out = models, backend, cfg, Path(out)
        self.log, self.progress = log, progress
        self.generated = 0  # batches generated (not reused) by this run

    def _key(self, spec: ModelSpec, sampler: str, steps: int) -> dict[str, Any]:
        c = self.cfg
        prompts = hashlib.sha256("\n".join(p.text for p in self.backend.prompts).encode()).hexdigest()[:16]
        return {"model": str(spec.path.resolve()), "fingerprint": fingerprint(spec.path), "sampler": sampler,
                "steps": steps, "guidance": c.guidance, "guidance_rescale": c.guidance_rescale, "seed": c.seed,
                "prompts": prompts, "n": len(self.backend.prompts), "batch_size": c.batch_size,
                "backend": self.backend.kind}

    def _samples(self, spec: ModelSpec, model: Any, sampler: str, steps: int, advance: Callable[[], None]):
        """All images of one model, sampler and step count: reused from ``samples/`` where a batch is there."""
        folder = self.out / "samples" / spec.name / f"{sampler}-{steps:03d}"
        key = self._key(spec, sampler, steps)
        key_path = folder / "key.json"
        if key_path.is_file():
            old = json.loads(key_path.read_text())
            if old != key:
                changed = sorted(k for k in key if old.get(k) != key[k])
                raise ConfigError(f"{folder} holds samples made with other settings ({', '.join(changed)}): choose "
                                  "another --out, or delete that folder", field="--out")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(key_path, dump_json(key))
        n, b = len(self.backend.prompts), self.cfg.batch_size
        batches = []
        for start in range(0, n, b):
            path = folder / f"batch-{start // b:04d}.safetensors"
            idx = list(range(start, min(start + b, n)))
            if path.is_file():
                images = load_file(path)["images"]
            else:
                images = self.backend.generate(model, idx, sampler, steps)
                tmp = path.with_name(f".{path.name}.tmp")
                save_file({"images": images.contiguous()}, tmp)
                os.replace(tmp, path)
                self.generated += 1
            batches.append(images)
            advance()
        return torch.cat(batches)

    def _time(self, models: dict[str, Any], sampler: str, steps: int) -> dict[str, dict[str, Any]]:
        """Seconds for one image per model (warm-up first): the whole pipeline and the U-Net calls inside it.
        The models take turns within each repeat, so a change of machine load hits all of them alike."""
        for model in models.values():
            self.backend.generate(model, [0], sampler, steps)
        total: dict[str, list[float]] = {name: [] for name in models}
        unet: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(self.cfg.timing_repeats):
            for name, model in models.items():
                calls: list[float] = []
                with _timed(self.backend.unet(model), calls):
                    t0 = time.perf_counter()
                    self.backend.generate(model, [0], sampler, steps)
                    total[name].append(time.perf_counter() - t0)
                unet[name].append(sum(calls))
        return {name: {"pipeline_min": min(total[name]), "pipeline_median": float(np.median(total[name])),
                       "unet_min": min(unet[name]), "unet_median": float(np.median(unet[name])),
                       "repeats": len(total[name]),
                       "noise_floor": (float(np.median(total[name])) - min(total[name])) / min(total[name])}
                for name in models}

    def run(self) -> dict[str, Any]:
        from rich.progress import Progress

        cfg, backend = self.cfg, self.backend
        if cfg.reference_steps not in cfg.steps:
            raise ConfigError(f"the teacher's reference step count {cfg.reference_steps} is not among --steps "
                              f"{cfg.steps}", field="--teacher-steps")
        models = {spec.name: backend.load(spec) for spec in self.models}
        backend.check(models)
        self.out.mkdir(parents=True, exist_ok=True)
        real = backend.reference_features()
        n_batches = math.ceil(len(backend.prompts) / cfg.batch_size)
        runs = [(s, sampler, steps) for s in self.models for sampler in cfg.samplers for steps in cfg.steps]
        feats: dict[tuple[str, str, int], torch.Tensor] = {}
        text: dict[tuple[str, str, int], torch.Tensor | None] = {}
        seconds: dict[tuple[str, str, int], dict[str, Any]] = {}
        with Progress(disable=not self.progress, transient=True) as bar:
            task = bar.add_task("generating", total=len(runs) * n_batches)
            for spec, sampler, steps in runs:
                bar.update(task, description=f"{spec.name} {sampler} {steps} steps")
                images = self._samples(spec, models[spec.name], sampler, steps, lambda: bar.advance(task))
                k = (spec.name, sampler, steps)
                feats[k] = backend.features(images)
                text[k] = backend.text_scores(images, list(range(len(images))))
                self._grid(spec.name, sampler, steps, images)
            bar.update(task, description="timing")
            for sampler in cfg.samplers:
                for steps in cfg.steps:
                    for name, timing in self._time(models, sampler, steps).items():
                        seconds[(name, sampler, steps)] = timing
        result = self._report(feats, text, seconds, real)
        atomic_write(self.out / "evaluation.json", dump_json(result))
        self._plots(result)
        return result

    # ---- scoring ---------------------------------------------------------------------------------------------

    def _report(self, feats, text, seconds, real) -> dict[str, Any]:
        from proxies.quality.fid import bootstrap_indices, frechet_distance, interval

        cfg = self.cfg
        n = len(self.backend.prompts)
        boot = bootstrap_indices(n, cfg.bootstrap, cfg.seed)
        teacher = next((s.name for s in self.models if s.role == "teacher"), None)
        results: dict[str, Any] = {}
        for (name, sampler, steps), f in feats.items():
            row: dict[str, Any] = {"steps": steps}
            if f is not None and real is not None:
                row["fid"] = frechet_distance(real, f)
                row["fid_interval"] = interval([frechet_distance(real, f[i]) for i in boot], center=row["fid"])
            if f is not None and teacher is not None:
                ref = feats[(teacher, sampler, cfg.reference_steps)]
                row["relative_fid"] = frechet_distance(ref, f)
                row["relative_fid_interval"] = interval([frechet_distance(ref[i], f[i]) for i in boot],
                                                        center=row["relative_fid"])
            t = text[(name, sampler, steps)]
            if t is not None:
                row[self.backend.text_score_name] = float(t.mean())
                row[f"{self.backend.text_score_name}_interval"] = interval([float(t[i].mean()) for i in boot])
            row["seconds_per_image"] = seconds[(name, sampler, steps)]
            results.setdefault(name, {}).setdefault(sampler, []).append(row)
        headline = self._headline(feats, seconds, real, boot, teacher) if teacher is not None else []
        return {
            "evaluation": "unet-nas evaluate",
            "environment": _environment(self.backend),
            "config": asdict(cfg) | {"teacher_steps": cfg.reference_steps},
            "backend": self.backend.kind,
            "feature_space": self.backend.feature_space,
            "reference_set": self.backend.reference,
            "text_score": self.backend.text_score_name,
            "images_per_setting": n,
            "models": [{"name": s.name, "path": str(s.path), "role": s.role} for s in self.models],
            "results": results,
            "headline": headline,
            "notes": [
                "fid / relative_fid / text scores are deterministic under the seed on one machine and thread count; "
                "intervals are 95% bootstrap percentiles over the prompt/seed pairs",
                "seconds_per_image: one image (guidance as a batch of 2) after a warm-up, the models taking turns "
                "within each repeat; minimum and median of "
                "the repeats; noise_floor = (median - min) / min; measured on this machine under its load",
            ],
        }

    def _headline(self, feats, seconds, real, boot, teacher: str) -> list[dict[str, Any]]:
        """Per student and sampler: the fewest steps at which the student matches the teacher's reference FID."""
        from proxies.quality.fid import frechet_distance, interval

        cfg = self.cfg
        rows = []
        for spec in self.models:
            if spec.role == "teacher":
                continue
            for sampler in cfg.samplers:
                ref_key = (teacher, sampler, cfg.reference_steps)
                ref = feats[ref_key]
                if ref is None or real is None:
                    continue
                target = frechet_distance(real, ref)
                t_sec = seconds[ref_key]["pipeline_min"]
                # the teacher's own fewest steps within the tolerance of its reference: a speed-up that fewer steps
                # of the teacher itself would give is not the student's
                own = next((st for st in sorted(cfg.steps) if frechet_distance(real, feats[(teacher, sampler, st)])
                            <= (1 + cfg.tolerance) * target), cfg.reference_steps)
                t_own_sec = seconds[(teacher, sampler, own)]["pipeline_min"]
                sweep = []
                for steps in sorted(cfg.steps):
                    f = feats[(spec.name, sampler, steps)]
                    fid = frechet_distance(real, f)
                    diff = [frechet_distance(real, f[i]) - frechet_distance(real, ref[i]) for i in boot]
                    diff_interval = interval(diff, center=fid - target)
                    s_sec = seconds[(spec.name, sampler, steps)]["pipeline_min"]
                    sweep.append({"steps": steps, "fid": fid, "fid_minus_teacher": fid - target,
                                  "fid_minus_teacher_interval": diff_interval,
                                  "matches": fid <= (1 + cfg.tolerance) * target,
                                  "matches_at_95": diff_interval[1] <= cfg.tolerance * target,
                                  "speedup_per_image": t_sec / s_sec,
                                  "speedup_vs_teacher_fewest_steps": t_own_sec / s_sec})
                first = next((r for r in sweep if r["matches"]), None)
                sure = next((r["steps"] for r in sweep if r["matches_at_95"]), None)
                rows.append({
                    "student": spec.name, "sampler": sampler, "teacher_steps": cfg.reference_steps,
                    "teacher_fid": target, "tolerance": cfg.tolerance,
                    "matching_steps": first["steps"] if first else None,
                    "matching_steps_at_95": sure,  # the interval's upper end within the tolerance too
                    "speedup_per_image": first["speedup_per_image"] if first else None,
                    "teacher_fewest_matching_steps": own,
                    "speedup_vs_teacher_fewest_steps": first["speedup_vs_teacher_fewest_steps"] if first else None,
                    "fid_minus_teacher_interval": first["fid_minus_teacher_interval"] if first else None,
                    "claim": (f"{spec.name} at {first['steps']} steps matches {teacher} at {cfg.reference_steps} steps "
                              f"(FID {first['fid']:.3g} vs {target:.3g}, tolerance {cfg.tolerance:.0%}): "
                              f"{first['speedup_per_image']:.2f}x faster per image; the teacher itself is within the "
                              f"tolerance from {own} steps, against which the student is "
                              f"{first['speedup_vs_teacher_fewest_steps']:.2f}x faster" if first else
                              f"{spec.name} does not reach {teacher}'s FID at {cfg.reference_steps} steps "
                              f"({target:.3g}, tolerance {cfg.tolerance:.0%}) at any of {sorted(cfg.steps)} steps"),
                    "sweep": sweep,
                })
        return rows

    # ---- pictures ----------------------------------------------------------------------------------------------

    def _grid(self, name: str, sampler: str, steps: int, images: torch.Tensor, count: int = 20) -> None:
        from PIL import Image

        x = self.backend.grid_images(images[:count]).clamp(0, 1)
        n, c, h, w = x.shape
        cols = min(10, n)
        rows = math.ceil(n / cols)
        scale, pad = max(1, 64 // h), 2
        th, tw = h * scale + pad, w * scale + pad
        canvas = torch.full((c, rows * th + pad, cols * tw + pad), 0.5)
        big = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        for i in range(n):
            r, k = divmod(i, cols)
            canvas[:, pad + r * th:(r + 1) * th, pad + k * tw:(k + 1) * tw] = big[i]
        array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = self.out / "grids" / name / f"{sampler}-{steps:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(array[..., 0] if c == 1 else array).save(tmp, format="PNG")
        os.replace(tmp, path)

    def _plots(self, result: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = "fid" if any("fid" in r for m in result["results"].values() for rs in m.values() for r in rs) \
            else "relative_fid"
        for x_key, file, xlabel in (("steps", "quality_vs_steps.png", "sampling steps"),
                                    ("seconds", "quality_vs_seconds.png", "seconds per image (min of repeats)")):
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for name, by_sampler in result["results"].items():
                for sampler, rows in by_sampler.items():
                    rows = [r for r in rows if metric in r]
                    if not rows:
                        continue
                    xs = [r["steps"] if x_key == "steps" else r["seconds_per_image"]["pipeline_min"] for r in rows]
                    ys = [r[metric] for r in rows]
                    lo = [r[metric] - r[f"{metric}_interval"][0] for r in rows]
                    hi = [r[f"{metric}_interval"][1] - r[metric] for r in rows]
                    ax.errorbar(xs, ys, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], marker="o", capsize=3,
                                label=f"{name} ({sampler})")
            for h in result["headline"][:1]:
                ax.axhline(h["teacher_fid"] * (1 + h["tolerance"]), ls="--", c="grey", lw=1,
                           label=f"teacher @ {h['teacher_steps']} steps +{h['tolerance']:.0%}")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric.replace("_", " ").upper() if metric == "fid" else "relative FID")
            ax.set_title(f"{'FID' if metric == 'fid' else 'relative FID'} against {xlabel.split(' (')[0]}\n"
                         f"{result['feature_space'] or ''}", fontsize=8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            tmp = self.out / f".{file}.tmp"
            fig.savefig(tmp, dpi=120, format="png")
            plt.close(fig)
            os.replace(tmp, self.out / file)


def _environment(backend: Backend) -> dict[str, Any]:
    import diffusers

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "device": getattr(backend, "device", "cpu"), "torch_threads": torch.get_num_threads(),
            "cpus_visible": os.cpu_count(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
