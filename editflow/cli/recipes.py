"""The commands on one recipe: run, plan, validate, schema, explain (sweeps included)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
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
    out_dir = args.out or default_out_dir(args.recipe, args.overrides)
    axes = _sweep_axes(args)
    if axes:
        code = run_swept(args, axes, out_dir)
        if not args.out:
            write_overrides(out_dir, args.recipe, args.overrides)
        return code
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
    if not args.out:
        write_overrides(out_dir, args.recipe, args.overrides)
    if not args.log_json:
        seconds = time.perf_counter() - started
        print(
            f"{len(result.computed)} computed, {len(result.hits)} cached, "
            f"{len(result.written)} files in {out_dir} ({seconds:.1f} s)",
            file=sys.stderr,
        )
    return 0


OVERRIDES_FILE = "overrides.toml"


def out_root_of(recipe: Path) -> Path:
    """The folder a recipe's default output path is taken under: the nearest ancestor named
    ``manifests`` (this project's recipes, as ``figures`` and ``lock`` lay them out), else
    the recipe's own folder."""
    folder = Path(os.path.abspath(recipe)).parent
    for ancestor in (folder, *folder.parents):
        if ancestor.name == "manifests":
            return ancestor
    return folder


def default_out_dir(recipe: Path, overrides: list[str] | None = None) -> Path:
    """``out/<the recipe's path under its root, without suffix>/``, and with ``--set`` values
    a folder of their own in it, ``<short digest of the overrides>/``, so an exploratory run
    never overwrites the recipe's own outputs.

    ``manifests/compositing/background.toml`` -> ``out/compositing/background``; with
    ``--set stages.edit.eta=0.5`` -> ``out/compositing/background/<digest>``.
    """
    path = Path(os.path.abspath(recipe))
    out_dir = Path("out") / path.relative_to(out_root_of(path)).with_suffix("")
    return out_dir / overrides_digest(overrides) if overrides else out_dir


def normalized_overrides(overrides: list[str]) -> list[str]:
    """``KEY=VALUE`` with the spaces around both taken off; sorted when every key is set once
    (the order then changes nothing), else in the given order (the last one wins)."""
    pairs = [override.partition("=") for override in overrides]
    normal = [f"{key.strip()}{sep}{value.strip()}" for key, sep, value in pairs]
    keys = [key.strip() for key, _, _ in pairs]
    return sorted(normal) if len(set(keys)) == len(keys) else normal


def overrides_digest(overrides: list[str]) -> str:
    """12 hex digits of sha256 over the normalised ``--set`` values (stable across runs and
    machines: the same overrides always name the same folder)."""
    text = json.dumps(normalized_overrides(overrides))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_overrides(out_dir: Path, recipe: Path, overrides: list[str]) -> Path | None:
    """``OUT/overrides.toml``: the recipe and the ``--set`` values the folder's outputs were
    made with (nothing without overrides: the folder is the recipe's own)."""
    import tomli_w

    if not overrides:
        return None
    path = out_dir / OVERRIDES_FILE
    document = {"recipe": recipe.as_posix(), "set": list(overrides)}
    header = "# The --set values the outputs in this folder were made with.\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(header + tomli_w.dumps(document), encoding="utf-8")
    return path


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
        summary += f", {len(plan_points(args.recipe, axes, cache, args.overrides))} sweep points"
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
    from editflow.cli.explain import against_last_run, against_lock, against_revision
    from editflow.engine.api import plan_recipe

    cache = open_cache_of(args)
    plan = plan_recipe(args.recipe, args.overrides, cache=cache)
    if args.stage not in plan.stages:
        raise EditflowError(f"no stage named {args.stage!r}", file=str(args.recipe))
    stage = plan.stages[args.stage]
    if args.against is None:
        lines = against_last_run(plan, stage, cache)
    elif args.against == "lock":
        lines = against_lock(args.recipe, plan, stage)
    else:
        lines = against_revision(args.recipe, plan, stage, args.against, cache)
    print(f"{stage.name} ({stage.kind.kind}) key {stage.key}")
    for line in lines:
        print(f"  {line}")
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

    if args.targets:
        raise EditflowError("--sweep runs whole recipes: leave --target out", file="--target")
    started = time.perf_counter()
    if not args.log_json:
        count = math.prod(len(axis.values) for axis in axes)
        print(f"{count} sweep points: planning each before anything runs", file=sys.stderr)
    with event_display(args) as display:
        ray = _ray_executor(args) if args.executor == "ray" else None
        result = run_sweep(
            args.recipe, axes, cache=open_cache_of(args), out_root=out_dir, device=args.device,
            events=display, ray=ray, threads=resolve_threads(args.threads)[0],
            overrides=args.overrides,
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

    planned = plan_points(args.recipe, axes, cache, args.overrides)
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
