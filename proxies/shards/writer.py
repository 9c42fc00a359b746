"""Writing sharded datasets: records from arrays, shards rolled over at a size, the index written last.

The index is written (atomically) only after every shard it lists is whole on disk, so a reader either finds no
dataset or a complete one. ``convert_cache`` turns a one-file cache (``LatentCache``) into a sharded dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.yamlio import atomic_write

from .format import INDEX, DatasetIndex, RecordSpec, ShardInfo, encode_caption, merge_infos, write_shard

DEFAULT_SHARD_BYTES = 128 << 20


def make_records(spec: RecordSpec, ids: np.ndarray, mean: np.ndarray, std: np.ndarray, text: np.ndarray,
                 captions: list[str], size: np.ndarray | None = None, crop: np.ndarray | None = None,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """A structured array of records; ``text`` is embeddings [N, L, D] or token ids [N, L] per the spec."""
    n = len(ids)
    rec = np.zeros(n, dtype=spec.dtype)
    rec["id"] = ids
    rec["mean"] = mean
    rec["std"] = std
    rec["text" if spec.text_mode == "embeddings" else "tokens"] = text
    if size is not None:
        rec["size"] = size
    if crop is not None:
        rec["crop"] = crop
    rec["caption"] = [encode_caption(c, spec.caption_bytes) for c in captions]
    if spec.labels:
        rec["label"] = labels if labels is not None else -1
    return rec


def records_per_shard(spec: RecordSpec, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    return max(1, shard_bytes // spec.record_bytes)


def write_index(out: str | os.PathLike, spec: RecordSpec, shards: list[ShardInfo], meta: dict[str, Any],
                uncond: Any = None) -> DatasetIndex:
    """``index.json`` over ``shards`` (sorted by file name), written atomically."""
    if uncond is not None:
        uncond = np.asarray(uncond)
        uncond = uncond.astype(np.float32) if spec.text_mode == "embeddings" else uncond.astype(np.int64)
    index = DatasetIndex(spec, merge_infos(shards), meta, uncond)
    atomic_write(Path(out) / INDEX, index.dumps())
    return index


class DatasetWriter:
    """Records in, shards of ``shard_records`` out (one open shard per split), the index on ``close``."""

    def __init__(self, out: str | os.PathLike, spec: RecordSpec, meta: dict[str, Any], uncond: Any = None,
                 shard_records: int | None = None, prefix: str = ""):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.spec, self.meta, self.uncond = spec, meta, uncond
        self.shard_records = shard_records or records_per_shard(spec)
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self._pending: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self._counts = {"train": 0, "val": 0}

    def add(self, records: np.ndarray, split: str = "train") -> None:
        self._pending[split].append(records)
        while sum(len(r) for r in self._pending[split]) >= self.shard_records:
            self._flush(split, self.shard_records)

    def _flush(self, split: str, n: int | None = None) -> None:
        parts = self._pending[split]
        if not parts:
            return
        allrec = parts[0] if len(parts) == 1 else np.concatenate(parts)
        n = len(allrec) if n is None else n
        head, rest = allrec[:n], allrec[n:]
        self._pending[split] = [rest] if len(rest) else []
        name = f"{self.prefix}{split}-{self._counts[split]:05d}.npy"
        self._counts[split] += 1
        self.shards.append(write_shard(head, self.out / name, split))

    def close(self) -> DatasetIndex:
        for split in ("train", "val"):
            self._flush(split)
        return write_index(self.out, self.spec, self.shards, self.meta, self.uncond)


def convert_cache(cache: Any, out: str | os.PathLike, shard_bytes: int = DEFAULT_SHARD_BYTES) -> DatasetIndex:
    """A ``LatentCache`` (today's one-file cache, or the digits) as a sharded dataset with the same split."""
    n_train = int(cache.manifest.get("splits", {}).get("train", len(cache)))
    spec = RecordSpec(tuple(cache.latent_shape), "embeddings", tuple(cache.text.shape[1:]),
                      labels=cache.labels is not None)
    meta = {k: v for k, v in cache.manifest.items() if k not in ("path", "splits", "n", "version", "latent_shape",
                                                               "text_shape")}
    meta.setdefault("resolution", int(cache.manifest.get("resolution", cache.latent_shape[-1])))
    meta["converted_from"] = str(cache.manifest.get("path", cache.manifest.get("source", "")))
    writer = DatasetWriter(out, spec, json.loads(json.dumps(meta)),
                           None if cache.uncond is None else cache.uncond[0].numpy(),
                           records_per_shard(spec, shard_bytes))
    labels = cache.labels.numpy() if cache.labels is not None else None
    ids = np.arange(len(cache), dtype=np.int64)
    for split, part in (("train", slice(0, n_train)), ("val", slice(n_train, len(cache)))):
        if part.stop <= part.start:
            continue
        writer.add(make_records(spec, ids[part], cache.mean[part].numpy(), cache.std[part].numpy(),
                                cache.text[part].numpy(), cache.captions[part],
                                labels=None if labels is None else labels[part]), split)
    return writer.close()


def write_synthetic(out: str | os.PathLike, n: int, latent_shape: tuple[int, int, int] = (4, 8, 8),
                    text_shape: tuple[int, ...] = (8, 32), text_mode: str = "embeddings", shard_records: int = 64,
                    n_val: int = 0, seed: int = 0, resolution: int | None = None) -> DatasetIndex:
    """A deterministic random dataset of ``n`` training records (and ``n_val`` validation ones), written in
    chunks so that generating a dataset larger than memory needs none: benchmarks and tests."""
    spec = RecordSpec(latent_shape, text_mode, text_shape)
    rng = np.random.default_rng(seed)
    uncond = np.zeros(text_shape, np.float32) if text_mode == "embeddings" else np.zeros(text_shape, np.int64)
    meta = {"source": f"synthetic(seed={seed})", "resolution": resolution or latent_shape[-1] * 8,
            "scaling_factor": 1.0, "vae": "none", "text_encoder": "none"}
    writer = DatasetWriter(out, spec, meta, uncond, shard_records)
    # text dominates a record (77 x 768 for CLIP-L): one random block, offset per record, keeps generation cheap
    # enough to write datasets of gigabytes in tests while every record stays distinct
    m = min(shard_records, 64)
    block = (rng.standard_normal((m, *text_shape), dtype=np.float32).astype(np.float16) if text_mode == "embeddings"
             else rng.integers(0, 49408, (m, *text_shape)))
    for split, count, base in (("train", n, 0), ("val", n_val, n)):
        for start in range(0, count, shard_records):
            k = min(shard_records, count - start)
            ids = np.arange(base + start, base + start + k)
            if text_mode == "embeddings":
                text = block[np.arange(k) % m] + (ids[:, None, None] % 1000 * 1e-3).astype(np.float16)
            else:
                text = (block[np.arange(k) % m] + ids[:, None]) % 49408
            writer.add(make_records(spec, ids,
                                    rng.standard_normal((k, *latent_shape), dtype=np.float32),
                                    np.full((k, *latent_shape), 0.05, np.float32), text,
                                    [f"sample {base + start + i}" for i in range(k)],
                                    size=np.full((k, 2), 512), crop=np.zeros((k, 2))), split)
    return writer.close()
