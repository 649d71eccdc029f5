"""Where a cache lives: its paths and the few filesystem operations the publish protocol needs.

One ``Layout`` per cache root. Local folders use ``os`` for the two operations that must be
atomic (exclusive create of a ref by ``os.link``, replace of a record by ``os.replace``) and
fsspec's ``LocalFileSystem`` for listing and deleting, so that local and remote caches share
every other line of code. Remote roots use fsspec for everything and zarr's ``FsspecStore``
(over an async filesystem, wrapped when the filesystem is sync, as for ``memory://``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fsspec
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from editflow.errors import CacheError

FORMAT = 1
"""Version of the on-disk layout, written to ``editflow-cache.json`` at the root."""

_KEY = re.compile(r"^[0-9a-z][0-9a-z_-]{3,127}$")
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_OBJECT_ID = re.compile(r"^[0-9a-f]{32}$")
_TMP_PREFIX = ".tmp-"


def check_key(key: str) -> str:
    """Return ``key`` if it is safe to use as a path component, else raise CacheError."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise CacheError(
            f"invalid cache key {key!r}: expected 4 to 128 lowercase letters, digits, '-' or "
            "'_' (a sha256 hex digest)"
        )
    return key


def check_array_name(name: str) -> str:
    """Return ``name`` if it can name an array in an entry, else raise ValueError."""
    if not isinstance(name, str) or not _ARRAY_NAME.match(name) or name == "zarr.json":
        raise ValueError(
            f"invalid array name {name!r}: use letters, digits, '_', '.', '-' (no '/')"
        )
    return name


def is_temporary(path: str) -> bool:
    """Whether a file is a not-yet-renamed temporary file of this module."""
    return path.rsplit("/", 1)[-1].startswith(_TMP_PREFIX)


@dataclass(frozen=True)
class FileStat:
    """One stored file: its path in the filesystem, size in bytes and modification time."""

    path: str
    size: int
    mtime: float | None


class Layout:
    """The paths of one cache root and the filesystem operations on them.

    Paths (relative to the root)::

        editflow-cache.json            {"format": 1}
        objects/<key>/<object-id>/     zarr v3 group, one array per name (staging or published)
        refs/<key[:2]>/<key>.json      manifest; its existence *is* publication
        damaged/<key>.json             {"object": id, "reason": ...}: known-damaged entry
        records/<quoted-name>.json     small JSON documents, replaced atomically
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.url, self.fs, self.root, self.local_root, self._async_fs = _open(url, storage_options)
        self._damaged: dict[str, str | None] = {}
        self._marker_written = False
        self._check_format()

    # -- paths -------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """Join parts under the root with '/'."""
        return "/".join([self.root.rstrip("/"), *parts])

    def ref_path(self, key: str) -> str:
        """The manifest whose existence publishes ``key``."""
        return self.path("refs", key[:2], f"{key}.json")

    def object_path(self, key: str, object_id: str) -> str:
        """The zarr group one writer of ``key`` stages its arrays in."""
        return self.path("objects", key, object_id)

    def damage_path(self, key: str) -> str:
        """The marker saying the entry published under ``key`` is damaged."""
        return self.path("damaged", f"{key}.json")

    def record_path(self, name: str) -> str:
        """The file of a record; any non-empty name works (it is percent-quoted)."""
        if not isinstance(name, str) or not name:
            raise CacheError(f"invalid record name {name!r}: expected a non-empty string")
        quoted = quote(name, safe="-_.")
        if len(quoted) > 200:
            raise CacheError(f"record name too long ({len(quoted)} characters quoted): {name!r}")
        return self.path("records", f"{quoted}.json")

    # -- zarr ----------------------------------------------------------------------------------

    def zarr_store(self, path: str, *, read_only: bool) -> Store:
        """A zarr store rooted at ``path`` (an object folder), so no parent metadata is made."""
        if self._async_fs is None:
            return LocalStore(path, read_only=read_only)
        return FsspecStore(self._async_fs, path=path, read_only=read_only)

    # -- small files ---------------------------------------------------------------------------

    def read_json(self, path: str) -> Any | None:
        """Read a JSON file; None when it does not exist.

        Raises:
            ValueError: The file is not valid JSON.
        """
        data = self.read_bytes(path)
        return None if data is None else json.loads(data)

    def read_bytes(self, path: str) -> bytes | None:
        """Read a small file whole; None when it does not exist."""
        data = b""
        for _ in range(3):
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
            if data:
                break
            # A non-local exclusive create can be observed between create and write.
            time.sleep(0.05)
        return data

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; True when this call created it.

        Locally the content is written to a temporary file first and hard-linked into place,
        so the file appears complete or not at all. Remote filesystems use fsspec's
        ``pipe_file(mode="create")``: atomic where the backend supports conditional writes
        (memory, S3 with If-None-Match), otherwise fsspec's check-then-write.
        """
        if self.local_root is None:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        self.ensure_folder(path)
        tmp = self._write_temporary(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: exclusive create, written in place
            return _create_in_place(path, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def replace(self, path: str, data: bytes) -> None:
        """Write ``path`` atomically (locally by ``os.replace``), overwriting it."""
        if self.local_root is None:
            self.fs.pipe_file(path, data)
            return
        self.ensure_folder(path)
        os.replace(self._write_temporary(path, data), path)

    def remove(self, path: str) -> None:
        """Delete a file or a folder tree; missing is fine."""
        # Parent folders stay (a concurrent writer may be creating files in them); gc removes
        # empty folders once they are older than its threshold.
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def children(self, path: str) -> list[str]:
        """Names directly inside a folder (empty when it does not exist)."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def files(self, path: str) -> list[FileStat]:
        """Every file under a folder, with size and modification time."""
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        return [
            FileStat(name, int(info.get("size") or 0), _mtime(info))
            for name, info in found.items()
            if info.get("type") != "directory"
        ]

    def remove_empty_folders(self, path: str, older_than: float) -> int:
        """Delete empty folders under ``path`` last modified before ``older_than`` (local only).

        Returns:
            How many folders were removed.
        """
        if self.local_root is None or not os.path.isdir(path):
            return 0
        removed = 0
        for folder, _subfolders, filenames in os.walk(path, topdown=False):
            if folder == path or filenames:
                continue
            with contextlib.suppress(OSError):
                if os.stat(folder).st_mtime < older_than:
                    os.rmdir(folder)  # fails if something appeared in it meanwhile
                    removed += 1
        return removed

    def exists(self, path: str) -> bool:
        """Whether a file exists (one stat, no read)."""
        return bool(self.fs.exists(path))

    # -- damage markers ----------------------------------------------------------------------

    def mark_damaged(self, key: str, object_id: str | None, reason: str) -> None:
        """Remember (in memory and, when writable, on disk) that an entry's data is damaged."""
        self._damaged[key] = object_id
        data = json.dumps({"object": object_id, "reason": reason}).encode()
        with contextlib.suppress(OSError):
            self.replace(self.damage_path(key), data)

    def damaged_object(self, key: str) -> tuple[bool, str | None]:
        """``(True, object_id)`` when the entry published under ``key`` was found damaged."""
        if key in self._damaged:
            return True, self._damaged[key]
        if not self.exists(self.damage_path(key)):
            return False, None
        try:
            marker = self.read_json(self.damage_path(key)) or {}
        except ValueError:
            return True, None
        return True, marker.get("object")

    def is_damaged(self, key: str) -> bool:
        """Whether the entry now published under ``key`` is known to be damaged."""
        marked, object_id = self.damaged_object(key)
        if not marked:
            return False
        try:
            ref = self.read_json(self.ref_path(key))
        except ValueError:
            return True
        if not isinstance(ref, dict):
            return ref is not None
        if object_id is None:  # the manifest itself was unreadable; is it still?
            return not isinstance(ref.get("object"), str)
        return ref.get("object") == object_id

    def discard(self, key: str) -> bool:
        """Unpublish ``key`` (ref first, so readers stop seeing it), then delete its data.

        Returns:
            Whether a ref was removed.
        """
        ref_path = self.ref_path(key)
        try:
            ref = self.read_json(ref_path)
        except ValueError:
            ref = None
        existed = self.exists(ref_path)
        self.remove(ref_path)
        object_id = ref.get("object") if isinstance(ref, dict) else None
        if isinstance(object_id, str) and _OBJECT_ID.match(object_id):
            self.remove(self.object_path(key, object_id))
        self.clear_damage(key)
        return existed

    def clear_damage(self, key: str) -> None:
        """Forget that ``key`` was damaged (after it was discarded)."""
        self._damaged.pop(key, None)
        self.remove(self.damage_path(key))

    # -- helpers -------------------------------------------------------------------------------

    def ensure_folder(self, file_path: str) -> None:
        """Create the folder that will hold ``file_path`` (local only; object stores need none)."""
        if self.local_root is not None:
            os.makedirs(os.path.dirname(file_path), exist_ok=True)

    def ensure_marker(self) -> None:
        """Write the format marker at the root once per process (on first write)."""
        if self._marker_written:
            return
        marker = self.path("editflow-cache.json")
        self.create_exclusive(marker, json.dumps({"format": FORMAT}).encode())
        self._marker_written = True

    def _check_format(self) -> None:
        marker = self.path("editflow-cache.json")
        try:
            found = self.read_json(marker)
        except Exception as error:  # any failure here: unusable location
            raise CacheError(f"cannot read cache location {self.url}: {error}") from error
        if found is not None and (not isinstance(found, dict) or found.get("format") != FORMAT):
            seen = found.get("format") if isinstance(found, dict) else found
            raise CacheError(
                f"cache at {self.url} has layout format {seen!r}, this editflow "
                f"reads format {FORMAT}",
                hint="use another cache location or a matching editflow version",
            )

    def _write_temporary(self, path: str, data: bytes) -> str:
        tmp = os.path.join(os.path.dirname(path), f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        # No fsync: a manifest torn by a power cut fails to parse or to match its checksums,
        # and a damaged entry is recomputed, so a cache needs no durability (and fsync cost
        # several ms per stage).
        with open(tmp, "wb") as handle:
            handle.write(data)
        return tmp


def _open(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None
) -> tuple[str, fsspec.AbstractFileSystem, str, Path | None, Any]:
    """Resolve a location into (url, sync fs, root path, local root, async fs for zarr)."""
    text = os.fspath(url)
    if not isinstance(text, str) or not text:
        raise CacheError(f"invalid cache location {url!r}: expected a folder path or fsspec URL")
    if "://" not in text:
        local = Path(text).expanduser().absolute()
        _check_local(local, text)
        return str(local), LocalFileSystem(), local.as_posix(), local, None
    options = dict(storage_options or {})
    try:
        fs, root = fsspec.core.url_to_fs(text, **options)
        if isinstance(fs, LocalFileSystem):
            local = Path(root)
            _check_local(local, text)
            return text, LocalFileSystem(), local.as_posix(), local, None
        async_fs = FsspecStore.from_url(text, storage_options=options).fs
    except CacheError:
        raise
    except (ValueError, ImportError, TypeError) as error:
        raise CacheError(
            f"cannot open cache location {text}: {error}",
            hint="use a folder path or an fsspec URL whose filesystem package is installed",
        ) from error
    return text, fs, root, None, async_fs


def _check_local(folder: Path, url: str) -> None:
    """Fail early when a local cache folder could never be written."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CacheError(f"cache location {url} is not usable: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(
            f"cache folder {url} is not writable ({probe})",
            hint="choose another cache folder or fix its permissions",
        )


def _create_in_place(path: str, data: bytes) -> bool:
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return True


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time from an fsspec info dict, whatever the backend calls it."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created", "ctime"):
        value = info.get(field)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None
