"""What the commands share: the cache a command opens and the display of a run's events."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def open_cache_of(args: argparse.Namespace):
    from editflow.engine.api import open_cache

    return open_cache(args.cache)


@contextlib.contextmanager
def event_display(args: argparse.Namespace) -> Iterator[Any]:
    """The run's event display: JSON lines with ``--log-json``, else progress bars; the run
    between a 'run-start' and a 'run-end' event."""
    from editflow.cli.progress import JsonLines, ProgressDisplay, reported_run

    display = JsonLines() if args.log_json else ProgressDisplay()
    try:
        with reported_run(display, str(args.recipe)):
            yield display
    finally:
        if isinstance(display, ProgressDisplay):
            display.close()


def figure_document(args: argparse.Namespace) -> tuple[Path, dict[str, Any]] | None:
    """(where, document) of the recipe a figure given as RECIPE carries; None for a recipe."""
    from editflow.cli.figures import is_figure, recipe_of_figure

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
