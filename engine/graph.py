"""Graph checks: the stage graph, its references, types, wiring rules, cycles and targets.

Everything here reads only the recipe: no file, no model. Every problem found is returned,
located, so that a recipe shows all of them at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from editflow.engine.recipe import LoadedRecipe
from editflow.errors import Problem
from editflow.stages import Port, StageKind, type_name


@dataclass(frozen=True)
class StageGraph:
    """The checked graph of a recipe.

    Attributes:
        graph: Stage names, with an edge from each producer to each consumer whose ``reads``
            lists the (input port, output) pairs it connects.
        order: Every valid stage, in a stable topological order (file order where free).
        needed: The stages the targets need (themselves and their ancestors).
        sizes: Stage -> input port -> the (height, width) in pixels of the image its value
            derives from, where an input file's size is known (for the kinds' checks).
    """

    graph: nx.DiGraph
    order: list[str]
    needed: frozenset[str]
    sizes: Mapping[str, Mapping[str, tuple[int, int] | None]]


def producer_of(ref: str) -> str:
    """'invert.latents' -> 'invert'; 'inputs.photo' -> 'inputs.photo'."""
    head, _, _ = ref.partition(".")
    return ref if head == "inputs" else head


def references_of(value: str | list[str]) -> list[str]:
    """A port's reference(s) as a list."""
    return value if isinstance(value, list) else [value]


def check_graph(
    loaded: LoadedRecipe,
    targets: list[str] | None,
    input_sizes: Mapping[str, tuple[int, int] | None],
) -> tuple[StageGraph | None, list[Problem]]:
    """Build the stage graph and find every problem in it.

    Args:
        loaded: The recipe; its stages that failed validation still take part, so that a
            reference to them is not reported as dangling.
        targets: Stages asked for on the command line (``--target``), else the recipe's.
        input_sizes: Input name -> its image's (height, width), for the kinds' checks
            (:meth:`StageKind.check`, which the plan runs once the models are resolved).

    Returns:
        The graph (``None`` when there are problems) and the problems, located.
    """
    kinds: dict[str, type[StageKind]] = {name: spec.kind for name, spec in loaded.stages.items()}
    kinds.update({name: kind for name, (kind, _) in loaded.loose.items()})
    wiring = {name: spec.references for name, spec in loaded.stages.items()}
    wiring.update({name: references for name, (_, references) in loaded.loose.items()})
    problems: list[Problem] = []

    def problem(message: str, key: str, hint: str | None = None) -> None:
        # Located in the file, or at the --set that gave the key.
        problems.append(loaded.located(Problem(message, key=key, hint=hint)))

    graph = nx.DiGraph()
    graph.add_nodes_from(kinds)
    for name, kind in kinds.items():
        for port in kind.inputs:
            if port.name not in wiring[name]:
                continue
            for index, ref in enumerate(references_of(wiring[name][port.name])):
                key = f"stages.{name}.{port.name}" + (f".{index}" if port.many else "")
                if not isinstance(ref, str):
                    continue  # already reported as a bad value
                message = _check_reference(ref, port, kinds, loaded.recipe.inputs)
                if message:
                    problem(message, key)
                elif not ref.startswith("inputs."):
                    producer = producer_of(ref)
                    if not graph.has_edge(producer, name):
                        graph.add_edge(producer, name, reads=[])
                    graph.edges[producer, name]["reads"].append((port.name, ref.split(".", 1)[1]))
    try:
        cycle = nx.find_cycle(graph)
        names = [edge[0] for edge in cycle] + [cycle[0][0]]
        problem(f"cycle between stages: {' -> '.join(names)}", f"stages.{names[0]}")
    except nx.NetworkXNoCycle:
        pass

    chosen = targets if targets is not None else loaded.recipe.targets
    for index, target in enumerate(chosen or []):
        if target not in kinds:
            close = difflib.get_close_matches(target, list(kinds), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(kinds)}"
            if targets is not None:
                problems.append(Problem(f"no stage named {target!r}", file="--target", hint=hint))
            else:
                problem(f"no stage named {target!r}", f"targets.{index}", hint)
    if problems or loaded.problems:
        return None, problems

    wanted = list(chosen) if chosen is not None else [n for n in kinds if graph.out_degree(n) == 0]
    needed = set(wanted)
    for name in wanted:
        needed |= nx.ancestors(graph, name)
    position = {name: index for index, name in enumerate(kinds)}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    size_of = _sizes(kinds, wiring, input_sizes)
    sizes = {
        name: {port: size_of(refs) for port, refs in spec.references.items()}
        for name, spec in loaded.stages.items()
    }
    return StageGraph(graph, order, frozenset(needed), sizes), []


def _sizes(
    kinds: Mapping[str, type[StageKind]],
    wiring: Mapping[str, Mapping[str, Any]],
    input_sizes: Mapping[str, tuple[int, int] | None],
) -> Any:
    """A function from a reference to the pixel size of the image it derives from (or None),
    following each output's ``size_of`` input back to an input file."""
    seen: set[str] = set()

    def size_of(refs: Any) -> tuple[int, int] | None:
        ref = refs[0] if isinstance(refs, list) and refs else refs
        if not isinstance(ref, str) or ref in seen:
            return None  # a bad value or a cycle, reported elsewhere
        head, _, tail = ref.partition(".")
        if head == "inputs":
            return input_sizes.get(tail)
        port = kinds[head].output_port(tail) if head in kinds else None
        if port is None or port.size_of is None or port.size_of not in wiring[head]:
            return None
        seen.add(ref)
        try:
            return size_of(wiring[head][port.size_of])
        finally:
            seen.discard(ref)

    return size_of


def _check_reference(
    ref: str,
    wanted: Port,
    kinds: Mapping[str, type[StageKind]],
    declared_inputs: Mapping[str, Any],
) -> str | None:
    head, _, tail = ref.partition(".")
    if head == "inputs":
        if tail not in declared_inputs:
            close = difflib.get_close_matches(tail, list(declared_inputs), n=1)
            hint = f" (did you mean 'inputs.{close[0]}'?)" if close else ""
            return f"{ref!r} refers to no input named {tail!r}{hint}"
        produced = declared_inputs[tail].type
        source = f"input {tail!r}"
    else:
        if head not in kinds:
            close = difflib.get_close_matches(head, list(kinds), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"{ref!r} refers to no stage named {head!r}{hint}"
        kind = kinds[head]
        port = kind.output_port(tail)
        if port is None:
            outputs = ", ".join(port.name for port in kind.outputs)
            return f"stage {head!r} ({kind.kind}) has no output {tail!r}; its outputs: {outputs}"
        produced = port.type
        source = f"{ref!r}"
    if not wanted.takes(produced):
        return f"{source} is {type_name(produced)}, but this input takes {type_name(wanted.type)}"
    return None
