"""Cache throughput on local disk (page cache warm), against np.save / np.load of the same array.

Two arrays, as editflow stores them: a 100-step noise sequence (100x4x64x64 fp32, one step per
chunk, raw) and Stable-Diffusion-sized cross-attention maps (fp16, one chunk per layer-step).
Prints write and whole-read throughput, each as a ratio to numpy's, and the time of one step's
read from an open entry (what a streaming consumer pays per step).

    python bench/bench_cache.py [--repeats 7] [--map-steps 10]
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from support import warm_guest_memory

from editflow.cache import Cache

MIB = 2**20
# SD 1.x at 512 px, conditional half, 16 cross-attention layers: (heads, queries, 77 tokens).
SD_MAP_LAYERS = [(8, 4096, 77)] * 6 + [(8, 1024, 77)] * 4 + [(8, 256, 77)] * 4 + [(8, 64, 77)] * 2


def _median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_array(
    label: str, arrays: dict[str, torch.Tensor], work: Path, repeats: int, streamed: bool = False
) -> None:
    megabytes = sum(a.numel() * a.element_size() for a in arrays.values()) / MIB
    counter = iter(range(10**6))

    def write() -> str:
        key = f"{next(counter):064x}"
        cache = Cache(work / "cache")
        if not streamed:
            cache.put(key, arrays, {}, stream_axis=dict.fromkeys(arrays, 0))
            return key
        with cache.writer(key, {}) as writer:  # step by step, as a stage streams its maps
            handles = {
                n: writer.create_stream(n, tuple(a.shape), a.dtype) for n, a in arrays.items()
            }
            for step in range(next(iter(arrays.values())).shape[0]):
                for name, value in arrays.items():
                    handles[name][step] = value[step]
        return key

    write_s = _median_seconds(write, repeats)
    key = write()
    cache = Cache(work / "cache")

    def read() -> None:
        entry = cache.get(key)
        for name in arrays:
            entry.tensor(name)

    read_s = _median_seconds(read, repeats)
    entry = cache.get(key)
    first = next(iter(arrays))
    entry.step(first, 0)  # opens the array once, as a streaming reader does
    step_s = _median_seconds(lambda: [entry.step(name, 1) for name in arrays], repeats)

    numpy_arrays = {name: a.numpy() for name, a in arrays.items()}

    saves = iter(range(10**6))

    def np_save() -> None:  # new files, as every cache entry is: no overwrite of a hot file
        index = next(saves)
        for name, a in numpy_arrays.items():
            np.save(work / f"{name}-{index}.npy", a)

    def np_load() -> None:
        for name in numpy_arrays:
            np.load(work / f"{name}-0.npy")

    np_write = _median_seconds(np_save, repeats)
    np_read = _median_seconds(np_load, repeats)
    print(f"{label} ({megabytes:.1f} MiB), median of {repeats}:")
    print(
        f"  write {megabytes / write_s:7.0f} MiB/s   np.save {megabytes / np_write:7.0f} MiB/s"
        f"   ratio {np_write / write_s:.2f}"
    )
    print(
        f"  read  {megabytes / read_s:7.0f} MiB/s   np.load {megabytes / np_read:7.0f} MiB/s"
        f"   ratio {np_read / read_s:.2f}"
    )
    print(f"  one step of every array from an open entry: {step_s * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--map-steps", type=int, default=10, help="steps of SD-sized maps")
    parser.add_argument(
        "--warm-gib", type=float, default=6.0, help="memory to touch first (0: none)"
    )
    args = parser.parse_args()
    if args.warm_gib > 0:
        warm_guest_memory(args.warm_gib)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(100, 4, 64, 64, generator=generator)
    maps = {
        f"layer{index}": torch.rand((args.map_steps, *shape), generator=generator)
        .softmax(-1)
        .half()
        for index, shape in enumerate(SD_MAP_LAYERS)
    }
    with tempfile.TemporaryDirectory() as folder:
        bench_array("noise sequence 100x4x64x64 fp32", {"noise": noise}, Path(folder), args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        bench_array(
            f"SD 1.x attention maps, {args.map_steps} steps x 16 layers fp16, written step by step",
            maps,
            Path(folder),
            args.repeats,
            streamed=True,
        )


if __name__ == "__main__":
    main()
