"""The ``editflow`` command line: run, plan, validate, schema, explain, cache, lock, repro,
figures.

User errors (``EditflowError``) print one line per problem and exit 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from editflow import __version__
from editflow.errors import EditflowError
from editflow.threads import resolve_threads

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# What the machine, not editflow, got wrong: said in one line, like a recipe problem.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS}


def _cache_option(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument(
        "--cache",
        default=default,
        metavar="PATH_OR_URL",
        help="cache folder or fsspec URL (default: $EDITFLOW_CACHE or ~/.cache/editflow)",
    )


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads torch computes with (default: $EDITFLOW_THREADS, else 1)",
    )


def _recipe_command(
    commands: Any, name: str, help: str, targets: bool = True
) -> argparse.ArgumentParser:
    """A command on one recipe: the recipe, --set, --cache and (usually) --target."""
    parser = commands.add_parser(name, help=help)
    parser.add_argument("recipe", type=Path, help="recipe file (.toml or .json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set stages.edit.guidance_scale=12 (repeatable)",
    )
    _cache_option(parser)
    parser.add_argument(
        "--base",
        type=Path,
        metavar="DIR",
        help="for a figure (PNG or GIF) as RECIPE: the folder its recipe's inputs are read"
        " from, and only from (default: the figure's folder)",
    )
    if targets:
        parser.add_argument(
            "--target",
            dest="targets",
            action="append",
            default=None,
            metavar="STAGE",
            help="produce only this stage and what it needs (repeatable)",
        )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editflow", description="Declarative, cached pipelines for diffusion image editing."
    )
    parser.add_argument("--version", action="version", version=f"editflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _recipe_command(commands, "run", "run a recipe, reusing cached stages")
    run.add_argument("--out", type=Path, help="output folder (default: out/<recipe name>)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _threads_option(run)
    run.add_argument("--log-json", action="store_true", help="print events as JSON lines")
    run.add_argument(
        "--executor",
        choices=("inprocess", "ray"),
        default="inprocess",
        help="inprocess (default) or ray: stages and sweep points as Ray tasks (the ray extra)",
    )
    run.add_argument("--address", help="a Ray cluster to join (default: start a local one)")
    run.add_argument(
        "--workers", type=int, help="Ray workers (default: one per CPU, at most 2 locally)"
    )
    plan = _recipe_command(commands, "plan", "show what would run and why; loads no weights")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    for command in (run, plan):
        command.add_argument(
            "--sweep",
            dest="sweeps",
            action="append",
            default=[],
            metavar="KEY.PATH=V1,V2,...",
            help="run over these values (repeatable: the Cartesian product); adds to or"
            " replaces the recipe's [sweep] table",
        )
    _recipe_command(commands, "validate", "check a recipe and its graph")
    commands.add_parser("schema", help="print the recipe JSON Schema")
    explain = _recipe_command(
        commands, "explain", "what changed in a stage's key since its last run", targets=False
    )
    explain.add_argument("stage", help="stage name")

    cache = commands.add_parser("cache", help="inspect and maintain the cache")
    _cache_option(cache)
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list entries")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    du = actions.add_parser("du", help="disk usage")
    verify = actions.add_parser("verify", help="recompute checksums; damaged entries are removed")
    verify.add_argument("--keep-damaged", action="store_true", help="report only")
    gc = actions.add_parser("gc", help="remove unpublished leftovers and old entries")
    gc.add_argument("--older-than-days", type=float, help="also remove older entries (days)")
    rm = actions.add_parser("rm", help="remove entries by key or unique prefix (>= 8 characters)")
    rm.add_argument("keys", nargs="*", metavar="KEY")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    for action in (ls, du, verify, gc, rm):
        # Accepted after the action too; SUPPRESS keeps a value given before it.
        _cache_option(action, default=argparse.SUPPRESS)

    lock = commands.add_parser(
        "lock", help="run recipes and write RECIPE.lock and RECIPE.baseline/ next to each"
    )
    repro = commands.add_parser("repro", help="rerun recipes and compare with their locks")
    for command in (lock, repro):
        command.add_argument(
            "recipes", nargs="+", type=Path, metavar="RECIPE", help="recipe files or folders"
        )
    figures = commands.add_parser(
        "figures", help="rerun every recipe under a folder against its lock, in one process"
    )
    figures.add_argument("folder", nargs="?", type=Path, default=Path("manifests"))
    for command in (repro, figures):
        command.add_argument(
            "--check",
            action="store_true",
            help="exit 1 on drift beyond tolerance, a recipe without a lock or a failed recipe",
        )
        command.add_argument(
            "--update", action="store_true", help="rewrite the locks and baseline images"
        )
        command.add_argument("--json", action="store_true", help="print the results as JSON")
    for command in (lock, repro, figures):
        _cache_option(command)
        command.add_argument(
            "--out", type=Path, default=Path("out"),
            help="output root: OUT/<recipe path under the folder>/<stem>/",
        )  # fmt: skip
        command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        _threads_option(command)
    return parser


def entry() -> None:
    """The ``editflow`` command: :func:`main`, then exit with its status.

    After Ctrl-C the process ends at once: interpreter shutdown could otherwise meet the
    interrupt again in a library's thread or finaliser and print a traceback. What must be
    undone (staged cache objects, half-written files) was undone as the interrupt unwound.
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for user errors, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except EditflowError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `editflow cache ls | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        if error.errno not in USER_OS_ERRORS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"{where}{error.strerror}", file=sys.stderr)  # the cache stays consistent
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot interrupt this
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _cache(args: argparse.Namespace):
    from editflow.engine.api import open_cache

    return open_cache(args.cache)


@contextlib.contextmanager
def _display(args: argparse.Namespace) -> Iterator[Any]:
    """The run's event display: JSON lines with ``--log-json``, else progress bars."""
    from editflow.progress import JsonLines, ProgressDisplay

    display = JsonLines() if args.log_json else ProgressDisplay()
    try:
        yield display
    finally:
        if isinstance(display, ProgressDisplay):
            display.close()


def cmd_run(args: argparse.Namespace) -> int:
    from editflow.engine.api import run_recipe
    from editflow.figures import is_figure

    if is_figure(args.recipe):
        return run_figure(args)
    out_dir = args.out or Path("out") / args.recipe.stem
    axes = _sweep_axes(args)
    if axes:
        return run_swept(args, axes, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EditflowError(f"{out_dir} is a file, not a folder", file="--out")
    started = time.perf_counter()
    with _display(args) as display:
        executor = None
        if args.executor == "ray":
            from editflow.ray_executor import RayExecutor

            executor = RayExecutor(**_ray_options(args))
        result = run_recipe(
            args.recipe,
            args.overrides,
            cache=_cache(args),
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

    cache = _cache(args)
    if _figure_document(args) is None and (axes := _sweep_axes(args)):
        return plan_swept(args, axes, cache)
    plan = _plan(args, cache)
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
    from editflow.sweeps import plan_points

    cache = _cache(args)
    plan = _plan(args, cache)
    summary = f"{len(plan.stages)} stages, {len(plan.inputs)} inputs"
    axes = _sweep_axes(args) if _figure_document(args) is None else []
    if axes:  # every point, as run and plan would make it
        summary += f", {len(plan_points(args.recipe, axes, cache))} sweep points"
    print(f"{args.recipe}: ok ({summary})")
    return 0


def _figure_document(args: argparse.Namespace) -> tuple[Path, dict[str, Any]] | None:
    """(where, document) of the recipe a figure given as RECIPE carries; None for a recipe."""
    from editflow.figures import is_figure, recipe_of_figure

    if not is_figure(args.recipe):
        if args.base is not None:
            raise EditflowError("only for a figure given as RECIPE", file="--base")
        return None
    if getattr(args, "sweeps", None):
        raise EditflowError(
            "a figure replays one run, not a sweep", file="--sweep",
            hint="sweep the recipe file it came from",
        )  # fmt: skip
    return recipe_of_figure(args.recipe, args.base)


def _plan(args: argparse.Namespace, cache: Any) -> Any:
    """The plan of RECIPE, or of the recipe a figure carries (confined to its base)."""
    from editflow.engine.api import plan_recipe

    carried = _figure_document(args)
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

    cache = _cache(args)
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


def cmd_cache(args: argparse.Namespace) -> int:
    from editflow.cache.report import human_size, keys_for_prefixes, listing

    cache = _cache(args)
    if args.action == "ls" and getattr(args, "json", False):
        rows = [
            {
                "key": info.key,
                "kind": (info.attrs or {}).get("kind"),
                "stage": (info.attrs or {}).get("stage"),
                "recipe": (info.attrs or {}).get("recipe"),
                "stored_bytes": info.stored_bytes,
                "created": info.created,
            }
            for info in cache.ls()
        ]
        print(json.dumps(rows, indent=2))
    elif args.action == "ls":
        print("\n".join(listing(cache.ls())) or "the cache is empty")
    elif args.action == "du":
        usage = cache.du()
        print(f"{usage.entries} entries, {human_size(usage.entry_bytes)}")
        if usage.staging_bytes:
            print(f"{human_size(usage.staging_bytes)} in unpublished leftovers (editflow cache gc)")
    elif args.action == "verify":
        damages = cache.verify()
        for damage in damages:
            print(f"damaged {damage.key} {damage.array}: {damage.reason}")
        if damages and not args.keep_damaged:
            for key in sorted({damage.key for damage in damages}):
                cache.discard(key)
            print(f"removed {len({d.key for d in damages})} damaged entries; reruns recompute them")
        if not damages:
            print("all entries intact")
        return 1 if damages else 0
    elif args.action == "gc":
        cutoff = time.time() - (args.older_than_days or 0) * 86400
        keep = (lambda info: info.created >= cutoff) if args.older_than_days is not None else None
        report = cache.gc(keep=keep)
        print(
            f"removed {len(report.removed_entries)} entries and {report.removed_staging} unpublished "
            f"leftovers, freed {human_size(report.freed_bytes)}"
        )
    elif args.action == "rm":
        if args.all == bool(args.keys):
            raise EditflowError("give entry keys or --all (not both)", file="cache rm")
        keys = [info.key for info in cache.ls()]
        print(
            f"removed {cache.rm(keys if args.all else keys_for_prefixes(keys, args.keys))} entries"
        )
    return 0


def _sweep_axes(args: argparse.Namespace) -> list[Any]:
    from editflow.documents import read_document
    from editflow.sweeps import combine, parse_sweep, table_axes

    command_line = [parse_sweep(argument) for argument in getattr(args, "sweeps", [])]
    document, _ = read_document(args.recipe)
    return combine(table_axes(document), command_line)


def _ray_options(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EditflowError(
            "Ray is not installed", file="--executor", hint="pip install 'editflow[ray]'"
        )
    return {"address": args.address, "workers": args.workers}


def run_swept(args: argparse.Namespace, axes: list[Any], out_dir: Path) -> int:
    from editflow.sweeps import run_sweep

    if args.overrides or args.targets:
        raise EditflowError("--sweep runs whole recipes: use --sweep alone", file="--set/--target")
    started = time.perf_counter()
    if not args.log_json:
        count = math.prod(len(axis.values) for axis in axes)
        print(f"{count} sweep points: planning each before anything runs", file=sys.stderr)
    with _display(args) as display:
        ray = _ray_options(args) if args.executor == "ray" else None
        result = run_sweep(
            args.recipe, axes, cache=_cache(args), out_root=out_dir, device=args.device,
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
    from editflow.sweeps import plan_points, shared_stages

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


def _check(args: argparse.Namespace, paths: list[Path], update: bool, progress: bool) -> list:
    """Rerun recipes (files, or every recipe under folders) against their locks."""
    from editflow.figures import check_recipes, find_recipes

    def report(result: Any, index: int, count: int) -> None:
        counts = f"{len(result.computed)} computed, {len(result.cached)} cached"
        print(f"[{index + 1:>{len(str(count))}}/{count}] {result.label}: {result.state}"
              f" ({counts}, {result.seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip

    return check_recipes(
        find_recipes(paths), cache=_cache(args), out_root=args.out, device=args.device,
        threads=resolve_threads(args.threads), update=update,
        on_result=report if progress else None,
    )  # fmt: skip


def cmd_lock(args: argparse.Namespace) -> int:
    from editflow.lock import baseline_dir, lock_path

    results = _check(args, args.recipes, update=True, progress=False)
    for result in results:
        if result.state == "failed":
            print("\n".join(result.lines), file=sys.stderr)
            continue
        print(f"{lock_path(result.recipe)}: {len(result.computed) + len(result.cached)} stages,"
              f" {result.outputs} files in {baseline_dir(result.recipe).name}/")  # fmt: skip
    return EXIT_USER_ERROR if any(result.state == "failed" for result in results) else 0


def cmd_repro(args: argparse.Namespace) -> int:
    results = _check(args, args.recipes, update=args.update, progress=False)
    if args.json:
        print(json.dumps([result.as_json() for result in results], indent=2))
    else:
        for result in results:
            print(f"{result.recipe}: {result.state}")
            for line in result.lines:
                print(f"  {line}")
    return _exit_status(args, results)


def _exit_status(args: argparse.Namespace, results: list) -> int:
    """--check: 1 on drift beyond tolerance, a missing lock or a failed recipe (with --update,
    only on a failed one); without it, 2 when a recipe failed, else 0."""
    failed = any(result.state == "failed" for result in results)
    if args.check:
        return 1 if failed or (not args.update and any(r.failed for r in results)) else 0
    return EXIT_USER_ERROR if failed else 0


def cmd_figures(args: argparse.Namespace) -> int:
    from editflow.report import step_summary, write_report

    results = _check(args, [args.folder], update=args.update, progress=not args.json)
    if args.json:
        print(json.dumps([result.as_json() for result in results], indent=2))
    else:
        header = ("recipe", "computed", "cached", "outputs", "verdict")
        table = [header] + [
            (r.label, str(len(r.computed)), str(len(r.cached)), str(r.outputs), r.state)
            for r in results
        ]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        for line in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        for result in results:
            for line in result.lines:
                print(f"{result.label}: {line}")
    if not args.update:
        report = write_report(args.out / "report.html", results)
        print(f"report: {report}", file=sys.stderr)
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as summary:
                summary.write(step_summary(results))
    return _exit_status(args, results)


def run_figure(args: argparse.Namespace) -> int:
    """``editflow run FIGURE.png`` (or an animation's GIF): rerun the recipe it carries,
    confined to its base folder, writing to ``--out`` or ``out/<figure stem>``."""
    from editflow.engine.api import run_recipe

    recipe, document = _figure_document(args)
    out_dir = args.out or Path("out") / args.recipe.stem
    if out_dir.exists() and not out_dir.is_dir():
        raise EditflowError(f"{out_dir} is a file, not a folder", file="--out")
    started = time.perf_counter()
    with _display(args) as display:
        result = run_recipe(
            recipe, args.overrides, cache=_cache(args), out_dir=out_dir, device=args.device,
            events=display, targets=args.targets, document=document, confined=True,
            threads=resolve_threads(args.threads)[0],
        )  # fmt: skip
    print(
        f"{args.recipe}: the recipe it carries ({recipe.name}, inputs from {recipe.parent});"
        f" {len(result.hits)} stages were in the cache, {len(result.computed)} computed;"
        f" {len(result.written)} files in {out_dir} ({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "explain": cmd_explain,
    "cache": cmd_cache,
    "lock": cmd_lock,
    "repro": cmd_repro,
    "figures": cmd_figures,
}

if __name__ == "__main__":
    entry()
