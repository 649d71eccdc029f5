"""Writing and reading entries: dtypes, attrs, streams, fresh copies, one-chunk step reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editflow.cache import Cache

KEY = "a1" * 32


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool, torch.int64]
)
def test_put_get_round_trips_dtype_exactly(cache: Cache, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    value = (torch.randn(3, 5, 7, generator=generator) * 50).to(dtype)

    cache.put(KEY, {"value": value}, {"stage": "test"})

    read = cache.get(KEY).tensor("value")
    assert read.dtype == dtype
    assert torch.equal(read, value)


def test_bfloat16_is_stored_as_float32_and_restored(cache: Cache) -> None:
    value = torch.randn(4, 4).bfloat16()
    entry = cache.put(KEY, {"latent": value}, {})
    assert entry.arrays["latent"].dtype == "float32"
    assert entry.arrays["latent"].torch_dtype == "bfloat16"
    assert torch.equal(cache.get(KEY).tensor("latent"), value)


def test_stream_array_and_attrs_round_trip(cache: Cache) -> None:
    noise_maps = torch.randn(10, 1, 4, 8, 8)  # (T, B, C, H, W)
    attrs = {"stage": "invert", "recipe": "r.toml", "preimage": {"seed": 3, "cfg": 3.5}}

    cache.put(KEY, {"noise_maps": noise_maps}, attrs, stream_axis={"noise_maps": 0})

    entry = cache.get(KEY)
    assert entry.attrs == attrs
    info = entry.arrays["noise_maps"]
    assert info.shape == (10, 1, 4, 8, 8)
    assert info.chunks == (10, 1, 4, 8, 8)  # 1 KiB steps share a chunk
    assert info.stream_axis == 0
    assert torch.equal(entry.tensor("noise_maps"), noise_maps)
    for step in (0, 4, -1):
        assert torch.equal(entry.step("noise_maps", step), noise_maps[step])


def test_big_steps_get_one_chunk_each_inside_shards(cache: Cache) -> None:
    noise_maps = torch.randn(6, 1, 4, 64, 64)  # SD 1.x latents: 64 KiB per step
    cache.put(KEY, {"noise_maps": noise_maps}, {}, stream_axis={"noise_maps": 0})
    info = cache.get(KEY).arrays["noise_maps"]
    assert info.chunks == (1, 1, 4, 64, 64)
    assert info.shards == (6, 1, 4, 64, 64)  # few files, each step still read alone


def test_numpy_arrays_and_scalars_come_back_as_tensors(cache: Cache) -> None:
    scores = np.array([0.25, 0.5, 0.75], dtype=np.float64)
    cache.put(KEY, {"scores": scores, "scale": torch.tensor(2.5), "empty": torch.zeros(0, 3)}, {})
    entry = cache.get(KEY)
    assert torch.equal(entry.tensor("scores"), torch.from_numpy(scores))
    big_endian = np.arange(4, dtype=">i4")
    entry = cache.put("a2" * 32, {"counts": big_endian}, {})
    assert entry.arrays["counts"].dtype == "int32"
    assert entry.tensor("counts").tolist() == [0, 1, 2, 3]
    entry = cache.get(KEY)
    assert entry.tensor("scale").shape == () and entry.tensor("scale").item() == 2.5
    assert entry.tensor("empty").shape == (0, 3)


def test_tensors_handed_out_are_fresh_copies(cache: Cache) -> None:
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    original = value.clone()
    entry = cache.put(KEY, {"value": value}, {}, stream_axis={"value": 0})
    value.add_(100)  # the caller's tensor is not the cache's

    first = entry.tensor("value")
    first.mul_(0)
    entry.step("value", 1).mul_(0)

    assert torch.equal(entry.tensor("value"), original)
    assert torch.equal(cache.get(KEY).tensor("value"), original)


def test_step_reads_one_chunk_not_the_whole_array(cache: Cache) -> None:
    attention_maps = torch.randn(10, 1, 4, 64, 64)  # random: compresses poorly, sizes are real
    cache.put(KEY, {"attention_maps": attention_maps}, {}, stream_axis={"attention_maps": 0})
    entry = cache.get(KEY)
    entry.step("attention_maps", 0)  # opens the array (reads its metadata once)

    before = entry.reads.bytes, entry.reads.requests
    step = entry.step("attention_maps", 7)
    read_bytes = entry.reads.bytes - before[0]
    read_requests = entry.reads.requests - before[1]

    assert torch.equal(step, attention_maps[7])
    assert read_requests <= 2  # the chunk plus the shard index
    assert read_bytes < entry.stored_bytes / 5
    whole = entry.reads.bytes
    entry.tensor("attention_maps")
    assert entry.reads.bytes - whole > 8 * read_bytes


def test_stream_written_step_by_step_matches_tensor(cache: Cache) -> None:
    attention = torch.randn(6, 2, 16, 5)  # (steps, heads, H*W, tokens)
    with cache.writer(KEY, {"stage": "sample"}) as writer:
        handle = writer.create_stream("attention", tuple(attention.shape), torch.float16)
        buffer = torch.empty(2, 16, 5)
        for step in range(6):
            buffer.copy_(attention[step])  # reusing one buffer must not alter earlier steps
            handle[step] = buffer
        writer.set_attrs(seconds=1.5)

    assert writer.won
    entry = cache.get(KEY)
    assert entry.attrs == {"stage": "sample", "seconds": 1.5}
    assert entry.arrays["attention"].dtype == "float16"
    assert torch.equal(entry.tensor("attention"), attention.half())
    assert torch.equal(entry.step("attention", 3), attention[3].half())


def test_stream_written_out_of_order_on_a_middle_axis(cache: Cache) -> None:
    maps = torch.randn(2, 5, 3)
    with cache.writer(KEY, {}) as writer:
        handle = writer.create_stream("maps", (2, 5, 3), torch.bfloat16, stream_axis=1)
        for index in (4, 0, 2, 1, 3, 2):
            handle[index] = maps[:, index]

    entry = cache.get(KEY)
    assert torch.equal(entry.tensor("maps"), maps.bfloat16())
    assert torch.equal(entry.step("maps", 2), maps[:, 2].bfloat16())
    assert cache.verify() == []


def test_unwritten_stream_steps_fail_the_write_and_publish_nothing(cache: Cache) -> None:
    with pytest.raises(ValueError, match=r"steps \[2\] were never written"):
        with cache.writer(KEY, {}) as writer:
            handle = writer.create_stream("noise", (3, 4), torch.float32)
            handle[0] = torch.zeros(4)
            handle[1] = torch.ones(4)
    assert not cache.has(KEY)


def test_missing_key_is_not_there(cache: Cache) -> None:
    assert not cache.has(KEY)
    assert cache.get(KEY) is None


def test_step_on_an_array_without_stream_axis_is_an_error(cache: Cache) -> None:
    entry = cache.put(KEY, {"latent": torch.zeros(2, 2)}, {})
    with pytest.raises(ValueError, match="no stream axis"):
        entry.step("latent", 0)
    with pytest.raises(KeyError, match="no array 'other'"):
        entry.tensor("other")


def test_unsupported_values_are_rejected_before_writing(cache: Cache) -> None:
    with pytest.raises(TypeError, match="attrs"):
        cache.put(KEY, {"names": np.array(["a", "b"])}, {})
    with pytest.raises(ValueError, match="plain JSON"):
        cache.put(KEY, {"x": torch.zeros(1)}, {"loss": float("nan")})
    assert not cache.has(KEY)
