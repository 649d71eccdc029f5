"""A published cache entry: its manifest, and verified reads of its arrays."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from editflow.errors import CacheError
from editflow.lazy import lazy

from .dtypes import (
    PIXELS,
    checksum_of,
    checksum_update,
    from_pixel_codes,
    from_stored,
    new_checksum,
)
from .layout import Layout
from .shards import Ineligible, ShardedArray

torch = lazy("torch")

# zarr encodes and decodes the chunks of one request in batches of this many, in parallel; its
# default of 1 spent most of a 100-step read in per-chunk overhead (578 vs 1235 MiB/s, raw).
PARALLEL = {"codec_pipeline.batch_size": 128}
MANIFEST_FORMAT = 3  # 2: attrs_sha256 covers the attributes; 3: xxh3-128 array checksums
ENCODED_FORMAT = 4
"""The format of a manifest with an encoded array (``ArrayInfo.encoding``); every other
manifest is written as :data:`MANIFEST_FORMAT`. An editflow that reads only format 3 takes a
format-4 entry for damaged and recomputes it, rather than misread its uint8 codes."""
MANIFEST_FORMATS = (MANIFEST_FORMAT, ENCODED_FORMAT)
ENCODINGS = (PIXELS,)


class DamagedEntryError(CacheError):
    """A published entry's data is missing, undecodable or fails its checksum.

    The entry is remembered as damaged (``Cache.has`` turns False); discard and recompute it.
    """

    def __init__(self, key: str, array: str | None, reason: str, *, location: str | None = None):
        self.key = key
        self.array = array
        self.reason = reason
        what = f"array {array!r} of cache entry {key}" if array else f"cache entry {key}"
        super().__init__(
            f"{what} is damaged: {reason}",
            file=location,
            hint="it will be recomputed; `editflow cache verify` lists damaged entries",
        )


@dataclass(frozen=True)
class Damage:
    """One problem found by ``Cache.verify``; ``array`` is None for the entry as a whole."""

    key: str
    array: str | None
    reason: str


@dataclass(frozen=True)
class ArrayInfo:
    """What the manifest records about one array of an entry.

    Attributes:
        shape: Array shape.
        dtype: Numpy dtype name of the values (``"float32"`` for a bfloat16 tensor): the
            stored one, unless ``encoding`` says how they are stored.
        torch_dtype: Torch dtype name handed back by reads (``"bfloat16"``).
        checksum: Hex xxh3-128 of the C-order bytes of the whole array's values (of
            ``dtype``, decoded where ``encoding`` is set).
        nbytes: Uncompressed stored size in bytes.
        chunks: zarr chunk shape (1 along the stream axis, full elsewhere).
        shards: zarr shard shape when sharded (remote streams), else None.
        stream_axis: Axis read one index at a time by ``Entry.step``, else None.
        step_checksums: Hex xxh3-128 of each index along the stream axis, so one step is
            verified without reading the others.
        codec: How chunks are stored: ``"raw"`` or ``"zstd"``.
        chunk_separator: The separator of zarr's chunk keys: ``"."`` puts a local raw
            array's shard files beside its metadata (no folder per dimension to create);
            arrays zarr writes keep its default ``"/"``.
        encoding: None (stored as ``dtype``) or ``"pixels"``: float32 values ``k / 255``
            stored as their uint8 codes ``k`` (:func:`~editflow.cache.dtypes.pixel_codes`).
    """

    shape: tuple[int, ...]
    dtype: str
    torch_dtype: str
    checksum: str
    nbytes: int
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    stream_axis: int | None = None
    step_checksums: tuple[str, ...] | None = None
    codec: str = "raw"  # or "zstd"
    chunk_separator: str = "/"
    encoding: str | None = None

    @property
    def stored_dtype(self) -> np.dtype:
        """The numpy dtype of the array on storage."""
        return np.dtype(np.uint8 if self.encoding == PIXELS else self.dtype)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Values from what was read from storage."""
        return from_pixel_codes(stored) if self.encoding == PIXELS else stored

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["encoding"] is None:  # the manifests of unencoded arrays stay as they were
            del data["encoding"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArrayInfo:
        def optional_tuple(value: Iterable[Any] | None) -> tuple[Any, ...] | None:
            return None if value is None else tuple(value)

        return cls(
            shape=tuple(int(size) for size in data["shape"]),
            dtype=str(data["dtype"]),
            torch_dtype=str(data["torch_dtype"]),
            checksum=str(data["checksum"]),
            nbytes=int(data["nbytes"]),
            chunks=tuple(int(size) for size in data["chunks"]),
            shards=optional_tuple(data.get("shards")),
            stream_axis=data.get("stream_axis"),
            step_checksums=optional_tuple(data.get("step_checksums")),
            codec=str(data.get("codec", "zstd")),
            chunk_separator=str(data.get("chunk_separator", "/")),
            encoding=_encoding(data.get("encoding")),
        )


def _encoding(value: Any) -> str | None:
    if value is not None and value not in ENCODINGS:
        raise ValueError(f"unknown array encoding {value!r}")
    return value


@dataclass
class ReadStats:
    """Requests and bytes an entry fetched from storage (metadata included)."""

    requests: int = 0
    bytes: int = 0


class _CountingStore(WrapperStore[Store]):
    """Passes reads through to a store, adding them up in a shared ``ReadStats``."""

    def __init__(self, store: Store, stats: ReadStats) -> None:
        super().__init__(store)
        self._stats = stats

    def _with_store(self, store: Store) -> _CountingStore:
        return _CountingStore(store, self._stats)

    def _count(self, buffer: Buffer | None) -> None:
        if buffer is not None:
            self._stats.requests += 1
            self._stats.bytes += len(buffer)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buffer = await self._store.get(key, prototype, byte_range)
        self._count(buffer)
        return buffer

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        for buffer in buffers:
            self._count(buffer)
        return buffers


def _arrays_of(manifest: Mapping[str, Any]) -> dict[str, ArrayInfo]:
    return {name: ArrayInfo.from_json(info) for name, info in dict(manifest["arrays"]).items()}


@dataclass(frozen=True)
class ReadManifest:
    """A manifest's bytes, parsed, with what those bytes alone decide: whether its
    attributes pass their sha256, and its arrays (None: malformed, left for
    :meth:`Entry.from_manifest` to report)."""

    manifest: Any
    attrs_ok: bool
    arrays: Mapping[str, ArrayInfo] | None


@functools.lru_cache(maxsize=1024)  # ~30 MB at most: manifests are a few KB each
def read_manifest(data: bytes) -> ReadManifest:
    """Parse a manifest and check its attributes, once per distinct bytes: an all-hit run
    reads each entry's manifest to know it is there and again to read what it holds, and
    the attributes' sha256 covers the whole key preimage. Manifests are written once and
    never changed, so the same bytes always mean the same entry; treat the result as
    read-only.

    Raises:
        ValueError: The bytes are not JSON.
    """
    manifest = json.loads(data)
    try:
        return ReadManifest(
            manifest,
            attrs_sha256(manifest["attrs"]) == manifest["attrs_sha256"],
            MappingProxyType(_arrays_of(manifest)),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return ReadManifest(manifest, False, None)


def attrs_sha256(attrs: Any) -> str:
    """sha256 of an entry's attributes as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(attrs, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def stored_checksum(array: zarr.Array, stream_axis: int | None, decode: Any = np.asarray) -> str:
    """Recompute an array's checksum from storage (of its values: ``decode`` turns what is
    read into them); axis-0 streams are read one step at a time."""
    digest = new_checksum()
    if stream_axis == 0:
        for index in range(array.shape[0]):
            checksum_update(digest, decode(np.asarray(array[index])))
    else:
        checksum_update(digest, decode(np.asarray(array[...])))
    return digest.hexdigest()


class Entry:
    """A published cache entry: attributes plus named arrays, read and verified lazily.

    Attributes:
        key: The cache key.
        attrs: JSON attributes given at write time (key preimage, recipe, stage, timings ...).
        arrays: Name -> ``ArrayInfo``.
        object_id: Name of the object folder holding the data.
        created: Publication time (seconds since the epoch).
        stored_bytes: Bytes on storage, compressed, metadata included.
        reads: Requests and bytes fetched so far through this object.
    """

    def __init__(
        self,
        layout: Layout,
        manifest: Mapping[str, Any],
        arrays: Mapping[str, ArrayInfo] | None = None,
    ) -> None:
        self.key: str = manifest["key"]
        self.object_id: str = manifest["object"]
        self.created = float(manifest["created"])
        self.stored_bytes = int(manifest.get("stored_bytes", 0))
        self.attrs: dict[str, Any] = dict(manifest["attrs"])
        self.arrays = dict(arrays) if arrays is not None else _arrays_of(manifest)
        self.reads = ReadStats()
        self._layout = layout
        self._opened: dict[str, zarr.Array] = {}
        self._shards: dict[str, ShardedArray | None] = {}

    @classmethod
    def from_manifest(
        cls, layout: Layout, key: str, manifest: Any, read: ReadManifest | None = None
    ) -> Entry:
        """Build an entry from a parsed manifest (``read``: what :func:`read_manifest` found
        in its bytes), or raise DamagedEntryError if malformed."""
        try:
            if manifest["key"] != key or manifest.get("format") not in MANIFEST_FORMATS:
                raise ValueError(
                    f"manifest is for {manifest['key']!r}, format {manifest.get('format')!r}"
                )
            if read is not None and read.arrays is not None:
                if not read.attrs_ok:
                    raise ValueError("attributes fail their sha256")
                return cls(layout, manifest, read.arrays)
            if attrs_sha256(manifest["attrs"]) != manifest["attrs_sha256"]:
                raise ValueError("attributes fail their sha256")
            return cls(layout, manifest)
        except (KeyError, TypeError, ValueError) as error:
            layout.mark_damaged(key, None, f"manifest unreadable: {error}")
            raise DamagedEntryError(
                key, None, f"manifest unreadable: {error}", location=layout.url
            ) from error

    def __repr__(self) -> str:
        return f"Entry(key={self.key[:12]}..., arrays={sorted(self.arrays)})"

    def tensor(self, name: str) -> torch.Tensor:
        """Read a whole array as a new tensor of its original torch dtype, checksum verified.

        Raises:
            KeyError: The entry has no array called ``name``.
            DamagedEntryError: The data is missing, undecodable or fails its checksum.
        """
        info = self._info(name)
        values = info.decode(self._read(name, info, ...))
        if checksum_of(values) != info.checksum:
            raise self._damage(name, "checksum mismatch")
        return from_stored(values, info.torch_dtype)

    def step(self, name: str, index: int) -> torch.Tensor:
        """Read one index along the stream axis (one chunk) as a new tensor, verified.

        Args:
            name: An array written with a stream axis, for example attention maps
                ``(steps, heads, H*W, tokens)``.
            index: Position along the stream axis; negative counts from the end.

        Returns:
            The slice without the stream axis, e.g. ``(heads, H*W, tokens)``.

        Raises:
            ValueError: The array was not written with a stream axis.
            IndexError: ``index`` is out of range.
            DamagedEntryError: The chunk is missing, undecodable or fails its checksum.
        """
        info = self._info(name)
        if info.stream_axis is None:
            raise ValueError(f"array {name!r} of {self.key} has no stream axis; use tensor()")
        steps = info.shape[info.stream_axis]
        if not -steps <= index < steps:
            raise IndexError(f"step {index} out of range for {name!r} with {steps} steps")
        index %= steps
        selection = (slice(None),) * info.stream_axis + (index,)
        values = info.decode(self._read(name, info, selection))
        if info.step_checksums is not None and checksum_of(values) != info.step_checksums[index]:
            raise self._damage(name, f"checksum mismatch at step {index}")
        return from_stored(values, info.torch_dtype)

    def check(self) -> list[Damage]:
        """Re-read every array and compare checksums; damage found is also remembered."""
        damages = []
        for name, info in self.arrays.items():
            try:
                digest = stored_checksum(self._array(name, info), info.stream_axis, info.decode)
            except OSError as error:
                if not isinstance(error, FileNotFoundError):
                    raise
                damages.append(Damage(self.key, name, f"missing data: {error}"))
                continue
            except Exception as error:  # any decode failure is damage
                damages.append(Damage(self.key, name, f"cannot decode: {error}"))
                continue
            if digest != info.checksum:
                damages.append(Damage(self.key, name, "checksum mismatch"))
        if damages:
            self._layout.mark_damaged(self.key, self.object_id, damages[0].reason)
        return damages

    def _info(self, name: str) -> ArrayInfo:
        if name not in self.arrays:
            raise KeyError(
                f"cache entry {self.key} has no array {name!r}; has {sorted(self.arrays)}"
            )
        return self.arrays[name]

    def _array(self, name: str, info: ArrayInfo) -> zarr.Array:
        if name not in self._opened:
            store = self._layout.zarr_store(
                self._layout.object_path(self.key, self.object_id), read_only=True
            )
            array = zarr.open_array(_CountingStore(store, self.reads), path=name, mode="r")
            if tuple(array.shape) != info.shape or np.dtype(array.dtype) != info.stored_dtype:
                raise ValueError(
                    f"stored array is {array.dtype}{array.shape}, manifest says otherwise"
                )
            self._opened[name] = array
        return self._opened[name]

    def _read(self, name: str, info: ArrayInfo, selection: Any) -> np.ndarray:
        direct = self._read_direct(name, info, selection)
        if direct is not None:
            return direct
        try:
            with zarr.config.set(PARALLEL):
                return np.asarray(self._array(name, info)[selection])
        except OSError as error:
            if not isinstance(error, FileNotFoundError):
                raise  # transient I/O (network, permissions) is not damage
            raise self._damage(name, f"missing data ({error})") from error
        except Exception as error:  # any decode failure is damage
            raise self._damage(name, f"cannot decode ({type(error).__name__}: {error})") from error

    def _read_direct(self, name: str, info: ArrayInfo, selection: Any) -> np.ndarray | None:
        """A whole array or one step straight from its local shard files (:mod:`.shards`);
        None where zarr must read it."""
        root = self._layout.local_root
        if root is None:
            return None
        if name not in self._shards:
            folder = Path(self._layout.object_path(self.key, self.object_id)) / name
            try:
                self._shards[name] = ShardedArray(folder, info)
            except (Ineligible, OSError, ValueError):
                self._shards[name] = None
        shard = self._shards[name]
        if shard is None or (selection is not ... and len(selection) != 1):
            return None
        try:
            values, size = shard.read_all() if selection is ... else shard.read_step(selection[0])
        except (Ineligible, OSError, ValueError):
            return None
        self.reads.requests += 1
        self.reads.bytes += size
        return values

    def _damage(self, name: str, reason: str) -> DamagedEntryError:
        self._layout.mark_damaged(self.key, self.object_id, f"{name}: {reason}")
        return DamagedEntryError(self.key, name, reason, location=self._layout.url)
