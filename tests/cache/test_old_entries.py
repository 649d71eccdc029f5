"""Entries written before one-shard streams and pixel-encoded arrays (manifest format 3,
streams in several shard files, images as float32) read as they did, bit for bit: the
fixture ``data/format3`` was written by that cache (``data/make_format3.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from editflow.cache import Cache, CachedSteps, Entry

FIXTURE = Path(__file__).parent / "data" / "format3"
KEY = "a1" * 32


@pytest.fixture
def old_cache(tmp_path: Path) -> Cache:
    shutil.copytree(FIXTURE, tmp_path / "cache")  # reads may mark damage: never in the repo
    return Cache(tmp_path / "cache")


def _everything(cache: Cache) -> dict[str, list[torch.Tensor]]:
    entry = cache.get(KEY)
    steps = CachedSteps(cache, KEY, "attention_maps")
    maps = [steps[index] for index in range(len(steps))]
    return {
        "down": [step["down"] for step in maps],
        "up": [step["up"] for step in maps],
        "noise": [entry.tensor("noise")] + [entry.step("noise", i) for i in range(5)],
        "image": [entry.tensor("image")],
        "maps whole": [entry.tensor("attention_maps.0"), entry.tensor("attention_maps.1")],
    }


def test_an_old_entry_reads_directly_and_through_zarr_alike(
    old_cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = json.loads(next((FIXTURE / "refs").rglob("*.json")).read_text())
    assert manifest["format"] == 3
    assert manifest["arrays"]["attention_maps.0"]["shards"][0] == 3  # 7 steps in 3 files
    direct = _everything(old_cache)  # every read checks its checksum from the old manifest
    entry = old_cache.get(KEY)
    entry.step("attention_maps.0", 6)
    assert entry._shards["attention_maps.0"] is not None, "several shards, read directly"
    assert entry.arrays["image"].encoding is None and direct["image"][0].dtype == torch.float32
    monkeypatch.setattr(Entry, "_read_direct", lambda self, name, info, selection: None)
    through_zarr = _everything(Cache(old_cache.url))
    for name, values in direct.items():
        for mine, zarrs in zip(values, through_zarr[name], strict=True):
            assert torch.equal(mine, zarrs), name
    assert old_cache.verify() == []


def test_a_new_entry_beside_an_old_one_in_the_same_cache(old_cache: Cache) -> None:
    image = old_cache.get(KEY).tensor("image")  # on the 1/255 grid, stored float32 then
    entry = old_cache.put("a2" * 32, {"image": image}, {})
    assert entry.arrays["image"].encoding == "pixels"
    assert entry.arrays["image"].checksum == old_cache.get(KEY).arrays["image"].checksum
    assert torch.equal(old_cache.get("a2" * 32).tensor("image"), image)
    assert old_cache.verify() == []
