"""Reading a sharded dataset: open and check the index, read records by (shard, row), stream training samples.

:class:`ShardedDataset` holds the index and one lazily opened file per shard, never the records: memory stays
flat as the dataset grows. :class:`TrainStream` is the map-style ``torch.utils.data.Dataset`` the trainer reads
through a ``DataLoader`` (0 or more worker processes): item ``q`` is stream position ``q`` of
:mod:`proxies.shards.order`, and every random draw of that sample (the latent drawn from the stored posterior,
caption dropout, the timestep, the noise) comes from a generator seeded by ``(seed, stream, q)``. A training
batch is therefore a pure function of the positions it holds, on any number of processes or loader workers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search_spaces import ConfigError, UNetArch

from .format import INDEX, DatasetIndex, RecordSpec, ShardError, ShardFile, ShardInfo, decode_caption
from .order import EpochOrder
from .store import CachedStore, LocalStore, check_file, default_cache_dir, is_remote

DEFAULT_CACHE_BYTES = 16 << 30


def is_sharded(path: str | os.PathLike) -> bool:
    """A sharded dataset (its folder holds ``index.json``, or it is a URL), not a one-file cache."""
    return is_remote(path) or (Path(path) / INDEX).is_file()


class ShardedDataset:
    """An opened sharded dataset.

    Args:
        url: a folder or an fsspec URL (``s3://bucket/laion_256``).
        cache_dir, cache_bytes: the local shard cache of a remote dataset and its bound.
        verify: ``"hash"`` (default) checks each shard's SHA-256 before its first read in this process;
            ``"size"`` checks sizes only (at open).
        skip_bad: leave out, and count, shards whose size (and, for a local dataset, hash) is wrong, instead of
            refusing the dataset. They are found at open, so every process agrees on the set.
        storage_options: passed to fsspec (endpoint, credentials through the usual environment variables).
    """

    def __init__(self, url: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, verify: str = "hash", skip_bad: bool = False,
                 storage_options: dict[str, Any] | None = None):
        if verify not in ("hash", "size"):
            raise ConfigError(f"verify must be 'hash' or 'size', not {verify!r}", field="verify")
        self.url = str(url)
        if is_remote(url):
            self.store: LocalStore | CachedStore = CachedStore(self.url, cache_dir or default_cache_dir(),
                                                               cache_bytes, storage_options)
        else:
            self.store = LocalStore(url, verify_hash=verify == "hash")
        source = f"{self.store}/{INDEX}"
        try:
            text = self.store.read_text(INDEX)
        except (OSError, FileNotFoundError) as exc:
            raise ConfigError(f"not a sharded dataset (no {INDEX}: {exc.__class__.__name__})",
                              source=str(self.store)) from None
        self.index = DatasetIndex.loads(text, source)
        self.spec: RecordSpec = self.index.spec
        self.dtype = self.spec.dtype
        self.skipped: list[str] = []  # "file: why" for every shard left out with skip_bad
        self._check_shards(skip_bad, verify)
        self.train = [s for s in self.index.shards if s.split == "train"]
        self.val = [s for s in self.index.shards if s.split == "val"]
        if not self.train:
            raise ConfigError("the dataset has no training shards" + (f" ({len(self.skipped)} skipped as bad)"
                                                                       if self.skipped else ""), source=source)
        self._files: OrderedDict[str, ShardFile] = OrderedDict()
        # open shards kept at once: a remote cache must be able to hold them all (an evicted shard's disk space
        # is freed when its last descriptor closes), a local folder only bounds descriptors
        largest = max(s.bytes for s in self.index.shards)
        self.max_open = max(1, cache_bytes // largest) if isinstance(self.store, CachedStore) else 64
        self.manifest: dict[str, Any] = {**self.index.meta, "path": self.url, "n": len(self)}

    def _check_shards(self, skip_bad: bool, verify: str) -> None:
        sizes = self.store.sizes()
        good = []
        for info in self.index.shards:
            where = f"{self.store}/{info.file}"
            try:
                if info.file not in sizes:
                    raise ShardError("listed in the index but missing", source=where)
                if sizes[info.file] != info.bytes:
                    raise ShardError(f"is {sizes[info.file]} bytes, the index says {info.bytes} (truncated or "
                                     "rewritten)", source=where)
                if skip_bad and verify == "hash" and isinstance(self.store, LocalStore):
                    check_file(self.store.root / info.file, info)
                    self.store._checked.add(info.file)
            except ShardError as exc:
                if not skip_bad:
                    raise
                self.skipped.append(f"{info.file}: {exc.message}")
                continue
            good.append(info)
        self.index.shards = good

    # ---- shape and compatibility ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(s.count for s in self.train)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.spec.latent_shape

    @property
    def scaling_factor(self) -> float:
        return float(self.index.meta.get("scaling_factor", 1.0))

    @property
    def text_mode(self) -> str:
        return self.spec.text_mode

    @property
    def uncond(self) -> torch.Tensor | None:
        """The empty caption's embedding [1, L, D] or token ids [1, L]."""
        if self.index.uncond is None:
            return None
        return torch.from_numpy(self.index.uncond.copy())[None]

    def check_compatible(self, arch: UNetArch, text_width: int | None = None) -> None:
        """Refuse data that cannot feed ``arch``: latent channels, or text width (embeddings, or the online
        text encoder's ``text_width`` for token ids)."""
        c = self.latent_shape[0]
        if c != arch.in_channels or c != arch.out_channels:
            raise ConfigError(f"the dataset's latents have {c} channels but the arch takes {arch.in_channels} in "
                              f"and gives {arch.out_channels} out", field="in_channels", source=self.url)
        d = self.spec.text_shape[-1] if self.text_mode == "embeddings" else text_width
        if d is not None and d != arch.cross_attention_dim:
            raise ConfigError(f"the text embeddings are {d} wide but the arch's cross_attention_dim is "
                              f"{arch.cross_attention_dim}", field="cross_attention_dim", source=self.url)

    # ---- reads -----------------------------------------------------------------------------------------------

    def shard_file(self, info: ShardInfo) -> ShardFile:
        f = self._files.get(info.file)
        if f is None:
            while len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            f = self._files[info.file] = ShardFile(self.store.local(info), info, self.dtype)
        self._files.move_to_end(info.file)
        return f

    def read(self, shards: list[ShardInfo], shard_idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Records (structured array) at ``(shards[shard_idx[i]], rows[i])``, in that order."""
        out = np.empty(len(rows), dtype=self.dtype)
        for s in np.unique(shard_idx):
            sel = np.flatnonzero(shard_idx == s)
            out[sel] = self.shard_file(shards[int(s)]).read(rows[sel])
        return out

    def order(self, seed: int, block: int = 4) -> EpochOrder:
        return EpochOrder([s.count for s in self.train], seed=seed, block=block)

    def records(self, split: str = "train", limit: int | None = None) -> np.ndarray:
        """The first ``limit`` records of a split in index order (validation sets, conversions, tests)."""
        shards = self.train if split == "train" else self.val
        parts, left = [], limit if limit is not None else sum(s.count for s in shards)
        for info in shards:
            if left <= 0:
                break
            n = min(info.count, left)
            parts.append(self.shard_file(info).read(np.arange(n)))
            left -= n
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def in_memory(self, train: int = 0, val: int = 256, encode: Any = None) -> Any:
        """A bounded in-memory :class:`~proxies.data.LatentCache` of the first ``train`` training and ``val``
        validation records (the first training records stand in when there is no validation split), for
        validation images, held-out losses and the quality proxies: its size is set here, not by the dataset."""
        from proxies.data import LatentCache

        if self.text_mode != "embeddings" and encode is None:
            raise ConfigError("this dataset stores token ids: an in-memory cache needs the text encoder",
                              source=self.url)
        parts = [self.records("train", train)] if train else []
        held_out = self.records("val" if self.val else "train", val) if val else self.records("train", 0)
        rec = np.concatenate([*parts, held_out])
        manifest = {**self.manifest, "splits": {"train": len(rec) - len(held_out), "val": len(held_out)},
                    "held_out": "val" if self.val else "train (the dataset has no validation split)"}
        if self.text_mode == "embeddings":
            text, uncond = torch.from_numpy(rec["text"].astype(np.float32)), self.uncond
        else:
            text = encode(torch.from_numpy(rec["tokens"].astype(np.int64))).cpu()
            uncond = None if self.uncond is None else encode(self.uncond).cpu()
        return LatentCache(torch.from_numpy(rec["mean"].astype(np.float32)),
                           torch.from_numpy(rec["std"].astype(np.float32)), text,
                           [decode_caption(c) for c in rec["caption"]], manifest,
                           torch.from_numpy(rec["label"]) if "label" in rec.dtype.names else None, uncond)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ---- the training stream -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draws:
    """What is drawn for every training sample, and from which stream."""

    seed: int
    stream: int  # e.g. the phase: two phases over the same positions draw differently
    num_train_timesteps: int
    caption_dropout: float


class TrainStream(torch.utils.data.Dataset):
    """Item ``q`` (a stream position) -> clean latent, text (embedding or token ids), timestep, noise. Batched
    reads go through ``__getitems__`` (one read per contiguous run of rows)."""

    def __init__(self, data: ShardedDataset, order: EpochOrder, draws: Draws):
        self.data, self.order, self.draws = data, order, draws
        uncond = data.uncond
        self.uncond = None if uncond is None else uncond[0].numpy()

    def __len__(self) -> int:  # an endless stream; the sampler decides which positions are read
        return 2**62

    def __getitem__(self, q: int) -> dict[str, torch.Tensor]:
        return _collate(self.__getitems__([q]))

    def __getitems__(self, positions: list[int]) -> dict[str, Any]:
        q = np.asarray(positions, dtype=np.int64)
        shard, row = self.order.lookup(q)
        try:
            rec = self.data.read(self.data.train, shard, row)
        except ShardError as exc:  # crosses a worker's process boundary as data, re-raised whole by the loader
            return {"error": {"message": exc.message, "source": exc.source}}
        d, scale = self.draws, self.data.scaling_factor
        shape = self.data.latent_shape
        x0 = np.empty((len(q), *shape), np.float32)
        noise = np.empty_like(x0)
        t = np.empty(len(q), np.int64)
        text = rec["text"].astype(np.float32) if self.data.text_mode == "embeddings" else \
            rec["tokens"].astype(np.int64)
        for i, pos in enumerate(q.tolist()):
            g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([d.seed, d.stream, pos])))
            eps = g.standard_normal(shape, dtype=np.float32)
            x0[i] = (rec["mean"][i].astype(np.float32) + rec["std"][i].astype(np.float32) * eps) * scale
            if d.caption_dropout > 0 and g.random() < d.caption_dropout:
                text[i] = self.uncond
            t[i] = g.integers(0, d.num_train_timesteps)
            noise[i] = g.standard_normal(shape, dtype=np.float32)
        return {"x0": torch.from_numpy(x0), "text": torch.from_numpy(text), "t": torch.from_numpy(t),
                "noise": torch.from_numpy(noise), "id": torch.from_numpy(rec["id"].copy()),
                "position": torch.from_numpy(q)}


def _collate(batch: Any) -> Any:
    """The stream's items are already batches."""
    return batch


class StepSampler(torch.utils.data.Sampler):
    """Yields the stream positions of every micro-batch this process reads, from step ``start`` to ``end``."""

    def __init__(self, start: int, end: int, batch: int, rank: int, world: int, micro: int, offset: int = 0):
        self.start, self.end, self.batch = start, end, batch
        self.rank, self.world, self.micro, self.offset = rank, world, micro, offset

    def __iter__(self):
        from .order import rank_positions

        accum = self.batch // self.world // self.micro
        for step in range(self.start, self.end):
            for m in range(accum):
                yield rank_positions(step, self.batch, self.rank, self.world, m, self.micro, self.offset).tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * (self.batch // self.world // self.micro)


class StreamLoader:
    """A ``DataLoader`` over the stream whose bad-shard errors arrive as one :class:`ShardError` naming the shard
    (a worker's exception would otherwise come back as text with the worker's traceback in it)."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if "error" in batch:
                raise ShardError(batch["error"]["message"], source=batch["error"]["source"])
            yield batch


def stream_loader(data: ShardedDataset, draws: Draws, start: int, end: int, batch: int, rank: int, world: int,
                  micro: int, offset: int = 0, workers: int = 0, block: int = 4) -> StreamLoader:
    """The micro-batches of steps ``[start, end)`` for process ``rank`` of ``world``, read by ``workers``
    DataLoader processes (0: in this one)."""
    stream = TrainStream(data, data.order(draws.seed, block), draws)
    sampler = StepSampler(start, end, batch, rank, world, micro, offset)
    return StreamLoader(torch.utils.data.DataLoader(stream, batch_sampler=sampler, num_workers=workers,
                                                    collate_fn=_collate, prefetch_factor=2 if workers else None,
                                                    persistent_workers=False))
