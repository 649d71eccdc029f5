"""The CLI's default CPU thread count: a cold quick start at 1 thread and at every core.

Each run is a fresh ``editflow run`` process on a fresh cache (models already built), with
``--threads N``; the counts alternate ABBA so drift in the machine's load hits both alike.
Prints wall and CPU time (min / median / max) per count, quiet and, with ``--load``, while
as many busy-looping processes as cores run beside it (a shared CI runner).

    python bench/bench_threads.py [--pairs 3] [--load]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "manifests" / "quickstart.toml")


def cold_run(threads: int, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one cold quick start in a child process."""
    with tempfile.TemporaryDirectory() as folder:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "editflow", "run", QUICKSTART, "--threads", str(threads),
             "--cache", f"{folder}/cache", "--out", f"{folder}/out"],
            check=True, capture_output=True, env=env, cwd=ROOT,
        )  # fmt: skip
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _spin(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--load", action="store_true", help="busy-loop one process per core")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [1, cores] if cores > 1 else [1, 2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cold_run(1, env)  # builds the tiny model once, outside the measurement
    stop, spinners = multiprocessing.Event(), []
    if args.load:
        spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(cores)]
        for spinner in spinners:
            spinner.start()
    times: dict[int, list[tuple[float, float]]] = {count: [] for count in counts}
    try:
        for pair in range(args.pairs):
            order = counts if pair % 2 == 0 else counts[::-1]
            for count in order + order[::-1]:
                times[count].append(cold_run(count, env))
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
    load = f"{cores} busy processes beside it" if args.load else "quiet"
    print(f"cold quick start, {cores} cores, {load}, {2 * args.pairs} runs per count (ABBA):")
    for count, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(
            f"  --threads {count}: wall {min(walls):.2f} / {statistics.median(walls):.2f} /"
            f" {max(walls):.2f} s, CPU {min(cpus):.2f} / {statistics.median(cpus):.2f} /"
            f" {max(cpus):.2f} s (min / median / max)"
        )


if __name__ == "__main__":
    main()
