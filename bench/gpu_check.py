"""The GPU checks of issue #25 in one run, for ``bench/gpu_check.sh`` (read it first).

Builds the ``sd15-shaped`` model (SD 1.5's configs, random weights) and, in float16 and
bfloat16, measures with ``harness`` (ABBA pairs, min / median / max):

1. engine vs diffusers per step: the ``sample.ddim`` stage function against
   ``StableDiffusionPipeline(output_type="latent")`` on the same UNet (CFG 7.5), with
   attention as SDPA (diffusers' default) and eager (matmuls and a softmax), then compiled
   (torch.compile, channels-last; run last, it is the slowest to prepare);
2. the whole round trip through the engine (``run_recipe``, cold cache, PNG export)
   against diffusers doing the same work (float16 only);
3. the peak GPU memory of the guided pix2pix-zero edit against the unguided one (the
   growth of CUDA's allocator peak over each edit);
4. the cache's write and read rate from and to GPU tensors (a 100-step noise sequence and
   SD-sized attention maps streamed step by step), device copies included;
5. byte-identical reruns: the round trip twice on fresh caches, the PNG bytes and every
   cache entry's arrays compared.

Writes one JSON (``--out``, default bench/results/gpu_check.json) after every section, so a
run cut short by the time limit keeps what it measured. ``--cpu`` runs the same code on the
CPU with tiny sizes (the ``tiny`` model, 64 px, 2 steps) to test it where there is no GPU;
its figures are not GPU results.

    python bench/gpu_check.py [--cpu] [--steps 20] [--size 512] [--pairs 5] [--budget-s 450]
"""

from __future__ import annotations

from quiet import quiet

quiet()  # before diffusers and transformers are imported

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from bench_gpu import (
    GUIDANCE,
    bench_kernel,
    bench_pix2pix_zero,
    bench_roundtrip,
    load_models,
    set_attention,
)
from harness import RESULTS, format_series, machine, measure, series
from roundtrip import write_recipe
from support import models_dir

from editflow.cache import Cache
from editflow.engine.api import run_recipe
from editflow.models.tiny import ensure_tiny

MIB = 2**20
# SD 1.x at 512 px, conditional half, 16 cross-attention layers: (heads, queries, 77 tokens).
SD_MAP_LAYERS = [(8, 4096, 77)] * 6 + [(8, 1024, 77)] * 4 + [(8, 256, 77)] * 4 + [(8, 64, 77)] * 2


class Record:
    """The JSON, written again after every section."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path, self.started = path, time.monotonic()
        self.data: dict[str, Any] = {
            "bench": "gpu_check",
            "command": "bash bench/gpu_check.sh" + (" --cpu" if args.cpu else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "sections": {},
            "skipped": {},
            "failed": {},
        }
        self.write()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def write(self) -> None:
        self.data["machine"] = machine()
        self.data["seconds"] = self.elapsed()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def section(self, name: str, cost_s: float, budget_s: float, run) -> Any:
        """Run one section if the time left allows its expected cost; record either way."""
        left = budget_s - self.elapsed()
        if left < cost_s:
            self.data["skipped"][name] = f"{left:.0f} s left, about {cost_s:.0f} s needed"
            print(f"[{self.elapsed():5.0f} s] skipped {name}: not enough time left")
            self.write()
            return None
        print(f"[{self.elapsed():5.0f} s] {name}")
        started = time.monotonic()
        try:
            value = run()
        except Exception as error:  # one failed check must not lose the others
            self.data["failed"][name] = "".join(traceback.format_exception(error))[-3000:]
            print(f"  FAILED: {error!r}")
            value = None
        else:
            self.data["sections"][name] = value
        self.data.setdefault("section_seconds", {})[name] = time.monotonic() - started
        self.write()
        return value


def cache_rates(device: torch.device, args: argparse.Namespace, work: Path) -> dict:
    """Write and read rates of the cache from and to ``device`` tensors."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(100, 4, 64, 64, generator=generator).to(device)
    map_steps = args.map_steps
    layers = SD_MAP_LAYERS if not args.cpu else SD_MAP_LAYERS[-4:]
    maps = {
        f"layer{i}": torch.rand((map_steps, *shape), generator=generator).softmax(-1).half()
        for i, shape in enumerate(layers)
    }
    maps = {name: m.to(device) for name, m in maps.items()}
    keys = iter(range(10**6))
    cache = Cache(work / "rates")
    results = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for label, arrays, streamed in (
        ("noise sequence 100x4x64x64 fp32", {"noise": noise}, False),
        (f"SD 1.x attention maps, {map_steps} steps x {len(layers)} layers fp16, step by step",
         maps, True),
    ):  # fmt: skip
        mib = sum(a.numel() * a.element_size() for a in arrays.values()) / MIB
        last = {}

        def write(arrays=arrays, streamed=streamed, last=last) -> None:
            key = f"{next(keys):064x}"
            last["key"] = key
            if not streamed:
                cache.put(key, arrays, {}, stream_axis=dict.fromkeys(arrays, 0))
                return
            with cache.writer(key, {}) as writer:
                handles = {n: writer.create_stream(n, tuple(a.shape), a.dtype)
                           for n, a in arrays.items()}  # fmt: skip
                for step in range(next(iter(arrays.values())).shape[0]):
                    for name, value in arrays.items():
                        handles[name][step] = value[step]

        def read(arrays=arrays, last=last) -> None:
            entry = cache.get(last["key"])
            for name in arrays:
                entry.tensor(name).to(device)
            sync()

        written = series("write from the device", lambda: measure(write, device=device),
                         repeats=args.pairs)  # fmt: skip
        read_back = series("read to the device", lambda: measure(read, device=device),
                           repeats=args.pairs)  # fmt: skip
        rates = {
            "MiB": mib,
            "write MiB/s (median, min-max)": _rates(mib, written, "write from the device"),
            "read MiB/s (median, min-max)": _rates(mib, read_back, "read to the device"),
            "write": written,
            "read": read_back,
        }
        results[label] = rates
        print(f"  {label} ({mib:.1f} MiB):")
        print(format_series(written))
        print(format_series(read_back))
        write_rate, read_rate = (
            rates["write MiB/s (median, min-max)"],
            rates["read MiB/s (median, min-max)"],
        )
        print(f"  write {write_rate[0]:.0f} MiB/s ({write_rate[1]:.0f}-{write_rate[2]:.0f}),"
              f" read {read_rate[0]:.0f} MiB/s ({read_rate[1]:.0f}-{read_rate[2]:.0f})")  # fmt: skip
    return results


def _rates(mib: float, result: dict, name: str) -> list[float]:
    wall = result[name]["wall"]
    return [mib / wall["median"], mib / wall["max"], mib / wall["min"]]


def reruns(recipe: Path, device: torch.device, work: Path) -> dict:
    """The round trip twice, each on a fresh cache and its own loaded models: equal bytes?"""
    outcomes = []
    for run in range(2):
        cache = Cache(work / f"rerun-cache{run}")
        result = run_recipe(recipe, [], cache=cache, out_dir=work / f"rerun-out{run}",
                            device=device.type)  # fmt: skip
        arrays = {}
        for stage, key in result.keys.items():
            entry = cache.get(key)
            for name in entry.arrays if entry is not None else []:
                arrays[f"{stage}.{name}"] = entry.tensor(name)
        pngs = {path.name: path.read_bytes() for path in result.written if path.suffix == ".png"}
        outcomes.append((arrays, pngs, dict(result.keys)))
        del result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (arrays_a, pngs_a, keys_a), (arrays_b, pngs_b, keys_b) = outcomes
    differing = [name for name in arrays_a
                 if name not in arrays_b or not torch.equal(arrays_a[name], arrays_b[name])]  # fmt: skip
    verdict = {
        "keys equal": keys_a == keys_b,
        "arrays compared": sorted(arrays_a),
        "arrays differing": differing,
        "pngs compared": sorted(pngs_a),
        "pngs byte-identical": pngs_a == pngs_b and bool(pngs_a),
    }
    verdict["byte-identical"] = not differing and verdict["pngs byte-identical"]
    print(f"  byte-identical rerun: {verdict['byte-identical']} ({len(arrays_a)} arrays,"
          f" {len(pngs_a)} PNGs; differing: {differing or 'none'})")  # fmt: skip
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (a dry run)")
    parser.add_argument("--model", help="default sd15-shaped (tiny with --cpu)")
    parser.add_argument("--size", type=int, help="px (default 512; 64 with --cpu)")
    parser.add_argument("--steps", type=int, help="default 20 (2 with --cpu)")
    parser.add_argument("--pairs", type=int, help="default 5 (2 with --cpu)")
    parser.add_argument("--map-steps", type=int, help="default 10 (2 with --cpu)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()
    cpu = args.cpu
    args.model = args.model or ("tiny" if cpu else "sd15-shaped")
    args.size = args.size or (64 if cpu else 512)
    args.steps = args.steps or (2 if cpu else 20)
    args.pairs = args.pairs or (2 if cpu else 5)
    args.map_steps = args.map_steps or (2 if cpu else 10)
    args.attention = ["sdpa", "eager"]
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing measured (use --cpu for a dry run)")
        return
    device = torch.device("cpu" if cpu else "cuda")
    torch.set_num_threads(1 if cpu else torch.get_num_threads())
    record = Record(args.out, args)
    budget = args.budget_s
    record.section("build model", 0, budget, lambda: _build(args.model))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        work = Path(folder)
        for dtype in args.dtypes:
            args.dtype = dtype
            recipe = write_recipe(work, model=args.model, size=args.size, steps=args.steps,
                                  guidance=GUIDANCE, dtype=dtype)  # fmt: skip
            loaded = record.section(f"{dtype}: load", 30, budget,
                                    lambda r=recipe: load_models(r, device, work))  # fmt: skip
            if loaded is None:
                continue
            models, plan = loaded
            record.data["sections"][f"{dtype}: load"] = "done"
            for mode in args.attention:

                def kernel(mode=mode, models=models, dtype=dtype) -> dict:
                    set_attention(models, mode)
                    try:
                        label = f"{dtype}, not compiled, attention {mode}"
                        return bench_kernel(models, device, args, label)
                    finally:
                        set_attention(models, "sdpa")

                record.section(f"{dtype}: per step, {mode}", 20, budget, kernel)
            record.section(f"{dtype}: pix2pix-zero guided vs unguided", 30, budget,
                           lambda m=models: bench_pix2pix_zero(m, device, args))  # fmt: skip
            if dtype == args.dtypes[0]:
                record.section(
                    f"{dtype}: round trip, run_recipe vs diffusers", 40, budget,
                    lambda m=models, p=plan, r=recipe: bench_roundtrip(r, m, p, device, args, work),
                )  # fmt: skip
                record.section(f"{dtype}: byte-identical reruns", 40, budget,
                               lambda r=recipe: reruns(r, device, work))  # fmt: skip
            del models, plan, loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record.section("cache rates from/to device tensors", 30, budget,
                       lambda: cache_rates(device, args, work))  # fmt: skip
        if not args.no_compile:
            for dtype in args.dtypes:
                args.dtype = dtype

                def compiled(dtype=dtype) -> dict:
                    recipe = write_recipe(work, model=args.model, size=args.size,
                                          steps=args.steps, guidance=GUIDANCE, dtype=dtype,
                                          compiled=True)  # fmt: skip
                    models, _ = load_models(recipe, device, work)
                    try:
                        return bench_kernel(models, device, args, f"{dtype}, torch.compile")
                    finally:
                        del models
                        if device.type == "cuda":
                            torch.cuda.empty_cache()

                record.section(f"{dtype}: per step, torch.compile", 120, budget, compiled)
    record.write()
    print(f"wrote {args.out} ({record.elapsed():.0f} s)")
    if record.data["failed"]:
        print(f"failed sections: {', '.join(record.data['failed'])}")


def _build(model: str) -> dict:
    started = time.perf_counter()
    folder = ensure_tiny(models_dir(), model)
    # The folder's name says which build it is; where it lies is this machine's business.
    return {"folder": folder.name, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main()
