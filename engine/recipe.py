"""Recipe models and loading: TOML or JSON in, a validated :class:`Recipe` out.

The stage union is derived from the stage kinds registered in ``editflow.stages``
(:mod:`editflow.stages.recipe_models`), discriminated on ``kind``. Every problem is collected and reported at once, each with its
key path and, for TOML, its line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from editflow.documents import (
    SCHEMA_VERSION,
    Locator,
    Table,
    apply_overrides,
    error_message,
    migrate,
    read_document,
)
from editflow.errors import Problem, RecipeError, sort_problems, unique_problems
from editflow.files.inputs import InputSection
from editflow.files.plots import PlotSpec
from editflow.files.tables import TableSpec, spec_problems, valid_specs
from editflow.imagecheck import CheckSection
from editflow.models import ModelSection
from editflow.stages import KINDS_BY_NAME, Params, StageKind
from editflow.stages.recipe_models import stage_models, stage_union

# Names become file names in the output folder, so they stay short and portable.
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
NAME_RULE = "letters, digits, '_' and '-', starting with a letter or '_', at most 64 characters"


@dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe after validation: its kind, its params, and its references.

    Attributes:
        kind: The stage kind.
        params: An instance of ``kind.params`` (parameters only).
        references: Input port name -> the reference, or list of references, it reads.
    """

    kind: type[StageKind]
    params: Params
    references: dict[str, str | list[str]]


def split_stage(model: BaseModel) -> StageSpec:
    """Separate a validated stage table into its kind's params and its port references."""
    kind = KINDS_BY_NAME[model.kind]  # type: ignore[attr-defined]
    ports = {port.name for port in kind.inputs}
    values = {name: getattr(model, name) for name in type(model).model_fields}
    references = {
        name: value for name, value in values.items() if name in ports and value is not None
    }
    params = kind.params.model_validate(
        {name: value for name, value in values.items() if name not in ports | {"kind"}}
    )
    return StageSpec(kind, params, references)


class Recipe(Table):
    """An edit recipe: a model, input files, a seed and a graph of named stages."""

    schema_version: int = Field(description=f"Recipe format version (current: {SCHEMA_VERSION})")
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Seed from which every random draw is derived"
    )
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
    check: CheckSection = Field(
        default_factory=CheckSection,
        description="How `figures --check` compares exported images with the lock's baselines"
        " where the platform differs (exact bytes are compared where it does not)",
    )
    sweep: dict[str, list[Any] | str | dict[str, str]] = Field(
        default_factory=dict,
        description='Sweep axes: {"stages.edit.skip" = [20, 30, 40] or "range(20, 50, 10)"'
        ' or "linspace(1, 7.5, 4)", ...}; run and plan go over their Cartesian product.'
        ' [sweep.grid]: the plot: image = "STAGE.OUTPUT" to tile, x, y, z = swept keys',
    )
    tables: dict[Annotated[str, Field(pattern=NAME_PATTERN)], TableSpec] = Field(
        default_factory=dict,
        description="Tables of numbers (NAME.csv, NAME.md, NAME.tex): a row per sweep point"
        " (or one), a column per stage output, each reduced to one number",
    )
    plots: dict[Annotated[str, Field(pattern=NAME_PATTERN)], PlotSpec] = Field(
        default_factory=dict, description="Plots of the tables (NAME.png, NAME.svg)"
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
    stages: dict[str, StageSpec]  # stage name -> its kind, params and references
    raw: dict[str, Any]  # the document after overrides and migrations
    problems: list[Problem] = []
    loose: dict[str, tuple[Any, dict[str, Any]]] = {}
    locator: Locator
    confined: bool = False  # a figure's recipe: inputs only from under its folder

    @property
    def folder(self) -> Path:
        return self.path.parent

    def located(self, problem: Problem) -> Problem:
        """The problem pointed at the file and line, or at the --set that gave its key."""
        return self.locator.locate(problem)


@cache
def _stage_adapter() -> TypeAdapter[Any]:
    """The validator of one stage table; built once (a rebuild costs more than a rerun)."""
    return TypeAdapter(stage_union())


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    defer: bool = False,
    document: dict[str, Any] | None = None,
    confined: bool = False,
) -> LoadedRecipe:
    """Read, override, migrate and validate a recipe.

    Raises RecipeError with every problem found. With ``defer``, problems inside individual
    stages are returned on the result instead, for the planner to report together with
    the graph's problems. ``document`` stands in for the file's contents (a recipe carried
    by a figure); ``path`` still places it, for its relative input paths, and ``confined``
    keeps those inside its folder (a document that came with a figure is untrusted).
    """
    path = Path(path)
    label = str(path)
    if document is None:
        document, text = read_document(path)
    else:
        text = json.dumps(document, indent=1)
    document = apply_overrides(document, overrides or [])
    document = migrate(document, label)
    locator = Locator.of(path, text, overrides or [])
    problems: list[Problem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(document)
    except ValidationError as error:
        problems.extend(_problems(error, (), locator))

    stages: dict[str, Any] = {}
    loose: dict[str, tuple[Any, dict[str, Any]]] = {}
    adapter = _stage_adapter()
    raw_stages = document.get("stages")
    if isinstance(raw_stages, dict):
        for name, raw in raw_stages.items():
            if name == "inputs":
                message = "'inputs' is reserved for input files; rename this stage"
                problems.append(locator.locate(Problem(message, key="stages.inputs")))
                continue
            try:
                stages[name] = split_stage(adapter.validate_python(raw))
            except ValidationError as error:
                kind = KINDS_BY_NAME.get(raw.get("kind")) if isinstance(raw, dict) else None
                known = list(stage_models()[kind.kind].model_fields) if kind else None
                problems.extend(_problems(error, ("stages", name), locator, known))
                if kind is not None:
                    ports = {port.name for port in kind.inputs}
                    loose[name] = (kind, {k: v for k, v in raw.items() if k in ports})
    # Tables and plots read stages' outputs: checked against them (those that are valid
    # alone, when something else in the recipe is not, so every problem is said at once).
    kinds = {name: None for name in raw_stages} if isinstance(raw_stages, dict) else {}
    kinds |= {name: kind for name, (kind, _) in loose.items()}
    kinds |= {name: spec.kind for name, spec in stages.items()}
    tables, plots = (recipe.tables, recipe.plots) if recipe is not None else valid_specs(document)
    problems += [locator.locate(p) for p in spec_problems(tables, plots, kinds)]
    problems = unique_problems(problems)
    if recipe is None or (problems and not defer):
        raise RecipeError(problems=sort_problems(problems))
    return LoadedRecipe(
        path=path,
        recipe=recipe,
        stages=stages,
        raw=document,
        problems=problems,
        loose=loose,
        locator=locator,
        confined=confined,
    )


# ------------------------------------------------------------------ pydantic errors -> lines


def _problems(
    error: ValidationError,
    prefix: tuple,
    locator: Locator,
    known_fields: list[str] | None = None,
) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(prefix) + tuple(item["loc"])
        # pydantic puts the discriminator tag into the location; users never wrote it.
        if prefix and len(loc) > 2 and loc[2] in stage_models():
            loc = loc[:2] + loc[3:]
        message = _message(item, loc, known_fields)
        if loc[-1:] == ("[key]",):  # a bad table key: name the key itself
            loc = loc[:-1]
        elif not prefix and loc[:1] == ("stages",) and len(loc) > 2:
            continue  # stages are validated one by one, with better messages
        key = ".".join(str(part) for part in loc)
        problems.append(locator.locate(Problem(message, key=key or None)))
    return problems


def _message(item: dict[str, Any], loc: tuple, known_fields: list[str] | None = None) -> str:
    kind, given = item["type"], item.get("input")
    if kind == "union_tag_invalid":
        known = ", ".join(sorted(stage_models()))
        return f"unknown kind {item.get('ctx', {}).get('tag')!r}; known kinds: {known}"
    if kind == "union_tag_not_found":
        return "missing 'kind' (every stage needs one)"
    if kind == "string_pattern_mismatch" and loc[-1:] == ("[key]",):
        return f"not a valid name: use {NAME_RULE}"
    if kind == "string_pattern_mismatch" and len(loc) > 1 and loc[0] == "stages":
        return f"must be a reference like 'stage.output' or 'inputs.name', got {given!r}"
    if kind == "extra_forbidden" and known_fields is None:
        known_fields = _known_keys(loc[:-1])
    return error_message(item, known_fields or [])


def _known_keys(loc: tuple) -> list[str]:
    if len(loc) == 2 and loc[0] == "stages":
        return sorted({field for model in stage_models().values() for field in model.model_fields})
    if loc == ():
        return list(Recipe.model_fields)
    if loc == ("model",):
        return list(ModelSection.model_fields)
    if len(loc) == 2 and loc[0] == "inputs":
        return list(InputSection.model_fields)
    if len(loc) == 2 and loc[0] in ("tables", "plots"):
        return list((TableSpec if loc[0] == "tables" else PlotSpec).model_fields)
    return []
