"""Sharded datasets: the sample order (exactly once per epoch on 1, 2 and 4 ranks; resume at a step; 2 -> 4
ranks), the draws of a batch independent of the process count, shard hashes, conversion of today's caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from proxies.data import digits_cache
from proxies.shards import Draws, EpochOrder, ShardedDataset, ShardError, convert_cache, rank_positions, stream_loader
from proxies.shards.writer import write_synthetic

N, BATCH, MICRO = 300, 20, 5  # 15 steps an epoch; shards of 64 records, the last one short (44)
STEPS = 2 * N // BATCH  # two epochs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, N, latent_shape=(2, 4, 4), text_shape=(3, 4), shard_records=64, n_val=8)
    return root


def _global_batches(root, world: int, start: int = 0, end: int = STEPS, workers: int = 0,
                    micro: int = MICRO) -> list[dict[str, torch.Tensor]]:
    """Per step, the global batch as the concatenation of every rank's micro-batches in rank order (what the
    gradient all-reduce averages over)."""
    draws = Draws(seed=3, stream=0, num_train_timesteps=1000, caption_dropout=0.2)
    per_rank = []
    for rank in range(world):
        loader = stream_loader(ShardedDataset(root), draws, start, end, BATCH, rank, world, micro, workers=workers)
        batches = list(loader)
        accum = BATCH // world // micro
        per_rank.append([batches[i * accum:(i + 1) * accum] for i in range(end - start)])
    steps = []
    for s in range(end - start):
        parts = [b for rank in range(world) for b in per_rank[rank][s]]
        steps.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return steps


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_exactly_once_per_epoch_across_ranks(dataset, world):
    steps = _global_batches(dataset, world)  # micro-batches of 5: 4 per step on 1 rank, 2 on 2, 1 on 4
    per_epoch = N // BATCH
    for epoch in range(2):
        ids = torch.cat([s["id"] for s in steps[epoch * per_epoch:(epoch + 1) * per_epoch]]).tolist()
        assert sorted(ids) == list(range(N)), f"epoch {epoch} on {world} ranks"
    first = torch.cat([s["id"] for s in steps[:per_epoch]])
    second = torch.cat([s["id"] for s in steps[per_epoch:]])
    assert not torch.equal(first, second)  # each epoch has its own order


def test_global_batches_are_the_same_on_1_2_and_4_ranks(dataset):
    one = _global_batches(dataset, 1)
    assert _equal(one, _global_batches(dataset, 2)) and _equal(one, _global_batches(dataset, 4))


def test_resume_at_a_step_gives_the_uninterrupted_batches(dataset):
    full = _global_batches(dataset, 2)
    for k in (1, 7, 16):  # inside the first epoch, and inside the second
        assert _equal(_global_batches(dataset, 2, start=k), full[k:])


def test_resume_from_2_to_4_ranks_gives_the_same_global_batches(dataset):
    full = _global_batches(dataset, 2)
    k = 9
    assert _equal(_global_batches(dataset, 2, end=k) + _global_batches(dataset, 4, start=k), full)


def test_loader_workers_do_not_change_the_stream(dataset):
    assert _equal(_global_batches(dataset, 2, end=4, workers=2), _global_batches(dataset, 2, end=4))


def test_order_is_a_pure_function_and_memory_is_per_shard():
    counts = [5, 7, 3, 9, 1]
    a, b = EpochOrder(counts, seed=1, block=2), EpochOrder(counts, seed=1, block=2)
    q = np.arange(3 * 25)
    shard, row = a.lookup(q)
    shard2, row2 = b.lookup(q[::-1])  # another instance, asked in another order
    assert np.array_equal(shard2[::-1], shard) and np.array_equal(row2[::-1], row)
    for e in range(3):
        pairs = set(zip(shard[e * 25:(e + 1) * 25].tolist(), row[e * 25:(e + 1) * 25].tolist(), strict=True))
        assert pairs == {(s, r) for s, c in enumerate(counts) for r in range(c)}
    assert not np.array_equal(EpochOrder(counts, seed=2).lookup(q)[0], shard)
    with pytest.raises(ValueError, match="does not split"):
        rank_positions(0, 20, 0, 3, 0, 5)


def test_a_truncated_shard_is_refused_naming_it(dataset, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(dataset, root)
    victim = root / "train-00002.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"train-00002\.npy: is \d+ bytes, the index says"):
        ShardedDataset(root)
    ds = ShardedDataset(root, skip_bad=True)  # or skipped and counted, with the rest still exactly once
    assert len(ds.skipped) == 1 and ds.skipped[0].startswith("train-00002.npy") and len(ds) == N - 64
    ids = [i for b in stream_loader(ds, Draws(0, 0, 1000, 0.0), 0, 4, 59, 0, 1, 59) for i in b["id"].tolist()]
    assert sorted(ids) == sorted(set(range(N)) - set(range(128, 192)))
    from typer.testing import CliRunner

    from nas.cli import app

    res = CliRunner().invoke(app, ["data", "verify", str(root)])
    assert res.exit_code == 1 and "bad shard train-00002.npy" in res.output
    assert CliRunner().invoke(app, ["data", "verify", str(dataset)]).exit_code == 0


def test_a_changed_shard_is_refused_by_its_hash_before_it_is_read(dataset, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(dataset, root)
    victim = root / "train-00001.npy"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte changed
    victim.write_bytes(bytes(data))
    for workers in (0, 1):  # read here, or in a loader worker: the same one error
        ds = ShardedDataset(root)  # sizes agree: opening is cheap
        with pytest.raises(ShardError, match=r"train-00001\.npy: changed since the index was written") as err:
            list(stream_loader(ds, Draws(0, 0, 1000, 0.0), 0, N // BATCH, BATCH, 0, 1, BATCH, workers=workers))
        assert "Traceback" not in str(err.value)
    skipping = ShardedDataset(root, skip_bad=True)
    assert [s.split(":")[0] for s in skipping.skipped] == ["train-00001.npy"]


def test_a_broken_index_is_one_clear_error(dataset, tmp_path):
    import shutil

    from search_spaces import ConfigError

    root = tmp_path / "d"
    shutil.copytree(dataset, root)
    index = json.loads((root / "index.json").read_text())
    index["record_bytes"] += 1
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="record_bytes"):
        ShardedDataset(root)
    (root / "index.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ShardedDataset(root)
    with pytest.raises(ConfigError, match="not a sharded dataset"):
        ShardedDataset(tmp_path / "nowhere")


def test_todays_cache_converts_to_a_sharded_dataset(tmp_path):
    cache = digits_cache()
    convert_cache(cache, tmp_path / "digits", shard_bytes=64 << 10)
    ds = ShardedDataset(tmp_path / "digits")
    assert len(ds.train) > 1 and len(ds) == cache.manifest["splits"]["train"]
    back = ds.in_memory(val=10**6).split("val")
    val = cache.split("val")
    assert torch.equal(back.mean, val.mean.half().float()) and back.captions == val.captions
    assert torch.equal(back.labels, val.labels) and torch.equal(back.uncond, cache.uncond)


def test_quality_proxies_read_a_bounded_slice_of_a_sharded_dataset(tmp_path, monkeypatch):
    from nas.experiment import load_experiment
    from nas.search import objectives
    from nas.search.objectives import Evaluator

    convert_cache(digits_cache(), tmp_path / "digits_shards", shard_bytes=64 << 10)
    (tmp_path / "exp.yaml").write_text("""name: s
space: digits
data: digits_shards
objectives:
  - {name: quality, kind: quality, proxy: grad_norm}
strategy: {name: random}
budget: {trials: 1}
""")
    monkeypatch.setattr(objectives, "PROXY_TRAIN_ITEMS", 100)
    ctx = Evaluator(load_experiment(tmp_path / "exp.yaml"))._quality_context()
    assert len(ctx.data.split("train")) == 100 and len(ctx.data.split("val")) == 256
    assert ctx.data.captions[0].startswith("a handwritten digit")
