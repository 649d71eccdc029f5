"""The zarr metadata a local writer writes itself is the document zarr writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

from editflow.cache import Cache
from editflow.cache.metadata import array_metadata, group_metadata
from editflow.cache.writer import chunk_layout

DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip
LAYOUTS = {
    "one chunk": ((1, 4, 8, 8), None),
    "steps share a chunk, sharded": ((100, 1, 4, 8, 8), 0),
    "one step per chunk, sharded": ((6, 1, 4, 64, 64), 0),
    "stream along axis 1": ((3, 5, 7), 1),
}


@pytest.mark.parametrize("separator", ["/", "."])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_array_metadata_is_zarrs(dtype: str, layout: tuple, separator: str, tmp_path: Path) -> None:
    shape, axis = layout
    numpy_dtype = np.dtype(dtype)
    chunks, shards = chunk_layout(shape, numpy_dtype.itemsize, axis, True, 2**20)
    group = zarr.open_group(LocalStore(tmp_path), mode="w-")
    encoding = {"name": "default", "separator": separator}
    group.create_array("x", shape=shape, dtype=numpy_dtype, chunks=chunks, shards=shards,
                       compressors=None, chunk_key_encoding=encoding)  # fmt: skip
    written = json.loads((tmp_path / "x" / "zarr.json").read_text())
    assert array_metadata(shape, numpy_dtype, chunks, shards, separator) == written


def test_group_metadata_is_zarrs(tmp_path: Path) -> None:
    attributes = {"editflow_staging": {"key": "ab" * 32, "pid": 7, "started": 1.5}}
    zarr.open_group(LocalStore(tmp_path), mode="w-", attributes=attributes)
    assert group_metadata(attributes) == json.loads((tmp_path / "zarr.json").read_text())


def test_entries_written_without_zarr_open_in_zarr_and_round_trip(tmp_path: Path) -> None:
    values = {
        "noise": torch.randn(100, 1, 4, 16, 16),
        "latents": torch.randn(1, 4, 8, 8),
        "mask": torch.rand(1, 1, 8, 8) > 0.5,
        "trajectory": torch.randn(5, 3, 7).bfloat16(),
        "packed": torch.randn(9, 1, 4, 8, 8),
    }
    cache = Cache(tmp_path / "cache")
    key = "c3" * 32
    with cache.writer(key, {}) as writer:
        for name, value in values.items():
            axis = {"noise": 0, "trajectory": 1}.get(name)
            writer.write(name, value, stream_axis=axis, compress=name == "packed")
        stream = writer.create_stream("streamed", (4, 2, 3), torch.float16, stream_axis=1)
        streamed = torch.randn(4, 2, 3).half()
        for index in (1, 0):  # out of order: read back through zarr to checksum
            stream[index] = streamed[:, index]
    values["streamed"] = streamed
    entry = cache.get(key)
    for name, value in values.items():
        assert torch.equal(entry.tensor(name), value), name
    folder = next((tmp_path / "cache" / "objects" / key).iterdir())
    group = zarr.open_group(LocalStore(folder), mode="r")
    assert sorted(group.array_keys()) == sorted(values)
    assert np.array_equal(group["noise"][...], values["noise"].numpy())
    assert cache.verify() == []
    # Local raw arrays keep their shard file beside their metadata; zarr's own keep "c/...".
    assert (folder / "noise" / "c.0.0.0.0.0").is_file()
    assert (folder / "packed" / "c").is_dir()
    assert entry.arrays["noise"].chunk_separator == "."
    assert entry.arrays["packed"].chunk_separator == "/"


def test_entries_of_caches_written_with_zarrs_folder_keys_still_read_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from editflow.cache import writer

    value = torch.randn(100, 1, 4, 16, 16)
    cache = Cache(tmp_path / "cache")
    monkeypatch.setattr(writer, "LOCAL_SEPARATOR", "/")  # as editflow wrote entries before
    cache.put("d4" * 32, {"noise": value}, {}, stream_axis={"noise": 0})
    monkeypatch.undo()
    ref = tmp_path / "cache" / "refs" / "d4" / f"{'d4' * 32}.json"
    manifest = json.loads(ref.read_text())
    del manifest["arrays"]["noise"]["chunk_separator"]  # manifests had no such field
    ref.write_text(json.dumps(manifest))
    folder = next((tmp_path / "cache" / "objects" / ("d4" * 32)).iterdir())
    assert (folder / "noise" / "c" / "0" / "0" / "0" / "0" / "0").is_file()
    entry = Cache(tmp_path / "cache").get("d4" * 32)
    assert torch.equal(entry.tensor("noise"), value)
    assert torch.equal(entry.step("noise", 7), value[7])
    assert entry._shards["noise"] is not None, "read straight from the shard file"


def test_a_local_stream_of_several_shards_round_trips_through_zarr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from editflow.cache import writer

    monkeypatch.setattr(writer, "LOCAL_STREAM_SHARD_BYTES", 3 * 8 * 64 * 64 * 2)  # 3 a shard
    value = torch.rand(8, 8, 64, 64).half()  # 64 KiB steps: one a chunk
    cache = Cache(tmp_path / "cache")
    with cache.writer("e5" * 32, {}) as entry_writer:
        stream = entry_writer.create_stream("maps", tuple(value.shape), torch.float16)
        for index in range(len(value)):
            stream[index] = value[index]
    entry = cache.get("e5" * 32)
    assert entry.arrays["maps"].shards[0] == 3
    folder = next((tmp_path / "cache" / "objects" / ("e5" * 32)).iterdir()) / "maps"
    assert sorted(p.name for p in folder.iterdir()) == [
        "c.0.0.0.0",
        "c.1.0.0.0",
        "c.2.0.0.0",
        "zarr.json",
    ]
    assert torch.equal(entry.tensor("maps"), value)
    assert all(torch.equal(entry.step("maps", i), value[i]) for i in range(len(value)))
    assert cache.verify() == []
