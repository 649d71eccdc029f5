"""Cached CLI commands as lookups, and `editflow figures --check` cold and all-hit.

1. Process wall and CPU time of ``editflow validate``, ``editflow plan``, an all-hit
   ``editflow run`` and an all-hit ``editflow repro --check`` of the quick start, each
   against ``python -c "import zarr, pydantic, networkx, PIL.Image"`` (the libraries a
   lookup cannot avoid), all interleaved in one run (A B C D E, E D C B A, ...): target
   <= 2x the bare import each.
2. ``editflow figures --check`` over manifests/: once on a cold cache, then all hits,
   interleaved ABBA with the same bare import.

    python bench/bench_repro.py [--pairs 5] [--skip-figures]

Writes bench/results/bench_repro.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from harness import (
    command_line,
    compare,
    compare_many,
    compile_bytecode,
    format_comparison,
    measure_command,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "manifests" / "quickstart.toml")
BARE = "import zarr, pydantic, networkx, PIL.Image"
BASELINE = [sys.executable, "-c", BARE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--skip-figures", action="store_true")
    args = parser.parse_args()
    editflow = [sys.executable, "-m", "editflow"]
    compile_bytecode()  # as an installed package has it; see compile_bytecode
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITFLOW_CACHE": f"{folder}/cache"}
        out = f"{folder}/out"
        cold_run = measure_command([*editflow, "run", QUICKSTART, "--out", out], env, cwd=ROOT)
        results["cold quick start (builds tiny into the fresh cache)"] = asdict(cold_run)
        commands = {
            "validate": [*editflow, "validate", QUICKSTART],
            "plan": [*editflow, "plan", QUICKSTART],
            "all-hit run": [*editflow, "run", QUICKSTART, "--out", out],
            "all-hit repro --check": [*editflow, "repro", "--check", QUICKSTART, "--out", out],
        }
        calls = {"bare import": lambda: measure_command(BASELINE, env, cwd=ROOT)}
        for name, argv in commands.items():
            calls[f"editflow {name}"] = lambda argv=argv: measure_command(argv, env, cwd=ROOT)
        lookups = compare_many(calls, rounds=args.pairs)
        lookups["what"] = (
            f'quick start, every stage cached, vs python -c "{BARE}"; target <= 2x each'
        )
        results["cached commands"] = lookups
        print(f"process time of cached commands vs the bare import ({lookups['what']}):")
        print(format_comparison(lookups))
        if not args.skip_figures:
            figures = [*editflow, "figures", "--check", str(ROOT / "manifests"), "--out",
                       f"{folder}/figures"]  # fmt: skip
            figures_env = {**env, "EDITFLOW_CACHE": f"{folder}/figures-cache"}
            # Exit 1 is a recipe that drifted from its lock: a verdict, timed all the same.
            codes = set()

            def check():
                sample = measure_command(figures, figures_env, cwd=ROOT, returncodes=(0, 1))
                codes.add(measure_command.returncode)
                return sample

            cold = check()
            warm = compare(
                "bare import", lambda: measure_command(BASELINE, env, cwd=ROOT),
                "figures --check, all hits", check, pairs=args.pairs, warmup=0,
            )  # fmt: skip
            warm["cold figures --check"] = asdict(cold)
            warm["exit codes of figures --check"] = sorted(codes)
            if codes != {0}:
                print("  (figures --check exited 1: a recipe drifted from its lock)")
            warm["recipes"] = len(list((ROOT / "manifests").rglob("*.toml")))
            results["figures --check"] = warm
            print(f"editflow figures --check over manifests/ ({warm['recipes']} recipes):"
                  f" cold {cold.wall:.1f} s (cpu {cold.cpu:.1f} s)")  # fmt: skip
            print(format_comparison(warm, unit="s"))
    print(write_results("bench_repro", results, command=command_line()))


if __name__ == "__main__":
    main()
