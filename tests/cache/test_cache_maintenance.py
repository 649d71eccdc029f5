"""ls, du, rm, gc and records."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from editflow.cache import Cache, EntryWriter

KEYS = ["e5" * 32, "f6" * 32, "a7" * 32]


def _orphan(cache: Cache, key: str) -> EntryWriter:
    """A writer whose process died mid-write: staged data, never published or cleaned."""
    writer = cache.writer(key, {})
    writer.__enter__()
    writer.write("latent", torch.randn(8, 8))
    return writer


def test_ls_lists_published_entries_with_attrs_and_sizes(cache: Cache) -> None:
    cache.put(KEYS[0], {"latent": torch.randn(4, 4)}, {"stage": "invert"})
    cache.put(KEYS[1], {"image": torch.zeros(3, 8, 8, dtype=torch.uint8)}, {"stage": "decode"})
    _orphan(cache, KEYS[2])

    infos = cache.ls()

    assert [info.key for info in infos] == KEYS[:2]
    assert [info.attrs["stage"] for info in infos] == ["invert", "decode"]
    assert infos[1].arrays == ("image",)
    assert all(info.stored_bytes > 0 for info in infos)
    assert infos[0].created <= infos[1].created <= time.time()


def test_du_counts_entries_and_staging_data(cache: Cache) -> None:
    cache.put(KEYS[0], {"latent": torch.randn(16, 16)}, {})
    _orphan(cache, KEYS[1])

    usage = cache.du()

    assert usage.entries == 1
    assert usage.entry_bytes == cache.ls()[0].stored_bytes
    assert usage.staging_objects == 1 and usage.staging_bytes > 0
    assert usage.total_bytes > usage.entry_bytes + usage.staging_bytes  # refs, marker


def test_rm_discards_published_entries_and_counts_them(
    cache: Cache, stored_files: Callable[[str], list[str]]
) -> None:
    for key in KEYS[:2]:
        cache.put(key, {"latent": torch.randn(2)}, {})

    assert cache.rm([KEYS[0], KEYS[2]]) == 1

    assert not cache.has(KEYS[0]) and cache.has(KEYS[1])
    assert {path.split("/")[0] for path in stored_files("objects")} == {KEYS[1]}


def test_gc_removes_old_orphans_and_keeps_fresh_ones(cache: Cache) -> None:
    cache.put(KEYS[0], {"latent": torch.randn(2)}, {})
    _orphan(cache, KEYS[1])
    time.sleep(0.6)
    fresh = _orphan(cache, KEYS[2])

    report = cache.gc(older_than_s=0.3)

    assert report.removed_staging == 1 and report.freed_bytes > 0
    assert report.removed_entries == ()
    assert cache.du().staging_objects == 1
    fresh.__exit__(None, None, None)  # the writer still at work was not broken
    assert fresh.won and cache.has(KEYS[2]) and cache.has(KEYS[0])
    assert cache.verify() == []


def test_gc_default_threshold_removes_an_hour_old_orphan(tmp_path: Path) -> None:
    cache = Cache(tmp_path)  # local only: file times can be set
    old = _orphan(cache, KEYS[0])
    _orphan(cache, KEYS[1])
    old_folder = cache.local_root / "objects" / KEYS[0] / old.object_id
    two_hours_ago = time.time() - 7200
    for folder, _, files in os.walk(old_folder):
        for name in files:
            os.utime(os.path.join(folder, name), (two_hours_ago, two_hours_ago))

    assert cache.gc().removed_staging == 1
    assert not old_folder.exists()
    assert cache.du().staging_objects == 1


def test_gc_drops_entries_that_keep_rejects(cache: Cache) -> None:
    cache.put(KEYS[0], {"latent": torch.randn(2)}, {"recipe": "keep.toml"})
    cache.put(KEYS[1], {"latent": torch.randn(2)}, {"recipe": "old.toml"})

    report = cache.gc(keep=lambda info: info.attrs["recipe"] == "keep.toml")

    assert report.removed_entries == (KEYS[1],)
    assert cache.has(KEYS[0]) and not cache.has(KEYS[1])
    assert cache.du().entries == 1


def test_records_round_trip_and_overwrite(cache: Cache) -> None:
    name = "recipes/edit cat.toml/stage:invert"
    assert cache.get_record(name) is None

    cache.put_record(name, {"key": KEYS[0]})
    assert cache.get_record(name) == {"key": KEYS[0]}

    cache.put_record(name, {"key": KEYS[1], "seed": 3})
    assert cache.get_record(name) == {"key": KEYS[1], "seed": 3}
    assert cache.get_record("recipes/other") is None
    assert cache.ls() == []  # records are not entries
