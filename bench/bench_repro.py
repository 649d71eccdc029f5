"""Cached runs as lookups, and `editflow figures` cold and warm.

1. Process wall time of ``editflow validate``, ``editflow plan``, an all-hit ``editflow run``
   and an all-hit ``editflow repro --check`` of the quick start, each against ``python -c
   "import zarr, pydantic, networkx, PIL.Image"`` (the libraries a lookup cannot avoid)
   measured in the same run: target <= 2x each. Medians of alternating runs.
2. ``editflow figures --check`` over manifests/ on a cold cache, then warm (all hits) against
   the same bare import, alternating: wall times and ratios.

    python bench/bench_repro.py [--repeats 5] [--skip-figures]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "manifests" / "quickstart.toml")
BASELINE = [sys.executable, "-c", "import zarr, pydantic, networkx, PIL.Image"]


def wall(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-figures", action="store_true")
    args = parser.parse_args()
    editflow = [sys.executable, "-m", "editflow"]
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITFLOW_CACHE": f"{folder}/cache"}
        out = f"{folder}/out"
        subprocess.run([*editflow, "run", QUICKSTART, "--out", out], check=True,
                       capture_output=True, env=env, cwd=ROOT)  # fmt: skip
        commands = {
            "validate": [*editflow, "validate", QUICKSTART],
            "plan": [*editflow, "plan", QUICKSTART],
            "all-hit run": [*editflow, "run", QUICKSTART, "--out", out],
            "all-hit repro --check": [*editflow, "repro", "--check", QUICKSTART, "--out", out],
        }
        times: dict[str, list[float]] = {name: [] for name in ["baseline", *commands]}
        for _ in range(args.repeats):
            times["baseline"].append(wall(BASELINE, env))
            for name, command in commands.items():
                times[name].append(wall(command, env))
        base = statistics.median(times["baseline"])
        print(f"process wall time, median of {args.repeats} (quick start):")
        print(f"  import zarr, pydantic, networkx, PIL  {base * 1000:7.0f} ms")
        for name in commands:
            value = statistics.median(times[name])
            print(f"  editflow {name:27s} {value * 1000:7.0f} ms  x{value / base:.2f}"
                  " (target <= 2)")  # fmt: skip
        if args.skip_figures:
            return
        figures = [*editflow, "figures", "--check", str(ROOT / "manifests"), "--out",
                   f"{folder}/figures"]  # fmt: skip
        warm_env = {**env, "EDITFLOW_CACHE": f"{folder}/figures-cache"}
        cold = wall(figures, warm_env)
        warm, bare = [], []
        for _ in range(args.repeats):
            bare.append(wall(BASELINE, env))
            warm.append(wall(figures, warm_env))
        base = statistics.median(bare)
        print(f"editflow figures --check over manifests/: cold {cold:.1f} s; all hits"
              f" {min(warm):.2f} / {statistics.median(warm):.2f} / {max(warm):.2f} s"
              f" (min / median / max), x{statistics.median(warm) / base:.2f} the bare import"
              f" ({base * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
