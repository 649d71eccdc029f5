"""Local, uncompressed, axis-0 streamed arrays read and written straight in their shard files.

zarr v3 stores a sharded array's inner chunks one after another in a shard file, with an
index of ``(offset, nbytes)`` pairs (little-endian uint64, chunks in C order) and its crc32c
at the end. For the arrays editflow streams (steps along axis 0, inner chunks full along the
other axes, stored raw) a whole read is then one contiguous read per shard file, and one
step is one read at a known offset: no per-chunk work in zarr's codec pipeline, which cost
most of a read (SD 1.x attention maps: 0.62 against 1.8 GiB/s for ``np.load``). Anything
else (compressed chunks, chunks missing from an index, another layout) is left to zarr, and
so is any read this module finds inconsistent: the caller falls back, and zarr reports the
damage. Checksums are the caller's, as for zarr's reads.

Writing, :class:`ShardWriter` puts each step at its place in its shard file as it is given
(``os.pwrite``), and a shard's index once all its steps are there: no step waits in memory
for its shard, and no shard is assembled by copying. The files are zarr's, so zarr reads
them too (``tests/cache/test_shards.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

_MISSING = np.iinfo(np.uint64).max  # the index's mark for a chunk that was never written
_SYSCALL_BYTES = 1 << 30  # one pread/pwrite moves at most this (Linux stops near 2 GiB)


class Ineligible(Exception):
    """This array is not laid out for a direct read; zarr reads it."""


def direct_layout(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    shards: tuple[int, ...] | None,
    stream_axis: int | None,
) -> bool:
    """Whether an array's chunks are whole steps along axis 0 inside shards that are whole
    along every other axis: the layout this module reads and writes."""
    return (
        shards is not None
        and stream_axis == 0
        and len(shape) >= 1
        and tuple(chunks[1:]) == tuple(shape[1:]) == tuple(shards[1:])
        and shards[0] % chunks[0] == 0
    )


class ShardedArray:
    """One array's shard files along axis 0, each index read once, read by offset."""

    def __init__(self, folder: Path, info: Any) -> None:
        shape, chunks, shards = tuple(info.shape), tuple(info.chunks), info.shards
        if info.codec != "raw" or getattr(info, "encoding", None) is not None:
            raise Ineligible
        if not direct_layout(shape, chunks, shards, info.stream_axis):
            raise Ineligible
        assert shards is not None
        self.folder, self.separator = folder, info.chunk_separator
        self.dtype = np.dtype(info.dtype).newbyteorder("<")
        self.shape = shape
        self.rows = chunks[0]  # steps per inner chunk
        self.shard_rows = int(shards[0])  # steps per shard
        self.slots = self.shard_rows // self.rows  # chunks per shard, as its index lists them
        self.row_bytes = math.prod(shape[1:]) * self.dtype.itemsize
        self.chunk_bytes = self.rows * self.row_bytes
        self.count = max(1, math.ceil(shape[0] / self.shard_rows))
        self._offsets: dict[int, np.ndarray] = {}
        # Each shard file stays open while this object lives: the kernel's read-ahead state
        # belongs to an open file, so a file opened again for every step never reads ahead
        # (a cold streaming read ran at half the disk's speed).
        self._descriptors: dict[int, int] = {}
        self._closer = weakref.finalize(self, _close_all, self._descriptors)
        if shape[0]:
            self._index(0)  # a missing or foreign first shard: zarr's from the start

    def path(self, shard: int) -> Path:
        return shard_path_of(self.folder, shard, len(self.shape), self.separator)

    def _descriptor(self, shard: int) -> int:
        descriptor = self._descriptors.get(shard)
        if descriptor is None:
            descriptor = os.open(self.path(shard), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            # Another thread (a prefetch) may have opened it meanwhile: keep one.
            kept = self._descriptors.setdefault(shard, descriptor)
            if kept != descriptor:
                os.close(descriptor)
            descriptor = kept
        return descriptor

    def close(self) -> None:
        """Close the shard files (also done when this object is collected)."""
        self._closer()

    def _steps(self, shard: int) -> int:
        """Steps of the array in shard ``shard``."""
        return min(self.shard_rows, self.shape[0] - shard * self.shard_rows)

    def _index(self, shard: int) -> np.ndarray:
        """Byte offsets of the chunks holding steps in shard ``shard``, from its index."""
        if shard not in self._offsets:
            descriptor = self._descriptor(shard)
            size = os.fstat(descriptor).st_size - (16 * self.slots + 4)
            if size < 0:
                raise Ineligible
            raw = os.pread(descriptor, 16 * self.slots, size)
            if len(raw) != 16 * self.slots:
                raise Ineligible
            chunks = math.ceil(self._steps(shard) / self.rows)
            index = np.frombuffer(raw, dtype="<u8").reshape(self.slots, 2)[:chunks]
            if (index[:, 0] == _MISSING).any() or (index[:, 1] != self.chunk_bytes).any():
                raise Ineligible
            self._offsets[shard] = index[:, 0].astype(np.int64)
        return self._offsets[shard]

    def read_all(self) -> tuple[np.ndarray, int]:
        """The whole array (a new, writable array) and the bytes read."""
        values = np.empty(self.shape, self.dtype)
        flat = memoryview(values.reshape(-1).view(np.uint8))
        start = 0
        for shard in range(self.count if self.shape[0] else 0):
            offsets = self._index(shard)
            if (offsets != np.arange(len(offsets)) * self.chunk_bytes).any():
                raise Ineligible  # chunks out of order: zarr reads them
            size = self._steps(shard) * self.row_bytes
            _read_exactly(self._descriptor(shard), flat[start : start + size], 0)
            start += size
        return values, start

    def read_step(self, index: int) -> tuple[np.ndarray, int]:
        """One index along axis 0 (a new, writable array) and the bytes read."""
        shard, row = divmod(index, self.shard_rows)
        chunk, row = divmod(row, self.rows)
        offset = int(self._index(shard)[chunk]) + row * self.row_bytes
        values = np.empty(self.shape[1:], self.dtype)
        target = memoryview(values.reshape(-1).view(np.uint8))
        _read_exactly(self._descriptor(shard), target, offset)
        return values, self.row_bytes


def _close_all(descriptors: dict[int, int]) -> None:
    while descriptors:
        _, descriptor = descriptors.popitem()
        with contextlib.suppress(OSError):
            os.close(descriptor)


def _read_exactly(descriptor: int, target: memoryview, offset: int) -> None:
    done = 0
    while done < len(target):
        count = os.preadv(descriptor, [target[done : done + _SYSCALL_BYTES]], offset + done)
        if count == 0:
            raise Ineligible  # shorter than its index says: zarr will call it damaged
        done += count


def _write_exactly(descriptor: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(descriptor, data[done : done + _SYSCALL_BYTES], offset + done)


def _shard_index(chunks: int, chunk_bytes: int) -> bytes:
    """A shard's index (every chunk present, in order) and its crc32c, as zarr writes it."""
    import google_crc32c  # zarr's own crc32c, for the index checksum it verifies

    index = np.empty((chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    checksum = np.uint32(google_crc32c.value(index.tobytes())).astype("<u4").tobytes()
    return index.tobytes() + checksum


def _little_endian_bytes(values: np.ndarray) -> memoryview:
    data = np.ascontiguousarray(values)
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    return memoryview(data.reshape(-1).view(np.uint8))


class ShardWriter:
    """Writes a streamed array's shard files a step at a time, each step at its offset.

    A shard file is created at its first step and finished (index and checksum written, file
    closed) once every one of its steps has been written; :meth:`close` finishes the rest.
    Steps may come in any order and be written again.

    Args:
        folder: The array's folder (beside its ``zarr.json``).
        shape: The array's shape (steps first).
        dtype: Stored numpy dtype.
        rows: Steps per inner chunk.
        shard_rows: Steps per shard.
        separator: Of the chunk keys (``"."`` locally).
    """

    def __init__(
        self,
        folder: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        rows: int,
        shard_rows: int,
        separator: str,
    ) -> None:
        self.folder, self.shape, self.separator = folder, shape, separator
        self.rows, self.shard_rows = rows, shard_rows
        self.row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        self._open: dict[int, int] = {}  # shard -> file descriptor
        self._missing: dict[int, set[int]] = {}  # shard -> steps not yet written
        self._finished: set[int] = set()

    def _steps(self, shard: int) -> int:
        return min(self.shard_rows, self.shape[0] - shard * self.shard_rows)

    def _descriptor(self, shard: int) -> int:
        if shard not in self._open:
            path = shard_path_of(self.folder, shard, len(self.shape), self.separator)
            os.makedirs(path.parent, exist_ok=True)
            self._open[shard] = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            if shard not in self._missing:
                self._missing[shard] = set(range(self._steps(shard)))
        return self._open[shard]

    def write(self, index: int, values: np.ndarray) -> None:
        """Write step ``index`` (its values without the steps axis)."""
        shard, row = divmod(index, self.shard_rows)
        data = _little_endian_bytes(values)
        if len(data) != self.row_bytes:
            raise ValueError(f"a step is {self.row_bytes} bytes, got {len(data)}")
        _write_exactly(self._descriptor(shard), data, row * self.row_bytes)
        missing = self._missing[shard]
        missing.discard(row)
        if not missing:
            self._finish(shard)

    def _finish(self, shard: int) -> None:
        descriptor = self._open.pop(shard)
        try:
            if shard not in self._finished:
                slots = self.shard_rows // self.rows
                chunk_bytes = self.rows * self.row_bytes
                # Slots past the array's last step read as zeros (a hole), as zarr pads them.
                _write_exactly(
                    descriptor, memoryview(_shard_index(slots, chunk_bytes)), slots * chunk_bytes
                )
                self._finished.add(shard)
        finally:
            os.close(descriptor)

    def close(self) -> None:
        """Finish every shard still open (all steps must have been written)."""
        for shard in sorted(self._open):
            if self._missing[shard]:
                raise ValueError(f"shard {shard} is missing steps {sorted(self._missing[shard])}")
            self._finish(shard)

    def abort(self) -> None:
        """Close every open file (the caller deletes the folder)."""
        for descriptor in self._open.values():
            with contextlib.suppress(OSError):
                os.close(descriptor)
        self._open.clear()


def write_shard(path: Path, values: np.ndarray, rows: int, shard_rows: int) -> None:
    """Write one shard as zarr's sharding codec lays it out, in one file write.

    Args:
        path: The shard file (``<array>/c/<k>/0/.../0``), created with its folders.
        values: The shard's steps (axis 0), C order, at most ``shard_rows`` of them.
        rows: Steps per inner chunk.
        shard_rows: Steps per shard; missing ones are written as zeros (zarr's fill value,
            never read: they lie beyond the array).
    """
    chunks = shard_rows // rows
    data = _little_endian_bytes(values)
    chunk_bytes = rows * math.prod(values.shape[1:]) * values.dtype.itemsize
    os.makedirs(path.parent, exist_ok=True)  # one mkdir per new level, not two
    with open(path, "wb", buffering=0) as handle:
        _write_exactly(handle.fileno(), data, 0)
        # Slots past the array's last step are a hole (zeros), as zarr pads them.
        _write_exactly(
            handle.fileno(), memoryview(_shard_index(chunks, chunk_bytes)), chunks * chunk_bytes
        )


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
