"""Direct shard reads and writes round-trip every layout bit for bit, like zarr's own."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import pytest
import torch

from editflow.cache import Cache, DamagedEntryError, Entry

CASES = {
    "noise, one step per chunk": torch.randn(6, 1, 4, 64, 64),
    "tiny latents, steps share a chunk": torch.randn(100, 1, 4, 8, 8),
    "odd sizes": torch.randn(7, 3, 5),
    "attention maps fp16": torch.rand(5, 4, 64, 77).half(),
    "bfloat16 trajectory": torch.randn(11, 1, 4, 8, 8).bfloat16(),
    "masks as bool": torch.rand(4, 1, 16, 16) > 0.5,
}


@pytest.mark.parametrize("value", CASES.values(), ids=list(CASES))
def test_direct_and_zarr_paths_agree_bit_for_bit(
    value: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "5a" * 32
    cache = Cache(tmp_path / "cache")
    cache.put(key, {"x": value}, {}, stream_axis={"x": 0})
    direct = cache.get(key)
    whole, steps = direct.tensor("x"), [direct.step("x", i) for i in range(len(value))]
    assert direct._shards["x"] is not None, "this layout is read directly"
    monkeypatch.setattr(Entry, "_read_direct", lambda self, name, info, selection: None)
    through_zarr = cache.get(key)
    assert torch.equal(whole, value) and torch.equal(through_zarr.tensor("x"), value)
    for index, step in enumerate(steps):
        assert torch.equal(step, value[index])
        assert torch.equal(through_zarr.step("x", index), value[index])
    assert cache.verify() == []


def test_compressed_arrays_are_left_to_zarr(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    value = torch.zeros(8, 4, 64, 64)
    with cache.writer("6b" * 32, {}) as writer:
        writer.write("x", value, stream_axis=0, compress=True)
    entry = cache.get("6b" * 32)
    assert entry.arrays["x"].codec == "zstd"
    assert torch.equal(entry.tensor("x"), value) and entry._shards["x"] is None


def _stream(cache: Cache, key: str, value: torch.Tensor, order: list[int] | None = None) -> None:
    with cache.writer(key, {}) as writer:
        stream = writer.create_stream("x", tuple(value.shape), value.dtype)
        for index in order if order is not None else range(len(value)):
            stream[index] = value[index]


def _shard_files(tmp_path: Path, key: str) -> list[str]:
    folder = next((tmp_path / "cache" / "objects" / key).iterdir()) / "x"
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("shard_steps", [None, 3], ids=["one shard", "3 steps a shard"])
@pytest.mark.parametrize("order", ["in order", "shuffled, one step twice"])
def test_a_stream_written_straight_to_its_shard_files_is_zarrs_bit_for_bit(
    shard_steps: int | None, order: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from editflow.cache import writer

    value = torch.rand(8, 8, 64, 64).half()  # 64 KiB steps: one a chunk
    if shard_steps is not None:  # the layout entries were written with before (16 MiB shards)
        monkeypatch.setattr(writer, "LOCAL_STREAM_SHARD_BYTES", shard_steps * 8 * 64 * 64 * 2)
    steps = [0, 1, 2, 3, 4, 5, 6, 7] if order == "in order" else [5, 0, 7, 2, 2, 6, 1, 3, 4]
    cache = Cache(tmp_path / "cache")
    key = "c7" * 32
    _stream(cache, key, value, steps)
    expected = 1 if shard_steps is None else 3
    assert len(_shard_files(tmp_path, key)) == expected + 1  # and the zarr.json
    entry = cache.get(key)
    assert torch.equal(entry.tensor("x"), value)
    assert all(torch.equal(entry.step("x", i), value[i]) for i in range(len(value)))
    assert entry._shards["x"] is not None, "read straight from the shard files"
    monkeypatch.setattr(Entry, "_read_direct", lambda self, name, info, selection: None)
    through_zarr = cache.get(key)
    assert torch.equal(through_zarr.tensor("x"), value)
    assert all(torch.equal(through_zarr.step("x", i), value[i]) for i in range(len(value)))
    assert cache.verify() == []


def test_steps_sharing_a_chunk_are_written_in_place_and_padded_as_zarr_pads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = torch.randn(100, 1, 4, 8, 8)  # 1 KiB steps: 64 a chunk, the second part empty
    cache = Cache(tmp_path / "cache")
    _stream(cache, "c8" * 32, value)
    entry = cache.get("c8" * 32)
    assert entry.arrays["x"].chunks[0] == 64
    assert torch.equal(entry.tensor("x"), value) and entry._shards["x"] is not None
    assert torch.equal(entry.step("x", 99), value[99])
    monkeypatch.setattr(Entry, "_read_direct", lambda self, name, info, selection: None)
    assert torch.equal(cache.get("c8" * 32).tensor("x"), value)


def _open_descriptors(folder: Path) -> int:
    """Files this process holds open under ``folder`` (only those: other tests' leftovers and
    the test runner's own files come and go)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            count += os.readlink(f"/proc/self/fd/{name}").startswith(f"{folder.resolve()}{os.sep}")
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_a_stream_abandoned_midway_closes_its_files_and_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    value = torch.rand(6, 8, 64, 64).half()
    before = _open_descriptors(tmp_path)
    with pytest.raises(RuntimeError, match="stage failed"):
        with cache.writer("c9" * 32, {}) as writer:
            stream = writer.create_stream("x", tuple(value.shape), value.dtype)
            for index in range(3):
                stream[index] = value[index]
            assert _open_descriptors(tmp_path) == before + 1  # the shard file, being written
            raise RuntimeError("stage failed")
    assert _open_descriptors(tmp_path) == before
    assert cache.get("c9" * 32) is None
    staged = tmp_path / "cache" / "objects" / ("c9" * 32)
    assert not staged.exists() or list(staged.iterdir()) == []  # gc removes the empty folder
    with pytest.raises(RuntimeError, match="finished EntryWriter"):
        stream[3] = value[3]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_a_reader_keeps_its_shard_files_open_until_it_is_dropped(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    value = torch.rand(4, 8, 64, 64).half()
    _stream(cache, "ca" * 32, value)
    before = _open_descriptors(tmp_path)
    entry = cache.get("ca" * 32)
    for index in range(len(value)):  # one open file for every step: the kernel reads ahead
        assert torch.equal(entry.step("x", index), value[index])
    assert _open_descriptors(tmp_path) == before + 1
    del entry
    gc.collect()
    assert _open_descriptors(tmp_path) == before


def test_a_shard_file_shorter_than_its_index_says_is_damage(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    value = torch.rand(4, 8, 64, 64).half()
    _stream(cache, "cb" * 32, value)
    folder = next((tmp_path / "cache" / "objects" / ("cb" * 32)).iterdir()) / "x"
    shard = folder / "c.0.0.0.0"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # the index at the end is gone
    with pytest.raises(DamagedEntryError):
        cache.get("cb" * 32).tensor("x")
