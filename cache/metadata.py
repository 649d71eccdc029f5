"""zarr v3 metadata documents for the groups and raw arrays a local writer stages.

``zarr.open_group`` and ``Group.create_array`` each cost about 4 ms (round trips through
zarr's event loop and existence checks), twice the time of writing a 6 MiB noise sequence's
shard. A local writer stages into a fresh folder nobody else sees, so it writes these small
JSON documents itself, as zarr would; zarr opens such an array only when a write must go
through it. ``tests/cache/test_metadata.py`` compares them with zarr's for every dtype and
layout the cache writes. Compressed arrays and object stores still go through zarr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

METADATA_FILE = "zarr.json"


def _bytes_codec(dtype: np.dtype) -> dict[str, Any]:
    if dtype.itemsize == 1:  # no byte order to record
        return {"name": "bytes"}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def _fill_value(dtype: np.dtype) -> Any:
    if dtype.kind == "b":
        return False
    if dtype.kind == "c":
        return [0.0, 0.0]
    if dtype.kind == "f":
        return 0.0
    return 0


def array_metadata(
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: tuple[int, ...],
    shards: tuple[int, ...] | None,
    separator: str = "/",
) -> dict[str, Any]:
    """The ``zarr.json`` of an uncompressed array with zarr's default chunk key encoding.

    Args:
        shape: The array's shape.
        dtype: A native numeric or bool numpy dtype.
        chunks: Inner chunk shape.
        shards: Shard shape (the chunk grid), or None when unsharded.
        separator: Between the parts of a chunk key (``"c/0/0"`` or ``"c.0.0"``).
    """
    dtype = np.dtype(dtype)
    if shards is None:
        grid, codecs = chunks, [_bytes_codec(dtype)]
    else:
        index_codecs = [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "crc32c"},
        ]
        sharding = {
            "chunk_shape": list(chunks),
            "codecs": [_bytes_codec(dtype)],
            "index_codecs": index_codecs,
            "index_location": "end",
        }
        grid, codecs = shards, [{"name": "sharding_indexed", "configuration": sharding}]
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(grid)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": _fill_value(dtype),
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def group_metadata(attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of a group with these (JSON) attributes."""
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def write_metadata(folder: Path, document: dict[str, Any]) -> None:
    """Create ``folder`` (it must not exist) and its ``zarr.json``."""
    os.makedirs(folder)  # pathlib's mkdir(parents=True) tries each new level twice
    (folder / METADATA_FILE).write_bytes(json.dumps(document, indent=2).encode())
