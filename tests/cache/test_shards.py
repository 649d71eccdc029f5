"""Direct shard reads and writes round-trip every layout bit for bit, like zarr's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editflow.cache import Cache, Entry

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
