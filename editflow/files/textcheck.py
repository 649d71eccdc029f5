"""Exported text files (tables, SVG plots) compared within a tolerance, as images are.

Where a lock's platform differs, the numbers a run computes move in their last digits, so a
table's bytes cannot be compared; its words can. A text export is within tolerance when its
text outside the numbers is the baseline's and every number is close to the baseline's:

- in a table (``.csv``, ``.md``, ``.tex``) within the ``[check]`` table's ``numbers``
  fraction of its value, or within one unit of the last digit printed (``0.123`` and ``0.124``
  may be one float rounded either way; integers get no such allowance);
- in an SVG plot within ``numbers`` of the plot's size (its larger side, in points): a
  coordinate's value says where, not how much, and the ids matplotlib derives from path
  data (markers, clip paths) are compared by the order they appear in.

A lock records for a text file the sha256 of its bytes where it records an image's pixel
digest: on the lock's platform the bytes must match exactly.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editflow.imagecheck import CheckSection, compare_images, pixel_digest

TABLE_SUFFIXES = (".csv", ".md", ".tex")
TEXT_SUFFIXES = (*TABLE_SUFFIXES, ".svg")
NUMBER = re.compile(r"([-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)")
_SVG_ID = re.compile(r'(id="|#)([A-Za-z_][\w.-]*)')
_VIEWBOX = re.compile(r'viewBox="([^"]*)"')


def is_text(path: Path) -> bool:
    """Whether an exported file is compared as text (tables, SVG plots)."""
    return path.suffix.lower() in TEXT_SUFFIXES


def exported_digest(path: Path) -> str:
    """What a lock records as an exported file's content: the sha256 of a text file's bytes,
    an image's pixel digest (:func:`editflow.imagecheck.pixel_digest`)."""
    if is_text(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return pixel_digest(path)


@dataclass(frozen=True)
class TextDifference:
    """How far a text export is from its baseline."""

    numbers: int  # numbers compared
    changed: int  # numbers not written the same
    beyond: int  # numbers beyond the tolerance
    largest: float  # the largest difference, as a fraction of what it is measured against
    measure: str  # what the fraction is of ("their value", "the plot's size")
    mismatch: str | None = None  # other text: beyond any tolerance

    def within(self, tolerance: CheckSection) -> bool:
        return self.mismatch is None and self.beyond == 0

    def describe(self, tolerance: CheckSection) -> str:
        """``within tolerance (2 of 40 numbers differ, the most by 0.03% of their value)``."""
        if self.mismatch is not None:
            return f"beyond tolerance ({self.mismatch})"
        if self.changed == 0:
            return "within tolerance (the same text and numbers)"
        # Platform noise is often far below 0.01%: say how far below.
        share = f"{self.largest:.2%}" if self.largest >= 1e-4 else f"{self.largest * 100:.1e}%"
        most = f"the most by {share} of {self.measure}"
        if self.beyond:
            return (
                f"beyond tolerance ({self.beyond} of {self.numbers} numbers differ by more than"
                f" {tolerance.numbers:.2%}, {most})"
            )
        return f"within tolerance ({self.changed} of {self.numbers} numbers differ, {most})"


def compare_exported(baseline: Path, path: Path, tolerance: CheckSection) -> Any:
    """How far an exported file is from its baseline: a :class:`TextDifference` for text, an
    :class:`editflow.imagecheck.ImageDifference` for an image."""
    if is_text(path):
        return compare_texts(baseline, path, tolerance)
    if _is_plot(path) and baseline.with_suffix(".svg").is_file():
        # A plot's PNG rasterises its SVG: an axis that autoscales by a hair on another CPU
        # moves every line edge by a pixel there, while the SVG's numbers say how far the
        # plot really moved. So the PNG stands or falls with its SVG.
        return compare_texts(baseline.with_suffix(".svg"), path.with_suffix(".svg"), tolerance)
    return compare_images(baseline, path, tolerance)


def _is_plot(path: Path) -> bool:
    """A PNG that ``figure.plot`` wrote (its text chunks name the plot) beside its SVG."""
    from PIL import Image

    if path.suffix.lower() != ".png" or not path.with_suffix(".svg").is_file():
        return False
    with Image.open(path) as image:  # the text chunks, no pixels decoded
        return "editflow:plot" in getattr(image, "text", {})


def compare_texts(baseline: Path, path: Path, tolerance: CheckSection) -> TextDifference:
    """Compare a text export with its baseline (see the module's docstring)."""
    old = baseline.read_text(encoding="utf-8", errors="replace")
    new = path.read_text(encoding="utf-8", errors="replace")
    svg = path.suffix.lower() == ".svg"
    if svg:
        old, new = _numbered_ids(old), _numbered_ids(new)
    old_parts, new_parts = NUMBER.split(old), NUMBER.split(new)
    if old_parts[0::2] != new_parts[0::2]:
        return TextDifference(0, 0, 0, 0.0, "", _first_difference(old, new))
    scale = _svg_size(old) if svg else None
    measure = "the plot's size" if svg else "their value"
    olds, news = old_parts[1::2], new_parts[1::2]
    changed = beyond = 0
    largest = 0.0
    for before, after in zip(olds, news, strict=True):
        if before == after:
            continue
        changed += 1
        a, b = float(before), float(after)
        against = scale if scale is not None else max(abs(a), abs(b))
        fraction = abs(a - b) / against if against > 0 else math.inf
        largest = max(largest, fraction)
        allowed = max(tolerance.numbers * against, _last_digit(before), _last_digit(after))
        beyond += abs(a - b) > allowed
    return TextDifference(len(olds), changed, beyond, largest, measure)


def _last_digit(number: str) -> float:
    """One unit of the last digit printed after a decimal point (0 for an integer)."""
    mantissa, _, exponent = number.lower().partition("e")
    if "." not in mantissa:
        return 0.0
    decimals = len(mantissa.split(".")[1])
    return 10.0 ** (int(exponent or 0) - decimals)


def _numbered_ids(svg: str) -> str:
    """The SVG with each id (and each reference to it) replaced by its order of appearance:
    matplotlib names markers and clip paths by a hash of their path data."""
    order: dict[str, str] = {}
    for match in re.finditer(r'id="([^"]+)"', svg):
        order.setdefault(match.group(1), f"id{len(order)}")

    def renamed(match: re.Match[str]) -> str:
        return match.group(1) + order.get(match.group(2), match.group(2))

    return _SVG_ID.sub(renamed, svg)


def _svg_size(svg: str) -> float | None:
    match = _VIEWBOX.search(svg)
    try:
        sides = [float(value) for value in match.group(1).split()[2:]] if match else []
    except ValueError:
        return None
    return max(sides) if sides else None


def _first_difference(old: str, new: str) -> str:
    """Where the text (numbers aside) first differs: ``other text on line 3: '...'``."""
    old_lines = NUMBER.sub("0", old).splitlines()
    new_lines = NUMBER.sub("0", new).splitlines()
    for number, (before, after) in enumerate(zip(old_lines, new_lines, strict=False), start=1):
        if before != after:
            shown = new.splitlines()[number - 1].strip()
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"other text on line {number}: {shown!r}"
    return f"{len(new_lines)} lines, the baseline {len(old_lines)}"
