"""A sweep's X/Y/Z plot, as AUTOMATIC1111 draws it: one image per point tiled in a table, the
X axis's values as column headers across the top, the Y axis's as row headers down the
side, and one block per value of the Z axis (or of several: every swept key not on X or Y),
each under its own title, stacked in one ``sweep.png``.

What is tiled is the recipe's ``[sweep.grid] image = "STAGE.OUTPUT"`` (every image of that
output, side by side in the cell, as the cache holds it) or, without it, each point's
``figure.png``. Headers are set in DejaVu Sans, the TrueType font matplotlib ships: a
header reads ``edit.skip = 20`` whatever the tile size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from editflow.errors import EditflowError, Problem

if TYPE_CHECKING:
    from editflow.cli.sweeps import Axis

# Enters what a grid is made of: a grid drawn by an older layout is drawn again.
GRID_FORMAT = 2
GRID_KEYS = ("image", "x", "y", "z")


@dataclass(frozen=True)
class GridSpec:
    """The recipe's ``[sweep.grid]`` table: what each cell shows and which key goes where."""

    image: str | None = None  # "STAGE.OUTPUT"; None: each point's figure
    x: str | None = None  # a swept key (with or without "stages.")
    y: str | None = None
    z: str | None = None


@dataclass(frozen=True)
class Arrangement:
    """Which axis runs across (x), down (y), and which make the blocks (z, slowest first)."""

    x: Axis | None
    y: Axis | None
    z: tuple[Axis, ...]


@dataclass
class GridLayout:
    """Where everything of a drawn grid is, in pixels: each point's tile ``(left, top, width,
    height)`` in point order, and each header's text as drawn (a newline where it wraps)
    with its box ``(left, top, right, bottom)``."""

    size: tuple[int, int]
    tiles: list[tuple[int, int, int, int]] = field(default_factory=list)
    headers: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)


def grid_spec(document: dict[str, Any]) -> GridSpec:
    """The ``[sweep.grid]`` table of a recipe document (defaults where absent).

    Raises:
        EditflowError: It is not a table of the strings ``image``, ``x``, ``y``, ``z``, or
            ``image`` does not read ``STAGE.OUTPUT``.
    """
    table = document.get("sweep")
    if not isinstance(table, dict) or "grid" not in table:
        return GridSpec()
    grid = table["grid"]
    if not isinstance(grid, dict):
        raise EditflowError(
            'must be a table: [sweep.grid] image = "STAGE.OUTPUT", x = "stages.NAME.PARAMETER"',
            file="sweep.grid",
        )
    for name, value in grid.items():
        if name not in GRID_KEYS:
            raise EditflowError(
                f"unknown key (known: {', '.join(GRID_KEYS)})", file=f"sweep.grid.{name}"
            )
        if not isinstance(value, str) or not value.strip():
            raise EditflowError("must be a non-empty string", file=f"sweep.grid.{name}")
    image = grid.get("image")
    if image is not None and len(image.split(".")) != 2:
        raise EditflowError(
            f'expected "STAGE.OUTPUT" (for example "decode_edit.images"), got {image!r}',
            file="sweep.grid.image",
        )
    return GridSpec(**grid)


def arrange(axes: list[Axis], spec: GridSpec) -> Arrangement:
    """Put each axis on X, Y or Z: the ones ``spec`` names where it names them, the others in
    their order on what is left (X, then Y, then Z).

    Raises:
        EditflowError: ``spec`` names a key that is not swept, or one key twice.
    """
    named: dict[str, Axis] = {}
    for which in ("x", "y", "z"):
        wanted = getattr(spec, which)
        if wanted is None:
            continue
        match = [axis for axis in axes if wanted.strip() in (axis.key, _short(axis.key))]
        if not match:
            swept = ", ".join(axis.key for axis in axes)
            raise EditflowError(
                f"{wanted!r} is not swept (swept: {swept})", file=f"sweep.grid.{which}"
            )
        if match[0] in named.values():
            raise EditflowError(
                f"{wanted!r} is already on another axis", file=f"sweep.grid.{which}"
            )
        named[which] = match[0]
    rest = [axis for axis in axes if axis not in named.values()]
    x = named.get("x") or (rest.pop(0) if rest else None)
    y = named.get("y") or (rest.pop(0) if rest else None)
    z = ([named["z"]] if "z" in named else []) + rest
    return Arrangement(x, y, tuple(z))


def image_problem(spec: GridSpec, plan: Any) -> Problem | None:
    """What is wrong with ``[sweep.grid] image`` for a planned point, if anything."""
    if spec.image is None:
        return None
    stage_name, port_name = spec.image.split(".")
    where = {"file": "sweep.grid.image"}
    stage = plan.stages.get(stage_name)
    if stage is None:
        return Problem(f"the recipe has no stage {stage_name!r}", **where)
    port = stage.kind.output_port(port_name)
    if port is None:
        outputs = ", ".join(p.name for p in stage.kind.outputs)
        message = f"{stage_name!r} ({stage.kind.kind}) has no output {port_name!r} (its outputs: {outputs})"
        return Problem(message, **where)
    if port.type.value != "image":
        return Problem(f"{spec.image!r} is {port.type.value}, not image", **where)
    if not stage.needed:
        return Problem(f"{stage_name!r} is not run (not needed by the targets)", **where)
    return None


# ----------------------------------------------------------------------------------- cells


def output_cell(cache: Any, key: str, port: str) -> Image.Image:
    """The images of a cached output, side by side: what a cell shows (8-bit, as exported)."""
    from editflow.stages.images import to_pil

    images = cache.get(key).tensor(port)  # (N, 3, H, W)
    tiles = [to_pil(image) for image in images]
    cell = Image.new("RGB", (sum(tile.width for tile in tiles), tiles[0].height), "white")
    left = 0
    for tile in tiles:
        cell.paste(tile, (left, 0))
        left += tile.width
    return cell


def figure_cell(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def made_of(arrangement: Arrangement, spec: GridSpec, labels: list[str], sources: list[str]) -> str:
    """What a grid is made of, as a digest: an unchanged sweep finds its grid made already
    (and imports no torch). ``sources``: each cell's stage key or figure digest."""
    axes = [arrangement.x, arrangement.y, *arrangement.z]
    described = [
        [axis.key, [json.dumps(v) for v in axis.values]] if axis else None for axis in axes
    ]
    text = json.dumps([GRID_FORMAT, spec.image, described, labels, sources], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def kept_layout(path: Path, digest: str) -> GridLayout | None:
    """The layout of the grid at ``path`` when it was made of ``digest``, else None."""
    try:
        with Image.open(path) as existing:
            if existing.info.get("editflow:made_of") != digest:
                return None
            saved = json.loads(existing.info["editflow:layout"])
    except (OSError, ValueError, KeyError):
        return None
    headers = [(text, tuple(box)) for text, box in saved["headers"]]
    return GridLayout(tuple(saved["size"]), [tuple(t) for t in saved["tiles"]], headers)  # type: ignore[arg-type]


def write_grid(
    path: Path, canvas: Image.Image, keys: list[str], digest: str, layout: GridLayout
) -> Path:
    """The grid as a PNG that says its swept keys, what it was made of, and its layout."""
    from editflow.files.outputs import write_png

    info = PngImagePlugin.PngInfo()
    info.add_text("editflow:sweep", json.dumps(keys))
    info.add_text("editflow:made_of", digest)
    saved = {"size": layout.size, "tiles": layout.tiles, "headers": layout.headers}
    info.add_text("editflow:layout", json.dumps(saved))
    return write_png(path, canvas, info)


# ---------------------------------------------------------------------------------- layout


@cache
def header_font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (or its bold) at ``size`` px, from matplotlib's data folder, found without
    importing matplotlib (which takes a while): a readable font on any machine, no download."""
    spec = importlib.util.find_spec("matplotlib")
    folder = Path(next(iter(spec.submodule_search_locations or [])))  # type: ignore[union-attr]
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(folder / "mpl-data" / "fonts" / "ttf" / name), size)


def font_size(tile_height: int) -> int:
    """Headers grow with the tiles, from 12 px (legible beside 32 px tiles) to 28 px."""
    return max(12, min(28, tile_height // 8))


def text_image(text: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """``text`` (lines split on newlines, centred) in black on white, cropped to its lines'
    height and width plus a pixel: exactly what the grid pastes as a header."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = probe.multiline_textbbox((0, 0), text, font=font, align="center")
    left, top, right, bottom = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]),
                                math.ceil(box[3]))  # fmt: skip
    image = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(image).multiline_text(
        (1 - left, 1 - top), text, fill="black", font=font, align="center"
    )
    return image


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` broken at spaces into lines of at most ``width`` px (a word longer stays)."""
    lines: list[str] = []
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    return "\n".join(lines)


def header_text(axis: Axis, value: Any) -> str:
    from editflow.cli.sweeps import value_text

    return f"{_short(axis.key)} = {value_text(value)}"


def draw(
    cells: list[Image.Image], arrangement: Arrangement, places: list[tuple[int, int, int]]
) -> tuple[Image.Image, GridLayout]:
    """The X/Y/Z plot of ``cells`` (one per point), each at its ``(block, row, column)``.

    Columns are as wide as their tile or their header, rows as tall as their tile or their
    header; every header is a :func:`text_image` pasted over its column (bottom-aligned),
    beside its row (right-aligned, centred in height), or, in bold, at the left above its
    block (Z).
    """
    x, y, z = arrangement.x, arrangement.y, arrangement.z
    tile_w, tile_h = max(c.width for c in cells), max(c.height for c in cells)
    font = header_font(font_size(tile_h))
    gap = max(6, font.size // 2)
    limit = max(tile_w, 8 * font.size)  # a header wraps past this width
    # The headers' texts as drawn (wrapped), as the layout reports them.
    column_texts = [wrap(header_text(x, value), font, limit) for value in x.values] if x else []
    row_texts = [wrap(header_text(y, value), font, limit) for value in y.values] if y else []
    columns = [text_image(text, font) for text in column_texts]
    rows = [text_image(text, font) for text in row_texts]
    titles = [text_image(text, header_font(font.size, bold=True)) for text in block_titles(z)]
    column_w = [max(tile_w, header.width) for header in columns] or [tile_w]
    row_h = [max(tile_h, header.height) for header in rows] or [tile_h]
    head_h = max((header.height + gap for header in columns), default=0)
    side_w = max((header.width + gap for header in rows), default=0)
    title_h = max((title.height + gap for title in titles), default=0)
    column_left = [gap + side_w + sum(column_w[:c]) + c * gap for c in range(len(column_w))]
    row_top = [title_h + head_h + sum(row_h[:r]) + r * gap for r in range(len(row_h))]
    block_h = title_h + head_h + sum(row_h) + len(row_h) * gap + gap
    width = max([column_left[-1] + column_w[-1] + gap, *(t.width + 2 * gap for t in titles)])
    canvas = Image.new("RGB", (width, gap + max(1, len(titles)) * block_h), "white")
    layout = GridLayout(canvas.size)

    def header(image: Image.Image, left: int, top: int, text: str) -> None:
        canvas.paste(image, (left, top))
        layout.headers.append((text, (left, top, left + image.width, top + image.height)))

    for block in range(max(1, len(titles))):
        top = gap + block * block_h
        if titles:
            header(titles[block], gap, top, block_titles(z)[block])
        for c, image in enumerate(columns):
            left = column_left[c] + (column_w[c] - image.width) // 2
            header(image, left, top + title_h + head_h - gap - image.height, column_texts[c])
        for r, image in enumerate(rows):
            middle = top + row_top[r] + (row_h[r] - image.height) // 2
            header(image, gap + side_w - gap - image.width, middle, row_texts[r])
    for cell, (block, r, c) in zip(cells, places, strict=True):
        left = column_left[c] + (column_w[c] - cell.width) // 2
        top = gap + block * block_h + row_top[r] + (row_h[r] - cell.height) // 2
        canvas.paste(cell, (left, top))
        layout.tiles.append((left, top, cell.width, cell.height))
    return canvas, layout


def block_titles(z: tuple[Axis, ...]) -> list[str]:
    """One title per block: every Z key with its value (none without a Z axis)."""
    if not z:
        return []
    return [
        ", ".join(header_text(axis, value) for axis, value in zip(z, values, strict=True))
        for values in itertools.product(*(axis.values for axis in z))
    ]


def cell_places(
    count: int, arrangement: Arrangement, axes: list[Axis]
) -> list[tuple[int, int, int]]:
    """Each point's (z block, row, column), points in the order of :func:`points` (the
    first axis slowest); positions come from indices, never from comparing values (1 and
    1.0 and true are equal in Python, and different values of an axis)."""
    shape = [len(axis.values) for axis in axes]
    result = []
    for flat in range(count):
        index, rest = {}, flat
        for axis, size in zip(reversed(axes), reversed(shape), strict=True):
            rest, index[axis.key] = divmod(rest, size)
        column = index[arrangement.x.key] if arrangement.x else 0
        row = index[arrangement.y.key] if arrangement.y else 0
        block = 0
        for axis in arrangement.z:
            block = block * len(axis.values) + index[axis.key]
        result.append((block, row, column))
    return result


def _short(key: str) -> str:
    return key.removeprefix("stages.")
