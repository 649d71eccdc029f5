"""Planning: a validated recipe turned into ordered stages with keys, before any weight loads.

:func:`build_plan` runs three steps, each in its own place: the graph checks
(:mod:`editflow.engine.graph`), the resolution of the models the needed stages declare
(:func:`editflow.models.resolve_providers`: configs and published hashes only) and the keys
(:mod:`editflow.engine.keys`). A recipe with a dangling reference, a type mismatch, a cycle
or a missing file fails with every problem listed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from editflow.engine.graph import check_graph, producer_of
from editflow.engine.keys import canonical_json, input_key, key_of, stage_preimage
from editflow.engine.recipe import LoadedRecipe
from editflow.errors import EditflowError, Problem, RecipeError, sort_problems
from editflow.files.inputs import ResolvedInput, resolve_input
from editflow.models import ComponentSpec, ResolvedModel, resolve_providers
from editflow.models.providers import component_config
from editflow.stages import Params, StageKind
from editflow.stages.base import CheckView


@dataclass
class PlannedStage:
    """One stage of a plan: what it is, its params, what it reads, and its key.

    Attributes:
        name: The stage's name in the recipe.
        kind: Its kind.
        params: An instance of ``kind.params``.
        references: Input port -> reference(s), kept apart from the params.
        components: The model parts this configuration uses.
        preimage: What its key is the hash of.
        key: Its cache key.
        needed: Whether the targets need it.
    """

    name: str
    kind: type[StageKind]
    params: Params
    references: dict[str, str | list[str]]
    components: tuple[ComponentSpec, ...] = ()
    preimage: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    needed: bool = False


@dataclass
class Plan:
    """A validated recipe turned into ordered stages with keys.

    Attributes:
        loaded: The recipe.
        inputs: Its input files, resolved and hashed.
        stages: Every stage, in topological order.
        models: Provider (``model.id`` ...) -> the resolved model, for the providers the
            needed stages declare.
        recipe_hash: sha256 of the recipe after overrides.
        input_keys: Input name -> its key.
        graph: The stage graph: an edge from each producer to each consumer, with the
            (input port, output) pairs it ``reads`` (what executors schedule by).
        notes: What the kinds' checks found worth saying but not wrong (located).
        runs_as: Whose last-run records a run of it reads and writes: the recipe's (None),
            or a sweep point's own, so that rerunning the points rewrites none.
    """

    loaded: LoadedRecipe
    inputs: dict[str, ResolvedInput]
    stages: dict[str, PlannedStage]
    models: dict[str, ResolvedModel]
    recipe_hash: str
    input_keys: dict[str, str]
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    notes: list[Problem] = field(default_factory=list)
    runs_as: str | None = None

    @property
    def needed(self) -> list[PlannedStage]:
        return [stage for stage in self.stages.values() if stage.needed]


def build_plan(
    loaded: LoadedRecipe,
    *,
    models_dir: Path,
    targets: list[str] | None = None,
) -> Plan:
    """Validate the recipe's files and graph, resolve its models and compute every key.

    Raises:
        RecipeError: Listing every problem with the recipe, its files or its graph.
        ModelUnavailableError: A model the needed stages declare cannot be found.
    """
    problems: list[Problem] = []
    inputs: dict[str, ResolvedInput] = {}
    for name, section in loaded.recipe.inputs.items():
        resolved = resolve_input(
            name, section, loaded.folder, str(loaded.path), confined=loaded.confined
        )
        if isinstance(resolved, Problem):
            problems.append(loaded.located(resolved))
        else:
            inputs[name] = resolved
    sizes = {name: item.size for name, item in inputs.items()}
    graph, graph_problems = check_graph(loaded, targets, sizes)
    problems = loaded.problems + problems + graph_problems
    if problems or graph is None:
        raise RecipeError(problems=sort_problems(problems))

    stages, problems, unresolved = _inherit(loaded, graph.order, graph.needed)
    needed = [stage for stage in stages.values() if stage.needed]
    models = resolve_models(loaded, needed, models_dir)
    for stage in stages.values():
        if stage.name not in unresolved:
            view = _check_view(stage, graph.sizes[stage.name], models)
            problems += [
                _located(loaded, stage.name, p) for p in stage.kind.problems(stage.params, view)
            ]
    notes = sort_problems([problem for problem in problems if problem.note])
    problems = [problem for problem in problems if not problem.note]
    if problems:
        raise RecipeError(problems=sort_problems(problems))
    input_keys = {name: input_key(item.section, item.digest) for name, item in inputs.items()}
    keys: dict[str, str] = {}
    for stage in stages.values():
        stage.preimage = stage_preimage(
            kind=stage.kind,
            params=stage.params,
            references=stage.references,
            upstream_key=lambda ref: _upstream_key(ref, input_keys, keys),
            components=stage.components,
            models=models,
            seed=loaded.recipe.seed,
            stage_name=stage.name,
            dtype=loaded.recipe.model.dtype,
        )
        stage.key = keys[stage.name] = key_of(stage.preimage)
    recipe_hash = hashlib.sha256(canonical_json(loaded.raw).encode()).hexdigest()
    return Plan(loaded, inputs, stages, models, recipe_hash, input_keys, graph.graph, notes)


def _inherit(
    loaded: LoadedRecipe, order: list[str], needed: frozenset[str]
) -> tuple[dict[str, PlannedStage], list[Problem], set[str]]:
    """The planned stages, producers first, each with what it inherits from its producers;
    the problems, and the stages whose inherited values could not be resolved."""
    stages: dict[str, PlannedStage] = {}
    problems: list[Problem] = []
    unresolved: set[str] = set()
    for name in order:
        spec = loaded.stages[name]
        producers = {
            port: (producer, stages[producer].params)
            for port, refs in spec.references.items()
            if (producer := _first_stage(refs, stages)) is not None
        }
        params, issues = spec.kind.inherit(spec.params, producers)
        problems += [_located(loaded, name, issue) for issue in issues]
        if any(not issue.note for issue in issues):
            unresolved.add(name)
        components = spec.kind.component_specs(params, spec.references)
        stages[name] = PlannedStage(
            name, spec.kind, params, spec.references, components, needed=name in needed
        )
    return stages, problems, unresolved


def _first_stage(refs: str | list[str], stages: Mapping[str, PlannedStage]) -> str | None:
    listed = refs if isinstance(refs, list) else [refs]
    return next((p for r in listed if isinstance(r, str) and (p := producer_of(r)) in stages), None)


def _check_view(stage: PlannedStage, sizes: Mapping[str, Any], models: Mapping[str, Any]) -> Any:
    """What a stage's check sees: its wiring, sizes and, when needed, its resolved models."""
    mine = models if stage.needed else {}

    def configs(component: str, provider: str) -> Mapping[str, Any] | None:
        return component_config(mine[provider], component) if provider in mine else None

    return CheckView(stage.references, sizes, mine, configs)


def _located(loaded: LoadedRecipe, stage: str, problem: Problem) -> Problem:
    """A kind's problem (``key``: a parameter, an input or None) at ``stages.STAGE[.KEY]``."""
    key = f"stages.{stage}" + (f".{problem.key}" if problem.key else "")
    return loaded.located(Problem(problem.message, key=key, hint=problem.hint, note=problem.note))


def resolve_models(
    loaded: LoadedRecipe, needed: list[PlannedStage], models_dir: Path
) -> dict[str, ResolvedModel]:
    """Resolve the providers the needed stages declare; nothing is loaded or downloaded.

    A stage that is not needed, or whose configuration uses no model, resolves nothing.
    """
    providers = {spec.provider for stage in needed for spec in stage.components}
    if loaded.confined and (outside := loaded.recipe.model.paths_outside(loaded.folder)):
        raise EditflowError(problems=[loaded.located(Problem(
            f"{value} is outside the base folder {loaded.folder}: an untrusted recipe reads"
            " models only from under it", key=key)) for key, value in outside])  # fmt: skip
    try:
        return resolve_providers(
            loaded.recipe.model, providers, base_dir=loaded.folder, models_dir=models_dir
        )
    except EditflowError as error:
        raise type(error)(problems=[loaded.located(p) for p in error.problems]) from None


def _upstream_key(ref: str, input_keys: dict[str, str], keys: dict[str, str]) -> dict[str, str]:
    producer = producer_of(ref)
    if producer.startswith("inputs."):
        name = ref.split(".", 1)[1]
        return {"input": name, "key": input_keys[name]}
    return {"stage": producer, "output": ref.split(".", 1)[1], "key": keys[producer]}
