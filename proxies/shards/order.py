"""The order of samples: a pure function of (seed, epoch, position), whatever the number of processes.

An epoch visits every training record exactly once. Its order is a two-level shuffle, so that a reader touches a
few shards at a time (a local shard cache smaller than the dataset then works; a file per sample or a global
permutation over millions of shards would read everything at random):

1. the shards are permuted by a generator seeded with ``(seed, epoch)``;
2. consecutive runs of ``block`` shards of that order form a block; the records of a block are permuted by a
   generator seeded with ``(seed, epoch, block)``.

Position ``q`` of the stream (counted from 0 over all epochs) is record ``perm(epoch = q // N)[q % N]``. Nothing
depends on a loader's state or on the process count: global batch ``s`` is positions ``[s * B, (s + 1) * B)``,
and a process takes its contiguous share of it (:func:`rank_positions`). So resuming at step ``k`` needs only
``k``, every rank reads disjoint positions, and 2 processes resumed on 4 read the same global batches. Memory is
one int per shard plus the current blocks' permutations, however large the dataset grows.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class EpochOrder:
    """Map stream positions to (shard, row) for a fixed list of shard record counts."""

    def __init__(self, counts: list[int] | np.ndarray, seed: int = 0, block: int = 4, cache_blocks: int = 8):
        self.counts = np.asarray(counts, dtype=np.int64)
        if (self.counts <= 0).any() or not len(self.counts):
            raise ValueError("every shard needs at least one record")
        self.seed, self.block = int(seed), max(1, int(block))
        self.n = int(self.counts.sum())
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_blocks = cache_blocks

    def __len__(self) -> int:
        return self.n

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, start position of every block in the epoch)."""
        if self._epoch is None or self._epoch[0] != epoch:
            perm = _rng(self.seed, epoch).permutation(len(self.counts))
            per_block = np.add.reduceat(self.counts[perm], np.arange(0, len(perm), self.block))
            starts = np.concatenate([[0], np.cumsum(per_block)])
            self._epoch = (epoch, perm, starts)
        return self._epoch[1], self._epoch[2]

    def _block(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record permutation, shard ids, first row offset per shard) of block ``b`` of ``epoch``."""
        key = (epoch, b)
        if key not in self._blocks:
            perm, _ = self._epoch_layout(epoch)
            shards = perm[b * self.block:(b + 1) * self.block]
            counts = self.counts[shards]
            self._blocks[key] = (_rng(self.seed, epoch, b + 1).permutation(int(counts.sum())), shards,
                                 np.concatenate([[0], np.cumsum(counts)]))
            while len(self._blocks) > self._cache_blocks:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        return self._blocks[key]

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row in shard) of each stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        if (positions < 0).any():
            raise ValueError("positions start at 0")
        shard = np.empty_like(positions)
        row = np.empty_like(positions)
        epochs, within = np.divmod(positions, self.n)
        for epoch in np.unique(epochs):
            sel = np.flatnonzero(epochs == epoch)
            _, starts = self._epoch_layout(int(epoch))
            blocks = np.searchsorted(starts, within[sel], side="right") - 1
            for b in np.unique(blocks):
                bsel = sel[blocks == b]
                perm, shards, offsets = self._block(int(epoch), int(b))
                j = perm[within[bsel] - starts[b]]
                k = np.searchsorted(offsets, j, side="right") - 1
                shard[bsel] = shards[k]
                row[bsel] = j - offsets[k]
        return shard, row


def rank_positions(step: int, batch: int, rank: int, world: int, micro_index: int, micro: int,
                   offset: int = 0) -> np.ndarray:
    """Stream positions of micro-batch ``micro_index`` of process ``rank`` at optimizer step ``step``: each
    process takes a contiguous ``batch / world`` share of the global batch, split into micro-batches, so the
    global batch (all shares in rank order) is the same for every ``world`` that divides ``batch``."""
    if batch % world or (batch // world) % micro:
        raise ValueError(f"batch {batch} does not split into {world} processes x micro-batches of {micro}")
    share = batch // world
    start = offset + step * batch + rank * share + micro_index * micro
    return np.arange(start, start + micro, dtype=np.int64)
