"""Whole-cache operations behind ``editflow cache ls | du | verify | gc | rm``."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .entry import Damage, DamagedEntryError, Entry
from .layout import FileStat, Layout, check_key, is_temporary


@dataclass(frozen=True)
class EntryInfo:
    """A published entry as listed by ``Cache.ls``.

    Attributes:
        key: The cache key.
        attrs: The entry's JSON attributes (stage, recipe, timings, key preimage ...).
        arrays: Names of its arrays.
        stored_bytes: Bytes on storage, compressed, metadata included.
        created: Publication time (seconds since the epoch).
        object_id: Name of the object folder holding its data.
    """

    key: str
    attrs: dict[str, Any]
    arrays: tuple[str, ...]
    stored_bytes: int
    created: float
    object_id: str


@dataclass(frozen=True)
class DiskUsage:
    """Bytes under a cache root, split into published entries and staging leftovers.

    Attributes:
        total_bytes: Every file under the root (refs and records included).
        entries: Number of published entries.
        entry_bytes: Bytes of published entries' data.
        staging_bytes: Bytes of object folders no ref points to (writes in progress, crashed
            or lost writers); ``gc`` removes them once old enough.
        staging_objects: Number of such object folders.
    """

    total_bytes: int
    entries: int
    entry_bytes: int
    staging_bytes: int
    staging_objects: int


@dataclass(frozen=True)
class GcReport:
    """What ``Cache.gc`` removed."""

    removed_staging: int
    removed_entries: tuple[str, ...]
    freed_bytes: int


def published_keys(layout: Layout) -> list[str]:
    """Keys that have a ref, sorted (their manifests are not read)."""
    keys = []
    for stat in layout.files(layout.path("refs")):
        name = stat.path.rsplit("/", 1)[-1]
        if not is_temporary(stat.path) and name.endswith(".json"):
            keys.append(name.removesuffix(".json"))
    return sorted(keys)


def published(layout: Layout) -> dict[str, Any]:
    """Key -> parsed manifest of every ref (None where the manifest is not valid JSON)."""
    manifests: dict[str, Any] = {}
    for key in published_keys(layout):
        try:
            manifests[key] = layout.read_json(layout.ref_path(key))
        except ValueError:
            manifests[key] = None
    return manifests


def list_entries(layout: Layout) -> list[EntryInfo]:
    """Published entries with readable manifests, oldest first."""
    infos = []
    for key, manifest in published(layout).items():
        if manifest is None:
            continue  # unreadable (or unpublished meanwhile); verify reports it
        try:
            entry = Entry.from_manifest(layout, key, manifest)
        except DamagedEntryError:
            continue  # verify reports it
        infos.append(
            EntryInfo(
                key=key,
                attrs=entry.attrs,
                arrays=tuple(entry.arrays),
                stored_bytes=entry.stored_bytes,
                created=entry.created,
                object_id=entry.object_id,
            )
        )
    return sorted(infos, key=lambda info: (info.created, info.key))


def disk_usage(layout: Layout) -> DiskUsage:
    """Sizes of everything under the root, by published entry and staging object."""
    live = _live_objects(layout)
    objects = _objects(layout)
    entry_bytes = sum(_size(stats) for place, stats in objects.items() if place in live)
    staging = {place: stats for place, stats in objects.items() if place not in live}
    return DiskUsage(
        total_bytes=_size(layout.files(layout.root)),
        entries=len(live),
        entry_bytes=entry_bytes,
        staging_bytes=sum(_size(stats) for stats in staging.values()),
        staging_objects=len(staging),
    )


def verify(layout: Layout, keys: Iterable[str] | None) -> list[Damage]:
    """Recompute every checksum of the given (default: all published) entries.

    Damaged entries are also remembered as damaged, so ``Cache.has`` turns False for them.
    Keys that are not published are skipped.
    """
    damages: list[Damage] = []
    for key in published_keys(layout) if keys is None else [check_key(key) for key in keys]:
        try:
            manifest = layout.read_json(layout.ref_path(key))
            if manifest is None:
                continue
            entry = Entry.from_manifest(layout, key, manifest)
        except ValueError as error:  # not JSON at all
            layout.mark_damaged(key, None, f"manifest unreadable: {error}")
            damages.append(Damage(key, None, f"manifest unreadable: {error}"))
            continue
        except DamagedEntryError as error:
            damages.append(Damage(key, None, error.reason))
            continue
        damages.extend(entry.check())
    return damages


def collect_garbage(
    layout: Layout, keep: Callable[[EntryInfo], bool] | None, older_than_s: float
) -> GcReport:
    """Remove old staging leftovers and the published entries ``keep`` rejects.

    Staging data (object folders no ref points to, temporary files) is removed only when its
    newest file is older than ``older_than_s``, so a writer still at work is never broken.
    Files whose backend reports no modification time are kept.
    """
    cutoff = time.time() - older_than_s
    removed_entries = []
    freed = 0
    if keep is not None:
        for info in list_entries(layout):
            if not keep(info):
                layout.discard(info.key)
                removed_entries.append(info.key)
                freed += info.stored_bytes
    live = _live_objects(layout)
    removed_staging = 0
    for (key, object_id), stats in _objects(layout).items():
        newest = max((stat.mtime for stat in stats if stat.mtime is not None), default=None)
        if (key, object_id) in live or newest is None or newest >= cutoff:
            continue
        layout.remove(layout.object_path(key, object_id))
        removed_staging += 1
        freed += _size(stats)
    for folder in ("refs", "records", "damaged"):
        for stat in layout.files(layout.path(folder)):
            if is_temporary(stat.path) and stat.mtime is not None and stat.mtime < cutoff:
                layout.remove(stat.path)
                freed += stat.size
    for folder in ("objects", "refs", "damaged"):
        layout.remove_empty_folders(layout.path(folder), cutoff)
    return GcReport(removed_staging, tuple(removed_entries), freed)


def _live_objects(layout: Layout) -> set[tuple[str, str]]:
    return {
        (key, manifest["object"])
        for key, manifest in published(layout).items()
        if isinstance(manifest, dict) and isinstance(manifest.get("object"), str)
    }


def _objects(layout: Layout) -> dict[tuple[str, str], list[FileStat]]:
    """Files under ``objects/``, grouped by (key, object id)."""
    prefix = layout.path("objects") + "/"
    grouped: dict[tuple[str, str], list[FileStat]] = defaultdict(list)
    for stat in layout.files(layout.path("objects")):
        parts = stat.path.removeprefix(prefix).split("/")
        if stat.path.startswith(prefix) and len(parts) >= 3:
            grouped[(parts[0], parts[1])].append(stat)
    return dict(grouped)


def _size(stats: Iterable[FileStat]) -> int:
    return sum(stat.size for stat in stats)
