"""Streamed maps read one step ahead on a background thread: same bytes, same errors."""

from __future__ import annotations

import threading

import pytest
import torch

from editflow.cache import Cache, DamagedEntryError, Entry, StreamedMaps, StreamWriter

KEY = "f3" * 32
STEPS = 5
# 64 KiB per layer-step in fp16: one chunk per step, as at Stable Diffusion sizes.
LAYERS = {"down": (STEPS, 4, 64, 128), "up": (STEPS, 4, 64, 128)}


def write_maps(cache: Cache) -> dict[str, torch.Tensor]:
    values = {name: torch.rand(shape).half() for name, shape in LAYERS.items()}
    with cache.writer(KEY, {}) as writer:
        stream = StreamWriter(writer, "attention_maps", LAYERS, torch.float16, None)
        for step in range(STEPS):
            stream.write(step, {name: value[step] for name, value in values.items()})
        writer.set_attrs(streams={"attention_maps": stream.description()})
    return values


@pytest.fixture
def maps(cache: Cache) -> dict[str, torch.Tensor]:
    return write_maps(cache)


def test_prefetching_reads_the_same_bytes_in_the_same_order(
    cache: Cache, maps: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, str]] = []
    original = Entry.step

    def recorded(self: Entry, name: str, index: int) -> torch.Tensor:
        reads.append((index, threading.current_thread().name))
        return original(self, name, index)

    monkeypatch.setattr(Entry, "step", recorded)
    plain = StreamedMaps(cache, KEY, "attention_maps", prefetch=False)
    ahead = StreamedMaps(cache, KEY, "attention_maps", prefetch=True)
    for step in range(STEPS):
        expected = {name: value[step] for name, value in maps.items()}
        for reader in (plain, ahead):
            got = reader.step(step)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert plain.bytes_read == ahead.bytes_read
    prefetched = [index for index, thread in reads if thread.startswith("editflow-prefetch")]
    assert prefetched == [1, 1, 2, 2, 3, 3, 4, 4]  # two layers per step, always one step ahead


def test_a_failed_prefetch_fails_the_step_that_asks_for_it(tmp_path) -> None:
    cache = Cache(tmp_path / "cache")
    write_maps(cache)
    entry = cache.get(KEY)
    assert cache.local_root is not None
    layer = entry.attrs["streams"]["attention_maps"]["layers"]["down"][0]
    folder = cache.local_root / "objects" / KEY / entry.object_id / layer
    shard = next(path for path in folder.rglob("*") if path.is_file() and path.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    step_bytes = 4 * 64 * 128 * 2
    data[2 * step_bytes + 100] ^= 0xFF  # inside step 2 of the 'down' layer
    shard.write_bytes(bytes(data))
    reader = StreamedMaps(cache, KEY, "attention_maps", prefetch=True)
    reader.step(0)
    reader.step(1)  # step 2 is read (and fails) in the background meanwhile
    with pytest.raises(DamagedEntryError, match="at step 2"):
        reader.step(2)


def test_prefetching_is_on_by_default_only_for_big_steps(cache: Cache, maps) -> None:
    reader = StreamedMaps(cache, KEY, "attention_maps")
    assert reader.step_bytes == 2 * 4 * 64 * 128 * 2  # two fp16 layers
    reader.step(0)
    assert reader.prefetch is False  # 128 KiB a step: read in line
