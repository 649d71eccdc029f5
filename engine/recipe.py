"""Recipe models and loading: TOML or JSON in, a validated :class:`Recipe` out.

The stage union is derived from the stage kinds registered in ``editflow.stages``: each kind
contributes one pydantic model (its parameters plus one reference field per input port),
discriminated on ``kind``. Every problem is collected and reported at once, each with its
key path and, for TOML, its line.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from editflow.errors import Problem, RecipeError
from editflow.stages import KINDS_BY_NAME, STAGE_KINDS, StageKind

SCHEMA_VERSION = 1

# Migrations from an older schema_version to the next one, applied in order on load, each
# with a warning. Version 1 is the first published format, so there are none yet.
MIGRATIONS: dict[int, Any] = {}

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
REFERENCE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*\.[A-Za-z_][A-Za-z0-9_]*$"
Reference = Annotated[
    str,
    Field(
        pattern=REFERENCE_PATTERN,
        description="'stage.output' or 'inputs.name'",
        json_schema_extra={"examples": ["invert.latents", "inputs.photo"]},
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Strict):
    """Which diffusion model the stages use, and in which dtype."""

    id: str = Field("tiny", description="'tiny', a hub id, or a folder relative to the recipe")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="Weight variant, e.g. 'fp16'")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Compute dtype (float16/bfloat16 are meant for GPUs)"
    )
    captioner: str = Field(
        "Salesforce/blip-image-captioning-base",
        description="BLIP for caption stages: hub id or folder ('tiny' has its own built in)",
    )


class InputSection(Strict):
    """A file the recipe reads. Exactly one of image, mask or text."""

    image: str | None = Field(
        None, description="Image path relative to the recipe, or 'skimage:NAME'"
    )
    mask: str | None = Field(None, description="Mask image path (white = 1)")
    text: str | None = Field(None, description="UTF-8 text file path")
    size: tuple[int, int] | None = Field(
        None, description="[height, width] to resize to; each a multiple of 8"
    )
    resize: Literal["center-crop", "stretch", "pad"] = Field(
        "center-crop", description="How to reach `size` when the aspect ratio differs"
    )

    @model_validator(mode="after")
    def _one_file(self) -> InputSection:
        if sum(value is not None for value in (self.image, self.mask, self.text)) != 1:
            raise ValueError("give exactly one of 'image', 'mask' or 'text'")
        if self.size is not None and any(side <= 0 or side % 8 for side in self.size):
            raise ValueError(f"size must be positive multiples of 8, got {list(self.size)}")
        return self

    def source(self) -> tuple[str, str]:
        """(field name, value) of the one file this input names."""
        given = [(name, getattr(self, name)) for name in ("image", "mask", "text")]
        given = [(name, value) for name, value in given if value is not None]
        return given[0]


def stage_model(kind: type[StageKind]) -> type[BaseModel]:
    """The recipe model of one stage kind: its params plus a reference field per input."""
    fields: dict[str, Any] = {
        "kind": (Literal[kind.kind], Field(description=kind.description)),  # type: ignore[valid-type]
    }
    for port in kind.inputs:
        annotation: Any = list[Reference] if port.many else Reference
        description = f"{port.type.value}: {port.description}"
        if port.optional:
            fields[port.name] = (annotation | None, Field(None, description=description))
        else:
            fields[port.name] = (annotation, Field(description=description))
    clash = set(kind.params.model_fields) & {port.name for port in kind.inputs}
    if clash or "kind" in kind.params.model_fields:
        raise TypeError(f"{kind.kind}: parameter names clash with inputs: {sorted(clash)}")
    name = "Stage_" + re.sub(r"\W", "_", kind.kind)
    return create_model(name, __base__=kind.params, __doc__=kind.description, **fields)


@cache
def stage_models() -> dict[str, type[BaseModel]]:
    return {kind.kind: stage_model(kind) for kind in STAGE_KINDS}


@cache
def stage_union() -> Any:
    models = tuple(stage_models().values())
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007


class Recipe(Strict):
    """An edit recipe: a model, input files, a seed and a graph of named stages."""

    schema_version: int = Field(description=f"Recipe format version (current: {SCHEMA_VERSION})")
    seed: int = Field(0, ge=0, description="Seed from which every random draw is derived")
    model: ModelSection = Field(default_factory=ModelSection)
    inputs: dict[Annotated[str, Field(pattern=NAME_PATTERN)], InputSection] = Field(
        default_factory=dict, description="Named input files"
    )
    stages: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Any] = Field(
        description="Named stages; each has a `kind`, parameters and input references"
    )
    targets: list[str] | None = Field(
        None, description="Stages to produce (default: every stage nothing else consumes)"
    )


def recipe_json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema, with the stage union spelled out (for editors)."""

    class RecipeSchema(Recipe):
        stages: dict[str, stage_union()]  # type: ignore[valid-type]

    RecipeSchema.__name__ = "Recipe"
    schema = RecipeSchema.model_json_schema()
    schema["title"] = "editflow recipe"
    return schema


# --------------------------------------------------------------------------- loading


class LoadedRecipe(BaseModel):
    """A recipe after validation, with where it came from.

    ``problems`` holds what is wrong with individual stages; ``loose`` keeps the kind and raw
    references of each stage that failed, so planning can still check the whole graph and
    report every problem at once.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    path: Path
    recipe: Recipe
    stages: dict[str, Any]  # stage name -> validated stage model
    raw: dict[str, Any]  # the document after overrides and migrations
    problems: list[Problem] = []
    loose: dict[str, tuple[Any, dict[str, Any]]] = {}
    locate: Any = None
    set_by: dict[str, str] = {}  # key path -> the --set argument that gave it

    @property
    def folder(self) -> Path:
        return self.path.parent

    def line_of(self, key: str) -> int | None:
        return self.locate(key) if self.locate else None

    def located(self, problem: Problem) -> Problem:
        """The problem pointed at the file and line, or at the --set that gave its key."""
        if problem.key in self.set_by:
            return replace(problem, file=f"--set {self.set_by[problem.key]}", line=None)
        return replace(problem, file=str(self.path), line=self.line_of(problem.key or ""))


def read_document(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a TOML or JSON recipe file; syntax errors become located RecipeErrors."""
    label = str(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", file=label)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(f"invalid JSON: {error.msg}", file=label, line=error.lineno) from None
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            match = re.search(r"\(at line (\d+), column \d+\)", str(error))
            message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(error))
            line = int(match.group(1)) if match else None
            raise RecipeError(f"invalid TOML: {message}", file=label, line=line) from None
    if not isinstance(document, dict):
        raise RecipeError("the recipe must be a table/object at the top level", file=label)
    return document, text


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides; values are parsed as TOML, else strings."""
    document = json.loads(json.dumps(document))
    problems: list[Problem] = []
    for override in overrides:
        where = f"--set {override}"
        path, sep, text = override.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            problems.append(Problem("expected KEY.PATH=VALUE", file=where))
            continue
        table = document
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(table.get(key), dict):
                missing = ".".join(keys[: depth + 1])
                problems.append(Problem(f"the recipe has no table '{missing}'", file=where))
                break
            table = table[key]
        else:
            table[keys[-1]] = _parse_value(text.strip())
    if problems:
        raise RecipeError(problems=problems)
    return document


def _overridden(overrides: list[str]) -> dict[str, str]:
    """Dotted key path -> the --set argument that set it."""
    return {override.partition("=")[0].strip(): override for override in overrides}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


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
        import warnings

        old = document["schema_version"]
        document = MIGRATIONS[old](document)
        warnings.warn(f"{label}: migrated from schema_version {old}", stacklevel=2)
    return document


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, *, defer: bool = False
) -> LoadedRecipe:
    """Read, override, migrate and validate a recipe.

    Raises RecipeError with every problem found. With ``defer``, problems inside individual
    stages are returned on the result instead, for the planner to report together with
    the graph's problems.
    """
    path = Path(path)
    label = str(path)
    document, text = read_document(path)
    document = apply_overrides(document, overrides or [])
    document = migrate(document, label)
    file_line = _toml_locator(text) if path.suffix != ".json" else (lambda key: None)
    set_by = _overridden(overrides or [])

    def locate(key: str) -> int | None:
        return None if key in set_by else file_line(key)

    problems: list[Problem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(document)
    except ValidationError as error:
        problems.extend(_problems(error, (), label, locate))

    stages: dict[str, Any] = {}
    loose: dict[str, tuple[Any, dict[str, Any]]] = {}
    adapter = TypeAdapter(stage_union())
    raw_stages = document.get("stages")
    if isinstance(raw_stages, dict):
        for name, raw in raw_stages.items():
            if name == "inputs":
                key = "stages.inputs"
                message = "'inputs' is reserved for input files; rename this stage"
                problems.append(Problem(message, file=label, key=key, line=locate(key)))
                continue
            try:
                stages[name] = adapter.validate_python(raw)
            except ValidationError as error:
                kind = KINDS_BY_NAME.get(raw.get("kind")) if isinstance(raw, dict) else None
                known = list(stage_models()[kind.kind].model_fields) if kind else None
                problems.extend(_problems(error, ("stages", name), label, locate, known))
                if kind is not None:
                    ports = {port.name for port in kind.inputs}
                    loose[name] = (kind, {k: v for k, v in raw.items() if k in ports})
    # A problem with a value given by --set points at the override, not at the file.
    problems = [
        replace(problem, file=f"--set {set_by[problem.key]}", line=None)
        if problem.key in set_by
        else problem
        for problem in _unique(problems)
    ]
    if recipe is None or (problems and not defer):
        raise RecipeError(problems=sort_problems(problems))
    return LoadedRecipe(
        path=path,
        recipe=recipe,
        stages=stages,
        raw=document,
        problems=problems,
        loose=loose,
        locate=locate,
        set_by=set_by,
    )


def sort_problems(problems: list[Problem]) -> list[Problem]:
    """In file order (problems without a line last, in the order found)."""
    return sorted(problems, key=lambda problem: problem.line or 10**9)


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    unique = []
    for problem in problems:
        if problem.render() not in seen:
            seen.add(problem.render())
            unique.append(problem)
    return unique


# ------------------------------------------------------------------ pydantic errors -> lines


def _problems(
    error: ValidationError,
    prefix: tuple,
    label: str,
    locate: Any,
    known_fields: list[str] | None = None,
) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(prefix) + tuple(item["loc"])
        # pydantic puts the discriminator tag into the location; users never wrote it.
        if prefix and len(loc) > 2 and loc[2] in stage_models():
            loc = loc[:2] + loc[3:]
        if not prefix and loc[:1] == ("stages",) and len(loc) > 2:
            continue  # stages are validated one by one, with better messages
        key = ".".join(str(part) for part in loc)
        message = _message(item, loc, known_fields)
        problems.append(Problem(message, file=label, key=key or None, line=locate(key)))
    return problems


def _message(item: dict[str, Any], loc: tuple, known_fields: list[str] | None = None) -> str:
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
        known = known_fields if known_fields is not None else _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        known = ", ".join(sorted(stage_models()))
        return f"unknown kind {ctx.get('tag')!r}; known kinds: {known}"
    if kind == "union_tag_not_found":
        return "missing 'kind' (every stage needs one)"
    if kind == "string_pattern_mismatch" and len(loc) > 1 and loc[0] == "stages":
        return f"must be a reference like 'stage.output' or 'inputs.name', got {given!r}"
    if kind == "value_error":
        return str(ctx.get("error", item["msg"]))
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {given!r}"
    message = item["msg"]
    message = message[0].lower() + message[1:]
    return f"{message}, got {given!r}" if given is not None and kind != "model_type" else message


def _known_keys(loc: tuple) -> list[str]:
    if len(loc) == 2 and loc[0] == "stages":
        return sorted({field for model in stage_models().values() for field in model.model_fields})
    if loc == ():
        return list(Recipe.model_fields)
    if loc == ("model",):
        return list(ModelSection.model_fields)
    if len(loc) == 2 and loc[0] == "inputs":
        return list(InputSection.model_fields)
    return []


def _toml_locator(text: str) -> Any:
    """Map a dotted key path to the TOML line that sets it (or its table's header)."""
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assignment = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")
    positions: dict[str, int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if match := header.match(line):
            table = _split_key(match.group(1))
            positions.setdefault(".".join(table), number)
        elif match := assignment.match(line):
            full = table + _split_key(match.group(1))
            for depth in range(len(table) + 1, len(full) + 1):
                positions.setdefault(".".join(full[:depth]), number)

    def locate(key: str) -> int | None:
        parts = key.split(".")
        while parts:
            if ".".join(parts) in positions:
                return positions[".".join(parts)]
            parts.pop()
        return None

    return locate


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))
