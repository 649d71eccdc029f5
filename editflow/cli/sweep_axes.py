"""A sweep's axes: ``--sweep KEY=V1,V2`` arguments and the ``[sweep]`` table's entries, with
``range(START, STOP[, STEP])`` and ``linspace(START, STOP, COUNT)`` spelling evenly spaced
values; every value finite and given once, at most :data:`MAX_POINTS` points."""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from editflow.errors import EditflowError

if TYPE_CHECKING:
    from editflow.cli.sweep_grid import GridSpec

_SPAN = re.compile(r"\s*(range|linspace)\s*\((.*)\)\s*", re.DOTALL)
_SPAN_USAGE = {"range": "range(START, STOP[, STEP])", "linspace": "linspace(START, STOP, COUNT)"}
MAX_POINTS = 1024  # a sweep larger than this is almost surely a typo (1e8 points plan forever)


@dataclass(frozen=True)
class Axis:
    """One swept key, its values, and where the user gave it (for messages)."""

    key: str
    values: tuple[Any, ...]
    origin: str  # "--sweep KEY=V1,V2" or 'sweep."KEY"'


def parse_sweep(argument: str) -> Axis:
    """``stages.edit.skip=20,30,40`` -> an axis (values parsed as TOML, else strings)."""
    origin = f"--sweep {argument}"
    key, separator, text = argument.partition("=")
    key = key.strip()
    if not separator or not key or not text.strip():
        raise EditflowError("expected KEY.PATH=VALUE,VALUE,...", file=origin)
    values = span(text, origin)
    if values is None:
        try:
            values = tomllib.loads(f"values = [{text}]")["values"]
        except tomllib.TOMLDecodeError:  # bare words: each value on its own, as --set reads it
            values = [_value(value.strip()) for value in text.split(",")]
    return _checked(Axis(key, tuple(values), origin))


def span(text: str, origin: str) -> list[Any] | None:
    """``range(START, STOP[, STEP])`` (STOP excluded, as Python's) or ``linspace(START, STOP,
    COUNT)`` (both ends included, as numpy's) as its values; None for any other text.

    The values are exact decimal steps (``range(0, 0.3, 0.1)`` is 0.0, 0.1, 0.2, not
    0.30000000000000004's neighbours): integers where every number given is an integer (and,
    for linspace, every value is whole), floats otherwise.

    Raises:
        EditflowError: Not numbers, a zero step, no values, or more than :data:`MAX_POINTS`.
    """
    match = _SPAN.fullmatch(text)
    if match is None:
        return None
    function, inner = match.groups()
    spelled = f"{function}({inner.strip()})"
    parts = [part.strip() for part in inner.split(",")]
    numbers = [_number(part) for part in parts]
    counts = (2, 3) if function == "range" else (3,)
    if len(parts) not in counts or None in numbers:
        raise EditflowError(
            f"{spelled}: expected {_SPAN_USAGE[function]} with numbers", file=origin
        )
    whole = all(re.fullmatch(r"[+-]?\d+", part) for part in parts)
    if function == "range":
        start, stop, step = (*numbers, Fraction(1))[:3]
        if step == 0:
            raise EditflowError(f"{spelled}: STEP must not be 0", file=origin)
        count = max(0, math.ceil((stop - start) / step))
        values = [start + index * step for index in range(min(count, MAX_POINTS + 1))]
    else:
        start, stop, count_given = numbers
        if count_given.denominator != 1 or count_given < 2:
            raise EditflowError(f"{spelled}: COUNT must be a whole number >= 2", file=origin)
        count = int(count_given)
        values = [
            start + (stop - start) * index / (count - 1)
            for index in range(min(count, MAX_POINTS + 1))
        ]
        whole = whole and all(value.denominator == 1 for value in values)
    if not values:
        raise EditflowError(
            f"{spelled}: no values (STOP is not beyond START in STEP's direction)", file=origin
        )
    if len(values) > MAX_POINTS:
        raise EditflowError(f"{spelled}: more than {MAX_POINTS} values", file=origin)
    return [int(value) if whole else float(value) for value in values]


def _number(text: str) -> Fraction | None:
    """A decimal number exactly (``0.1`` is one tenth), or None."""
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return None
    return Fraction(text)


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
    grid_spec(document)  # its mistakes are found with the axes', before anything plans
    axes = []
    for key, values in table.items():
        if key == "grid":  # [sweep.grid]: how the plot is drawn, not an axis
            continue
        origin = f"sweep.{json.dumps(key)}"
        if isinstance(values, str):
            values = span(values, origin)
            if values is None:
                raise EditflowError(
                    f"must be an array of values, {_SPAN_USAGE['range']!r} or"
                    f" {_SPAN_USAGE['linspace']!r}", file=origin,
                )  # fmt: skip
        if not isinstance(values, list) or not values:
            raise EditflowError("must be a non-empty array of values", file=origin)
        axes.append(_checked(Axis(key, tuple(values), origin)))
    return axes


def grid_spec(document: Mapping[str, Any]) -> GridSpec:
    """The recipe's ``[sweep.grid]`` table (see :mod:`editflow.cli.sweep_grid`)."""
    from editflow.cli import sweep_grid

    return sweep_grid.grid_spec(dict(document))


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
