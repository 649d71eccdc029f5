"""A sweep on Ray's 2 CPU workers against the same sweep in process with the same threads.

The edit-friendly text edit swept over 2 x 2 values of skip and cfg_tar (4 points sharing
one inversion), images at ``--size`` px, ``--steps`` steps, from a cold cache each run. Ray
runs 2 workers of one torch thread each; its in-process peer runs the sweep with 2 torch
threads: the same total threads, so the figure is what Ray's scheduling (whole stages side
by side, stages that follow a running inversion's streamed noise maps) buys over intra-op
parallelism, not over an idle core.

1. Fresh processes (``editflow run --sweep ...``, imports, model loads and, for Ray, the
   cluster's and the workers' start included): ``--threads 2`` against ``--executor ray
   --workers 2 --threads 1``. CPU time is every process's the command started (Ray's own
   and its workers, reaped when they exit); memory the largest peak of any one.
2. In this process, imports done and models loaded: ``run_sweep`` on a ``RayExecutor``
   whose 2 workers are kept from an earlier run, against ``run_sweep(threads=2)`` and
   ``run_sweep(threads=1)`` lending the models of an earlier run, the three interleaved
   (A B C, C B A, ...). On a 2-core machine others share, 2 torch threads in one process
   can be many times slower than 1 (OpenMP's threads wait for each other at every
   operation, and lose the core to other processes), so the 1-thread peer is shown too.
   Ray's CPU time and memory growth add its processes' (workers, raylet, GCS) from /proc;
   the in-process sides' are this process's (where Ray's driver threads also live).
3. All-hit reruns of both (no stage is dispatched when every key hits): Ray's per-run cost.

Each comparison has ``--pairs`` rounds. It also records the stages computed (the shared
inversion once), those that started while the inversion ran (they follow its noise maps),
and the bound no schedule of whole stages on 2 ideal workers beats, from the 1-thread
in-process run's stage times.

    python bench/bench_ray.py [--size 128] [--steps 100] [--pairs 5] [--fresh-pairs N]
        [--skip-fresh | --fresh-only]

Writes bench/results/bench_ray-fresh.json (part 1) and bench/results/bench_ray.json
(``-64px-40steps`` added to both names at ``--size 64 --steps 40``).
"""

from __future__ import annotations

from quiet import quiet

quiet()

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import networkx as nx
import torch
from harness import (
    command_line,
    compare,
    compare_many,
    format_comparison,
    measure,
    measure_command,
    write_results,
)
from support import models_dir

from editflow.cache import Cache
from editflow.cli.sweeps import base_document, parse_sweep, plan_points, run_sweep
from editflow.engine.api import plan_recipe
from editflow.engine.events import CollectEvents
from editflow.executors.ray import RayExecutor
from editflow.executors.ray_schedule import stages_to_compute
from editflow.models import tiny

ROOT = Path(__file__).resolve().parents[1]
AXES = ["stages.edit.skip=20,30", "stages.edit.cfg_tar=7.5,15"]


def makespan_bound(seconds: dict[str, float], graph: nx.DiGraph, workers: int) -> float:
    """No schedule of whole stages is shorter: for each stage, the longest chain up to its
    end plus the work that depends on it, shared by ``workers`` (a sweep's shared inversion
    would run alone; stages that follow its streams run alongside it instead)."""
    head: dict[str, float] = {}

    def chain(key: str) -> float:
        if key not in head:
            before = (chain(d) for d in graph.predecessors(key))
            head[key] = seconds.get(key, 0.0) + max(before, default=0.0)
        return head[key]

    return max(
        chain(key) + sum(seconds.get(d, 0.0) for d in nx.descendants(graph, key)) / workers
        for key in graph
    )


def cold_facts(result, events: CollectEvents) -> dict:
    """What a cold sweep computed, and which stages ran alongside the inversion."""
    stages = [entry.split("/")[1] for entry in result.computed]
    order = [(e.type, e.stage) for e in events.events]
    before = order[: order.index(("done", "invert"))] if ("done", "invert") in order else order
    alongside = [stage for kind, stage in before if kind == "running"
                 and stage != "invert" and ("done", stage) not in before]  # fmt: skip
    return {"stages computed": len(stages), "inversions": stages.count("invert"),
            "started while the inversion ran": alongside}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="inversion (and edit) steps")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--fresh-pairs", type=int, help="pairs of fresh processes (--pairs)")
    parser.add_argument("--skip-fresh", action="store_true", help="skip the fresh processes")
    parser.add_argument("--fresh-only", action="store_true", help="only the fresh processes")
    args = parser.parse_args()
    if args.steps <= 36:
        parser.error("--steps must be above 36 (the recipe's edit skips 36)")
    torch.set_num_threads(1)
    results: dict = {
        "what": f"edit-friendly text edit, 4-point sweep ({', '.join(AXES)}), {args.size} px,"
        f" {args.steps} steps, cold cache per run; Ray 2 workers x 1 thread vs in process"
        " 2 threads (and 1 thread, in process with imports done)"
    }
    print(results["what"])
    # Another size or step count writes its own record beside the default one.
    suffix = "" if (args.size, args.steps) == (128, 100) else f"-{args.size}px-{args.steps}steps"
    counter = iter(range(10**6))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shutil.copytree(ROOT / "manifests" / "edit_friendly", work, dirs_exist_ok=True)
        recipe = work / "text_edit.toml"
        text = recipe.read_text().replace("[64, 64]", f"[{args.size}, {args.size}]")
        text = text.replace(
            'source_prompt = "a photo of a cat"',
            f'source_prompt = "a photo of a cat"\nnum_inference_steps = {args.steps}',
        )
        recipe.write_text(text)
        axes = [parse_sweep(axis) for axis in AXES]
        # One models folder for every run (each cache would have its own): built once.
        models = models_dir()
        os.environ["EDITFLOW_MODELS"] = str(models)
        tiny.ensure_tiny(models)

        if not args.skip_fresh:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITFLOW_MODELS": str(models)}

            def cli(*extra: str):
                n = next(counter)
                argv = [sys.executable, "-m", "editflow", "run", str(recipe),
                        "--cache", str(work / f"cli-cache{n}"), "--out", str(work / f"cli{n}")]  # fmt: skip
                for axis in AXES:
                    argv += ["--sweep", axis]
                return measure_command([*argv, *extra], env, cwd=ROOT, tree=True)

            fresh = compare(
                "CLI in process, --threads 2", lambda: cli("--threads", "2"),
                "CLI Ray, 2 workers x 1 thread",
                lambda: cli("--executor", "ray", "--workers", "2", "--threads", "1"),
                pairs=args.fresh_pairs or args.pairs,
            )  # fmt: skip
            print("fresh processes (imports, model loads, Ray's start included):")
            print(format_comparison(fresh, unit="s"))
            fresh["what"] = results["what"]
            print(write_results(f"bench_ray-fresh{suffix}", {"fresh processes": fresh},
                                command=command_line()))  # fmt: skip
            if args.fresh_only:
                return

        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        on_ray = RayExecutor(workers=2)  # keeps its workers between runs
        lent = {"registry": None}
        facts: dict = {}

        def sweep(
            cache: Cache, out: Path, executor: RayExecutor | None, label: str, threads: int = 2
        ) -> None:
            events = CollectEvents()
            if executor is None:
                result = run_sweep(recipe, axes, cache=cache, out_root=out, device="cpu",
                                   events=events, registry=lent["registry"], threads=threads)  # fmt: skip
                lent["registry"] = result.outcomes[-1].registry or lent["registry"]
            else:
                torch.set_num_threads(1)  # the workers' spec: one thread each, as started
                result = run_sweep(recipe, axes, cache=cache, out_root=out, device="cpu",
                                   events=events, ray=executor)  # fmt: skip
            if result.computed:
                facts[label] = cold_facts(result, events)
                if executor is None and threads == 1:
                    facts["stage seconds"] = {e.key: e.seconds for e in events.of("done")}

        def cold(executor: RayExecutor | None, label: str, threads: int = 2):
            def call() -> None:
                n = next(counter)
                sweep(Cache(work / f"cache{n}"), work / f"out{n}", executor, label, threads)

            return lambda: measure(call, tree=executor is not None)

        # Ray first: each ratio is an in-process time over Ray's, Ray's speed-up.
        kept = compare_many(
            {
                "Ray, 2 kept workers x 1 thread": cold(on_ray, "Ray"),
                "in process, 2 threads, models lent": cold(None, "in process, 2 threads"),
                "in process, 1 thread, models lent": cold(None, "in process, 1 thread", 1),
            },
            rounds=args.pairs,
        )
        results["imports done"] = kept
        print("in this process, imports done, models loaded, workers kept:")
        print(format_comparison(kept, unit="s"))

        warm = Cache(work / "warm")
        sweep(warm, work / "warm-out", None, "warm")  # fills it: later runs are all hits
        hits = compare(
            "all-hit, in process",
            lambda: measure(lambda: sweep(warm, work / "warm-out", None, "hit")),
            "all-hit, Ray",
            lambda: measure(lambda: sweep(warm, work / "warm-out", on_ray, "hit"), tree=True),
            pairs=args.pairs,
        )  # fmt: skip
        results["all-hit rerun"] = hits
        print("all-hit reruns:")
        print(format_comparison(hits))
        on_ray.pool.release()
        ray.shutdown()

        plans_cache = Cache(work / "plans")
        document = base_document(recipe)
        plans = [plan_recipe(recipe, point.overrides, cache=plans_cache, document=document)
                 for point in plan_points(recipe, axes, plans_cache)]  # fmt: skip
        graph = stages_to_compute(plans, plans_cache)
        seconds = facts.pop("stage seconds", {})
        bound = sum(seconds.values()) / makespan_bound(seconds, graph, 2) if seconds else None
        # (from the 1-thread in-process run's stage times: each Ray worker has one thread)
        results["cold runs"] = facts
        results["whole-stage bound on 2 ideal workers (x over the stage sum)"] = bound
        for label, fact in facts.items():
            print(f"  {label}: {fact}")
        if bound:
            print(f"  no schedule of whole stages on 2 ideal workers beats x{bound:.2f}"
                  " the sum of the in-process stage times (1 thread)")  # fmt: skip
    print(write_results(f"bench_ray{suffix}", results, command=command_line()))


if __name__ == "__main__":
    main()
