"""Writing one entry: stage arrays in a fresh object folder, then publish its manifest.

Nothing a writer does is visible to readers until its manifest (the ref) is created, and the
ref is created exclusively: the first writer of a key wins, a later one deletes its own data
and hands out the winner's entry. Leaving the ``with`` block by an exception deletes the
staged data; a process that dies leaves an unreferenced object folder that ``Cache.gc``
removes once it is older than its threshold.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from editflow.lazy import lazy

from .dtypes import (
    PIXELS,
    checksum_of,
    checksum_update,
    new_checksum,
    pixel_codes,
    stored_dtype,
    to_stored,
    torch_dtype_name,
)
from .entry import (
    ENCODED_FORMAT,
    MANIFEST_FORMAT,
    PARALLEL,
    ArrayInfo,
    DamagedEntryError,
    Entry,
    attrs_sha256,
    stored_checksum,
)
from .layout import Layout, check_array_name, check_key
from .metadata import array_metadata, group_metadata, write_metadata
from .shards import ShardWriter, direct_layout, shard_path, write_shard

torch = lazy("torch")

ZSTD_LEVEL = 1
"""Fast zstd, for arrays written with ``compress=True``; float noise barely shrinks at any level."""


SHARD_BYTES = 64 * 2**20
"""Target shard size for streamed arrays on object stores (few objects, one-chunk reads)."""

MIN_CHUNK_BYTES = 64 * 2**10
"""Steps smaller than this share a chunk (see chunk_layout)."""

LOCAL_SEPARATOR = "."
"""Chunk keys of local raw arrays: ``c.0.0.0`` beside the array's metadata, where zarr's
default ``c/0/0/0`` costs a folder per dimension (each mkdir about 0.4 ms on our machines)."""

LIVE_ATTR = "editflow_live"
"""Attribute of a live stream's array: what a reader following it needs (the torch dtype)."""

LOCAL_SHARD_BYTES = 16 * 2**20
"""Target shard size on local disk of a stream zarr writes (a compressed one), whose steps
wait in memory until their shard is complete: writing one small file per step costs a few
ms each, so a 100-step noise sequence would spend more time in the file system than in
zstd. A shard still holds one chunk per step, read alone through the shard index."""

LOCAL_STREAM_SHARD_BYTES = 2**62
"""Target shard size of a raw stream on local disk: one shard file per array. Each step is
written at its place in that file as it comes (:class:`~editflow.cache.shards.ShardWriter`),
so no step waits in memory for its shard (16 MiB a layer, 209 MiB for SD 1.5's maps, did)
and none is copied to assemble one; a streaming reader reads each file front to back, which
the kernel reads ahead. SD 1.5 attention maps (bench/bench_cache.py), one file per layer
against 16 MiB shards (a file every 3 steps): read cold 1.21 against 0.90 GiB/s, written
and fsynced 1.33 against 0.87 GiB/s. Entries written with several shards per array (before)
are read directly all the same (:class:`~editflow.cache.shards.ShardedArray`)."""


def chunk_layout(
    shape: tuple[int, ...],
    itemsize: int,
    stream_axis: int | None,
    sharded: bool,
    shard_bytes: int = SHARD_BYTES,
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Choose zarr chunks (and shards) for an array.

    Args:
        shape: Array shape, e.g. ``(steps, heads, H*W, tokens)``.
        itemsize: Bytes per stored element.
        stream_axis: Axis read one index at a time, or None for a single chunk.
        sharded: Group the one-step chunks of a stream into shards (for object stores, where
            many small objects are slow); a step is still read alone by a ranged request.

    Returns:
        ``(chunks, shards)``; ``shards`` is None when not sharded.
    """
    full = tuple(max(1, size) for size in shape)
    if stream_axis is None:
        return full, None
    steps = full[stream_axis]
    step_bytes = max(1, math.prod(full) // steps * itemsize)
    # One step per chunk once a step is big (an SD latent is 64 KiB); tiny steps are grouped,
    # since zarr's per-chunk cost would then dominate reading and writing them.
    per_chunk = max(1, min(steps, MIN_CHUNK_BYTES // step_bytes))
    chunks = full[:stream_axis] + (per_chunk,) + full[stream_axis + 1 :]
    if not sharded:
        return chunks, None
    per_shard = max(1, shard_bytes // step_bytes) // per_chunk * per_chunk
    per_shard = min(max(per_chunk, per_shard), -(-steps // per_chunk) * per_chunk)
    if per_shard == 1:
        return chunks, None
    return chunks, full[:stream_axis] + (per_shard,) + full[stream_axis + 1 :]


def _check_axis(stream_axis: int | None, ndim: int) -> int | None:
    if stream_axis is None:
        return None
    if not 0 <= stream_axis < ndim:
        raise ValueError(f"stream_axis {stream_axis} out of range for a {ndim}-d array")
    return stream_axis


def _json_copy(attrs: Any) -> Any:
    """A JSON round trip of ``attrs``: what every later reader will see."""
    try:
        return json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"cache attrs must be plain JSON (no NaN or inf): {error}") from error


class StreamHandle:
    """Writes an array one index of its stream axis at a time, e.g. one denoising step.

    ``handle[i] = tensor`` writes index ``i`` (the slice without the stream axis), cast to the
    stream's dtype. Every index must be written before the entry is published. On sharded
    (remote) stores steps are buffered until their shard is complete, then written at once.
    """

    def __init__(
        self,
        array: zarr.Array,
        name: str,
        dtype: torch.dtype,
        stream_axis: int,
        shards: tuple[int, ...] | None,
        codec: str = "raw",
        direct: Path | None = None,
    ) -> None:
        self.name = name
        self.codec = codec
        self.separator = getattr(array, "separator", "/")
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = dtype
        self.stream_axis = stream_axis
        self._array = array
        self._shards = shards
        # The array's folder, when each step goes straight to its place in its shard file.
        self._direct: ShardWriter | None = None
        if direct is not None and shards is not None:
            self._direct = ShardWriter(
                direct,
                self.shape,
                np.dtype(array.dtype),
                int(array.chunks[0]),
                int(shards[0]),
                self.separator,
            )
        self._step_checksums: list[str | None] = [None] * self.shape[stream_axis]
        self._digest = new_checksum()  # of the whole array, while axis-0 steps arrive in order
        self._next_in_order: int | None = 0 if stream_axis == 0 else None
        self._pending: dict[int, dict[int, np.ndarray]] = {}  # shard -> step -> values
        self.closed = False  # set when the entry is published or abandoned

    def __len__(self) -> int:
        return self.shape[self.stream_axis]

    def __setitem__(self, index: int, value: torch.Tensor | np.ndarray) -> None:
        if self.closed:
            raise RuntimeError(f"stream {self.name!r} belongs to a finished EntryWriter")
        steps = len(self)
        if not -steps <= index < steps:
            raise IndexError(f"step {index} out of range for stream {self.name!r} of {steps}")
        index %= steps
        stored, _ = to_stored(value, cast_to=self.dtype)
        expected = self.shape[: self.stream_axis] + self.shape[self.stream_axis + 1 :]
        if stored.shape != expected:
            raise ValueError(
                f"stream {self.name!r} step must have shape {expected}, got {stored.shape}"
            )
        self._step_checksums[index] = checksum_of(stored)
        if self._next_in_order == index:
            checksum_update(self._digest, stored)
            self._next_in_order += 1
        else:
            self._next_in_order = None  # out of order: hash by reading back at close
        if self._direct is not None:
            self._direct.write(index, stored)
        elif self._shards is None:
            self._array[self._selection(index)] = stored
        else:
            self._buffer(index, np.array(stored, copy=True))  # the caller may reuse its tensor

    def close(self) -> ArrayInfo:
        """Flush buffered steps and describe the finished array.

        Raises:
            ValueError: Some steps were never written.
        """
        self.closed = True
        missing = [index for index, digest in enumerate(self._step_checksums) if digest is None]
        if missing:
            raise ValueError(f"stream {self.name!r}: steps {missing[:10]} were never written")
        if self._direct is not None:
            self._direct.close()
        # Only steps rewritten after their shard was flushed can still be pending.
        for shard in sorted(self._pending):
            for index, values in sorted(self._pending.pop(shard).items()):
                self._array[self._selection(index)] = values
        if self._next_in_order == len(self):
            checksum = self._digest.hexdigest()
        else:
            checksum = stored_checksum(self._array, self.stream_axis)
        return ArrayInfo(
            shape=self.shape,
            dtype=np.dtype(self._array.dtype).name,
            torch_dtype=torch_dtype_name(self.dtype),
            checksum=checksum,
            nbytes=int(self._array.nbytes),
            chunks=tuple(self._array.chunks),
            shards=self._shards,
            stream_axis=self.stream_axis,
            step_checksums=tuple(digest for digest in self._step_checksums if digest is not None),
            codec=self.codec,
            chunk_separator=self.separator,
        )

    def abort(self) -> None:
        """Stop writing (the entry is abandoned; its folder is deleted after)."""
        self.closed = True
        if self._direct is not None:
            self._direct.abort()

    def _selection(self, index: int) -> tuple[slice | int, ...]:
        return (slice(None),) * self.stream_axis + (index,)

    def _buffer(self, index: int, values: np.ndarray) -> None:
        assert self._shards is not None
        per_shard = self._shards[self.stream_axis]
        shard = index // per_shard
        start, stop = shard * per_shard, min((shard + 1) * per_shard, len(self))
        pending = self._pending.setdefault(shard, {})
        pending[index] = values
        if len(pending) == stop - start:
            stacked = np.stack([pending[i] for i in range(start, stop)], axis=self.stream_axis)
            region = (slice(None),) * self.stream_axis + (slice(start, stop),)
            self._array[region] = stacked
            del self._pending[shard]


class LocalArray:
    """A raw array in a local staging folder whose metadata the writer wrote itself (see
    ``metadata``); zarr opens it only when a read or write must go through zarr."""

    def __init__(
        self, folder: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple
    ) -> None:
        self._folder, self._name = folder, name
        self.shape, self.dtype, self.chunks = shape, np.dtype(dtype), chunks
        self.nbytes = math.prod(shape) * self.dtype.itemsize
        self.separator = LOCAL_SEPARATOR
        self._array: zarr.Array | None = None

    def _zarr(self) -> zarr.Array:
        if self._array is None:
            store = zarr.storage.LocalStore(self._folder)
            # Every chunk is written, even one of zeros (a noise map of a step without noise):
            # a live stream's reader waits for each step's chunk to exist.
            array = zarr.open_array(store, path=self._name, mode="r+")
            self._array = array.with_config({"write_empty_chunks": True})
        return self._array

    def __setitem__(self, selection: Any, value: np.ndarray) -> None:
        self._zarr()[selection] = value

    def __getitem__(self, selection: Any) -> np.ndarray:
        return self._zarr()[selection]


class EntryWriter:
    """Stages the arrays of one entry and publishes them on clean exit of its ``with`` block.

    Attributes:
        key: The cache key being written.
        object_id: Name of this writer's object folder (set on enter).
        published: After exit, the published entry (the other writer's if it won), or None
            if the block raised.
        won: True when this writer's data was published, False when another writer of the
            same key published first (this writer's data was deleted).
    """

    def __init__(
        self, layout: Layout, key: str, attrs: dict[str, Any], *, object_id: str | None = None
    ) -> None:
        self.key = check_key(key)
        if object_id is not None and not object_id.isalnum():
            raise ValueError(f"object_id must be letters and digits, got {object_id!r}")
        self._object_id = object_id
        self.object_id: str | None = None
        self.published: Entry | None = None
        self.won = False
        self._layout = layout
        self._attrs: dict[str, Any] = _json_copy(dict(attrs))
        self._arrays: dict[str, ArrayInfo] = {}
        self._streams: dict[str, StreamHandle] = {}
        self._group: zarr.Group | None = None  # on object stores
        self._folder: Path | None = None  # on local disk
        self._path = ""

    def __enter__(self) -> EntryWriter:
        if self.object_id is not None:
            raise RuntimeError("an EntryWriter can be used once")
        layout = self._layout
        layout.ensure_marker()
        if layout.is_damaged(self.key):
            layout.discard(self.key)  # this writer is the recomputation of a damaged entry
        self.object_id = self._object_id or uuid.uuid4().hex
        self._path = layout.object_path(self.key, self.object_id)
        staging = {"key": self.key, "host": socket.gethostname(), "pid": os.getpid()}
        attributes = {"editflow_staging": {**staging, "started": time.time()}}
        if layout.local_root is not None:
            self._folder = Path(self._path)
            write_metadata(self._folder, group_metadata(attributes))
        else:
            self._group = zarr.open_group(
                layout.zarr_store(self._path, read_only=False), mode="w-", attributes=attributes
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._publish()
        except BaseException:
            if not self.won:  # once the ref exists, the object is published data
                self._abort()
            raise

    def write(
        self,
        name: str,
        value: torch.Tensor | np.ndarray,
        *,
        stream_axis: int | None = None,
        compress: bool = False,
    ) -> None:
        """Write a whole array.

        Args:
            name: Array name within the entry (e.g. ``"noise_maps"``).
            value: Tensor or array; bfloat16 is stored as float32 and restored on read.
            stream_axis: Axis to chunk one index per chunk (``0`` for ``(T, C, H, W)`` noise
                sequences) so ``Entry.step`` reads one index alone; None for one chunk.
            compress: zstd each chunk. Off by default: float noise and latents do not
                compress (93% of raw) and zstd made reads several times slower.

        A float32 array (not streamed) whose every value is ``k / 255`` (an image from a
        PNG, a figure, a binary mask) is stored as the uint8 codes ``k`` and read back bit
        for bit (``encoding="pixels"``, :func:`~editflow.cache.dtypes.pixel_codes`).
        """
        self._new_name(name)
        stored, torch_dtype = to_stored(value)
        axis = _check_axis(stream_axis, stored.ndim)
        codes = pixel_codes(stored) if axis is None and torch_dtype == "float32" else None
        on_disk = stored if codes is None else codes
        array, chunks, shards = self._create(
            name, on_disk.shape, on_disk.dtype, axis, compress, whole=True
        )
        if not self._write_shard(name, on_disk, chunks, shards, axis, compress):
            with zarr.config.set(PARALLEL):
                array[...] = on_disk
        steps = None
        if axis is not None:
            selections = ((slice(None),) * axis + (i,) for i in range(stored.shape[axis]))
            steps = tuple(checksum_of(stored[selection]) for selection in selections)
        self._arrays[name] = ArrayInfo(
            shape=tuple(stored.shape),
            dtype=stored.dtype.name,
            torch_dtype=torch_dtype,
            checksum=checksum_of(stored),
            nbytes=int(on_disk.nbytes),
            chunks=chunks,
            shards=shards,
            stream_axis=axis,
            step_checksums=steps,
            codec="zstd" if compress else "raw",
            chunk_separator=getattr(array, "separator", "/"),
            encoding=None if codes is None else PIXELS,
        )

    def create_stream(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        stream_axis: int = 0,
        compress: bool = False,
        live: bool = False,
    ) -> StreamHandle:
        """Create an array to be written one index of ``stream_axis`` at a time.

        Args:
            name: Array name within the entry (e.g. ``"attention_maps"``).
            shape: Full shape, e.g. ``(steps, heads, H*W, tokens)``.
            dtype: Torch dtype stored (values written are cast to it; fp16 for attention).
            stream_axis: The axis indexed by ``handle[i] = ...``.
            compress: zstd each chunk (see :meth:`write`).
            live: Store each step as its own chunk, written (atomically) when it is given,
                so a reader can follow the array before the entry is published
                (:class:`~editflow.cache.live.LiveSteps`); raw, along axis 0 only. Otherwise
                steps may wait in memory until their shard is complete.
        """
        self._new_name(name)
        shape = tuple(int(size) for size in shape)
        axis = _check_axis(stream_axis, len(shape))
        assert axis is not None
        if live and (compress or axis != 0):
            raise ValueError("a live stream is raw and streams along axis 0")
        array, chunks, shards = self._create(
            name, shape, stored_dtype(dtype), axis, compress, live_dtype=dtype if live else None
        )
        direct = None
        if self._folder is not None and not compress and direct_layout(shape, chunks, shards, axis):
            direct = self._folder / name
        codec = "zstd" if compress else "raw"
        handle = StreamHandle(array, name, dtype, axis, shards, codec, direct)
        self._streams[name] = handle
        return handle

    def set_attrs(self, **attrs: Any) -> None:
        """Add or replace attributes (e.g. timings known only at the end)."""
        self._attrs.update(_json_copy(attrs))

    def _write_shard(
        self,
        name: str,
        stored: np.ndarray,
        chunks: tuple[int, ...],
        shards: tuple[int, ...] | None,
        axis: int | None,
        compress: bool,
    ) -> bool:
        """Write a local, raw, single-shard stream in one file write (see ``shards``);
        False where zarr must write it."""
        eligible = (
            self._layout.local_root is not None
            and not compress
            and axis == 0
            and shards is not None
            and shards[0] >= stored.shape[0]
            and tuple(chunks[1:]) == tuple(stored.shape[1:]) == tuple(shards[1:])
        )
        if eligible:
            folder = Path(self._layout.object_path(self.key, self.object_id)) / name
            path = shard_path(folder, stored.ndim, LOCAL_SEPARATOR)
            write_shard(path, stored, chunks[0], shards[0])
        return eligible

    def _new_name(self, name: str) -> None:
        if self._group is None and self._folder is None:
            raise RuntimeError("use the EntryWriter inside its `with` block")
        check_array_name(name)
        if name in self._arrays or name in self._streams:
            raise ValueError(f"array {name!r} already written to entry {self.key}")

    def _create(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        axis: int | None,
        compress: bool,
        whole: bool = False,
        live_dtype: torch.dtype | None = None,
    ) -> tuple[zarr.Array | LocalArray, tuple[int, ...], tuple[int, ...] | None]:
        local = self._folder is not None
        shard_bytes = LOCAL_SHARD_BYTES if local else SHARD_BYTES
        if local and whole:  # all in memory already: one shard file, written at once
            shard_bytes = 2**62
        elif local and not compress and axis == 0:  # each step straight to its place
            shard_bytes = LOCAL_STREAM_SHARD_BYTES
        chunks, shards = chunk_layout(shape, dtype.itemsize, axis, True, shard_bytes)
        attributes = {}
        if live_dtype is not None:  # one chunk (file or object) per step, no shard
            chunks, shards = (1, *(max(1, size) for size in shape[1:])), None
            attributes = {LIVE_ATTR: {"torch_dtype": torch_dtype_name(live_dtype)}}
        if self._folder is not None and not compress:
            metadata = array_metadata(shape, dtype, chunks, shards, LOCAL_SEPARATOR)
            write_metadata(self._folder / name, {**metadata, "attributes": attributes})
            return LocalArray(self._folder, name, shape, dtype, chunks), chunks, shards
        if self._group is None:  # a compressed array in a local folder: zarr writes it
            store = self._layout.zarr_store(self._path, read_only=False)
            self._group = zarr.open_group(store, mode="r+")
        array = self._group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            # One checksum layer: the manifest's checksum per array and per step is checked on
            # every read; a crc32c codec on top cost ~16% of read throughput for nothing.
            compressors=[ZstdCodec(level=ZSTD_LEVEL)] if compress else None,
            attributes=attributes,
        )
        if live_dtype is not None:  # a reader waits for each step's chunk (see LocalArray)
            array = array.with_config({"write_empty_chunks": True})
        return array, chunks, shards

    def _publish(self) -> None:
        layout = self._layout
        for name, handle in self._streams.items():
            self._arrays[name] = handle.close()
        encoded = any(info.encoding is not None for info in self._arrays.values())
        manifest = {
            "format": ENCODED_FORMAT if encoded else MANIFEST_FORMAT,
            "key": self.key,
            "object": self.object_id,
            "created": time.time(),
            "stored_bytes": sum(stat.size for stat in layout.files(self._path)),
            "attrs": self._attrs,
            "attrs_sha256": attrs_sha256(self._attrs),
            "arrays": {name: info.to_json() for name, info in sorted(self._arrays.items())},
        }
        data = json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False).encode()
        self._group = self._folder = None
        self.won = layout.create_exclusive(layout.ref_path(self.key), data)
        if self.won:
            self.published = Entry(layout, json.loads(data))
            return
        layout.remove(self._path)
        try:
            found = layout.read_json(layout.ref_path(self.key))
            self.published = None if found is None else Entry.from_manifest(layout, self.key, found)
        except (ValueError, DamagedEntryError):
            self.published = None  # the winner's entry vanished or is damaged: recompute

    def _abort(self) -> None:
        self._group = self._folder = None
        for handle in self._streams.values():
            handle.abort()
        self.won = False
        self.published = None
        if self._path:
            self._layout.remove(self._path)
