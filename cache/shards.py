"""Reads of local, uncompressed, single-shard arrays straight from their shard file.

zarr v3 stores a sharded array's inner chunks one after another in a shard file, with an
index of ``(offset, nbytes)`` pairs (little-endian uint64, chunks in C order) and its crc32c
at the end. For the arrays editflow streams (one step per inner chunk along axis 0, full
along the other axes, stored raw) a whole read is then one contiguous file read, and one
step is one read at a known offset: no per-chunk work in zarr's codec pipeline, which cost
most of a read (558-598 against 1.6+ GiB/s). Anything else (compressed chunks, chunks
missing from the index, several shards, another layout) is left to zarr, and so is any
read this module finds inconsistent: the caller falls back, and zarr reports the damage.
Checksums are the caller's, as for zarr's reads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

_MISSING = np.iinfo(np.uint64).max  # the index's mark for a chunk that was never written


class Ineligible(Exception):
    """This array is not laid out for a direct read; zarr reads it."""


class ShardFile:
    """One single-shard array's file and index, opened once and read by offset."""

    def __init__(self, path: Path, info: Any) -> None:
        if info.codec != "raw" or info.shards is None or info.shards[0] < info.shape[0]:
            raise Ineligible  # compressed, or several shards along the steps
        if info.stream_axis != 0 or tuple(info.chunks[1:]) != tuple(info.shape[1:]):
            raise Ineligible
        if tuple(info.shards[1:]) != tuple(info.shape[1:]):
            raise Ineligible
        self.path = path
        self.dtype = np.dtype(info.dtype).newbyteorder("<")
        self.shape = tuple(info.shape)
        self.rows = int(info.chunks[0])  # steps per inner chunk
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self.chunk_bytes = self.rows * self.row_bytes
        self.chunks = math.ceil(self.shape[0] / self.rows)  # the chunks holding steps
        slots = int(info.shards[0]) // self.rows  # the shard's index covers these
        with open(path, "rb") as handle:
            handle.seek(-(16 * slots + 4), os.SEEK_END)
            raw = handle.read(16 * slots)
        index = np.frombuffer(raw, dtype="<u8").reshape(slots, 2)[: self.chunks]
        if (index[:, 0] == _MISSING).any() or (index[:, 1] != self.chunk_bytes).any():
            raise Ineligible
        self.offsets = index[:, 0].astype(np.int64)
        self.index_bytes = len(raw) + 4
        self.contiguous = bool((self.offsets == np.arange(self.chunks) * self.chunk_bytes).all())

    def read_all(self) -> tuple[np.ndarray, int]:
        """The whole array (a new, writable array) and the bytes read."""
        if not self.contiguous:
            raise Ineligible
        size = self.chunks * self.chunk_bytes
        values = np.empty(self.chunks * self.rows * math.prod(self.shape[1:]), self.dtype)
        with open(self.path, "rb", buffering=0) as handle:
            if handle.readinto(memoryview(values).cast("B")) != size:
                raise Ineligible  # shorter than its index says: zarr will call it damaged
        return values.reshape((-1, *self.shape[1:]))[: self.shape[0]], size

    def read_step(self, index: int) -> tuple[np.ndarray, int]:
        """One index along axis 0 (a new, writable array) and the bytes read."""
        chunk, row = divmod(index, self.rows)
        values = np.empty(self.shape[1:], self.dtype)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(int(self.offsets[chunk]) + row * self.row_bytes)
            if handle.readinto(memoryview(values).cast("B")) != self.row_bytes:
                raise Ineligible
        return values, self.row_bytes


def write_shard(path: Path, values: np.ndarray, rows: int, shard_rows: int) -> None:
    """Write one shard as zarr's sharding codec lays it out, in one file write.

    Args:
        path: The shard file (``<array>/c/<k>/0/.../0``), created with its folders.
        values: The shard's steps (axis 0), C order, at most ``shard_rows`` of them.
        rows: Steps per inner chunk.
        shard_rows: Steps per shard; missing ones are written as zeros (zarr's fill value,
            never read: they lie beyond the array).
    """
    import google_crc32c  # zarr's own crc32c, for the index checksum it verifies

    chunks = shard_rows // rows
    data = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)
    padding = (chunks * rows - values.shape[0]) * math.prod(values.shape[1:]) * data.itemsize
    chunk_bytes = rows * math.prod(values.shape[1:]) * data.itemsize
    index = np.empty((chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    checksum = np.uint32(google_crc32c.value(index.tobytes())).astype("<u4").tobytes()
    os.makedirs(path.parent, exist_ok=True)  # one mkdir per new level, not two
    with open(path, "wb", buffering=0) as handle:
        handle.write(memoryview(data.reshape(-1)).cast("B"))
        if padding:
            handle.write(bytes(padding))
        handle.write(index.tobytes() + checksum)


def shard_path(array_folder: Path, ndim: int, separator: str = "/") -> Path:
    """The one shard file of a single-shard array (zarr's default chunk key encoding)."""
    return shard_path_of(array_folder, 0, ndim, separator)


def shard_path_of(array_folder: Path, shard: int, ndim: int, separator: str = "/") -> Path:
    """The file of shard ``shard`` along axis 0 (zarr's default chunk key encoding, with
    ``separator`` between the key's parts)."""
    parts = ["c", str(shard), *["0"] * (ndim - 1)]
    if separator == ".":
        return array_folder / ".".join(parts)
    return array_folder.joinpath(*parts)
