"""The commands on one recipe: run, plan, validate, schema, explain (sweeps included)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.cli.common import event_display, figure_document, open_cache_of
from editflow.cli.reproduce import run_figure
from editflow.cli.threads import resolve_threads
from editflow.errors import EditflowError

if TYPE_CHECKING:
    from editflow.executors.ray import RayExecutor


def cmd_run(args: argparse.Namespace) -> int:
    from editflow.cli.figures import is_figure
    from editflow.engine.api import run_recipe

    if is_figure(args.recipe):
        return run_figure(args)
    out_dir = args.out or Path("out") / args.recipe.stem
    axes = _sweep_axes(args)
    if axes:
        return run_swept(args, axes, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EditflowError(f"{out_dir} is a file, not a folder", file="--out")
    started = time.perf_counter()
    with event_display(args) as display:
        executor = _ray_executor(args) if args.executor == "ray" else None
        result = run_recipe(
            args.recipe,
            args.overrides,
            cache=open_cache_of(args),
            out_dir=out_dir,
            device=args.device,
            events=display,
            targets=args.targets,
            executor=executor,
            threads=resolve_threads(args.threads)[0],
        )
    if not args.log_json:
        seconds = time.perf_counter() - started
        print(
            f"{len(result.computed)} computed, {len(result.hits)} cached, "
            f"{len(result.written)} files in {out_dir} ({seconds:.1f} s)",
            file=sys.stderr,
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from editflow.engine.execute import last_run_record
    from editflow.engine.keys import describe_change, describe_changes

    cache = open_cache_of(args)
    if figure_document(args) is None and (axes := _sweep_axes(args)):
        return plan_swept(args, axes, cache)
    plan = _plan(args, cache)
    print_notes(plan)
    if args.json:
        rows = []
        for stage in plan.stages.values():
            row = {"stage": stage.name, "kind": stage.kind.kind, "key": stage.key}
            if not stage.needed:
                row["status"] = "skip"
            elif cache.has(stage.key):
                row["status"] = "hit"
            else:
                record = cache.get_record(last_run_record(plan, stage.name))
                before = record.get("preimage") if record else None
                row["status"], row["reasons"] = "miss", describe_changes(before, stage.preimage)
            rows.append(row)
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(name) for name in plan.stages)
    kind_width = max(len(stage.kind.kind) for stage in plan.stages.values())
    for stage in plan.stages.values():
        head = f"{stage.name:<{width}}  {stage.kind.kind:<{kind_width}}  {stage.key[:12]}"
        if not stage.needed:
            print(f"{head}  skip (not needed by the targets)")
        elif cache.has(stage.key):
            print(f"{head}  hit")
        else:
            record = cache.get_record(last_run_record(plan, stage.name))
            reason = describe_change(record.get("preimage") if record else None, stage.preimage)
            print(f"{head}  miss: {reason}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from editflow.cli.sweeps import plan_points

    cache = open_cache_of(args)
    plan = _plan(args, cache)
    print_notes(plan)
    summary = f"{len(plan.stages)} stages, {len(plan.inputs)} inputs"
    axes = _sweep_axes(args) if figure_document(args) is None else []
    if axes:  # every point, as run and plan would make it
        summary += f", {len(plan_points(args.recipe, axes, cache))} sweep points"
    print(f"{args.recipe}: ok ({summary})")
    return 0


def print_notes(plan: Any) -> None:
    """What the checks found worth saying but not wrong, one line each, on stderr."""
    for note in plan.notes:
        print(f"note: {note.render()}", file=sys.stderr)


def _plan(args: argparse.Namespace, cache: Any) -> Any:
    """The plan of RECIPE, or of the recipe a figure carries (confined to its base)."""
    from editflow.engine.api import plan_recipe

    carried = figure_document(args)
    if carried is None:
        return plan_recipe(args.recipe, args.overrides, cache=cache, targets=args.targets)
    recipe, document = carried
    return plan_recipe(recipe, args.overrides, cache=cache, targets=args.targets,
                       document=document, confined=True)  # fmt: skip


def cmd_schema(args: argparse.Namespace) -> int:
    from editflow.engine.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from editflow.engine.api import plan_recipe
    from editflow.engine.execute import last_run_record
    from editflow.engine.keys import describe_changes

    cache = open_cache_of(args)
    plan = plan_recipe(args.recipe, args.overrides, cache=cache)
    if args.stage not in plan.stages:
        raise EditflowError(f"no stage named {args.stage!r}", file=str(args.recipe))
    stage = plan.stages[args.stage]
    print(f"{stage.name} ({stage.kind.kind}) key {stage.key}")
    record = cache.get_record(last_run_record(plan, stage.name))
    if record is None:
        print("  no earlier run of this stage is recorded in this cache")
        return 0
    if record["key"] == stage.key:
        state = "present" if cache.has(stage.key) else "missing from the cache"
        print(f"  unchanged since the last run (entry {state})")
        return 0
    print(f"  last run {record['key']}")
    for reason in describe_changes(record["preimage"], stage.preimage, width=None):
        print(f"  {reason}")
    return 0


def _sweep_axes(args: argparse.Namespace) -> list[Any]:
    from editflow.cli.sweeps import combine, parse_sweep, table_axes
    from editflow.documents import read_document

    command_line = [parse_sweep(argument) for argument in getattr(args, "sweeps", [])]
    document, _ = read_document(args.recipe)
    return combine(table_axes(document), command_line)


def _ray_executor(args: argparse.Namespace) -> RayExecutor:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EditflowError(
            "Ray is not installed", file="--executor", hint="pip install 'editflow[ray]'"
        )
    from editflow.executors.ray import RayExecutor

    return RayExecutor(args.address, args.workers)


def run_swept(args: argparse.Namespace, axes: list[Any], out_dir: Path) -> int:
    from editflow.cli.sweeps import run_sweep

    if args.overrides or args.targets:
        raise EditflowError("--sweep runs whole recipes: use --sweep alone", file="--set/--target")
    started = time.perf_counter()
    if not args.log_json:
        count = math.prod(len(axis.values) for axis in axes)
        print(f"{count} sweep points: planning each before anything runs", file=sys.stderr)
    with event_display(args) as display:
        ray = _ray_executor(args) if args.executor == "ray" else None
        result = run_sweep(
            args.recipe, axes, cache=open_cache_of(args), out_root=out_dir, device=args.device,
            events=display, ray=ray, threads=resolve_threads(args.threads)[0],
        )  # fmt: skip
    if not args.log_json:
        grid = f", grid {result.grid}" if result.grid else ""
        print(
            f"{len(result.points)} points: {len(result.computed)} stages computed,"
            f" {len(result.cached)} cached, {len(result.written)} files in {out_dir}{grid}"
            f" ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
    return 0


def plan_swept(args: argparse.Namespace, axes: list[Any], cache: Any) -> int:
    from editflow.cli.sweeps import plan_points, shared_stages

    planned = plan_points(args.recipe, axes, cache)
    shared = shared_stages(planned)
    if args.json:
        rows = {
            "points": [{"name": p.name, "overrides": p.overrides, "keys": p.keys} for p in planned],
            "variants": shared,
        }
        print(json.dumps(rows, indent=2))
        return 0
    shape = " x ".join(f"{axis.key} ({len(axis.values)})" for axis in axes)
    print(f"{len(planned)} points over {shape}:")
    for point in planned:
        done = sum(cache.has(key) for key in point.keys.values())
        print(f"  {point.label}  ({done} of {len(point.keys)} stages cached)")
    width = max(len(name) for name in shared)
    for name, count in shared.items():
        what = "shared by every point: computed once" if count == 1 else f"{count} variants"
        print(f"{name:<{width}}  {what}")
    return 0
