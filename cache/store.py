"""The ``Cache`` object: one cache root, local folder or fsspec URL."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from editflow.errors import CacheError
from editflow.lazy import lazy

from . import maintenance
from .entry import Damage, DamagedEntryError, Entry, read_manifest
from .layout import Layout, check_key
from .maintenance import DiskUsage, EntryInfo, GcReport
from .writer import EntryWriter

torch = lazy("torch")

CACHE_ENV = "EDITFLOW_CACHE"


def default_cache_url() -> str:
    """``$EDITFLOW_CACHE``, else ``$XDG_CACHE_HOME/editflow``, else ``~/.cache/editflow``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "editflow")


class Cache:
    """A content-addressed, write-once store of tensors keyed by cache key.

    Args:
        url: A local folder (created on first write) or an fsspec URL such as
            ``"memory://name"``, ``"file:///path"`` or ``"s3://bucket/prefix"``.
        storage_options: Passed to fsspec for URLs (credentials, endpoint ...).

    Raises:
        CacheError: The location names an unknown protocol, a protocol whose package is not
            installed, a folder that cannot be written, or a cache of another layout format.
    """

    def __init__(
        self, url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
    ) -> None:
        self._layout = Layout(url, storage_options)

    def __repr__(self) -> str:
        return f"Cache({self.url!r})"

    @property
    def url(self) -> str:
        """The location as given (absolute path for plain local folders)."""
        return self._layout.url

    @property
    def is_local(self) -> bool:
        """True for plain folder paths and ``file://`` URLs."""
        return self._layout.local_root is not None

    @property
    def local_root(self) -> Path | None:
        """The cache folder of a local cache, else None."""
        return self._layout.local_root

    def has(self, key: str) -> bool:
        """Whether ``key`` is published with an intact manifest and not known to be damaged.

        Reads the small manifest (checking its attributes' sha256), not the arrays.
        """
        try:
            return self.get(key) is not None
        except DamagedEntryError:
            return False

    def get(self, key: str) -> Entry | None:
        """The published entry for ``key``, or None when there is none.

        Raises:
            DamagedEntryError: The entry is known to be damaged or its manifest is unreadable.
        """
        layout = self._layout
        data = layout.read_bytes(layout.ref_path(check_key(key)))
        if data is None:
            return None
        try:
            read = read_manifest(data)
        except ValueError as error:
            layout.mark_damaged(key, None, f"manifest unreadable: {error}")
            raise DamagedEntryError(
                key, None, f"manifest unreadable: {error}", location=self.url
            ) from error
        if layout.is_damaged(key):
            raise DamagedEntryError(key, None, "found damaged earlier", location=self.url)
        return Entry.from_manifest(layout, key, read.manifest, read)

    def writer(
        self, key: str, attrs: dict[str, Any], *, object_id: str | None = None
    ) -> EntryWriter:
        """A context manager that stages arrays and publishes them on clean exit.

        ``object_id`` names the staging folder (a fresh one by default): a reader that
        follows the entry's live streams while it is written must know where they are.

        Example::

            with cache.writer(key, {"stage": "invert"}) as writer:
                writer.write("noise_maps", noise_maps, stream_axis=0)  # (T, C, H, W)
                writer.set_attrs(seconds=12.5)
            entry = writer.published
        """
        return EntryWriter(self._layout, key, attrs, object_id=object_id)

    def read_staged(self, key: str, object_id: str, name: str) -> bytes | None:
        """A file of a writer's staging folder (a live stream's step), or None while it does
        not exist; see :mod:`.live`."""
        path = f"{self._layout.object_path(check_key(key), object_id)}/{name}"
        try:
            return self._layout.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def put(
        self,
        key: str,
        arrays: Mapping[str, torch.Tensor | np.ndarray],
        attrs: dict[str, Any],
        *,
        stream_axis: Mapping[str, int] | None = None,
    ) -> Entry:
        """Write and publish an entry in one call.

        Args:
            key: The cache key.
            arrays: Name -> tensor or array.
            attrs: JSON attributes.
            stream_axis: Name -> axis for arrays read step by step (see ``EntryWriter.write``).

        Returns:
            The published entry: this call's, or the one another writer published first.
        """
        axes = dict(stream_axis or {})
        unknown = set(axes) - set(arrays)
        if unknown:
            raise ValueError(f"stream_axis names arrays not given: {sorted(unknown)}")
        with self.writer(key, attrs) as writer:
            for name, value in arrays.items():
                writer.write(name, value, stream_axis=axes.get(name))
        if writer.published is None:
            raise CacheError(
                f"entry {key} was published by another writer, then removed or found damaged",
                file=self.url,
                hint="run again to recompute it",
            )
        return writer.published

    def discard(self, key: str) -> None:
        """Unpublish and delete an entry (for example a damaged one); missing is fine."""
        self._layout.discard(check_key(key))

    def rm(self, keys: Iterable[str]) -> int:
        """Discard entries; returns how many were published."""
        return sum(self._layout.discard(check_key(key)) for key in keys)

    def ls(self) -> list[EntryInfo]:
        """Published entries, oldest first."""
        return maintenance.list_entries(self._layout)

    def du(self) -> DiskUsage:
        """Disk usage by published entries and staging leftovers."""
        return maintenance.disk_usage(self._layout)

    def verify(self, keys: Iterable[str] | None = None) -> list[Damage]:
        """Recompute checksums of the given (default: all) entries; damage is remembered."""
        return maintenance.verify(self._layout, keys)

    def gc(
        self,
        *,
        keep: Callable[[EntryInfo], bool] | None = None,
        older_than_s: float = 3600,
    ) -> GcReport:
        """Remove staging leftovers older than ``older_than_s`` and entries ``keep`` rejects."""
        return maintenance.collect_garbage(self._layout, keep, older_than_s)

    def put_record(self, name: str, data: dict[str, Any]) -> None:
        """Store a small JSON document under ``name``, replacing any earlier one atomically.

        For example the last key of a stage of a recipe, so ``plan`` can say what changed.
        """
        try:
            payload = json.dumps(data, sort_keys=True, indent=1, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            raise ValueError(f"record {name!r} must be plain JSON: {error}") from error
        self._layout.ensure_marker()
        self._layout.replace(self._layout.record_path(name), payload)

    def get_record(self, name: str) -> dict[str, Any] | None:
        """The document stored under ``name``, or None."""
        path = self._layout.record_path(name)
        try:
            return self._layout.read_json(path)
        except ValueError as error:
            raise CacheError(f"record {name!r} is not valid JSON: {error}", file=path) from error
