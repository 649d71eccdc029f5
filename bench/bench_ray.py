"""A sweep on Ray's 2 CPU workers against the same sweep in process, and Ray's overhead.

The edit-friendly text edit (100 steps) swept over 2 x 2 values of skip and cfg_tar, images
at ``--size`` px: wall time on a local Ray instance with 2 workers (one torch thread each)
against the in-process executor run sequentially (one thread), from a cold cache each;
the count of stages computed (the shared inversion once). Then an all-hit rerun of both:
the difference is Ray's per-run overhead (no stage is dispatched when every key hits).

    python bench/bench_ray.py [--size 128]
"""

from __future__ import annotations

from quiet import quiet

quiet()

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from editflow.cache import Cache
from editflow.sweeps import parse_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
AXES = ["stages.edit.skip=20,30", "stages.edit.cfg_tar=7.5,15"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "text_edit.toml"
        text = (ROOT / "manifests" / "edit_friendly" / "text_edit.toml").read_text()
        recipe.write_text(text.replace("[64, 64]", f"[{args.size}, {args.size}]"))
        shutil.copytree(ROOT / "manifests" / "edit_friendly", Path(folder), dirs_exist_ok=True)
        recipe.write_text(text.replace("[64, 64]", f"[{args.size}, {args.size}]"))
        axes = [parse_sweep(axis) for axis in AXES]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        timings = {}
        for name, options in (
            ("in process", None),
            ("ray, 2 workers", {"address": None, "workers": 2}),
        ):
            cache = Cache(Path(folder) / name.replace(" ", "-"))
            for run in ("cold", "all-hit"):
                started = time.perf_counter()
                result = run_sweep(recipe, axes, cache=cache, out_root=Path(folder) / "out" / name,
                                   device="cpu", ray=options)  # fmt: skip
                timings[name, run] = time.perf_counter() - started
                if run == "cold":
                    stages = [entry.split("/")[1] for entry in result.computed]
                    print(f"{name}: {len(stages)} stages computed, inversion"
                          f" {stages.count('invert')}x; cold {timings[name, run]:.1f} s")  # fmt: skip
        ray.shutdown()
    cold = timings["in process", "cold"] / timings["ray, 2 workers", "cold"]
    print(f"4-point sweep at {args.size} px: Ray speed-up x{cold:.2f} (target >= 1.6)")
    extra = timings["ray, 2 workers", "all-hit"] - timings["in process", "all-hit"]
    print(
        f"all-hit rerun: in process {timings['in process', 'all-hit'] * 1000:.0f} ms,"
        f" Ray {timings['ray, 2 workers', 'all-hit'] * 1000:.0f} ms ({extra * 1000:+.0f} ms)"
    )


if __name__ == "__main__":
    main()
