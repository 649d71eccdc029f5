"""Sweeps: a recipe run over the Cartesian product of parameter values.

Axes come from ``--sweep stages.edit.skip=20,30,40`` (repeatable) or the recipe's ``[sweep]``
table (``"stages.edit.skip" = [20, 30, 40]``); the command line replaces a table axis of the
same key. Each point is the recipe with one value per axis set, as ``--set`` would; all
points are planned before anything runs (so every bad value is reported first), and they
run through one cache and one set of loaded models, so a stage whose key is the same in
several points (the caption, the inversion, the attention maps) is computed once. Each
point writes under ``out/<recipe>/<point>/`` with a readable point name, and the sweep's
grid of figures, labelled with the axis values, is ``out/<recipe>/sweep.png``.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError, Problem, RecipeError

_POINT_NAME = re.compile(r"[^A-Za-z0-9_.=,+-]")


@dataclass(frozen=True)
class Axis:
    """One swept key, its values, and where the user gave it (for messages)."""

    key: str
    values: tuple[Any, ...]
    origin: str  # "--sweep KEY=V1,V2" or 'sweep."KEY"'


@dataclass
class Point:
    """One combination of axis values."""

    name: str
    overrides: list[str]
    label: str
    values: tuple[Any, ...]
    keys: dict[str, str] = field(default_factory=dict)  # stage -> key, once planned


def parse_sweep(argument: str) -> Axis:
    """``stages.edit.skip=20,30,40`` -> an axis (values parsed as TOML, else strings)."""
    origin = f"--sweep {argument}"
    key, separator, text = argument.partition("=")
    key = key.strip()
    if not separator or not key or not text.strip():
        raise EditflowError("expected KEY.PATH=VALUE,VALUE,...", file=origin)
    try:
        values = tomllib.loads(f"values = [{text}]")["values"]
    except tomllib.TOMLDecodeError:  # bare words: each value on its own, as --set reads it
        values = [_value(value.strip()) for value in text.split(",")]
    return Axis(key, tuple(values), origin)


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def table_axes(document: Mapping[str, Any]) -> list[Axis]:
    """The axes of a recipe's ``[sweep]`` table."""
    table = document.get("sweep") or {}
    axes = []
    for key, values in table.items():
        origin = f"sweep.{json.dumps(key)}"
        if not isinstance(values, list) or not values:
            raise EditflowError("must be a non-empty array of values", file=origin)
        axes.append(Axis(key, tuple(values), origin))
    return axes


def combine(table: list[Axis], command_line: list[Axis]) -> list[Axis]:
    """The table's axes with the command line's replacing those of the same key."""
    given = {axis.key for axis in command_line}
    return [axis for axis in table if axis.key not in given] + command_line


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def points(axes: list[Axis]) -> list[Point]:
    """Every combination, the first axis varying slowest."""
    result = []
    for values in itertools.product(*(axis.values for axis in axes)):
        parts = [
            f"{_short(axis.key)}={_text(value)}" for axis, value in zip(axes, values, strict=True)
        ]
        overrides = [f"{axis.key}={_toml(value)}" for axis, value in zip(axes, values, strict=True)]
        name = _POINT_NAME.sub("_", ",".join(parts))[:200]
        result.append(Point(name, overrides, ", ".join(parts), values))
    return result


def _short(key: str) -> str:
    return key.removeprefix("stages.")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _toml(value)


def plan_points(recipe: Path, axes: list[Axis], cache: Any) -> list[Point]:
    """Plan every point (nothing runs, no weights load); every bad value is reported with
    the sweep that gave it.

    Raises:
        RecipeError: Some point does not plan; its problems name the ``--sweep`` argument or
            the ``[sweep]`` table key instead of the ``--set`` it became.
    """
    from editflow.engine.api import plan_recipe

    if not axes:
        raise EditflowError("a sweep needs at least one axis", file=str(recipe))
    plan_recipe(recipe, cache=cache)  # the recipe itself, its problems located in its file
    document = base_document(recipe)
    problems: list[Problem] = []
    planned = points(axes)
    for point in planned:
        try:
            plan = plan_recipe(recipe, point.overrides, cache=cache, document=document)
        except RecipeError as error:
            problems += [_relabel(problem, axes) for problem in error.problems]
            continue
        point.keys = {name: stage.key for name, stage in plan.stages.items() if stage.needed}
    if problems:
        unique = list({(p.file, p.line, p.key, p.message, p.hint): p for p in problems}.values())
        raise RecipeError(problems=unique)
    return planned


def base_document(recipe: Path) -> dict[str, Any]:
    """The recipe without its ``[sweep]`` table: every point is this plus its values, so a
    sweep given on the command line and the same sweep in the table make the same files."""
    from editflow.documents import read_document

    document, _ = read_document(recipe)
    document.pop("sweep", None)
    return document


def _relabel(problem: Problem, axes: list[Axis]) -> Problem:
    for axis in axes:
        if (problem.file or "").startswith(f"--set {axis.key}="):
            return Problem(problem.message, file=axis.origin, key=problem.key, hint=problem.hint)
    return problem


def shared_stages(planned: list[Point]) -> dict[str, int]:
    """Stage name -> how many distinct keys it has over the points (1: computed once)."""
    names = dict.fromkeys(name for point in planned for name in point.keys)
    return {name: len({point.keys.get(name) for point in planned}) for name in names}


@dataclass
class SweepResult:
    points: list[Point]
    computed: list[str]  # "point/stage" for each stage computed
    cached: list[str]
    written: list[Path]
    grid: Path | None
    outcomes: list[Any] = field(default_factory=list)  # each point's RunResult


def run_sweep(
    recipe: Path,
    axes: list[Axis],
    *,
    cache: Any,
    out_root: Path,
    device: str = "auto",
    events: Any = None,
    ray: dict[str, Any] | None = None,
    registry: Any = None,
    threads: int | None = None,
) -> SweepResult:
    """Run every point through one cache and one set of models (or, with ``ray`` options
    ``{"address", "workers"}``, on Ray: points and independent stages in parallel); write the
    sweep grid. ``registry`` lends models loaded by an earlier run; ``threads`` sets torch's
    CPU threads in process."""
    from editflow.engine.api import run_recipe

    planned = plan_points(recipe, axes, cache)
    document = base_document(recipe)
    result = SweepResult(planned, [], [], [], None)
    figures = []
    outcomes = None
    if ray is not None:
        from editflow.ray_executor import Job, run_jobs

        jobs = [Job(recipe, p.overrides, out_root / p.name, document) for p in planned]
        outcomes = run_jobs(jobs, cache=cache, device=device, events=events, **ray)
    for index, point in enumerate(planned):
        if outcomes is not None:
            outcome = outcomes[index]
        else:
            outcome = run_recipe(
                recipe, point.overrides, cache=cache, out_dir=out_root / point.name,
                device=device, events=events, registry=registry, document=document,
                threads=threads,
            )  # fmt: skip
        registry = outcome.registry or registry
        result.outcomes.append(outcome)
        result.computed += [f"{point.name}/{stage}" for stage in outcome.computed]
        result.cached += [f"{point.name}/{stage}" for stage in outcome.hits]
        result.written += outcome.written
        figures.append(_figure_of(outcome.written))
    result.grid = _write_grid(out_root / "sweep.png", planned, axes, figures)
    return result


def _figure_of(written: list[Path]) -> Path | None:
    """A point's figure: its ``figure.png`` (the convention of the example recipes), else
    its last ``figure*.png``, else its last image."""
    images = [path for path in written if path.suffix == ".png"]
    main = [path for path in images if path.name == "figure.png"]
    chosen = [path for path in images if path.name.startswith("figure")]
    return (main or chosen or images or [None])[-1]


def _write_grid(
    path: Path, planned: list[Point], axes: list[Axis], figures: list[Path | None]
) -> Path | None:
    """Each point's figure in a grid (the last axis along a row), labelled by its values."""
    if not figures or any(figure is None for figure in figures):
        return None
    from PIL import Image, PngImagePlugin

    from editflow.outputs import write_png
    from editflow.stages.figure import from_pil, image_grid, to_pil

    tiles = []
    for figure in figures:
        with Image.open(figure) as image:
            tiles.append(from_pil(image.convert("RGB"))[0])
    columns = len(axes[-1].values)
    grid = image_grid(tiles, [point.label for point in planned], columns)
    info = PngImagePlugin.PngInfo()
    info.add_text("editflow:sweep", json.dumps([axis.key for axis in axes]))
    return write_png(path, to_pil(grid[0]), info)
