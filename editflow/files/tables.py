"""Tables of a run's numbers: ``[tables.NAME]`` in a recipe, exported as CSV, Markdown and
LaTeX (booktabs) beside the figures.

A table's ``columns`` map a title to a tensor output of a stage (``"CLIP score" =
"clip.values"``); each cell is that tensor reduced to one number in float64 (``reduce``,
default the mean of its values). A sweep makes one row per point, led by one column per swept
key holding the point's value; a plain run makes one row. The values are read from the cache
after everything has run, so a table is of whatever kinds the recipe uses.

``NAME.csv`` holds every number at full float64 precision (data for other tools); the
Markdown and LaTeX tables print them with the table's ``format`` and put the best value of
each column named in ``bold`` in bold, as papers do. ``[plots.NAME]`` draw a table
(:mod:`editflow.files.plots`).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from editflow.documents import Table, document_identity
from editflow.errors import EditflowError, Problem
from editflow.files.outputs import write_text
from editflow.files.plots import PlotSpec
from editflow.stages.ports import ArtifactType, type_name

# A column reads a stage's output: "stage.port".
REFERENCE = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
# Outputs that are not one tensor of numbers (texts, streamed maps, dicts of weights).
NOT_TENSORS = (ArtifactType.TEXT, ArtifactType.ATTENTION_MAPS, ArtifactType.WEIGHTS)
# The sweep's own files are sweep.png, sweep.json and sweep.csv.
RESERVED = ("sweep",)
# Key paths a sweep may vary besides stage parameters.
SWEEPABLE_ROOTS = ("seed", "model", "inputs")
Reduction = Literal["mean", "median", "min", "max"]


class TableSpec(Table):
    """``[tables.NAME]``: numbers of the run (or of each sweep point) as rows and columns."""

    columns: dict[str, str] = Field(
        min_length=1,
        description='Column title -> the tensor output it reads, {"CLIP score" = "clip.values"}',
    )
    reduce: Reduction = Field(
        "mean", description="How a tensor becomes one number (in float64): mean, median, min, max"
    )
    format: str = Field(
        ".3f", description="Python format spec of the numbers in the Markdown and LaTeX tables"
    )
    bold: dict[str, Literal["max", "min"]] = Field(
        default_factory=dict,
        description='Column title -> which value is best and set in bold: {"LPIPS" = "min"}',
    )
    caption: str | None = Field(None, description="The LaTeX table's caption (Markdown: below)")


def short_key(key: str) -> str:
    """A swept key as a table's column title: ``stages.edit.cfg`` -> ``edit.cfg``."""
    return key.removeprefix("stages.")


def quoted(part: str) -> str:
    """A key part as TOML writes it: bare when it can be, else quoted."""
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)


# ----------------------------------------------------------------------------- plan time


def valid_specs(document: dict[str, Any]) -> tuple[dict[str, TableSpec], dict[str, PlotSpec]]:
    """The tables that are valid alone, and the plots that are when every table is (a plot
    names a table)."""

    def valid(field: str, model: type[Table]) -> tuple[dict[str, Any], bool]:
        raw = document.get(field)
        specs = {}
        for name, spec in raw.items() if isinstance(raw, dict) else ():
            try:
                specs[name] = model.model_validate(spec)
            except ValidationError:
                continue
        return specs, not isinstance(raw, dict) or len(specs) == len(raw)

    tables, complete = valid("tables", TableSpec)
    return tables, valid("plots", PlotSpec)[0] if complete else {}


def spec_problems(
    tables: Mapping[str, TableSpec], plots: Mapping[str, Any], kinds: Mapping[str, Any]
) -> list[Problem]:
    """What is wrong with a recipe's ``[tables]`` and ``[plots]``, one problem per key.

    Args:
        tables: The recipe's tables.
        plots: Its plots (:class:`editflow.files.plots.PlotSpec`).
        kinds: Every stage name in the recipe -> its kind, or None where the stage itself is
            invalid (reported on its own, so its ports are not checked here).
    """
    problems = []
    for name, spec in tables.items():
        if name in RESERVED:
            problems.append(Problem(f"{name!r} names the sweep's own files", key=f"tables.{name}"))
        for title, reference in spec.columns.items():
            key = f"tables.{name}.columns.{quoted(title)}"
            if (message := _reference_problem(reference, kinds)) is not None:
                problems.append(Problem(message, key=key))
        try:
            format(1.5, spec.format)
        except ValueError:
            message = f"not a Python format spec for numbers: {spec.format!r}"
            problems.append(Problem(message, key=f"tables.{name}.format", hint="e.g. '.3f'"))
        for title in spec.bold:
            if title not in spec.columns:
                message = f"no column {title!r}; columns: {', '.join(spec.columns)}"
                problems.append(Problem(message, key=f"tables.{name}.bold.{quoted(title)}"))
    for name, plot in plots.items():
        problems += _plot_problems(name, plot, tables, kinds)
    return problems


def _reference_problem(reference: str, kinds: Mapping[str, Any]) -> str | None:
    match = REFERENCE.match(reference)
    if match is None:
        return f"must be a reference like 'stage.output', got {reference!r}"
    stage, output = match.groups()
    if stage not in kinds:
        close = difflib.get_close_matches(stage, list(kinds), n=1)
        return f"no stage {stage!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    kind = kinds[stage]
    if kind is None:
        return None  # the stage is invalid; its own problem says why
    port = kind.output_port(output)
    if port is None:
        outputs = ", ".join(port.name for port in kind.outputs)
        return f"stage {stage!r} ({kind.kind}) has no output {output!r}; its outputs: {outputs}"
    if port.type in NOT_TENSORS:
        return f"{reference!r} is {type_name(port.type)}, not a tensor of numbers"
    return None


def _plot_problems(
    name: str, plot: Any, tables: Mapping[str, TableSpec], kinds: Mapping[str, Any]
) -> list[Problem]:
    problems = []
    if name in RESERVED:
        problems.append(Problem(f"{name!r} names the sweep's own files", key=f"plots.{name}"))
    if name in kinds:
        message = f"stage {name!r} exports {name}.png too: name the plot otherwise"
        problems.append(Problem(message, key=f"plots.{name}"))
    if plot.table not in tables:
        known = ", ".join(tables) or "none"
        message = f"no table {plot.table!r}; tables: {known}"
        return problems + [Problem(message, key=f"plots.{name}.table")]
    columns = list(tables[plot.table].columns)
    for field in ("x", "y", "series"):
        value = getattr(plot, field)
        if value is None or value in columns or _may_be_swept(value, kinds):
            continue
        message = (
            f"{value!r} is no column of table {plot.table!r} ({', '.join(columns)})"
            " and no swept key"
        )
        problems.append(Problem(message, key=f"plots.{name}.{field}"))
    return problems


def _may_be_swept(key: str, kinds: Mapping[str, Any]) -> bool:
    """Whether a plot's axis may name a swept key (``stages.edit.cfg`` or ``edit.cfg``): the
    axes of a ``--sweep`` are not known when one recipe is planned."""
    parts = key.split(".")
    if parts[0] == "stages":
        return len(parts) >= 3 and parts[1] in kinds
    return (len(parts) >= 2 and parts[0] in kinds) or parts[0] in SWEEPABLE_ROOTS


# ------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class TableRun:
    """One row's source: the swept values that made it and its stages' cache keys."""

    swept: Mapping[str, Any]  # swept key -> value (empty in a plain run)
    keys: Mapping[str, str]  # stage -> cache key, for the stages the run needed


@dataclass(frozen=True)
class TableData:
    """A table's cells: leading swept columns (any value), then one float per column."""

    name: str
    spec: TableSpec
    swept_keys: list[str]  # the swept keys, in axis order
    swept: list[list[Any]]  # per row, its swept values
    values: list[list[float]]  # per row, one number per column of the spec

    @property
    def swept_titles(self) -> list[str]:
        return [short_key(key) for key in self.swept_keys]

    @property
    def titles(self) -> list[str]:
        return self.swept_titles + list(self.spec.columns)

    def column(self, name: str) -> list[Any] | None:
        """A column's values by its title (a swept one also by its full key), or None."""
        if name in self.spec.columns:
            index = list(self.spec.columns).index(name)
            return [row[index] for row in self.values]
        for index, key in enumerate(self.swept_keys):
            if name in (key, short_key(key)):
                return [row[index] for row in self.swept]
        return None

    def title_of(self, name: str) -> str:
        """The title a column is shown under (a swept key's short form)."""
        return name if name in self.spec.columns else short_key(name)


def gather(name: str, spec: TableSpec, runs: Sequence[TableRun], cache: Any) -> TableData | None:
    """The table over ``runs`` (one row each), read from the cache; None when some run did
    not run a stage the table reads (a run limited by ``--target``).

    Raises:
        EditflowError: A swept key's column title is also one of the table's own.
    """
    swept_keys = list(runs[0].swept) if runs else []
    clash = set(map(short_key, swept_keys)) & set(spec.columns)
    if clash:
        raise EditflowError(
            f"column {sorted(clash)[0]!r} is also a swept key's column: rename it",
            key=f"tables.{name}.columns",
        )
    values = []
    for run in runs:
        row = []
        for reference in spec.columns.values():
            stage, output = reference.split(".")
            if stage not in run.keys:
                return None
            row.append(reduced(cache, run.keys[stage], output, spec.reduce))
        values.append(row)
    swept = [[run.swept[key] for key in swept_keys] for run in runs]
    return TableData(name, spec, swept_keys, swept, values)


def reduced(cache: Any, key: str, output: str, reduction: Reduction) -> float:
    """A cached output reduced to one float64 number.

    The number is kept in a cache record named by the checksums of the bytes it was computed
    from, so an all-hit rerun reads a small JSON document instead of importing torch and the
    array (cached outputs are never changed in place, and the checksum names the bytes).
    """
    entry = cache.get(key)
    if entry is None:  # the run has just published it: a bug if it is gone
        raise RuntimeError(f"no cache entry {key} for a table")
    arrays = {
        array: [info.shape, info.dtype, info.checksum, info.step_checksums]
        for array, info in sorted(entry.arrays.items())
        if array == output
    }
    identity = json.dumps([key, output, reduction, arrays], sort_keys=True, default=str)
    record = "table-values/" + hashlib.sha256(identity.encode()).hexdigest()
    kept = cache.get_record(record)
    if kept is not None:
        return float(kept["value"])  # repr: exact, and JSON has no inf or nan
    import numpy as np

    values = entry.tensor(output).detach().cpu().double().numpy()
    reduce = {"mean": np.mean, "median": np.median, "min": np.min, "max": np.max}[reduction]
    value = float(reduce(values)) if values.size else float("nan")
    cache.put_record(record, {"value": repr(value)})
    return value


# ----------------------------------------------------------------------------- exporting


def value_text(value: Any) -> str:
    """A swept value as a cell shows it: strings bare, the rest as TOML writes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def number_text(value: float, spec: str) -> str:
    """A number with the table's format (inf and nan as Python prints them)."""
    return format(value, spec)


def best_rows(table: TableData) -> dict[str, set[int]]:
    """Column title -> the rows whose value is the best as printed (ties all bold)."""
    best = {}
    titles = list(table.spec.columns)
    for title, rule in table.spec.bold.items():
        column = [row[titles.index(title)] for row in table.values]
        finite = [value for value in column if value == value]  # nan is never best
        if not finite:
            best[title] = set()
            continue
        winner = number_text(max(finite) if rule == "max" else min(finite), table.spec.format)
        best[title] = {
            index
            for index, value in enumerate(column)
            if value == value and number_text(value, table.spec.format) == winner
        }
    return best


def _cells(table: TableData) -> list[list[tuple[str, bool]]]:
    """Each row's printed cells with whether each is bold."""
    best = best_rows(table)
    rows = []
    for index, (swept, values) in enumerate(zip(table.swept, table.values, strict=True)):
        cells = [(value_text(value), False) for value in swept]
        cells += [
            (number_text(value, table.spec.format), index in best.get(title, ()))
            for title, value in zip(table.spec.columns, values, strict=True)
        ]
        rows.append(cells)
    return rows


def is_numeric(values: Iterable[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _swept_numeric(table: TableData) -> list[bool]:
    """Per swept column, whether all its values are numbers (right-aligned, as numbers are)."""
    return [is_numeric(row[i] for row in table.swept) for i in range(len(table.swept_keys))]


def to_csv(table: TableData) -> str:
    """The table as CSV: a header row of titles, swept values as cells show them and every
    number at full precision (``repr``: it reads back as the same float64)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(table.titles)
    for swept, values in zip(table.swept, table.values, strict=True):
        writer.writerow([*map(value_text, swept), *map(repr, values)])
    return text.getvalue()


# The standard library writes CSV but neither Markdown nor LaTeX tables, and the libraries
# that do (pandas, tabulate) are not dependencies of editflow and would not bold the best
# value per column; both are a few lines here.


def to_markdown(table: TableData) -> str:
    """The table as a Markdown pipe table; best values in ``**bold**``, numbers right-aligned,
    the caption below as pandoc reads it (``Table: ...``)."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|")

    aligns = ["---:" if flag else "---" for flag in _swept_numeric(table)] + ["---:"] * len(
        table.spec.columns
    )
    lines = [
        "| " + " | ".join(escape(title) for title in table.titles) + " |",
        "|" + "|".join(aligns) + "|",
    ]
    for cells in _cells(table):
        shown = [f"**{escape(text)}**" if bold else escape(text) for text, bold in cells]
        lines.append("| " + " | ".join(shown) + " |")
    if table.spec.caption:
        lines += ["", f"Table: {table.spec.caption}"]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",
}  # fmt: skip


def latex_escape(text: str) -> str:
    """Text as LaTeX prints it literally."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex_number(text: str) -> str:
    """A printed number in LaTeX: infinities as the symbol, a minus as a minus sign."""
    special = {"inf": r"$\infty$", "-inf": r"$-\infty$", "nan": "--"}
    if text in special:
        return special[text]
    return f"${text}$" if text.startswith("-") else latex_escape(text)


def to_latex(table: TableData) -> str:
    """The table as a LaTeX ``table`` float with a booktabs ``tabular`` (\\toprule,
    \\midrule, \\bottomrule; needs ``\\usepackage{booktabs}``), best values in \\textbf,
    labelled ``tab:NAME``."""
    columns = "".join("r" if flag else "l" for flag in _swept_numeric(table))
    columns += "r" * len(table.spec.columns)
    lines = [r"\begin{table}[t]", r"  \centering"]
    if table.spec.caption:
        lines.append(rf"  \caption{{{latex_escape(table.spec.caption)}}}")
    lines += [
        rf"  \label{{tab:{table.name}}}",
        rf"  \begin{{tabular}}{{{columns}}}",
        r"    \toprule",
        "    " + " & ".join(latex_escape(title) for title in table.titles) + r" \\",
        r"    \midrule",
    ]
    count = len(table.swept_keys)
    for cells in _cells(table):
        shown = []
        for index, (text, bold) in enumerate(cells):
            cell = latex_escape(text) if index < count else _latex_number(text)
            shown.append(rf"\textbf{{{cell}}}" if bold else cell)
        lines.append("    " + " & ".join(shown) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: TableData, out_dir: Path) -> list[Path]:
    """Write ``NAME.csv``, ``NAME.md`` and ``NAME.tex`` into ``out_dir``."""
    return [
        write_text(out_dir / f"{table.name}.csv", to_csv(table)),
        write_text(out_dir / f"{table.name}.md", to_markdown(table)),
        write_text(out_dir / f"{table.name}.tex", to_latex(table)),
    ]


# --------------------------------------------------------------------------- entry points


def recipe_chunks(path: Path, document: Mapping[str, Any]) -> dict[str, str]:
    """The PNG text chunks that say which recipe (as run) a plot is of, as every exported
    figure's do (``editflow run PLOT.png`` reruns a plain run's recipe)."""
    import editflow

    recipe_json = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {
        "editflow:version": editflow.__version__,
        "editflow:recipe": path.name,
        "editflow:recipe_sha256": hashlib.sha256(recipe_json.encode()).hexdigest(),
        "editflow:recipe_json": recipe_json,
        "editflow:recipe_path": document_identity(path),
    }


def export(
    recipe: Any, runs: Sequence[TableRun], cache: Any, out_dir: Path, chunks: dict[str, str]
) -> list[Path]:
    """Write a recipe's tables over ``runs`` and the plots drawn from them; returns the paths.

    A table whose stages some run did not run is left out, and so is a plot that needs a
    swept key the runs did not sweep, or of a table of one row (a plain run, a sweep's
    point): one marker says nothing, and its autoscaled axes move with the last digits of
    its value, so a check elsewhere would compare tick labels, not data.
    """
    if not recipe.tables:
        return []
    from editflow.files.plots import draw_plot

    written: list[Path] = []
    tables = {}
    for name, spec in recipe.tables.items():
        table = gather(name, spec, runs, cache)
        if table is not None:
            tables[name] = table
            written += write_table(table, out_dir)
    for name, plot in recipe.plots.items():
        table = tables.get(plot.table)
        axes = (plot.x, plot.y, plot.series)
        if table is None or len(table.values) < 2:
            continue
        if any(axis is not None and table.column(axis) is None for axis in axes):
            continue
        written += draw_plot(name, plot, table, out_dir, chunks)
    return written


def export_run(plan: Any, cache: Any, out_dir: Path) -> list[Path]:
    """A plain run's tables (one row each) and plots, after it has run."""
    recipe = plan.loaded.recipe
    if not recipe.tables:
        return []
    keys = {stage.name: stage.key for stage in plan.needed}
    chunks = recipe_chunks(plan.loaded.path, plan.loaded.raw)
    return export(recipe, [TableRun({}, keys)], cache, out_dir, chunks)


def export_sweep(
    recipe_path: Path,
    axes: Sequence[Any],
    points: Sequence[Any],
    outcomes: Sequence[Any],
    cache: Any,
    out_dir: Path,
    overrides: Sequence[str] = (),
) -> list[Path]:
    """A sweep's tables (one row per point, led by its swept values) and plots, written to
    the sweep's folder once every point has run.

    Args:
        recipe_path: The recipe file.
        axes: The sweep's axes (``key`` and ``values`` each).
        points: Its points (``values``: one per axis), in the order they ran.
        outcomes: Each point's run result (its ``plan``).
        cache: The cache they ran through.
        out_dir: The sweep's folder.
        overrides: The ``--set`` overrides every point had.
    """
    from editflow.documents import apply_overrides, read_document

    if not outcomes or not outcomes[0].plan.loaded.recipe.tables:
        return []
    runs = [
        TableRun(
            {axis.key: value for axis, value in zip(axes, point.values, strict=True)},
            {stage.name: stage.key for stage in outcome.plan.needed},
        )
        for point, outcome in zip(points, outcomes, strict=True)
    ]
    # The plot carries the recipe with the sweep it was drawn from (a figure replays one run,
    # so `editflow run PLOT.png` points to the recipe file instead).
    document = apply_overrides(read_document(recipe_path)[0], list(overrides))
    sweep = dict(document.get("sweep", {}))
    sweep.update({axis.key: list(axis.values) for axis in axes})
    document["sweep"] = sweep
    chunks = recipe_chunks(recipe_path, document)
    return export(outcomes[0].plan.loaded.recipe, runs, cache, out_dir, chunks)
