"""The ``editflow`` command line: run, plan, validate, schema, explain, cache, lock, repro,
figures.

User errors (``EditflowError``) print one line per problem and exit 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from editflow import __version__
from editflow.cli.cache_command import cmd_cache
from editflow.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR
from editflow.cli.recipes import cmd_explain, cmd_plan, cmd_run, cmd_schema, cmd_validate
from editflow.cli.reproduce import cmd_figures, cmd_lock, cmd_repro
from editflow.errors import EditflowError

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


def _offline_option(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    parser.add_argument(
        "--offline",
        action="store_true",
        default=default,
        help="never contact the Hugging Face Hub: use only its local cache (HF_HUB_OFFLINE=1)",
    )


def _recipe_command(
    commands: Any, name: str, help: str, targets: bool = True
) -> argparse.ArgumentParser:
    """A command on one recipe: the recipe, --set, --cache and (usually) --target."""
    parser = commands.add_parser(name, help=help)
    _offline_option(parser)
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
    _offline_option(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _recipe_command(commands, "run", "run a recipe, reusing cached stages")
    run.add_argument(
        "--out",
        type=Path,
        help="output folder (default: out/<recipe path under manifests/, else its name>, and"
        " with --set a folder per set of overrides in it: out/<recipe>/<digest>/)",
    )
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
        commands,
        "explain",
        "what changed in a stage's key: since its last run, the lock or a git revision",
        targets=False,
    )
    explain.add_argument("stage", help="stage name")
    explain.add_argument(
        "--against",
        metavar="lock|REV",
        help="compare with the recipe's lock file (lock) or with the recipe at a git revision"
        " (REV), instead of with the stage's last run in this cache",
    )

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

    Otherwise, when no thread but daemons is left, the exit handlers libraries registered
    run (Ray's shutdown, logging's flush) and the process ends without Python's teardown,
    which frees every object one by one: 0.3 s of a 1.6 s ``figures --check`` with every
    stage cached (bench/bench_repro.py). Every file was written and closed before
    :func:`main` returned.
    """
    code = main()
    _flush()
    if code == EXIT_INTERRUPTED:
        os._exit(code)
    if all(thread.daemon for thread in threading.enumerate() if thread is not MAIN_THREAD):
        atexit._run_exitfuncs()
        _flush()
        os._exit(code)
    sys.exit(code)


def _flush() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left before the last of the output: it wanted no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.stderr.flush()


MAIN_THREAD = threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for user errors, 130 when interrupted)."""
    previous = _notice_interrupts()
    try:
        args = build_parser().parse_args(argv)
        if args.offline:  # read when the Hub is first asked, not at import
            os.environ["HF_HUB_OFFLINE"] = "1"
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return _interrupted()
    except EditflowError as error:
        if _INTERRUPT_SEEN.is_set():
            return _interrupted()
        print(error.render(), file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `editflow cache ls | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        # A library that meets Ctrl-C in its own import can raise its own error instead (numpy's
        # C extension: "ImportError: PyCapsule_Import could not import module datetime").
        if _INTERRUPT_SEEN.is_set():
            return _interrupted()
        if not isinstance(error, OSError) or error.errno not in USER_OS_ERRORS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"{where}{error.strerror}", file=sys.stderr)  # the cache stays consistent
        return EXIT_USER_ERROR
    finally:
        if previous is not None and not _INTERRUPT_SEEN.is_set():
            signal.signal(signal.SIGINT, previous)


# Set by our SIGINT handler: whatever a command raises after it is the interrupt's doing.
_INTERRUPT_SEEN = threading.Event()


def _raise_interrupt(signum: int, frame: object) -> None:
    _INTERRUPT_SEEN.set()
    raise KeyboardInterrupt


def _notice_interrupts() -> Any:
    """Put :func:`_raise_interrupt` in place of Python's own SIGINT handler; returns the one
    to restore, or None where SIGINT is ignored (a shell's background job) or handled by
    someone else, or off the main thread."""
    _INTERRUPT_SEEN.clear()
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None
    signal.signal(signal.SIGINT, _raise_interrupt)
    return previous


def _interrupted() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot interrupt this
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


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
