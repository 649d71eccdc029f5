"""Planning: the stage graph, its validation, every stage's key, and what must run.

Everything here happens before any model weight is loaded: a recipe with a dangling
reference, a type mismatch, a cycle or a missing file fails with every problem listed.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import BaseModel

from editflow.engine.inputs import ResolvedInput, resolve_input
from editflow.engine.keys import (
    KEY_FORMAT,
    canonical_json,
    diff_preimages,
    key_of,
    library_versions,
)
from editflow.engine.models import ModelSpec, ResolvedModel, resolve_captioner, resolve_model
from editflow.engine.recipe import LoadedRecipe, sort_problems
from editflow.errors import EditflowError, Problem, RecipeError
from editflow.stages import KINDS_BY_NAME, ArtifactType, StageKind


@dataclass
class PlannedStage:
    """One stage of a plan: what it is, what it reads, and its key."""

    name: str
    kind: type[StageKind]
    spec: BaseModel  # the validated stage model (params + references)
    references: dict[str, str | list[str]]
    preimage: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    needed: bool = False

    @property
    def needs(self) -> frozenset[str]:
        """The model parts this stage's configuration uses."""
        return self.kind.needed_components(self.spec)

    @property
    def params(self) -> dict[str, Any]:
        ports = {port.name for port in self.kind.inputs}
        dumped = self.spec.model_dump(mode="json")
        return {name: value for name, value in dumped.items() if name not in ports | {"kind"}}

    def upstream(self) -> list[str]:
        """Producer names (stages and 'inputs.X') this stage reads, in port order."""
        names: list[str] = []
        for refs in self.references.values():
            for ref in refs if isinstance(refs, list) else [refs]:
                names.append(producer_of(ref))
        return names


@dataclass
class Plan:
    """A validated recipe turned into ordered stages with keys."""

    loaded: LoadedRecipe
    inputs: dict[str, ResolvedInput]
    stages: dict[str, PlannedStage]  # every stage, in topological order
    model: ResolvedModel | None
    recipe_hash: str
    input_keys: dict[str, str]
    captioner: ResolvedModel | None = None

    @property
    def needed(self) -> list[PlannedStage]:
        return [stage for stage in self.stages.values() if stage.needed]

    def output_key(self, ref: str) -> str:
        """The key of the producer of a reference."""
        producer = producer_of(ref)
        if producer.startswith("inputs."):
            return self.input_keys[producer.split(".", 1)[1]]
        return self.stages[producer].key


def producer_of(ref: str) -> str:
    """'invert.latents' -> 'invert'; 'inputs.photo' -> 'inputs.photo'."""
    head, _, tail = ref.partition(".")
    return ref if head == "inputs" else head


def type_name(artifact: ArtifactType) -> str:
    article = "an" if artifact.value[0] in "aeiou" else "a"
    return f"{article} {artifact.value.replace('_', ' ')}"


def build_plan(
    loaded: LoadedRecipe,
    *,
    models_dir: Path,
    targets: list[str] | None = None,
) -> Plan:
    """Validate the graph and compute keys. Raises RecipeError listing every problem."""
    label = str(loaded.path)
    recipe = loaded.recipe
    problems: list[Problem] = []

    inputs: dict[str, ResolvedInput] = {}
    for name, section in recipe.inputs.items():
        resolved = resolve_input(name, section, loaded.folder, label)
        if isinstance(resolved, Problem):
            problems.append(replace(resolved, line=loaded.line_of(resolved.key)))
        else:
            inputs[name] = resolved

    stages = {
        name: PlannedStage(name, KINDS_BY_NAME[spec.kind], spec, _references(spec))
        for name, spec in loaded.stages.items()
    }
    # Stages whose parameters are invalid still take part in the graph checks.
    checked = dict(stages)
    for name, (kind, references) in loaded.loose.items():
        checked[name] = PlannedStage(name, kind, None, references)  # type: ignore[arg-type]
    graph = nx.DiGraph()
    graph.add_nodes_from(checked)
    for stage in checked.values():
        for port in stage.kind.inputs:
            refs = stage.references.get(port.name)
            for index, ref in enumerate(refs if isinstance(refs, list) else [refs]):
                if ref is None:
                    continue
                key = f"stages.{stage.name}.{port.name}"
                key = f"{key}.{index}" if port.many else key
                if not isinstance(ref, str):
                    continue  # already reported as a bad value
                problem = _check_reference(ref, port.type, checked, recipe.inputs)
                if problem:
                    problems.append(Problem(problem, file=label, key=key, line=loaded.line_of(key)))
                elif not ref.startswith("inputs."):
                    graph.add_edge(producer_of(ref), stage.name)
    try:
        cycle = nx.find_cycle(graph)
        names = [edge[0] for edge in cycle] + [cycle[0][0]]
        message = f"cycle between stages: {' -> '.join(names)}"
        key = f"stages.{names[0]}"
        problems.append(Problem(message, file=label, key=key, line=loaded.line_of(key)))
    except nx.NetworkXNoCycle:
        pass

    chosen = targets if targets is not None else recipe.targets
    if chosen is not None:
        for index, target in enumerate(chosen):
            if target not in stages:
                close = difflib.get_close_matches(target, list(stages), n=1)
                hint = f"did you mean '{close[0]}'?" if close else None
                where = "--target" if targets is not None else "targets"
                key = None if targets is not None else f"targets.{index}"
                problems.append(
                    Problem(
                        f"no stage named {target!r}",
                        file=where if key is None else label,
                        key=key,
                        hint=hint,
                    )
                )
    problems = loaded.problems + problems
    if problems:
        raise RecipeError(problems=sort_problems(problems))

    wanted = list(chosen) if chosen is not None else [n for n in stages if graph.out_degree(n) == 0]
    needed = set(wanted)
    for name in wanted:
        needed |= nx.ancestors(graph, name)
    position = {name: index for index, name in enumerate(stages)}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))

    model = None
    if any(stages[name].needs for name in needed):
        spec = ModelSpec(recipe.model.id, recipe.model.revision, recipe.model.variant)
        try:
            model = resolve_model(
                spec,
                base_dir=loaded.folder,
                models_dir=models_dir,
                hash_memo=models_dir / "file-hashes.json",
            )
        except EditflowError as error:
            raise type(error)(problems=[loaded.located(p) for p in error.problems]) from None

    captioner = None
    if model is not None and any("captioner" in stages[name].needs for name in needed):
        try:
            captioner = resolve_captioner(
                recipe.model.captioner,
                main=model,
                base_dir=loaded.folder,
                hash_memo=models_dir / "file-hashes.json",
            )
        except EditflowError as error:
            raise type(error)(problems=[loaded.located(p) for p in error.problems]) from None

    input_keys = {
        name: key_of(
            {
                "format": KEY_FORMAT,
                "input": item.section.model_dump(mode="json"),
                "digest": item.digest,
            }
        )
        for name, item in inputs.items()
    }
    planned: dict[str, PlannedStage] = {}
    for name in order:
        stage = stages[name]
        stage.needed = name in needed
        stage.preimage = _preimage(stage, recipe, model, captioner, input_keys, planned)
        stage.key = key_of(stage.preimage)
        planned[name] = stage
    recipe_hash = hashlib.sha256(canonical_json(loaded.raw).encode()).hexdigest()
    return Plan(loaded, inputs, planned, model, recipe_hash, input_keys, captioner)


def _references(spec: BaseModel) -> dict[str, str | list[str]]:
    kind = KINDS_BY_NAME[spec.kind]  # type: ignore[attr-defined]
    return {
        port.name: getattr(spec, port.name)
        for port in kind.inputs
        if getattr(spec, port.name) is not None
    }


def _check_reference(
    ref: str,
    wanted: ArtifactType,
    stages: dict[str, PlannedStage],
    declared_inputs: dict[str, Any],
) -> str | None:
    head, _, tail = ref.partition(".")
    if head == "inputs":
        if tail not in declared_inputs:
            close = difflib.get_close_matches(tail, list(declared_inputs), n=1)
            hint = f" (did you mean 'inputs.{close[0]}'?)" if close else ""
            return f"{ref!r} refers to no input named {tail!r}{hint}"
        field_name, _ = declared_inputs[tail].source()
        produced = {"image": ArtifactType.IMAGE, "mask": ArtifactType.MASK}.get(
            field_name, ArtifactType.TEXT
        )
        source = f"input {tail!r}"
    else:
        if head not in stages:
            close = difflib.get_close_matches(head, list(stages), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"{ref!r} refers to no stage named {head!r}{hint}"
        kind = stages[head].kind
        port = kind.output_port(tail)
        if port is None:
            outputs = ", ".join(port.name for port in kind.outputs)
            return f"stage {head!r} ({kind.kind}) has no output {tail!r}; its outputs: {outputs}"
        produced = port.type
        source = f"{ref!r}"
    if produced != wanted:
        return f"{source} is {type_name(produced)}, but this input takes {type_name(wanted)}"
    return None


def _preimage(
    stage: PlannedStage,
    recipe: Any,
    model: ResolvedModel | None,
    captioner: ResolvedModel | None,
    input_keys: dict[str, str],
    planned: dict[str, PlannedStage],
) -> dict[str, Any]:
    def upstream(ref: str) -> dict[str, str]:
        producer = producer_of(ref)
        if producer.startswith("inputs."):
            return {"input": ref.split(".", 1)[1], "key": input_keys[ref.split(".", 1)[1]]}
        return {"stage": producer, "output": ref.split(".", 1)[1], "key": planned[producer].key}

    references = {
        port: [upstream(ref) for ref in refs] if isinstance(refs, list) else upstream(refs)
        for port, refs in stage.references.items()
    }
    uses_model = bool(stage.needs - {"captioner"})
    uses_captioner = "captioner" in stage.needs
    seeded = stage.kind.is_seeded(stage.spec)
    scheduler = None
    if uses_model and model is not None:
        config = {k: v for k, v in model.scheduler_config.items() if k != "_diffusers_version"}
        scheduler = {"class": config.get("_class_name"), "config": config}
    return {
        "format": KEY_FORMAT,
        "kind": stage.kind.kind,
        "kind_version": stage.kind.version,
        "params": stage.params,
        "inputs": references,
        "model": model.identity if uses_model and model is not None else None,
        "captioner": captioner.identity if uses_captioner and captioner is not None else None,
        "scheduler": scheduler,
        "seed": recipe.seed if seeded else None,
        "seed_path": [stage.name] if seeded else None,
        "dtype": recipe.model.dtype if uses_model or uses_captioner else None,
        "versions": library_versions(),
    }


def describe_change(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 3) -> str:
    """Why a stage misses, from the preimage of its last run: 'params.prompt changed ...'."""
    if old is None:
        return "never run"
    changes = diff_preimages(old, new)
    if not changes:
        return "entry missing (removed or damaged)"
    parts = []
    for path, before, after in changes:
        segments = path.split(".")
        if segments[0] == "inputs" and segments[-1] == "key":
            origin = new["inputs"].get(segments[1])
            origin = origin[int(segments[2])] if isinstance(origin, list) else origin
            source = origin.get("stage") or f"inputs.{origin.get('input')}"
            parts.append(f"input {segments[1]!r} changed upstream ({source})")
        else:
            parts.append(f"{path}: {_short(before)} -> {_short(after)}")
    unique = list(dict.fromkeys(parts))
    more = f" (+{len(unique) - limit} more)" if len(unique) > limit else ""
    return "; ".join(unique[:limit]) + more


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
