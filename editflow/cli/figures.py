"""``editflow figures``, ``repro`` and ``lock``: recipes rerun against their locks in one
process, and figures that carry their recipe.

Recipes run one after the other through one cache; each model part is loaded once for every
recipe that names the same model (a pool of loaded models keyed by their fingerprint and
dtype), so regenerating a paper's figures pays for the tiny model once, not per recipe. One
output layout serves every command: ``OUT/<recipe path under the folder>/<stem>/``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError, Problem

RECIPE_SUFFIXES = (".toml", ".json")


@dataclass
class RecipeResult:
    """One recipe's rerun and, when it has a lock, its verdict."""

    recipe: Path
    label: str  # the recipe's path under the folder it was found in
    out_dir: Path
    state: str = (
        "no lock"  # matches its lock | within tolerance | drift | no lock | locked | failed
    )
    lines: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    outputs: int = 0
    seconds: float = 0.0
    verdict: Any = None
    tolerance: Any = None

    @property
    def failed(self) -> bool:
        """Whether ``--check`` fails on it."""
        return self.state.split(" (")[0] not in ("matches its lock", "within tolerance", "locked")

    def as_json(self) -> dict[str, Any]:
        return {
            "recipe": self.label,
            "state": self.state,
            "computed": self.computed,
            "cached": self.cached,
            "outputs": self.outputs,
            "seconds": round(self.seconds, 3),
            "lines": self.lines,
            "files": {
                check.name: check.line for check in (self.verdict.files if self.verdict else [])
            },
        }


def recipes_under(folder: Path) -> list[Path]:
    """Every recipe file under ``folder`` (hidden folders skipped), sorted."""
    if not folder.is_dir():
        raise EditflowError(f"{folder} is not a folder", file="figures")
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix in RECIPE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and _is_recipe(path)
    )


def _is_recipe(path: Path) -> bool:
    """TOML files are recipes; a JSON file only with a ``stages`` table (keypoint files and
    other data sit next to recipes)."""
    if path.suffix == ".toml":
        return True
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # let the run say what is wrong with it
    return isinstance(document, dict) and "stages" in document


def find_recipes(paths: list[Path]) -> list[tuple[Path, str]]:
    """(recipe, its path under the folder it was found in) for recipe files and folders.

    Raises:
        EditflowError: A path that does not exist (each named).
    """
    missing = [Problem("not found", file=str(path)) for path in paths if not path.exists()]
    if missing:
        raise EditflowError(problems=missing)
    found = []
    for path in paths:
        if path.is_dir():
            found += [
                (recipe, recipe.relative_to(path).as_posix()) for recipe in recipes_under(path)
            ]
        else:
            found.append((path, path.name))
    return found


def check_recipes(
    recipes: list[tuple[Path, str]],
    *,
    cache: Any,
    out_root: Path,
    device: str = "auto",
    threads: tuple[int, bool] = (1, False),
    update: bool = False,
    events: Any = None,
    on_result: Callable[[RecipeResult, int, int], None] | None = None,
) -> list[RecipeResult]:
    """Rerun each recipe through one cache and one pool of loaded models, writing its outputs
    to ``out_root/<label without suffix>/``, and compare it with its lock (or, with
    ``update``, rewrite the lock and baselines). A recipe that fails is reported in its
    result and the others still run.

    Args:
        recipes: (recipe, label) pairs, as :func:`find_recipes` gives them.
        threads: (count, chosen by the user): a lock is checked at its own thread count
            unless the user chose one or the machine has fewer cores.
        on_result: Called with each result, its index and the count, as each one finishes.
    """
    from editflow.cli.check import compare, rerun
    from editflow.cli.lock import write_lock
    from editflow.cli.threads import threads_for_check

    pool = ModelPool(cache, device, events)
    results = []
    for index, (recipe, label) in enumerate(recipes):
        result = RecipeResult(recipe, label, out_root / Path(label).with_suffix(""))
        started = time.perf_counter()
        try:
            lock = _lock_or_none(recipe, update, cache)
            count = threads_for_check(*threads, lock.threads() if lock else None)
            outcome = rerun(
                recipe, cache=cache, out_dir=result.out_dir, device=device, events=events,
                registry=pool.lend(recipe), threads=count,
                known_pixels={f.sha256: f.pixels for f in lock.file.values()} if lock else None,
            )  # fmt: skip
            pool.keep(outcome.registry)
            result.computed, result.cached = outcome.computed, outcome.cached
            result.outputs, result.tolerance = len(outcome.files), outcome.tolerance
            if lock is not None:
                result.verdict = compare(lock, outcome.facts, recipe=recipe, files=outcome.files,
                                         tolerance=outcome.tolerance)  # fmt: skip
                result.state, result.lines = result.verdict.state, result.verdict.lines()
            elif not update:
                result.lines = [f"no lock: run `editflow lock {recipe}` and commit its lock"]
            if update:
                write_lock(recipe, outcome.facts, outcome.files)
                result.state = f"{result.state} (lock updated)" if lock else "locked"
        except EditflowError as error:
            result.state, result.lines = "failed", error.render().splitlines()
        result.seconds = time.perf_counter() - started
        results.append(result)
        if on_result is not None:
            on_result(result, index, len(recipes))
    return results


def _lock_or_none(recipe: Path, update: bool, cache: Any = None) -> Any:
    """The recipe's lock; with ``update`` an unreadable one is as good as none."""
    from editflow.cli.lock import lock_path, read_lock

    if not lock_path(recipe).is_file():
        return None
    try:
        return read_lock(recipe, memo=cache)
    except EditflowError:
        if update:
            return None
        raise


class ModelPool:
    """Loaded models shared by every recipe that names the same model (keyed by its
    fingerprint and dtype), so regenerating a paper's figures loads each part once."""

    def __init__(self, cache: Any, device: str, events: Any) -> None:
        self.cache, self.device, self.events = cache, device, events
        self.registries: dict[str, Any] = {}

    def lend(self, recipe: Path) -> Any:
        from editflow.engine.api import models_dir_for, plan_recipe
        from editflow.engine.events import Event
        from editflow.models import RunModels
        from editflow.models.section import resolve_device

        def on_load(component: str, seconds: float) -> None:
            if self.events is not None:
                self.events(Event("loaded", message=component, seconds=seconds))

        if not self.registries:  # nothing loaded yet: an all-hit run imports no torch
            return None
        plan = plan_recipe(recipe, cache=self.cache)
        dtype = plan.loaded.recipe.model.torch_dtype
        shared = {
            provider: self.registries[_pool_key(model, dtype)]
            for provider, model in plan.models.items()
            if model is not None and _pool_key(model, dtype) in self.registries
        }
        if not shared:
            return None
        models = RunModels(
            plan.models, device=resolve_device(self.device), dtype=dtype,
            models_dir=models_dir_for(self.cache), on_load=on_load,
        )  # fmt: skip
        models.registries.update(shared)
        return models

    def keep(self, used: Any) -> None:
        for registry in (used.registries if used is not None else {}).values():
            self.registries.setdefault(_pool_key(registry.resolved, used.dtype), registry)


def _pool_key(model: Any, dtype: Any) -> str:
    # The built-in helper models share tiny's identity; their provider tells them apart.
    return json.dumps([model.provider, model.fingerprint(), str(dtype)], sort_keys=True)


FIGURE_SUFFIXES = (".png", ".gif")
_RECIPE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.(toml|json)$")


def is_figure(path: Path) -> bool:
    """Whether a command's recipe argument is an exported figure (PNG or GIF)."""
    return path.suffix.lower() in FIGURE_SUFFIXES


def recipe_of_figure(figure: Path, base: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The recipe an exported PNG (or GIF) carries, as it was run, placed in a base folder.

    The document is untrusted: it is read as strictly as a recipe file (size, nesting,
    duplicate keys, one table at the top), and it chooses nothing on this machine: its
    relative inputs resolve inside ``base`` (the command line's ``--base``, else the figure's
    folder) and nowhere else (:func:`editflow.files.inputs.resolve_input` with ``confined``), and
    the recipe is placed at ``base/<its file name>``, never at a path the figure names.

    Raises:
        EditflowError: Not an editflow figure, or a carried recipe that cannot be read.
    """
    from PIL import Image

    from editflow.documents import MAX_DEPTH, MAX_RECIPE_BYTES, parse_bounded, read_json

    label = str(figure)
    if not figure.is_file():
        raise EditflowError("figure not found", file=label)
    try:
        with Image.open(figure) as image:
            if figure.suffix.lower() == ".gif":
                comment = image.info.get("comment", b"{}")
                text = json.loads(comment.decode("utf-8", "replace") or "{}")
            else:
                text = dict(getattr(image, "text", {}))
    except (OSError, ValueError, SyntaxError) as error:  # PIL: bad files, oversized text chunks
        reason = re.sub(r"\s*(<[^>]*>|'[^']*')$", "", str(error)) or type(error).__name__
        raise EditflowError(f"cannot read the figure's text: {reason}", file=label) from None
    chunk = text.get("editflow:recipe_json") if isinstance(text, dict) else None
    if not isinstance(chunk, str):
        raise EditflowError(
            "not a figure editflow wrote (no editflow:recipe_json text chunk)", file=label
        )
    where = f"{label}: editflow:recipe_json"
    if len(chunk.encode()) > MAX_RECIPE_BYTES:
        raise EditflowError(f"larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe", file=where)
    try:
        document = parse_bounded(read_json, chunk, MAX_DEPTH)
    except json.JSONDecodeError as error:
        raise EditflowError(f"invalid JSON: {error.msg}", file=where, line=error.lineno) from None
    except ValueError as error:  # a key given twice, nesting too deep
        raise EditflowError(str(error), file=where) from None
    if not isinstance(document, dict):
        raise EditflowError("the recipe must be an object at the top level", file=where)
    if document.get("sweep"):
        raise EditflowError(
            "the recipe has a [sweep] table: a figure replays one run, not a sweep",
            file=where, hint="rerun the sweep from its recipe file",
        )  # fmt: skip
    name = str(text.get("editflow:recipe", ""))
    name = name if _RECIPE_NAME.match(name) else "recipe.toml"
    folder = (base if base is not None else figure.parent).resolve()
    if not folder.is_dir():
        raise EditflowError("not a folder", file="--base")
    return folder / name, document
