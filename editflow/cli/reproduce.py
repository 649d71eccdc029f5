"""The commands that tie figures to locks: lock, repro, figures, and running a figure."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from editflow.cli.common import EXIT_USER_ERROR, event_display, figure_document, open_cache_of
from editflow.cli.threads import resolve_threads
from editflow.errors import EditflowError


def _check(args: argparse.Namespace, paths: list[Path], update: bool, progress: bool) -> list:
    """Rerun recipes (files, or every recipe under folders) against their locks."""
    from editflow.cli.figures import check_recipes, find_recipes

    def report(result: Any, index: int, count: int) -> None:
        counts = f"{len(result.computed)} computed, {len(result.cached)} cached"
        print(f"[{index + 1:>{len(str(count))}}/{count}] {result.label}: {result.state}"
              f" ({counts}, {result.seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip

    return check_recipes(
        find_recipes(paths), cache=open_cache_of(args), out_root=args.out, device=args.device,
        threads=resolve_threads(args.threads), update=update,
        on_result=report if progress else None,
    )  # fmt: skip


def cmd_lock(args: argparse.Namespace) -> int:
    from editflow.cli.lock import baseline_dir, lock_path

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
    from editflow.cli.report import step_summary, write_report

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
    confined to its base folder, writing to ``--out`` or ``out/<figure stem>`` (with
    ``--set``, ``out/<figure stem>/<digest of the overrides>``)."""
    from editflow.cli.recipes import overrides_digest, write_overrides
    from editflow.engine.api import run_recipe

    recipe, document = figure_document(args)
    out_dir = args.out or Path("out") / args.recipe.stem
    if args.overrides and not args.out:
        out_dir = out_dir / overrides_digest(args.overrides)
    if out_dir.exists() and not out_dir.is_dir():
        raise EditflowError(f"{out_dir} is a file, not a folder", file="--out")
    started = time.perf_counter()
    with event_display(args) as display:
        result = run_recipe(
            recipe, args.overrides, cache=open_cache_of(args), out_dir=out_dir, device=args.device,
            events=display, targets=args.targets, document=document, confined=True,
            threads=resolve_threads(args.threads)[0],
        )  # fmt: skip
    if not args.out:
        write_overrides(out_dir, args.recipe, args.overrides)
    print(
        f"{args.recipe}: the recipe it carries ({recipe.name}, inputs from {recipe.parent});"
        f" {len(result.hits)} stages were in the cache, {len(result.computed)} computed;"
        f" {len(result.written)} files in {out_dir} ({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0
