"""The sharded reader on ``s3://`` (fsspec + s3fs) against a real S3-compatible server on loopback (moto's
server mode), through a local shard cache of bounded size."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from proxies.shards import Draws, ShardedDataset, ShardError, stream_loader
from proxies.shards.writer import write_synthetic

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (started and stopped here), a bucket, and a dataset uploaded to it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():  # the endpoint and credentials reach s3fs the usual way: the environment
        mp.setenv(k, v)
    local = tmp_path_factory.mktemp("local") / "ds"
    write_synthetic(local, 200, latent_shape=(2, 4, 4), text_shape=(3, 4), shard_records=25)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    fs.put(str(local), "bucket/ds", recursive=True)
    yield local
    mp.undo()
    server.stop()


def _ids(ds: ShardedDataset, steps: int) -> list[int]:
    loader = stream_loader(ds, Draws(1, 0, 1000, 0.0), 0, steps, 20, 0, 1, 20, block=2)
    return [i for b in loader for i in b["id"].tolist()]


def test_s3_reads_the_local_stream_through_a_bounded_cache(s3, tmp_path):
    shard_bytes = (s3 / "train-00000.npy").stat().st_size
    bound = 3 * shard_bytes  # 3 of the 8 shards
    remote = ShardedDataset("s3://bucket/ds", cache_dir=tmp_path / "cache", cache_bytes=bound)
    ids = _ids(remote, 20)  # two epochs
    assert sorted(ids[:200]) == list(range(200)) and sorted(ids[200:]) == list(range(200))
    assert ids == _ids(ShardedDataset(s3), 20)  # the same stream as from the local copy
    assert remote.store.cached_bytes() <= bound
    assert remote.store.downloads > 8  # shards were evicted and fetched again: the bound held


def test_a_changed_object_is_refused_on_download(s3, tmp_path):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.copy("bucket/ds", "bucket/bad", recursive=True)
    data = bytearray(fs.cat_file("bucket/bad/train-00003.npy"))
    data[-1] ^= 0xFF
    fs.pipe_file("bucket/bad/train-00003.npy", bytes(data))
    ds = ShardedDataset("s3://bucket/bad", cache_dir=tmp_path / "cache", cache_bytes=1 << 30)
    with pytest.raises(ShardError, match=r"s3://bucket/bad/train-00003\.npy: changed since the index"):
        ds.read(ds.train, np.full(1, 3), np.zeros(1, np.int64))
    assert not list((tmp_path / "cache").glob("*train-00003*"))  # nothing half-written or wrong is kept
    assert torch.is_tensor(torch.from_numpy(ds.read(ds.train, np.zeros(1, np.int64), np.zeros(1, np.int64))["mean"]))
