"""Where shards live: a local folder, or an object store (``s3://``, ``gs://``, ... through fsspec) with a
local cache of bounded size.

A remote shard is downloaded whole into the cache (a temporary name, its SHA-256 checked against the index
while it streams, then renamed): a reader never sees a partial or changed file. The cache evicts the least
recently used shards to stay under ``max_bytes``; a shard being read stays readable after eviction (its file
descriptor is open), so the bound needs to hold only the shards of the current shuffle blocks. Processes on
one host may share a cache folder: they download to distinct temporary names and rename the same content.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .format import ShardError, ShardInfo, file_sha256


def is_remote(url: str | os.PathLike) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


class LocalStore:
    """Shards in a local folder; with ``verify_hash`` each shard's SHA-256 is checked the first time this
    process opens it (a shard changed after the dataset was opened is then refused, naming it)."""

    def __init__(self, root: str | os.PathLike, verify_hash: bool = True):
        self.root = Path(str(root).removeprefix("file://"))
        self.verify_hash = verify_hash
        self._checked: set[str] = set()

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text()

    def sizes(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.root.iterdir() if p.is_file()} if self.root.is_dir() else {}

    def local(self, info: ShardInfo) -> Path:
        path = self.root / info.file
        if self.verify_hash and info.file not in self._checked:
            check_file(path, info)
            self._checked.add(info.file)
        return path

    def __str__(self) -> str:
        return str(self.root)


class CachedStore:
    """Shards on an object store, read through a bounded local cache."""

    def __init__(self, url: str, cache_dir: str | os.PathLike, max_bytes: int,
                 storage_options: dict[str, Any] | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.downloads = 0  # shards fetched by this process (tests and benchmarks read it)

    def read_text(self, name: str) -> str:
        with self.fs.open(f"{self.root}/{name}", "rb") as fh:
            return fh.read().decode()

    def sizes(self) -> dict[str, int]:
        return {Path(e["name"]).name: int(e["size"]) for e in self.fs.ls(self.root, detail=True)
                if e.get("type") == "file"}

    def local(self, info: ShardInfo) -> Path:
        path = self.cache / f"{info.sha256[:16]}-{info.file}"
        if path.is_file() and path.stat().st_size == info.bytes:
            os.utime(path)  # recently used
            return path
        self._evict(info.bytes)
        tmp = self.cache / f".{path.name}.{os.getpid()}.tmp"
        h = hashlib.sha256()
        try:
            with self.fs.open(f"{self.root}/{info.file}", "rb", block_size=1 << 23) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 23):
                    h.update(block)
                    dst.write(block)
            if h.hexdigest() != info.sha256 or tmp.stat().st_size != info.bytes:
                raise ShardError(f"changed since the index was written (SHA-256 {h.hexdigest()[:12]}..., "
                                 f"{tmp.stat().st_size} bytes; the index says {info.sha256[:12]}..., "
                                 f"{info.bytes} bytes)", source=f"{self.url}/{info.file}")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.downloads += 1
        return path

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.cache.glob("*.npy"))

    def _evict(self, incoming: int) -> None:
        """Remove least recently used shards until ``incoming`` more bytes fit under the bound."""
        files = sorted(self.cache.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total + incoming > self.max_bytes:
            victim = files.pop(0)
            total -= victim.stat().st_size
            victim.unlink(missing_ok=True)

    def __str__(self) -> str:
        return self.url


def check_file(path: Path, info: ShardInfo) -> None:
    """One error naming the shard if its size or hash differs from the index."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError("listed in the index but missing", source=str(path)) from None
    if size != info.bytes:
        raise ShardError(f"is {size} bytes, the index says {info.bytes} (truncated or rewritten)", source=str(path))
    digest = file_sha256(path)
    if digest != info.sha256:
        raise ShardError(f"changed since the index was written (SHA-256 {digest[:12]}..., the index says "
                         f"{info.sha256[:12]}...)", source=str(path))


def default_cache_dir() -> Path:
    base = os.environ.get("UNET_NAS_SHARD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                                   or os.path.expanduser("~/.cache"),
                                                                   "unet-nas", "shards")
    return Path(base)
