"""Attention maps read one step ahead on a background thread: same bytes, same errors."""

from __future__ import annotations

import threading

import pytest
import torch

from editflow.cache import Cache, CachedSteps, DamagedEntryError, Entry, StepsWriter

KEY = "f3" * 32
STEPS = 5
# 64 KiB per layer-step in fp16: one chunk per step, as at Stable Diffusion sizes.
LAYERS = {"down": (STEPS, 4, 64, 128), "up": (STEPS, 4, 64, 128)}


def write_maps(cache: Cache) -> dict[str, torch.Tensor]:
    values = {name: torch.rand(shape).half() for name, shape in LAYERS.items()}
    with cache.writer(KEY, {}) as writer:
        stream = StepsWriter(lambda: writer, "attention_maps", STEPS, dtype=torch.float16)
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
    plain = CachedSteps(cache, KEY, "attention_maps", prefetch=False)
    ahead = CachedSteps(cache, KEY, "attention_maps", prefetch=True)
    for step in range(STEPS):
        expected = {name: value[step] for name, value in maps.items()}
        for reader in (plain, ahead):
            got = reader[step]
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
    reader = CachedSteps(cache, KEY, "attention_maps", prefetch=True)
    reader[0]
    reader[1]  # step 2 is read (and fails) in the background meanwhile
    with pytest.raises(DamagedEntryError, match="at step 2"):
        reader[2]


def test_prefetching_is_on_by_default_only_for_big_steps(cache: Cache, maps) -> None:
    reader = CachedSteps(cache, KEY, "attention_maps")
    assert reader.step_bytes == 2 * 4 * 64 * 128 * 2  # two fp16 layers
    reader[0]
    assert reader.prefetch is False  # 128 KiB a step: read in line


def test_the_same_reader_reads_a_tensor_sequence_step_by_step(tmp_path) -> None:
    cache = Cache(tmp_path / "cache")
    noise = torch.randn(STEPS, 4, 64, 64)  # 64 KiB a step: one chunk each
    with cache.writer(KEY, {}) as writer:
        stream = StepsWriter(lambda: writer, "noise_maps", STEPS)
        for step in range(STEPS):
            stream.write(step, noise[step])
        assert stream.description() is None  # found by its name, not in the attributes
    assert stream.result() is None  # no reader was given
    reader = CachedSteps(cache, KEY, "noise_maps", prefetch=True)
    assert len(reader) == STEPS and reader.step_bytes == 4 * 64 * 64 * 4
    assert all(torch.equal(reader[step], noise[step]) for step in range(STEPS))
    assert torch.equal(reader[-1], noise[-1])
    with pytest.raises(IndexError, match="step 5 out of range"):
        reader[STEPS]
