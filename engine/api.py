"""The programmatic entry points the CLI is a thin layer over: plan and run a recipe."""

from __future__ import annotations

import os
from pathlib import Path

from editflow.cache import Cache
from editflow.engine.events import CollectEvents, EventSink
from editflow.engine.execute import (
    Executor,
    InProcessExecutor,
    RunResult,
    Session,
    resolve_device,
)
from editflow.engine.models import ModelRegistry
from editflow.engine.plan import Plan, build_plan
from editflow.engine.recipe import load_recipe

CACHE_ENV = "EDITFLOW_CACHE"
MODELS_ENV = "EDITFLOW_MODELS"


def default_cache_url() -> str:
    """``$EDITFLOW_CACHE``, else ``$XDG_CACHE_HOME/editflow``, else ``~/.cache/editflow``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "editflow")


def models_dir_for(cache: Cache) -> Path:
    """Where built-in models (``tiny``) are saved and weight hashes memoised.

    ``$EDITFLOW_MODELS`` when set; else inside the cache folder when the cache is local; for
    a remote cache, in the default local cache folder (weights load from local disk).
    """
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    if cache.local_root is not None:
        return cache.local_root / "models"
    return Path(default_cache_url()) / "models"


def open_cache(url: str | os.PathLike | None = None) -> Cache:
    return Cache(url if url is not None else default_cache_url())


def plan_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    cache: Cache,
    targets: list[str] | None = None,
) -> Plan:
    """Load, validate and plan a recipe; loads no model weights and writes nothing."""
    loaded = load_recipe(path, overrides, defer=True)
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
    registry: ModelRegistry | None = None,
    executor: Executor | None = None,
) -> RunResult:
    """Plan and run a recipe; returns what ran, what hit and which files were written."""
    torch_device = resolve_device(device)
    plan = plan_recipe(path, overrides, cache=cache, targets=targets)
    session = Session(
        cache=cache,
        out_dir=Path(out_dir) if out_dir is not None else None,
        device=torch_device,
        events=events or CollectEvents(),
        models_dir=models_dir_for(cache),
        registry=registry,
    )
    result = (executor or InProcessExecutor()).execute(plan, session)
    result.registry = session.registry
    return result
