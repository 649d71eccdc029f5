"""Plots of a recipe's tables: ``[plots.NAME]`` with ``kind = "figure.plot"``, drawn with
matplotlib to ``NAME.png`` and ``NAME.svg`` beside the figures.

A plot draws ``y`` against ``x`` (a table's column titles or swept keys), one line (or set
of markers, ``style = "scatter"``) per value of ``series``, its points joined in the table's
row order (the sweep's order: a trade-off curve follows its parameter). The bytes depend only
on the table, the spec and the matplotlib version: matplotlib's default style with the
DejaVu Sans it ships (not the user's matplotlibrc), a fixed size and DPI, a fixed SVG hash
salt (the ids of markers and clip paths) and no dates in the metadata. Text in the SVG is
drawn as paths (it looks the same everywhere); each label's group has an id (``xlabel``,
``ylabel``, ``title``, ``legend-0`` ..., ``series-0`` ...) and holds its text in a comment,
so tests and scripts read the plot back.

The PNG is written with the text chunks every exported figure carries (the recipe as run),
plus ``editflow:made_of``, a digest of what the plot was drawn from: a rerun that would draw
the same plot leaves both files as they are, without importing matplotlib. No PDF is written:
its compressed streams cannot be compared within a tolerance where a lock's platform differs
(SVG's text can: :mod:`editflow.files.textcheck`).
"""

from __future__ import annotations

import hashlib
import io
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from editflow.documents import Table
from editflow.files.outputs import write_png, write_text

# Bump when the drawing changes, so kept plots are redrawn.
PLOT_VERSION = 1
SIZE = (5.0, 3.5)  # inches
DPI = 150  # the PNG: 750 x 525 pixels
STYLE = {
    "font.family": ["DejaVu Sans"],
    "font.size": 9.0,
    "mathtext.fontset": "dejavusans",
    "svg.fonttype": "path",
    "svg.hashsalt": "editflow",
    "axes.grid": True,
    "grid.alpha": 0.3,
}
SVG_METADATA = {"Date": None, "Creator": "editflow"}  # no timestamp, no version


class PlotSpec(Table):
    """``[plots.NAME]``: a line or scatter plot of a table's columns."""

    kind: Literal["figure.plot"] = Field(description="What is drawn: figure.plot (x, y, series)")
    table: str = Field(description="The table (``[tables.NAME]``) whose rows are plotted")
    x: str = Field(description="Horizontal axis: a column title or a swept key")
    y: str = Field(description="Vertical axis: a column title or a swept key")
    series: str | None = Field(
        None, description="One line per value of this column or swept key (with a legend)"
    )
    style: Literal["line", "scatter"] = Field(
        "line", description="line: markers joined in row order; scatter: markers only"
    )
    xlabel: str | None = Field(None, description="Default: the x column's title")
    ylabel: str | None = Field(None, description="Default: the y column's title")
    title: str | None = Field(None, description='Default: "Y vs X" of the axes\' labels')


def draw_plot(
    name: str, spec: PlotSpec, table: Any, out_dir: Path, chunks: dict[str, str]
) -> list[Path]:
    """Draw ``NAME.png`` (carrying ``chunks``) and ``NAME.svg`` from a table
    (:class:`editflow.files.tables.TableData`); returns both paths."""
    from PIL import PngImagePlugin

    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    made_of = _made_of(name, spec, table, chunks)
    if _kept(png, svg, made_of):
        return [png, svg]
    svg_text, image = _render(spec, table)
    write_text(svg, svg_text)
    info = PngImagePlugin.PngInfo()
    text = {**chunks, "editflow:plot": name, "editflow:table": table.name,
            "editflow:made_of": made_of,
            "editflow:svg_sha256": hashlib.sha256(svg_text.encode()).hexdigest()}  # fmt: skip
    for key, value in text.items():
        info.add_text(key, value)
    return [write_png(png, image, info), svg]


def _made_of(name: str, spec: PlotSpec, table: Any, chunks: dict[str, str]) -> str:
    """A digest of everything the two files depend on."""
    parts = [
        PLOT_VERSION, version("matplotlib"), name, spec.model_dump(), table.name, table.titles,
        [[repr(value) for value in row] for row in table.swept],
        [[repr(value) for value in row] for row in table.values], chunks,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _kept(png: Path, svg: Path, made_of: str) -> bool:
    """Whether both files are there as this drawing would write them."""
    from PIL import Image

    if not (png.is_file() and svg.is_file()):
        return False
    try:
        with Image.open(png) as image:  # text chunks precede the pixels: nothing is decoded
            text = dict(image.info)
    except (OSError, ValueError):
        return False
    if text.get("editflow:made_of") != made_of:
        return False
    return text.get("editflow:svg_sha256") == hashlib.sha256(svg.read_bytes()).hexdigest()


def _values(values: list[Any]) -> list[Any]:
    """Numbers stay numbers; anything else is drawn as categories, by its text."""
    from editflow.files.tables import is_numeric, value_text

    return [float(v) for v in values] if is_numeric(values) else [value_text(v) for v in values]


def _render(spec: PlotSpec, table: Any) -> tuple[str, Any]:
    """The plot as SVG text and as a PIL image (RGB)."""
    import matplotlib
    import matplotlib.style
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from editflow.files.tables import value_text

    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
        canvas = FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        xs, ys = _values(table.column(spec.x)), _values(table.column(spec.y))
        labels = table.column(spec.series) if spec.series else [None] * len(xs)
        groups: dict[Any, list[int]] = {}
        for row, label in enumerate(labels):
            groups.setdefault(None if label is None else value_text(label), []).append(row)
        for index, (label, rows) in enumerate(groups.items()):
            x, y = [xs[row] for row in rows], [ys[row] for row in rows]
            if spec.style == "line":
                (artist,) = axes.plot(x, y, marker="o", label=label)
            else:
                artist = axes.scatter(x, y, label=label)
            artist.set_gid(f"series-{index}")
        xlabel = spec.xlabel if spec.xlabel is not None else table.title_of(spec.x)
        ylabel = spec.ylabel if spec.ylabel is not None else table.title_of(spec.y)
        axes.set_xlabel(xlabel, gid="xlabel")
        axes.set_ylabel(ylabel, gid="ylabel")
        axes.set_title(spec.title if spec.title is not None else f"{ylabel} vs {xlabel}",
                       gid="title")  # fmt: skip
        if spec.series:
            legend = axes.legend(title=table.title_of(spec.series))
            legend.get_title().set_gid("legend-title")
            for index, text in enumerate(legend.get_texts()):
                text.set_gid(f"legend-{index}")
        stream = io.BytesIO()
        figure.savefig(stream, format="svg", metadata=SVG_METADATA)
        canvas.draw()
        image = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    return stream.getvalue().decode("utf-8"), image
