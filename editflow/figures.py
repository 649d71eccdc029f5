"""``editflow figures``: every recipe under a folder in one process, and figures that carry
their recipe.

Recipes run one after the other through one cache; each model part is loaded once for every
recipe that names the same model (a pool of loaded models keyed by their fingerprint and
dtype), so regenerating a paper's figures pays for the tiny model once, not per recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError

RECIPE_SUFFIXES = (".toml", ".json")


@dataclass
class FigureRow:
    """One recipe's line of the summary."""

    recipe: str
    computed: int = 0
    cached: int = 0
    outputs: int = 0
    drift: str = "no lock"
    error: str | None = None
    drift_lines: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, str, str, str, str]:
        if self.error is not None:
            return (self.recipe, "-", "-", "-", "failed")
        counts = (str(self.computed), str(self.cached), str(self.outputs))
        return (self.recipe, *counts, self.drift)

    def as_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "computed": self.computed,
            "cached": self.cached,
            "outputs": self.outputs,
            "drift": self.drift,
            "drift_lines": self.drift_lines,
            "error": self.error,
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


def run_figures(
    folder: Path, *, cache: Any, out_root: Path, device: str = "auto", events: Any = None
) -> list[FigureRow]:
    """Run every recipe under ``folder`` (outputs in ``out_root/<recipe path>/``); a recipe
    that fails is reported in its row and the others still run. ``events`` receives every
    run's events and one ``loaded`` event per model part loaded."""
    from editflow.engine.api import models_dir_for, plan_recipe
    from editflow.engine.events import CollectEvents, Event
    from editflow.lock import compare, describe, lock_path, parse, rerun
    from editflow.models import RunModels
    from editflow.models.section import resolve_device

    torch_device, pool, rows = resolve_device(device), {}, []
    events = events if events is not None else CollectEvents()

    def on_load(component: str, seconds: float) -> None:
        events(Event("loaded", message=component, seconds=seconds))

    for recipe in recipes_under(folder):
        row = FigureRow(recipe.relative_to(folder).as_posix())
        rows.append(row)
        try:
            plan = plan_recipe(recipe, cache=cache)
            dtype = plan.loaded.recipe.model.torch_dtype
            models = RunModels(
                plan.models, device=torch_device, dtype=dtype, models_dir=models_dir_for(cache),
                on_load=on_load,
            )  # fmt: skip
            for provider, model in plan.models.items():
                shared = pool.get(_pool_key(model, dtype))
                if shared is not None:
                    models.registries[provider] = shared
            out_dir = out_root / recipe.relative_to(folder).with_suffix("")
            outcome, used = rerun(
                recipe, cache=cache, out_dir=out_dir, device=device, registry=models,
                events=events,
            )  # fmt: skip
            for registry in (used.registries if used is not None else {}).values():
                pool.setdefault(_pool_key(registry.resolved, dtype), registry)
        except EditflowError as error:
            row.error = error.render()
            continue
        row.computed, row.cached = len(outcome.computed), len(outcome.cached)
        row.outputs = len(outcome.written)
        if lock_path(recipe).is_file():
            lock = parse(lock_path(recipe).read_text(encoding="utf-8"), str(lock_path(recipe)))
            drift = compare(lock, outcome.facts)
            row.drift_lines = describe(drift)
            row.drift = (
                f"{len(drift.stages) + len(drift.files)} drifted" if drift.drifted else "none"
            )
            if not drift.comparable and not drift.drifted:
                row.drift = "none (keys only: other platform)"
    return rows


def _pool_key(model: Any, dtype: Any) -> str:
    # The built-in helper models share tiny's identity; their layout tells them apart.
    return json.dumps([model.layout, model.fingerprint(), str(dtype)], sort_keys=True)


def recipe_of_figure(figure: Path) -> tuple[Path, dict[str, Any]]:
    """The recipe an exported PNG carries: where it lives (for its relative inputs) and the
    document as it was run.

    The recipe's path is recorded inside its git repository; it is looked up from the current
    folder and from each folder above the figure.

    Raises:
        EditflowError: The file is not an editflow figure, or its recipe's folder is not found.
    """
    from PIL import Image

    try:
        with Image.open(figure) as image:
            text = dict(getattr(image, "text", {}))
    except OSError as error:
        raise EditflowError(f"cannot read {figure}: {error}", file=str(figure)) from None
    if "editflow:recipe_json" not in text:
        raise EditflowError(
            "not a figure editflow wrote (no editflow:recipe_json text chunk)", file=str(figure)
        )
    document = json.loads(text["editflow:recipe_json"])
    recorded = Path(text.get("editflow:recipe_path", text.get("editflow:recipe", "recipe.toml")))
    if recorded.is_absolute():
        candidates = [recorded]
    else:
        folders = [Path.cwd(), *figure.resolve().parents]
        candidates = [folder / recorded for folder in folders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, document
    if recorded.is_absolute() and recorded.parent.is_dir():
        return recorded, document  # the file is gone; its folder still holds the inputs
    raise EditflowError(
        f"the recipe {recorded} is not found from here or above the figure",
        file=str(figure),
        hint="run from the repository the recipe lives in (its inputs are relative to it)",
    )
