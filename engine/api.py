"""The programmatic entry points the CLI is a thin layer over: plan and run a recipe."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from editflow.cache import Cache, default_cache_url
from editflow.engine.events import CollectEvents, EventSink
from editflow.engine.execute import Executor, InProcessExecutor, RunResult, Session
from editflow.engine.plan import Plan, build_plan
from editflow.engine.recipe import load_recipe
from editflow.files.tables import export_run
from editflow.models import RunModels, models_dir, resolve_device


def models_dir_for(cache: Cache) -> Path:
    """Where built-in models are saved and local weight hashes memoised, for this cache."""
    return models_dir(cache.local_root, Path(default_cache_url()))


def open_cache(url: str | os.PathLike | None = None) -> Cache:
    """The cache at ``url``, else at :func:`editflow.cache.default_cache_url`."""
    return Cache(url if url is not None else default_cache_url())


def plan_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    cache: Cache,
    targets: list[str] | None = None,
    document: dict[str, Any] | None = None,
    confined: bool = False,
) -> Plan:
    """Load, validate and plan a recipe; loads no model weights and writes nothing.
    ``confined``: the recipe's inputs must lie under its folder (a figure's recipe)."""
    loaded = load_recipe(path, overrides, defer=True, document=document, confined=confined)
    return build_plan(loaded, models_dir=models_dir_for(cache), targets=targets)


def run_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    cache: Cache,
    out_dir: str | Path | None,
    device: str = "auto",
    events: EventSink | None = None,
    targets: list[str] | None = None,
    registry: RunModels | None = None,
    executor: Executor | None = None,
    document: dict[str, Any] | None = None,
    threads: int | None = None,
    confined: bool = False,
    tables: bool = True,
    plan: Plan | None = None,
) -> RunResult:
    """Plan and run a recipe; returns what ran, what hit and which files were written.

    ``threads`` sets torch's CPU thread count when a stage computes (default: leave it);
    ``tables`` False: not its tables and plots (a sweep writes one of all its points);
    ``plan``: one already made of this recipe with these arguments (a sweep's point's).
    """
    if device not in ("auto", "cpu"):
        resolve_device(device)  # a device this machine lacks is an error before any work
    if plan is None:
        plan = plan_recipe(path, overrides, cache=cache, targets=targets, document=document,
                           confined=confined)  # fmt: skip
    session = Session(
        cache=cache,
        out_dir=Path(out_dir) if out_dir is not None else None,
        device_name=device,
        events=events or CollectEvents(),
        models_dir=models_dir_for(cache),
        registry=registry,
        threads=threads,
    )
    result = (executor or InProcessExecutor()).execute(plan, session)
    result.registry, result.plan = session.registry, plan
    if out_dir is not None and tables:  # the recipe's tables and plots, from cached outputs
        result.written += export_run(plan, cache, Path(out_dir))
    return result
