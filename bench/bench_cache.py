"""Cache throughput on local disk against np.save / np.load of the same bytes.

SD 1.5 cross-attention maps as pix2pix-zero's reference pass stores them (conditional half,
heads kept: 16 layers of (8, q, 77) fp16 with q = 4096 x5, 1024 x5, 256 x5, 64 x1, for each
of 50 steps, 1.55 GiB): written a step at a time through ``StepsWriter`` as the engine
does, read back a step at a time through ``CachedSteps`` as a consumer does; numpy saves
and loads each layer's whole (50, 8, q, 77) array, one ``.npy`` a layer.

- write: into the page cache, every file of the bench clean and evicted before each call
  (so no call pays for another's writeback);
- write + fsync: the same, then every file it wrote fsynced (the bytes on disk);
- read warm: from the page cache;
- read cold: the bench's own files fsynced and dropped from the page cache first
  (``posix_fadvise(POSIX_FADV_DONTNEED)``; nothing else is evicted).

Plus the small arrays of before: a 100-step noise sequence (100x4x64x64 fp32) put and read
whole, and one step read from an open entry. Every figure is an interleaved comparison
(editflow, numpy, numpy, editflow ...: ``harness.compare``) with its spread; throughput in
GiB/s is the bytes over each call's wall time.

    python bench/bench_cache.py [--pairs 5] [--map-steps 50]
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import (
    Sample,
    command_line,
    compare,
    format_comparison,
    format_series,
    measure,
    series,
    write_results,
)
from support import warm_guest_memory

from editflow.cache import Cache, CachedSteps, StepsWriter

GIB = 2**30
# SD 1.5 at 512 px, 16 cross-attention layers (down 2+2+2, mid 1, up 3+3+3), conditional
# half of the batch, 8 heads, 77 tokens: (heads, queries, tokens) a step.
SD_MAP_LAYERS = [(8, 4096, 77)] * 5 + [(8, 1024, 77)] * 5 + [(8, 256, 77)] * 5 + [(8, 64, 77)]
OUTPUT = "attention_maps"


def files_under(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """fsync each file, then ask the kernel to drop its pages (the bench's files only)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def fsync_all(paths: Iterable[Path]) -> None:
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def throughput(result: dict[str, Any], nbytes: int) -> dict[str, dict[str, float]]:
    """GiB/s of each side: min / median / max over its calls."""
    sides = result.get("sides") or [result["a"], result["b"]]
    return {
        side: {
            "min": nbytes / GIB / result[side]["wall"]["max"],
            "median": nbytes / GIB / result[side]["wall"]["median"],
            "max": nbytes / GIB / result[side]["wall"]["min"],
        }
        for side in sides
    }


def report(label: str, result: dict[str, Any], nbytes: int) -> dict[str, Any]:
    result["gib_per_s"] = throughput(result, nbytes)
    print(label)
    print(format_comparison(result))
    for side, figures in result["gib_per_s"].items():
        print(
            f"  {side:<34} {figures['median']:.2f} GiB/s"
            f" ({figures['min']:.2f}-{figures['max']:.2f})"
        )
    return result


class MapsBench:
    """One entry of SD-sized maps and one folder of ``.npy`` files, written and read."""

    def __init__(self, work: Path, maps: list[torch.Tensor]) -> None:
        self.work, self.maps = work, maps
        self.arrays = [value.numpy() for value in maps]
        self.nbytes = sum(array.nbytes for array in self.arrays)
        self.steps = len(maps[0])
        self.cache_root = work / "cache"
        self.numpy_root = work / "npy"
        self._keys = (f"{index:064x}" for index in itertools.count())
        self._folders = (self.numpy_root / str(index) for index in itertools.count())
        self.key = self.folder = None  # the latest written, what reads read

    def _clean(self) -> None:
        """Delete what the writes made but the latest, fsync and evict the bench's files."""
        cache = Cache(self.cache_root)
        for info in cache.ls():
            if info.key != self.key:
                cache.rm([info.key])
        if self.numpy_root.exists():
            for folder in self.numpy_root.iterdir():
                if folder != self.folder:
                    shutil.rmtree(folder)
        drop_from_page_cache(files_under(self.work))

    def write_editflow(self) -> Path:
        key = next(self._keys)
        cache = Cache(self.cache_root)
        with cache.writer(key, {}) as writer:  # as the engine: StepsWriter into the entry
            steps = StepsWriter(lambda: writer, OUTPUT, self.steps, dtype=torch.float16)
            for step in range(self.steps):
                steps.write(step, {f"layer{j}": value[step] for j, value in enumerate(self.maps)})
            writer.set_attrs(streams={OUTPUT: steps.description()})
        self.key = key
        return self.cache_root / "objects" / key

    def write_numpy(self) -> Path:
        folder = next(self._folders)
        folder.mkdir(parents=True)
        for index, array in enumerate(self.arrays):
            np.save(folder / f"layer{index}.npy", array)
        self.folder = folder
        return folder

    def read_editflow(self) -> None:
        steps = CachedSteps(Cache(self.cache_root), self.key, OUTPUT)
        for index in range(len(steps)):
            steps[index]

    def read_numpy(self) -> None:
        for index in range(len(self.arrays)):
            np.load(self.folder / f"layer{index}.npy")

    def writes(self, sync: bool) -> Callable[[Callable[[], Path]], Callable[[], Sample]]:
        def timed(write: Callable[[], Path]) -> Callable[[], Sample]:
            def call() -> Sample:
                self._clean()

                def work() -> None:
                    folder = write()
                    if sync:
                        fsync_all(files_under(folder))

                return measure(work)

            return call

        return timed

    def reads(self, cold: bool) -> Callable[[Callable[[], None]], Callable[[], Sample]]:
        def timed(read: Callable[[], None]) -> Callable[[], Sample]:
            def call() -> Sample:
                if cold:
                    drop_from_page_cache(files_under(self.work))
                return measure(read)

            return call

        return timed


def bench_maps(steps: int, pairs: int, work: Path) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand((steps, *shape), generator=generator).half() for shape in SD_MAP_LAYERS]
    bench = MapsBench(work, maps)
    label = f"SD 1.5 attention maps, {steps} steps x 16 layers fp16 ({bench.nbytes / GIB:.2f} GiB)"
    results = {}
    for name, sync in (("write", False), ("write + fsync", True)):
        timed = bench.writes(sync)
        result = compare(
            "editflow", timed(bench.write_editflow), "numpy", timed(bench.write_numpy), pairs=pairs
        )
        results[name] = report(f"{label}: {name}", result, bench.nbytes)
    bench._clean()
    for name, cold in (("read warm", False), ("read cold", True)):
        timed = bench.reads(cold)
        result = compare(
            "editflow", timed(bench.read_editflow), "numpy", timed(bench.read_numpy), pairs=pairs
        )
        results[name] = report(f"{label}: {name}", result, bench.nbytes)
    results["bytes"] = bench.nbytes
    results["shapes"] = {"steps": steps, "layers": [list(shape) for shape in SD_MAP_LAYERS]}
    return results


def bench_small(pairs: int, work: Path) -> dict[str, Any]:
    """The small-array figures of before: a noise sequence put and read whole, warm."""
    noise = torch.randn(100, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    array = noise.numpy()
    work.mkdir(parents=True, exist_ok=True)
    keys = (f"{index:064x}" for index in itertools.count())
    names = (work / f"noise-{index}.npy" for index in itertools.count())
    cache = Cache(work / "cache")
    written: dict[str, Any] = {}

    def put() -> None:
        written["key"] = next(keys)
        cache.put(written["key"], {"noise": noise}, {}, stream_axis={"noise": 0})

    def save() -> None:
        written["npy"] = next(names)
        np.save(written["npy"], array)

    label = f"noise sequence 100x4x64x64 fp32 ({array.nbytes / 2**20:.2f} MiB)"
    results = {
        "write": report(
            f"{label}: write",
            compare("editflow", lambda: measure(put), "numpy", lambda: measure(save), pairs=pairs),
            array.nbytes,
        )
    }

    def read() -> None:
        cache.get(written["key"]).tensor("noise")

    def load() -> None:
        np.load(written["npy"])

    results["read warm"] = report(
        f"{label}: read warm",
        compare("editflow", lambda: measure(read), "numpy", lambda: measure(load), pairs=pairs),
        array.nbytes,
    )
    entry = cache.get(written["key"])
    entry.step("noise", 0)  # opens the array once, as a streaming reader does
    result = series("one step from an open entry", lambda: measure(lambda: entry.step("noise", 1)))
    print(f"{label}: one step (64 KiB) from an open entry")
    print(format_series(result))
    results["one step"] = result
    results["bytes"] = int(array.nbytes)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--map-steps", type=int, default=50, help="steps of SD-sized maps")
    parser.add_argument("--warm-gib", type=float, default=6.0, help="memory to touch first")
    parser.add_argument("--work", default=None, help="folder for the files (default: a tmp one)")
    args = parser.parse_args()
    if args.warm_gib > 0:
        warm_guest_memory(args.warm_gib)  # see support.warm_guest_memory
    results = {}
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        results["small"] = bench_small(args.pairs, Path(folder) / "small")
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        results["sd_attention_maps"] = bench_maps(args.map_steps, args.pairs, Path(folder))
    print(write_results("bench_cache", results, command=command_line()))


if __name__ == "__main__":
    main()
