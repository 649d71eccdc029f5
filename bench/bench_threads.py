"""The CLI's default CPU thread count: a cold quick start at 1 thread and at every core.

Each run is a fresh ``editflow run`` process on a fresh cache (models already built), with
``--threads N``; the counts alternate ABBA so drift in the machine's load hits both alike.
Wall and CPU time (the child's own accounting) and its peak memory, min / median / max per
count, quiet and, with ``--load``, while as many busy-looping processes as cores run beside
it (a shared CI runner).

    python bench/bench_threads.py [--pairs 5] [--load]

Writes bench/results/bench_threads.json (bench_threads-load.json with ``--load``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

from harness import command_line, compare, format_comparison, measure_command, write_results

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "manifests" / "quickstart.toml")


def cold_run(threads: int, env: dict[str, str]):
    """One cold quick start in a child process."""
    with tempfile.TemporaryDirectory() as folder:
        return measure_command(
            [sys.executable, "-m", "editflow", "run", QUICKSTART, "--threads", str(threads),
             "--cache", f"{folder}/cache", "--out", f"{folder}/out"],
            env, cwd=ROOT,
        )  # fmt: skip


def _spin(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--load", action="store_true", help="busy-loop one process per core")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    many = cores if cores > 1 else 2
    from support import models_dir

    # The runs' caches are fresh; the built-in models are not (built once, here).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITFLOW_MODELS": str(models_dir())}
    stop, spinners = multiprocessing.Event(), []
    if args.load:
        spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(cores)]
        for spinner in spinners:
            spinner.start()
    try:
        result = compare(
            "--threads 1", lambda: cold_run(1, env),
            f"--threads {many}", lambda: cold_run(many, env),
            pairs=args.pairs,
        )  # fmt: skip
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
    load = f"{cores} busy processes beside it" if args.load else "quiet"
    result["what"] = f"cold quick start (20 steps, 64 px), fresh process and cache, {load}"
    print(f"{result['what']}, {cores} cores:")
    print(format_comparison(result, unit="s"))
    name = "bench_threads-load" if args.load else "bench_threads"
    print(write_results(name, {"threads": result}, command=command_line()))


if __name__ == "__main__":
    main()
