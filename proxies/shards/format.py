"""The sharded dataset format: fixed-shape records in large ``.npy`` shards, and the ``index.json`` over them.

Why this format (and not MosaicML ``streaming``, HF ``datasets`` or webdataset): every record of a dataset has
the same shape (one resolution per dataset), so a shard is a numpy structured array saved as ``.npy``: a short
self-describing header, then the records back to back. Record ``i`` of a shard is ``record_bytes`` at a known
offset: one positioned read (``os.pread``) per sample, no decoding, nothing held in memory but the batch, and
the file is readable with nothing but numpy (``np.load(shard, mmap_mode="r")``). The order of samples is our
own pure function (``proxies.shards.order``), so no library's loader state has to be checkpointed; object
stores go through ``fsspec`` (``proxies.shards.store``). MosaicML ``streaming`` 0.13 would pin
``transformers<5`` and ``numpy<2.2``; ``datasets`` resumes per rank only; webdataset resamples.

A dataset folder (local or ``s3://...``)::

    index.json          format, version, record fields, latent/text shapes, encoders, the shards
                        (file, split, records, bytes, sha256), the empty caption's embedding or tokens
    train-00000-000.npy one shard (64-256 MB by default): records with fields
                        id (int64, a stable global sample id), mean and std (fp16 [C, H, W], the VAE
                        posterior), text (fp16 [L, D] embeddings) or tokens (int32 [L], the text encoder
                        runs in the trainer), size (int32 [2], the original height and width), crop
                        (int32 [2], top and left of the crop in the original), caption (utf-8, fixed width)
                        and, for converted caches, label (int64)

Every shard's size and SHA-256 are in the index: a truncated shard is refused when the dataset is opened, a
changed one when it is first read, each with one error naming it (or skipped and counted by an option).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces import ConfigError

FORMAT = "unet-nas-shards"
VERSION = 1
INDEX = "index.json"
DEFAULT_CAPTION_BYTES = 256


class ShardError(ConfigError):
    """A shard that does not match the index: missing, truncated, or changed since it was written."""


# ---- records ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordSpec:
    """The fixed shape of every record of one dataset."""

    latent_shape: tuple[int, int, int]
    text_mode: str  # "embeddings" or "tokens"
    text_shape: tuple[int, ...]  # [L, D] embeddings or [L] token ids
    caption_bytes: int = DEFAULT_CAPTION_BYTES
    labels: bool = False

    def __post_init__(self) -> None:
        if self.text_mode not in ("embeddings", "tokens"):
            raise ConfigError(f"text must be 'embeddings' or 'tokens', not {self.text_mode!r}", field="text")

    @property
    def dtype(self) -> np.dtype:
        text = ("text", "<f2", self.text_shape) if self.text_mode == "embeddings" else ("tokens", "<i4",
                                                                                          self.text_shape)
        fields: list[tuple[Any, ...]] = [("id", "<i8"), ("mean", "<f2", self.latent_shape),
                                         ("std", "<f2", self.latent_shape), text, ("size", "<i4", (2,)),
                                         ("crop", "<i4", (2,)), ("caption", f"S{self.caption_bytes}")]
        if self.labels:
            fields.append(("label", "<i8"))
        return np.dtype(fields)

    @property
    def record_bytes(self) -> int:
        return self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"latent_shape": list(self.latent_shape), "text_mode": self.text_mode,
                "text_shape": list(self.text_shape), "caption_bytes": self.caption_bytes, "labels": self.labels}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordSpec:
        return cls(tuple(data["latent_shape"]), data["text_mode"], tuple(data["text_shape"]),
                   int(data.get("caption_bytes", DEFAULT_CAPTION_BYTES)), bool(data.get("labels", False)))


def encode_caption(text: str, width: int) -> bytes:
    """UTF-8, cut at a character boundary to fit ``width`` bytes (the record is fixed-width)."""
    raw = text.encode("utf-8")
    if len(raw) <= width:
        return raw
    return raw[:width].decode("utf-8", errors="ignore").encode("utf-8")


def decode_caption(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


# ---- shards ---------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    file: str
    split: str
    count: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "split": self.split, "count": self.count, "bytes": self.bytes,
                "sha256": self.sha256}


def header_bytes(path: str | os.PathLike) -> int:
    """Offset of the first record in a ``.npy`` shard (the header is padded to 64 bytes)."""
    with open(path, "rb") as fh:
        return _header_length(fh)


def _header_length(fh: Any) -> int:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(fh)
    else:
        np.lib.format.read_array_header_2_0(fh)
    return fh.tell()


def write_shard(records: np.ndarray, path: str | os.PathLike, split: str = "train") -> ShardInfo:
    """Write ``records`` (a structured array) to ``path`` atomically: a temporary file, fsync, rename. A kill
    leaves the old file or none, never a torn one; the returned info carries the size and SHA-256."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(records), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ShardInfo(path.name, split, len(records), path.stat().st_size, file_sha256(path))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardFile:
    """Positioned reads of records from one local shard file. Opened lazily in the process that reads (a
    loader worker forked after the dataset was built opens its own descriptor)."""

    def __init__(self, path: Path, info: ShardInfo, dtype: np.dtype):
        self.path, self.info, self.dtype = path, info, dtype
        self._fd: int | None = None
        self._pid = -1
        self._offset = 0

    def _open(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            fd = os.open(self.path, os.O_RDONLY)
            with os.fdopen(os.dup(fd), "rb") as fh:
                self._offset = _header_length(fh)
            self._fd, self._pid = fd, os.getpid()
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Records ``rows`` (in the order given); contiguous runs of rows are one read each."""
        fd = self._open()
        out = np.empty(len(rows), dtype=self.dtype)
        if not len(rows):
            return out
        size = self.dtype.itemsize
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        view = out.view(np.uint8).reshape(len(rows), size)
        start = 0
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        for stop in [*breaks.tolist(), len(rows)]:
            first, n = int(sorted_rows[start]), stop - start
            data = os.pread(fd, n * size, self._offset + first * size)
            if len(data) != n * size:
                raise ShardError(f"shard ends before record {first + n} (truncated since it was checked)",
                                 source=str(self.path))
            view[order[start:stop]] = np.frombuffer(data, dtype=np.uint8).reshape(n, size)
            start = stop
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:  # a descriptor does not travel to another process
        return {**self.__dict__, "_fd": None, "_pid": -1}


# ---- the index --------------------------------------------------------------------------------------------------


@dataclass
class DatasetIndex:
    """``index.json``: what every record holds and where the shards are."""

    spec: RecordSpec
    shards: list[ShardInfo]
    meta: dict[str, Any] = field(default_factory=dict)  # resolution, scaling_factor, vae, text_encoder, source
    uncond: np.ndarray | None = None  # the empty caption's embedding [L, D] (float32) or token ids [L] (int64)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "record": self.spec.to_json(),
                "record_bytes": self.spec.record_bytes, **self.meta,
                "n": sum(s.count for s in self.shards),
                "splits": {k: sum(s.count for s in self.shards if s.split == k) for k in ("train", "val")},
                "uncond": None if self.uncond is None else _array_json(self.uncond),
                "shards": [s.to_json() for s in self.shards]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def loads(cls, text: str, source: str) -> DatasetIndex:
        """Parse and check an index; anything missing or inconsistent is one error naming the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc.msg}", source=source, line=exc.lineno) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"not a sharded dataset index (format is not {FORMAT!r})", field="format",
                              source=source)
        if data.get("version") != VERSION:
            raise ConfigError(f"unsupported version {data.get('version')!r} (expected {VERSION})",
                              field="version", source=source)
        try:
            spec = RecordSpec.from_json(data["record"])
            shards = [ShardInfo(str(s["file"]), str(s["split"]), int(s["count"]), int(s["bytes"]),
                                str(s["sha256"])) for s in data["shards"]]
        except ConfigError as exc:
            raise ConfigError(exc.message, field=f"record.{exc.field}", source=source) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"missing or malformed entry: {exc}", field="record/shards", source=source) from None
        if data.get("record_bytes") != spec.record_bytes:
            raise ConfigError(f"says {data.get('record_bytes')} bytes per record, the fields make "
                              f"{spec.record_bytes}", field="record_bytes", source=source)
        for i, s in enumerate(shards):
            if s.split not in ("train", "val") or "/" in s.file or s.file.startswith("."):
                raise ConfigError(f"bad split {s.split!r} or file name {s.file!r}", field=f"shards[{i}]",
                                  source=source)
        meta = {k: v for k, v in data.items()
                if k not in ("format", "version", "record", "record_bytes", "n", "splits", "uncond", "shards")}
        try:
            uncond = None if data.get("uncond") is None else _array_from_json(data["uncond"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed: {exc}", field="uncond", source=source) from None
        return cls(spec, shards, meta, uncond)


def _array_json(a: np.ndarray) -> dict[str, Any]:
    """A small array (the empty caption's embedding) in the JSON index: dtype, shape, base64 little-endian."""
    import base64

    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode()}


def _array_from_json(d: dict[str, Any]) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(d["base64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def merge_infos(parts: Iterable[ShardInfo]) -> list[ShardInfo]:
    """Shards in file-name order: the index lists them the same way however many workers wrote them."""
    return sorted(parts, key=lambda s: s.file)
