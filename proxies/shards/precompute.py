"""Precompute a sharded dataset from images and captions, on one process or many.

Sources: an image folder (today's layout: ``metadata.jsonl`` or ``NAME.txt`` beside each image), or webdataset
tar shards (img2dataset's ``--output_format webdataset``: ``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.json`` with a
``caption``), given as a folder of ``*.tar``, one tar, or a glob.

The work is cut into *units* fixed by the source alone (a chunk of ``shard_records`` folder images, or one input
tar), numbered in sorted order. Process ``rank`` of ``world`` (``accelerate launch`` or ``torchrun``: one per
GPU, on as many nodes as you like) takes units ``rank, rank + world, ...``, loads the VAE and the text encoder
once, and writes each unit's shards and then, last and atomically, the unit's ``unit-NNNNN.json`` (its shards,
hashes and the images it could not read). A unit with that file is done: a rerun skips it; a unit killed midway
has none and is redone, its partial files replaced. When every unit is done, the main process merges the units'
files into ``index.json`` and ``report.json`` (corrupt images, by name). Sample ids are ``unit << 32 | item``:
stable across reruns and worker counts.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces import ConfigError
from search_spaces.yamlio import atomic_write

from .format import ShardInfo, write_shard
from .writer import make_records, write_index

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass(frozen=True)
class Unit:
    index: int
    split: str
    tar: str | None = None  # a webdataset tar, or
    items: tuple[tuple[str, str], ...] = ()  # (image path, caption) pairs of a folder

    @property
    def name(self) -> str:
        return f"unit-{self.index:05d}"


@dataclass
class Sample:
    key: str
    caption: str
    data: bytes | None = None  # encoded image bytes (tar), or
    path: str | None = None  # an image file
    size: tuple[int, int] | None = None  # original (height, width) when the source says
    error: str | None = None  # why it could not be read (a truncated tar)


# ---- planning -----------------------------------------------------------------------------------------------


def plan_units(source: str | os.PathLike, shard_records: int, val_units: int = 0) -> list[Unit]:
    """The units of a source, the same on every process; the last ``val_units`` are the validation split."""
    src = str(source)
    tars = sorted(glob.glob(src)) if any(c in src for c in "*?[") else (
        [src] if src.endswith(".tar") and Path(src).is_file() else
        sorted(str(p) for p in Path(src).glob("*.tar")) if Path(src).is_dir() else [])
    units: list[Unit]
    if tars:
        units = [Unit(i, "train", tar=t) for i, t in enumerate(tars)]
    else:
        from proxies.data import read_image_folder

        pairs = [(str(p), c) for p, c in read_image_folder(src)]
        units = [Unit(i, "train", items=tuple(pairs[s:s + shard_records]))
                 for i, s in enumerate(range(0, len(pairs), shard_records))]
    if val_units >= len(units) and val_units:
        raise ConfigError(f"{val_units} validation units leave no training data ({len(units)} units)",
                          field="--val-units")
    return [Unit(u.index, "val", u.tar, u.items) if u.index >= len(units) - val_units else u for u in units]


def iter_unit(unit: Unit) -> Iterator[Sample]:
    """The samples of a unit in a fixed order. A tar that ends early yields what it held, then one sample
    naming where it broke (counted as unreadable, never a crash)."""
    if unit.tar is None:
        for path, caption in unit.items:
            yield Sample(Path(path).name, caption, path=path)
        return
    current: dict[str, Any] = {}
    key = None
    try:
        with tarfile.open(unit.tar, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                k = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if k != key and key is not None:
                    yield _tar_sample(key, current)
                    current = {}
                key = k
                fh = tar.extractfile(member)
                current[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        if key is not None and current:
            yield _tar_sample(key, current)
        yield Sample(f"after {key}", "", error=f"the tar breaks off: {exc}")
        return
    if key is not None:
        yield _tar_sample(key, current)


def _tar_sample(key: str, parts: dict[str, Any]) -> Sample:
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    caption = parts["txt"].decode("utf-8", errors="replace").strip() if "txt" in parts else str(
        meta.get("caption") or "")
    size = None
    if meta.get("original_height") and meta.get("original_width"):
        size = (int(meta["original_height"]), int(meta["original_width"]))
    if image is None:
        return Sample(key, caption, error="no image in the sample")
    return Sample(key, caption, data=image, size=size)


# ---- encoding ------------------------------------------------------------------------------------------------


class Encoders:
    """The VAE and the text encoder (and tokenizer), loaded once per worker."""

    def __init__(self, vae_path: str | os.PathLike, text_encoder_path: str | os.PathLike, device: str,
                 text_mode: str = "embeddings", allow_pickle: bool = False):
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel

        from proxies.data import _load, _load_model

        self.device, self.text_mode = device, text_mode
        self.vae = _load_model(AutoencoderKL, vae_path, "vae", allow_pickle).to(device).eval()
        self.tokenizer = _load(lambda p, **kw: AutoTokenizer.from_pretrained(p, **kw), text_encoder_path,
                               "tokenizer")
        self.text = None
        if text_mode == "embeddings":
            self.text = _load_model(CLIPTextModel, text_encoder_path, "text_encoder", allow_pickle).to(device).eval()
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0))

    def tokens(self, captions: list[str]) -> Any:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_text(self, captions: list[str]) -> np.ndarray:
        import torch

        ids = self.tokens(captions)
        if self.text is None:
            return ids.numpy().astype(np.int32)
        with torch.no_grad():
            return self.text(ids.to(self.device))[0].float().cpu().numpy()

    def encode_images(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


def load_image(sample: Sample, resolution: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """Pixels [3, R, R] in [-1, 1], the original (height, width) and the crop's (top, left) in it."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(sample.data) if sample.data is not None else sample.path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        top, left = (h - s) // 2, (w - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
        arr = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1.0
    return arr, sample.size or (h, w), (top, left)


# ---- one unit ---------------------------------------------------------------------------------------------------


def run_unit(unit: Unit, enc: Encoders, out: Path, spec: Any, resolution: int, batch_size: int,
             shard_records: int, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode one unit into its shards and write its ``unit-NNNNN.json`` last."""
    import torch

    shards: list[ShardInfo] = []
    corrupt: list[dict[str, str]] = []
    pending: list[np.ndarray] = []
    batch: list[tuple[int, Sample, Any, tuple[int, int], tuple[int, int]]] = []
    part = 0
    n_ok = 0

    def flush_batch() -> None:
        nonlocal n_ok
        if not batch:
            return
        mean, std = enc.encode_images(torch.stack([b[2] for b in batch]))
        text = enc.encode_text([b[1].caption for b in batch])
        pending.append(make_records(spec, np.array([unit.index << 32 | b[0] for b in batch], np.int64), mean, std,
                                    text, [b[1].caption for b in batch], np.array([b[3] for b in batch]),
                                    np.array([b[4] for b in batch])))
        n_ok += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
        batch.clear()

    def flush_shard(final: bool) -> None:
        nonlocal part, pending
        rec = np.concatenate(pending) if pending else None
        while rec is not None and (len(rec) >= shard_records or (final and len(rec))):
            head, rec = rec[:shard_records], rec[shard_records:]
            name = f"{unit.split}-{unit.index:05d}-{part:03d}.npy"
            shards.append(write_shard(head, out / name, unit.split))
            part += 1
        pending = [rec] if rec is not None and len(rec) else []

    started = time.perf_counter()
    for j, sample in enumerate(iter_unit(unit)):
        if sample.error is not None:
            corrupt.append({"item": _where(unit, sample), "error": sample.error})
            continue
        try:
            pixels, size, crop = load_image(sample, resolution)
        except Exception as exc:  # PIL raises many types for a bad file: each is one counted, named image
            corrupt.append({"item": _where(unit, sample), "error": f"{type(exc).__name__}: {exc}"})
            continue
        batch.append((j, sample, pixels, size, crop))
        if len(batch) == batch_size:
            flush_batch()
            flush_shard(False)
    flush_batch()
    flush_shard(True)
    result = {"unit": unit.index, "split": unit.split, "source": unit.tar or f"{len(unit.items)} folder images",
              "records": n_ok, "corrupt": corrupt, "shards": [s.to_json() for s in shards],
              "seconds": round(time.perf_counter() - started, 3)}
    atomic_write(out / f"{unit.name}.json", json.dumps(result, indent=1) + "\n")
    return result


def _where(unit: Unit, sample: Sample) -> str:
    return f"{Path(unit.tar).name}:{sample.key}" if unit.tar else (sample.path or sample.key)


def unit_done(unit: Unit, out: Path) -> bool:
    """A unit whose file exists and whose shards have the sizes it lists."""
    path = out / f"{unit.name}.json"
    if not path.is_file():
        return False
    try:
        info = json.loads(path.read_text())
        return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"]
                   for s in info["shards"])
    except (json.JSONDecodeError, KeyError, OSError):
        return False


# ---- the whole job ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    source: str
    vae: str
    text_encoder: str
    resolution: int
    text_mode: str = "embeddings"
    shard_records: int = 1024
    val_units: int = 0
    caption_bytes: int = 256

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def precompute_shards(settings: Settings, out: str | os.PathLike, batch_size: int = 16, device: str | None = None,
                      allow_pickle: bool = False, rank: int = 0, world: int = 1,
                      barrier: Callable[[], None] | None = None, log: Callable[[str], None] = print,
                      on_batch: Callable[[int], None] | None = None) -> dict[str, Any] | None:
    """Run this process's share of the units, then (main process, after ``barrier``) merge the index. Returns
    the report on the main process once the index is written, else None."""
    from .format import RecordSpec

    out = Path(out)
    units = plan_units(settings.source, settings.shard_records, settings.val_units)
    _check_settings(out, settings)
    todo = [u for u in units[rank::world] if not unit_done(u, out)]
    for stale in out.glob(".*.tmp"):  # a killed writer's temporary files (its unit is redone)
        if any(stale.name.startswith(f".{s}-{u.index:05d}-") for u in todo for s in ("train", "val")):
            stale.unlink(missing_ok=True)
    log(f"process {rank}/{world}: {len(units[rank::world]) - len(todo)} of {len(units[rank::world])} units "
        f"already done, {len(todo)} to encode")
    enc = None
    if todo:
        enc = Encoders(settings.vae, settings.text_encoder, device or "cpu", settings.text_mode, allow_pickle)
    # bad input (source, settings, encoders) is refused above, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    _record_settings(out, settings)
    spec = None
    for unit in todo:
        if spec is None:
            spec = _spec(enc, settings, RecordSpec)
        result = run_unit(unit, enc, out, spec, settings.resolution, batch_size, settings.shard_records, on_batch)
        rate = result["records"] / max(result["seconds"], 1e-9)
        log(f"{unit.name}: {result['records']} images ({rate:.1f} images/s), {len(result['corrupt'])} unreadable")
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    missing = [u.name for u in units if not unit_done(u, out)]
    if missing:
        log(f"{len(missing)} units not done yet (other workers?): the index is written when all are")
        return None
    if enc is None:
        enc = Encoders(settings.vae, settings.text_encoder, device or "cpu", settings.text_mode, allow_pickle)
    return merge(out, units, settings, _spec(enc, settings, RecordSpec), enc)


def _spec(enc: Encoders, settings: Settings, record_spec: Any) -> Any:
    factor = 2 ** (len(enc.vae.config.block_out_channels) - 1)
    latent = (int(enc.vae.config.latent_channels), settings.resolution // factor, settings.resolution // factor)
    length = int(enc.tokenizer.model_max_length)
    text = (length, int(enc.text.config.hidden_size)) if enc.text is not None else (length,)
    return record_spec(latent, settings.text_mode, text, settings.caption_bytes)


def merge(out: Path, units: list[Unit], settings: Settings, spec: Any, enc: Encoders) -> dict[str, Any]:
    """``index.json`` and ``report.json`` from the units' files (written atomically, index last)."""
    shards, corrupt, records = [], [], 0
    for u in units:
        info = json.loads((out / f"{u.name}.json").read_text())
        shards += [ShardInfo(s["file"], s["split"], s["count"], s["bytes"], s["sha256"]) for s in info["shards"]]
        corrupt += info["corrupt"]
        records += info["records"]
    uncond = enc.encode_text([""])[0]
    report = {"units": len(units), "records": records, "unreadable": len(corrupt), "unreadable_items": corrupt,
              "shards": len(shards)}
    atomic_write(out / "report.json", json.dumps(report, indent=1) + "\n")
    meta = {"source": settings.source, "vae": settings.vae, "text_encoder": settings.text_encoder,
            "resolution": settings.resolution, "scaling_factor": enc.scaling_factor, "unreadable": len(corrupt)}
    write_index(out, spec, [s for s in shards if s.count], meta, uncond)
    return report


def _check_settings(out: Path, settings: Settings) -> None:
    """A rerun continues a job only with the same settings (else its units would mix)."""
    path = out / "precompute.json"
    if path.is_file():
        current = settings.to_json()
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc.msg}", source=str(path), line=exc.lineno) from None
        diff = [k for k in current if not isinstance(previous, dict) or previous.get(k) != current[k]]
        if diff:
            raise ConfigError(f"holds a precompute with other settings ({', '.join(diff)}): use another --out or "
                              "the same settings", source=str(out))


def _record_settings(out: Path, settings: Settings) -> None:
    path = out / "precompute.json"
    if not path.is_file():  # every process writes the same content, atomically
        atomic_write(path, json.dumps(settings.to_json(), indent=1) + "\n")
