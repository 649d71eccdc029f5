"""Sweeps: a recipe run over the Cartesian product of parameter values.

Axes come from ``--sweep stages.edit.skip=20,30,40`` (repeatable; ``range(10,40,10)`` and
``linspace(1,7.5,4)`` spell evenly spaced values) or the recipe's ``[sweep]`` table
(``"stages.edit.skip" = [20, 30, 40]`` or ``"range(10,40,10)"``); the command line replaces a
table axis of the same key, and ``--set`` fixes a value in every point. Each point is the
recipe with one value per axis set, as ``--set`` would; all points are planned before
anything runs (so every bad value is reported first), and they run through one cache and one
set of loaded models, so a stage whose key is the same in several points (the caption, the
inversion, the attention maps) is computed once. Each point writes under
``OUT/<point>/`` with a readable point name; the sweep's X/Y/Z plot is ``OUT/sweep.png``
(:mod:`editflow.cli.sweep_grid`) and its index ``OUT/sweep.json`` and ``OUT/sweep.csv``;
the axes are read in :mod:`editflow.cli.sweep_axes`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.cli.sweep_axes import (  # noqa: F401 (the sweep's axes, used from here too)
    MAX_POINTS,
    Axis,
    combine,
    grid_spec,
    parse_sweep,
    span,
    table_axes,
)
from editflow.errors import EditflowError, Problem, RecipeError

if TYPE_CHECKING:
    from editflow.cli.sweep_grid import GridLayout
    from editflow.executors.ray import RayExecutor

_POINT_NAME = re.compile(r"[^A-Za-z0-9_.=,+-]")
MAX_NAME = 200  # characters of a point's folder name


@dataclass
class Point:
    """One combination of axis values."""

    name: str
    overrides: list[str]
    label: str
    values: tuple[Any, ...]
    keys: dict[str, str] = field(default_factory=dict)  # stage -> key, once planned
    seconds: float | None = None  # how long it ran, once run
    plan: Any = None  # its Plan, once planned: run as it is, not planned again


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
        parts = [f"{_short(axis.key)}={value_text(value)}" for axis, value in pairs]
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


def value_text(value: Any) -> str:
    """A value as a point name and a header show it: strings bare, the rest as TOML."""
    return value if isinstance(value, str) else _toml(value)


def plan_points(
    recipe: Path, axes: list[Axis], cache: Any, overrides: list[str] | None = None
) -> list[Point]:
    """Plan every point (nothing runs, no weights load); every bad value is reported with
    the sweep that gave it. ``overrides`` (``--set``) are the same in every point.

    Raises:
        RecipeError: Some point does not plan; its problems name the ``--sweep`` argument or
            the ``[sweep]`` table key instead of the ``--set`` it became, and a bad
            ``[sweep.grid]`` names its key.
        EditflowError: A key is both set and swept, or ``[sweep.grid]`` names an axis that is
            not swept.
    """
    from editflow.cli.sweep_grid import arrange, image_problem
    from editflow.documents import document_identity
    from editflow.engine.api import plan_recipe

    if not axes:
        raise EditflowError("a sweep needs at least one axis", file=str(recipe))
    fixed = _fixed(overrides or [], axes)
    spec = grid_spec(_document(recipe))
    arrange(axes, spec)
    plan_recipe(recipe, fixed, cache=cache)  # the recipe itself, its problems located in its file
    document = base_document(recipe)
    problems: list[Problem] = []
    planned = points(axes)
    for point in planned:
        point.overrides = fixed + point.overrides
        try:
            plan = plan_recipe(recipe, point.overrides, cache=cache, document=document)
        except RecipeError as error:
            problems += [_relabel(problem, axes) for problem in error.problems]
            continue
        point.keys = {name: stage.key for name, stage in plan.stages.items() if stage.needed}
        # Each point keeps its own last-run records: one set for all would be rewritten by
        # every point of every rerun, and would tell a point what differs from its neighbour.
        plan.runs_as, point.plan = f"{document_identity(recipe)}#{point.name}", plan
        problems += [problem] if (problem := image_problem(spec, plan)) else []
    if problems:
        unique = list({(p.file, p.line, p.key, p.message, p.hint): p for p in problems}.values())
        raise RecipeError(problems=unique)
    return planned


def _fixed(overrides: list[str], axes: list[Axis]) -> list[str]:
    """The ``--set`` overrides every point shares; a key both set and swept is refused (which
    value would win is not obvious)."""
    swept = {axis.key: axis for axis in axes}
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in swept:
            raise EditflowError(
                f"{key} is also swept ({swept[key].origin}): set it or sweep it",
                file=f"--set {override}",
            )
    return list(overrides)


def _document(recipe: Path) -> dict[str, Any]:
    from editflow.documents import read_document

    return read_document(recipe)[0]


def base_document(recipe: Path) -> dict[str, Any]:
    """The recipe without its ``[sweep]`` table: every point is this plus its values, so a
    sweep given on the command line and the same sweep in the table make the same files."""
    document = _document(recipe)
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
    layout: GridLayout | None = None  # where the grid's tiles and headers are (None: kept)
    index: list[Path] = field(default_factory=list)  # sweep.json, sweep.csv


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
    overrides: list[str] | None = None,
) -> SweepResult:
    """Run every point through one cache and one set of models (or, with a ``ray``
    executor, on Ray: points and independent stages in parallel, on the executor's workers,
    which it keeps for its next run); write the X/Y/Z plot and the index. ``registry`` lends
    models loaded by an earlier run; ``threads`` sets torch's CPU threads in process;
    ``overrides`` (``--set``) hold in every point. Each point is announced to ``events`` as a
    ``point`` event (step i of total; again with its seconds when done)."""
    from editflow.engine.api import run_recipe

    planned = plan_points(recipe, axes, cache, overrides)
    document = base_document(recipe)
    result = SweepResult(planned, [], [], [], None)
    outcomes = None
    if ray is not None:
        from editflow.executors.ray import Job

        jobs = [Job(recipe, p.overrides, out_root / p.name, document, tables=False)
                for p in planned]  # fmt: skip
        outcomes = ray.run_jobs(jobs, cache=cache, device=device, events=events)
    for index, point in enumerate(planned):
        _announce(_of_point(events, point), index, point, len(planned))
        started = time.perf_counter()
        if outcomes is not None:
            outcome = outcomes[index]
            seconds = sum(outcome.seconds.values())  # the points ran side by side
        else:
            outcome = run_recipe(
                recipe, point.overrides, cache=cache, out_dir=out_root / point.name,
                device=device, events=_of_point(events, point), registry=registry,
                document=document, threads=threads, tables=False, plan=point.plan,
            )  # fmt: skip
            seconds = time.perf_counter() - started
        point.seconds = round(seconds, 3)
        _announce(_of_point(events, point), index, point, len(planned))
        registry = outcome.registry or registry
        result.outcomes.append(outcome)
        result.computed += [f"{point.name}/{stage}" for stage in outcome.computed]
        result.cached += [f"{point.name}/{stage}" for stage in outcome.hits]
        result.written += outcome.written
    result.grid, result.layout = _plot(recipe, out_root / "sweep.png", planned, axes, cache, result)
    result.index = write_index(out_root, planned, axes, result.layout, overrides or [])
    from editflow.files.tables import export_sweep  # the recipe's tables: a row per point

    result.written += export_sweep(recipe, axes, planned, result.outcomes, cache, out_root,
                                   overrides or [])  # fmt: skip
    return result


def _of_point(events: Any, point: Point) -> Any:
    """``events`` with each event naming the point it belongs to (its folder)."""
    import dataclasses

    if events is None:
        return events
    return lambda event: events(dataclasses.replace(event, point=point.name))


def _announce(events: Any, index: int, point: Point, total: int) -> None:
    """A ``point`` event: point ``index + 1`` of ``total`` starts (or, with seconds, ends)."""
    if events is not None:
        from editflow.engine.events import Event

        events(Event("point", step=index + 1, total=total, message=point.label,
                     seconds=point.seconds))  # fmt: skip


def write_index(
    folder: Path, planned: list[Point], axes: list[Axis], layout: GridLayout | None = None,
    overrides: list[str] | None = None,
) -> list[Path]:  # fmt: skip
    """``sweep.json`` and ``sweep.csv``: each point's folder, the values that made it, its
    stages' keys, its seconds (and, in the JSON, its tile in the grid as left, top, width,
    height)."""
    from editflow.files.outputs import write_text

    rows = []
    for number, point in enumerate(planned):
        row = {
            "folder": point.name,
            "values": {axis.key: value for axis, value in zip(axes, point.values, strict=True)},
            "stages": point.keys, "seconds": point.seconds,
        }  # fmt: skip
        if layout is not None:
            row["tile"] = list(layout.tiles[number])
        rows.append(row)
    index = {
        "axes": [{"key": axis.key, "values": list(axis.values)} for axis in axes],
        "set": list(overrides or []),
        "points": rows,
    }
    stages = list(dict.fromkeys(name for point in planned for name in point.keys))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["folder", *(axis.key for axis in axes), "seconds",
                     *(f"key.{name}" for name in stages)])  # fmt: skip
    for point in planned:
        writer.writerow([point.name, *(value_text(value) for value in point.values),
                         point.seconds, *(point.keys.get(name, "") for name in stages)])  # fmt: skip
    return [
        write_text(folder / "sweep.json", json.dumps(index, indent=2, sort_keys=True) + "\n"),
        write_text(folder / "sweep.csv", table.getvalue()),
    ]


def _figure_of(written: list[Path]) -> Path | None:
    """A point's figure: its ``figure.png`` (the convention of the example recipes), else
    its last ``figure*.png``, else its last image."""
    images = [path for path in written if path.suffix == ".png"]
    main = [path for path in images if path.name == "figure.png"]
    chosen = [path for path in images if path.name.startswith("figure")]
    return (main or chosen or images or [None])[-1]


def _plot(
    recipe: Path, path: Path, planned: list[Point], axes: list[Axis], cache: Any,
    result: SweepResult,
) -> tuple[Path | None, GridLayout | None]:  # fmt: skip
    """The X/Y/Z plot of the sweep (:mod:`editflow.cli.sweep_grid`), unless the one at
    ``path`` was made of the same cells; no plot when some point has nothing to show."""
    from editflow.cli import sweep_grid

    spec = grid_spec(_document(recipe))
    arrangement = sweep_grid.arrange(axes, spec)
    if spec.image is not None:
        stage, port = spec.image.split(".")
        sources = [f"{point.keys[stage]}.{port}" for point in planned]
    else:
        figures = [_figure_of(outcome.written) for outcome in result.outcomes]
        if not figures or any(figure is None for figure in figures):
            return None, None
        sources = [hashlib.sha256(figure.read_bytes()).hexdigest() for figure in figures]  # type: ignore[union-attr]
    digest = sweep_grid.made_of(arrangement, spec, [point.label for point in planned], sources)
    kept = sweep_grid.kept_layout(path, digest)
    if kept is not None:
        return path, kept
    if spec.image is not None:
        cells = [
            sweep_grid.output_cell(cache, source.rsplit(".", 1)[0], port) for source in sources
        ]
    else:
        cells = [sweep_grid.figure_cell(figure) for figure in figures]  # type: ignore[arg-type]
    places = sweep_grid.cell_places(len(planned), arrangement, axes)
    canvas, layout = sweep_grid.draw(cells, arrangement, places)
    keys = [axis.key for axis in axes]
    return sweep_grid.write_grid(path, canvas, keys, digest, layout), layout
