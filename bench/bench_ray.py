"""A sweep on Ray's 2 CPU workers against the same sweep in process, and Ray's overhead.

The edit-friendly text edit (100 steps) swept over 2 x 2 values of skip and cfg_tar, images
at ``--size`` px, from a cold cache each time, one torch thread per process:

1. in process, sequential, in a fresh process (imports and model loads included);
2. Ray with 2 workers started for the run (their start included);
3. in process again, imports done (what a long-lived driver pays);
4. Ray again on the workers the first Ray run left (models loaded).

It prints the count of stages computed (the shared inversion once), the stages that started
while the inversion was still running (they follow its streamed noise maps), the speed-ups
1/2 and 3/4, and the bound that no schedule of whole stages beats, from the in-process run's
own stage times: following is what goes past it. Then an all-hit rerun of both: the
difference is Ray's per-run overhead (no stage is dispatched when every key hits).

    python bench/bench_ray.py [--size 128]
"""

from __future__ import annotations

from quiet import quiet

quiet()

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import networkx as nx
import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "text_edit.toml"
        text = (ROOT / "manifests" / "edit_friendly" / "text_edit.toml").read_text()
        shutil.copytree(ROOT / "manifests" / "edit_friendly", Path(folder), dirs_exist_ok=True)
        recipe.write_text(text.replace("[64, 64]", f"[{args.size}, {args.size}]"))
        axes = [parse_sweep(axis) for axis in AXES]
        # One models folder for every run (each cache would have its own): built once, here.
        os.environ["EDITFLOW_MODELS"] = str(Path(folder) / "models")
        tiny.ensure_tiny(Path(folder) / "models")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        timings, stage_seconds, graph = {}, {}, nx.DiGraph()
        on_ray = RayExecutor(workers=2)  # keeps its workers from the first Ray run for the second
        runs = (
            ("in process, fresh process", None),
            ("Ray, 2 workers started", on_ray),
            ("in process, imports done", None),
            ("Ray, 2 workers kept", on_ray),
        )
        for name, executor in runs:
            cache = Cache(Path(folder) / name.replace(" ", "-").replace(",", ""))
            if executor is None:
                document = base_document(recipe)
                plans = [plan_recipe(recipe, point.overrides, cache=cache, document=document)
                         for point in plan_points(recipe, axes, cache)]  # fmt: skip
                graph = stages_to_compute(plans, cache)
            for run in ("cold", "all-hit"):
                events = CollectEvents()
                started = time.perf_counter()
                result = run_sweep(recipe, axes, cache=cache, out_root=Path(folder) / "out" / name,
                                   device="cpu", events=events, ray=executor)  # fmt: skip
                timings[name, run] = time.perf_counter() - started
                if run == "cold":
                    stages = [entry.split("/")[1] for entry in result.computed]
                    order = [(e.type, e.stage) for e in events.events]
                    before = order[: order.index(("done", "invert"))]
                    alongside = [stage for kind, stage in before if kind == "running"
                                 and stage != "invert" and ("done", stage) not in before]  # fmt: skip
                    print(f"{name}: {len(stages)} stages computed, inversion"
                          f" {stages.count('invert')}x, {alongside or 'none'} started while it"
                          f" ran; cold {timings[name, run]:.1f} s")  # fmt: skip
                    if executor is None:
                        stage_seconds = {e.key: e.seconds for e in events.of("done")}
        ray.shutdown()
    first = timings[runs[0][0], "cold"] / timings[runs[1][0], "cold"]
    kept = timings[runs[2][0], "cold"] / timings[runs[3][0], "cold"]
    bound = sum(stage_seconds.values()) / makespan_bound(stage_seconds, graph, 2)
    print(f"4-point sweep at {args.size} px, Ray speed-up (target >= 1.6): x{first:.2f} with"
          f" the workers' start, x{kept:.2f} on kept workers")  # fmt: skip
    print(f"  no schedule of whole stages on 2 ideal workers beats x{bound:.2f}")
    extra = timings[runs[3][0], "all-hit"] - timings[runs[2][0], "all-hit"]
    print(
        f"all-hit rerun: in process {timings[runs[2][0], 'all-hit'] * 1000:.0f} ms,"
        f" Ray {timings[runs[3][0], 'all-hit'] * 1000:.0f} ms ({extra * 1000:+.0f} ms)"
    )


if __name__ == "__main__":
    main()
