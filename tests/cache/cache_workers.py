"""Code run in spawned processes by the concurrency tests (imported by module name there)."""

from __future__ import annotations

from typing import Any

import torch

from editflow.cache import Cache


def write_same_key(root: str, key: str, writer_index: int, barrier: Any, results: Any) -> None:
    """Write an entry for ``key``, wait at ``barrier`` so both writers publish at once."""
    cache = Cache(root)
    noise_maps = torch.arange(6 * 4 * 8, dtype=torch.float32).reshape(6, 4, 8)  # (T, C, W)
    with cache.writer(key, {"writer": writer_index}) as writer:
        writer.write("noise_maps", noise_maps, stream_axis=0)
        handle = writer.create_stream("attention", (6, 8), torch.float16)
        for step in range(6):
            handle[step] = torch.full((8,), float(step))
        barrier.wait(timeout=60)
    results.put(
        {
            "writer": writer_index,
            "won": writer.won,
            "object": writer.object_id,
            "published": writer.published.object_id if writer.published else None,
        }
    )
