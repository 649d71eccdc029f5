"""Recipe documents: TOML or JSON files read into plain data, with every key path located.

Errors in the file itself (syntax, encoding) become located ``RecipeError``s; ``--set``
overrides are applied to the parsed document; an older ``schema_version`` is migrated
(:data:`MIGRATIONS`), with a warning, never silently misread; :func:`toml_locator` maps a dotted key path
back to the TOML line that sets it, and :func:`error_message` words a pydantic error as one
short line, so every later problem can name its line and say what is wrong.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
import tomllib
import types
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from editflow.errors import Problem, RecipeError

SCHEMA_VERSION = 1

# Migrations from an older schema_version to the next one, applied in order on load, each
# with a warning. Version 1 is the first published format, so there are none yet.
MIGRATIONS: dict[int, Any] = {}


class Table(BaseModel):
    """Base of every table a recipe holds: unknown keys are errors, values keep their type.

    Recipes are code kept in git, so nothing is coerced (``seed = "0"``, ``regularize =
    "yes"`` and ``cfg_tar = true`` are refused); the one exception is an integer where a
    number is expected. TOML and JSON have no tuples, so an array is taken for a tuple field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _arrays_as_tuples(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            name: tuple(value)
            if isinstance(value, list) and name in fields and _takes_tuple(fields[name].annotation)
            else value
            for name, value in data.items()
        }


def _takes_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_tuple(arg) for arg in typing.get_args(annotation))
    return annotation is tuple or typing.get_origin(annotation) is tuple


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of text; anything bigger is the wrong file
MAX_DEPTH = 32  # tables and arrays nested deeper than any recipe needs


def read_document(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a TOML or JSON recipe file; every way it can be unreadable is a located
    RecipeError (missing, too big, not UTF-8, bad syntax, nested too deeply)."""
    label = str(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", file=label)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(f"cannot read the recipe: {error.strerror}", file=label) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe", file=label)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise RecipeError(
            f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})",
            file=label,
            line=line,
            hint="save the recipe as UTF-8",
        ) from None
    try:
        document = copy.deepcopy(_parsed(text, path.suffix == ".json"))
    except json.JSONDecodeError as error:
        raise RecipeError(f"invalid JSON: {error.msg}", file=label, line=error.lineno) from None
    except DuplicateKeyError as error:
        raise RecipeError(f"invalid JSON: {error}", file=label) from None
    except tomllib.TOMLDecodeError as error:
        message, line = toml_error(error)
        raise RecipeError(message, file=label, line=line) from None
    except TooDeep as error:
        raise RecipeError(str(error), file=label) from None
    if not isinstance(document, dict):
        raise RecipeError("the recipe must be a table/object at the top level", file=label)
    return document, text


@functools.lru_cache(maxsize=64)
def _parsed(text: str, is_json: bool) -> dict[str, Any]:
    """A recipe's text parsed, kept for the next read of the same text: a sweep, a figure
    check and a lock read one recipe several times. Callers get a deep copy."""
    return parse_bounded(read_json if is_json else tomllib.loads, text, MAX_DEPTH)


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice (JSON keeps the last silently; TOML refuses it)."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` that refuses a key given twice."""
    counts = Counter(key for key, _ in pairs)
    twice = sorted(key for key, count in counts.items() if count > 1)
    if twice:
        raise DuplicateKeyError(f"duplicate key {twice[0]!r}")
    return dict(pairs)


def read_json(text: str) -> Any:
    """JSON as a recipe reads it: a key given twice is an error, not the last one kept."""
    return json.loads(text, object_pairs_hook=no_duplicate_keys)


class TooDeep(ValueError):
    """A document nests tables or arrays deeper than its kind ever needs."""


def parse_bounded(parse: Callable[[str], Any], text: str, limit: int) -> Any:
    """``parse(text)``, refusing nesting deeper than ``limit`` (the parser's own recursion
    limit included).

    Raises:
        TooDeep: Tables or arrays nested deeper than ``limit``.
    """
    too_deep = TooDeep(f"tables or arrays nested deeper than {limit} levels")
    try:
        document = parse(text)
    except RecursionError:
        raise too_deep from None
    if nesting_depth(document, limit) > limit:
        raise too_deep
    return document


def toml_error(error: tomllib.TOMLDecodeError) -> tuple[str, int | None]:
    """A TOML syntax error as (one short message, its line)."""
    match = re.search(r"\(at line (\d+), column \d+\)", str(error))
    message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(error))
    return f"invalid TOML: {message}", int(match.group(1)) if match else None


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of tables and arrays, counted without recursion (and no deeper than
    ``limit + 1``: past that the exact depth does not matter)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= limit:
                pending += [
                    (child, depth + 1)
                    for child in (item.values() if isinstance(item, dict) else item)
                ]
    return deepest


@dataclass(frozen=True)
class Locator:
    """Where a key path of a recipe was written: a line of its file, or a ``--set``."""

    file: str
    lines: Callable[[str], int | None]
    set_by: Mapping[str, str]  # key path -> the --set argument that gave it

    @classmethod
    def of(cls, path: Path, text: str, overrides: list[str]) -> Locator:
        lines = toml_locator(text) if path.suffix != ".json" else (lambda key: None)
        return cls(str(path), lines, overridden(overrides))

    def line_of(self, key: str) -> int | None:
        return None if key in self.set_by else self.lines(key)

    def locate(self, problem: Problem) -> Problem:
        """The problem pointed at the file and line, or at the --set that gave its key."""
        if problem.key in self.set_by:
            return replace(problem, file=f"--set {self.set_by[problem.key]}", line=None)
        return replace(problem, file=self.file, line=self.line_of(problem.key or ""))


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides; values are parsed as TOML, else strings.

    A part that is a number indexes an array of tables (``model.lora.0.scale=0.5``), so an
    entry of ``[[model.lora]]`` can be set and swept like any table's key.
    """
    document = json.loads(json.dumps(document))
    problems: list[Problem] = []
    for override in overrides:
        where = f"--set {override}"
        path, sep, text = override.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            problems.append(Problem("expected KEY.PATH=VALUE", file=where))
            continue
        table: Any = document
        for depth, key in enumerate(keys[:-1]):
            inner = _part(table, key)
            last = depth == len(keys) - 2  # the value's own table: not an array
            if not isinstance(inner, dict) and (last or not isinstance(inner, list)):
                missing = ".".join(keys[: depth + 1])
                problems.append(Problem(f"the recipe has no table '{missing}'", file=where))
                break
            table = inner
        else:
            table[keys[-1]] = _parse_value(text.strip())
    if problems:
        raise RecipeError(problems=problems)
    return document


def _part(container: Any, key: str) -> Any:
    """``container[key]`` for a table, ``container[int(key)]`` for an array; None if absent."""
    if isinstance(container, dict):
        return container.get(key)
    if isinstance(container, list) and key.isdigit() and int(key) < len(container):
        return container[int(key)]
    return None


def overridden(overrides: list[str]) -> dict[str, str]:
    """Dotted key path -> the --set argument that set it."""
    return {override.partition("=")[0].strip(): override for override in overrides}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def toml_locator(text: str) -> Callable[[str | tuple[str, ...]], int | None]:
    """Map a key path (dotted, or a tuple of parts when a part may hold a dot) to the TOML
    line that sets it (or its table's header)."""
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assignment = re.compile(
        r"^\s*((?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*'))*)\s*="
    )
    positions: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if match := header.match(line):
            table = _split_key(match.group(1))
            positions.setdefault(table, number)
        elif match := assignment.match(line):
            full = table + _split_key(match.group(1))
            for depth in range(len(table) + 1, len(full) + 1):
                positions.setdefault(full[:depth], number)

    def locate(key: str | tuple[str, ...]) -> int | None:
        parts = tuple(key.split(".")) if isinstance(key, str) else tuple(key)
        while parts:
            if parts in positions:
                return positions[parts]
            parts = parts[:-1]
        return None

    return locate


_KEY_PART = re.compile(r"\s*(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^.\s]+)\s*(?:\.|$)")


def _split_key(text: str) -> tuple[str, ...]:
    """A TOML key's parts: bare words, or quoted strings that may hold dots."""
    parts = []
    for match in _KEY_PART.finditer(text.strip()):
        part = match.group(1)
        if part.startswith('"'):
            try:
                part = json.loads(part)
            except ValueError:
                part = part.strip('"')
        parts.append(part.strip("'"))
    return tuple(parts)


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "an array",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
}


def error_message(item: dict[str, Any], known_keys: list[str]) -> str:
    """One pydantic error item (``ValidationError.errors()``) as a short line for users.

    Args:
        item: The error item.
        known_keys: The keys allowed where an unknown key was found (for "did you mean").
    """
    kind, ctx, given = item["type"], item.get("ctx", {}), item.get("input")
    bounds = {
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
    }
    if kind in bounds:
        symbol, field = bounds[kind]
        return f"must be {symbol} {ctx[field]}, got {given!r}"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(item["loc"][-1]), known_keys, n=1)
        return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}, got {given!r}"
    if kind == "too_short" and isinstance(given, list | tuple):
        least = ctx.get("min_length")
        return f"must hold at least {least} item{'s' if least != 1 else ''}, got {given!r}"
    if kind == "value_error":
        return str(ctx.get("error", item["msg"]))
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {given!r}"
    message = item["msg"]
    message = message[0].lower() + message[1:]
    return f"{message}, got {given!r}" if given is not None and kind != "model_type" else message


def migrate(document: dict[str, Any], label: str) -> dict[str, Any]:
    """Bring an older recipe to the current schema_version, warning once per step."""
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        if version is None:
            message = f"required key is missing (add schema_version = {SCHEMA_VERSION})"
        else:
            message = f"must be an integer, got {version!r}"
        raise RecipeError(message, file=label, key="schema_version")
    if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and version not in MIGRATIONS):
        oldest = min([*MIGRATIONS, SCHEMA_VERSION])
        raise RecipeError(
            f"unsupported version {version}; this editflow reads {oldest} to {SCHEMA_VERSION}",
            file=label,
            key="schema_version",
        )
    while document["schema_version"] < SCHEMA_VERSION:
        old = document["schema_version"]
        document = MIGRATIONS[old](document)
        warnings.warn(f"{label}: migrated from schema_version {old}", stacklevel=2)
    return document


def document_identity(path: Path) -> str:
    """The recipe as its last-run records name it: its path inside its git repository (so a
    fresh clone in CI finds the records a developer's run left in a shared cache), else its
    absolute path."""
    resolved = path.resolve()
    for folder in resolved.parents:
        if (folder / ".git").exists():
            return resolved.relative_to(folder).as_posix()
    return str(resolved)
