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

import hashlib
import itertools
import json
import math
import re
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import EditflowError, Problem, RecipeError

if TYPE_CHECKING:
    from editflow.executors.ray import RayExecutor

_POINT_NAME = re.compile(r"[^A-Za-z0-9_.=,+-]")
MAX_NAME = 200  # characters of a point's folder name
MAX_POINTS = 1024  # a sweep larger than this is almost surely a typo (1e8 points plan forever)


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
    return _checked(Axis(key, tuple(values), origin))


def _checked(axis: Axis) -> Axis:
    """The axis, if its values can be swept: finite numbers, no value twice."""
    for value in axis.values:
        if not _finite(value):
            raise EditflowError(f"{value!r} is not a finite value", file=axis.origin)
    seen = [json.dumps(value, sort_keys=True) for value in axis.values]
    twice = sorted({text for text in seen if seen.count(text) > 1})
    if twice:
        raise EditflowError(f"the value {twice[0]} is given twice", file=axis.origin)
    return axis


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    return True


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def table_axes(document: Mapping[str, Any]) -> list[Axis]:
    """The axes of a recipe's ``[sweep]`` table."""
    if "sweep" not in document:
        return []
    table = document["sweep"]
    if not isinstance(table, dict):
        raise EditflowError(
            'must be a table of axes: [sweep] "stages.NAME.PARAMETER" = [values]', file="sweep"
        )
    if not table:
        raise EditflowError("an empty table: give it an axis or remove it", file="sweep")
    axes = []
    for key, values in table.items():
        origin = f"sweep.{json.dumps(key)}"
        if not isinstance(values, list) or not values:
            raise EditflowError("must be a non-empty array of values", file=origin)
        axes.append(_checked(Axis(key, tuple(values), origin)))
    return axes


def combine(table: list[Axis], command_line: list[Axis]) -> list[Axis]:
    """The table's axes with the command line's replacing those of the same key.

    Raises:
        EditflowError: The command line gives one key twice, or there are more points than
            :data:`MAX_POINTS`.
    """
    given: dict[str, Axis] = {}
    for axis in command_line:
        if axis.key in given:
            raise EditflowError(
                f"{axis.key} is swept twice (also {given[axis.key].origin})", file=axis.origin
            )
        given[axis.key] = axis
    axes = [axis for axis in table if axis.key not in given] + command_line
    count = math.prod(len(axis.values) for axis in axes)
    if count > MAX_POINTS:
        shape = " x ".join(str(len(axis.values)) for axis in axes)
        raise EditflowError(
            f"{count} points ({shape}), more than {MAX_POINTS}: nothing was planned",
            file="sweep", hint="sweep fewer values, or several smaller sweeps",
        )  # fmt: skip
    return axes


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def points(axes: list[Axis]) -> list[Point]:
    """Every combination, the first axis varying slowest.

    A point's folder is its readable name (``edit.skip=20,edit.cfg_tar=7.5``) when that
    says its values exactly (nothing replaced or cut) and no other point reads the same;
    otherwise the name, made safe and cut, plus ``~`` and a digest of the values. A readable
    name never holds ``~``, and two exact names differ: folders are unique by construction.
    """
    result = []
    for values in itertools.product(*(axis.values for axis in axes)):
        pairs = list(zip(axes, values, strict=True))
        parts = [f"{_short(axis.key)}={_text(value)}" for axis, value in pairs]
        overrides = [f"{axis.key}={_toml(value)}" for axis, value in pairs]
        result.append(Point(",".join(parts), overrides, ", ".join(parts), values))
    raw = Counter(point.name for point in result)  # "1" and 1 read alike
    for point in result:
        name = _POINT_NAME.sub("_", point.name)
        exact = name == point.name and len(name) <= MAX_NAME and raw[name] == 1
        if not exact:
            identity = json.dumps([[a.key for a in axes], list(point.values)], sort_keys=True)
            digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
            name = f"{name[: MAX_NAME - 13]}~{digest}"
        point.name = name
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
    ray: RayExecutor | None = None,
    registry: Any = None,
    threads: int | None = None,
) -> SweepResult:
    """Run every point through one cache and one set of models (or, with a ``ray``
    executor, on Ray: points and independent stages in parallel, on the executor's workers,
    which it keeps for its next run); write the sweep grid. ``registry`` lends models loaded
    by an earlier run; ``threads`` sets torch's CPU threads in process."""
    from editflow.engine.api import run_recipe

    planned = plan_points(recipe, axes, cache)
    document = base_document(recipe)
    result = SweepResult(planned, [], [], [], None)
    figures = []
    outcomes = None
    if ray is not None:
        from editflow.executors.ray import Job

        jobs = [Job(recipe, p.overrides, out_root / p.name, document) for p in planned]
        outcomes = ray.run_jobs(jobs, cache=cache, device=device, events=events)
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
    write_index(out_root / "sweep.json", planned, axes)
    return result


def write_index(path: Path, planned: list[Point], axes: list[Axis]) -> Path:
    """``sweep.json``: each point's folder with the values that made it."""
    from editflow.files.outputs import write_text

    index = {
        "axes": [{"key": axis.key, "values": list(axis.values)} for axis in axes],
        "points": [
            {"folder": point.name,
             "values": {axis.key: value for axis, value in zip(axes, point.values, strict=True)},
             "stages": point.keys}
            for point in planned
        ],
    }  # fmt: skip
    return write_text(path, json.dumps(index, indent=2, sort_keys=True) + "\n")


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
    import hashlib

    from PIL import Image, PngImagePlugin

    from editflow.files.outputs import write_png

    # What the grid is made of: an all-hit rerun finds it made already (and imports no torch).
    made_of = hashlib.sha256(json.dumps(
        [[axis.key for axis in axes], [point.label for point in planned],
         [hashlib.sha256(figure.read_bytes()).hexdigest() for figure in figures]]  # type: ignore[union-attr]
    ).encode()).hexdigest()  # fmt: skip
    try:
        with Image.open(path) as existing:
            if existing.info.get("editflow:made_of") == made_of:
                return path
    except (OSError, ValueError):
        pass
    from editflow.stages.images import from_pil, image_grid, to_pil

    tiles = []
    for figure in figures:
        with Image.open(figure) as image:
            tiles.append(from_pil(image.convert("RGB"))[0])
    columns = len(axes[-1].values)
    grid = image_grid(tiles, [point.label for point in planned], columns)
    info = PngImagePlugin.PngInfo()
    info.add_text("editflow:sweep", json.dumps([axis.key for axis in axes]))
    info.add_text("editflow:made_of", made_of)
    return write_png(path, to_pil(grid[0]), info)
