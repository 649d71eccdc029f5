"""docs/composability.md against the code: every consumer port and every type it takes has
a cell, every ✔ names recipes that make that connection (and they run), every ✗ says why.

The recipes are the manifests (run by test_goldens), tests/recipes/composability/ (run here,
at 32 px and a few steps) and tests/recipes/compose_*.toml (run by the method's own
test_compose_*.py, which check what the combination computes).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from support import MANIFESTS, RECIPES, ROOT

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.stages import STAGE_KINDS, ArtifactType

DOC = ROOT / "docs" / "composability.md"
COMPOSABILITY = RECIPES / "composability"

# The data matrix's columns: what a value is.
COLUMNS = {
    "image": ArtifactType.IMAGE,
    "mask": ArtifactType.MASK,
    "text": ArtifactType.TEXT,
    "keypoints": ArtifactType.KEYPOINTS,
    "x0": ArtifactType.LATENT,
    "x_T (DDIM)": ArtifactType.INVERTED_LATENT,
    "x_T (EF)": ArtifactType.STOCHASTIC_LATENT,
    "noise maps": ArtifactType.NOISE_SEQUENCE,
    "path": ArtifactType.LATENT_TRAJECTORY,
    "attention": ArtifactType.ATTENTION_MAPS,
    "embedding": ArtifactType.EMBEDDING,
    "direction": ArtifactType.DIRECTION,
    "weights": ArtifactType.WEIGHTS,
    "scores": ArtifactType.SCORES,
}


def _table(name: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The markdown table between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``:
    its column names and, per row (first cell, backticks dropped), column -> cell."""
    text = DOC.read_text()
    block = text.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]
    lines = [line for line in block.strip().splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    return header[1:], {
        row[0].strip("`"): dict(zip(header[1:], row[1:], strict=True)) for row in rows
    }


def _recipes() -> dict[str, Path]:
    """Every recipe a cell may name, by file stem."""
    paths = [
        *MANIFESTS.rglob("*.toml"),
        *COMPOSABILITY.glob("*.toml"),
        *RECIPES.glob("compose_*.toml"),
    ]
    return {path.stem: path for path in paths}


@cache
def _connections(stem: str) -> tuple[str, frozenset[tuple[str, ArtifactType]], frozenset]:
    """A recipe's model, its (consumer ``kind.port``, type carried) and its stages'
    (kind, whether tuned weights are connected)."""
    plan = plan_recipe(_recipes()[stem], cache=Cache(Path("/nonexistent-cache")))
    found, kinds = set(), set()
    for stage in plan.stages.values():
        kinds.add((stage.kind.kind, "weights" in stage.references))
        for port in stage.kind.inputs:
            refs = stage.references.get(port.name)
            for ref in [] if refs is None else refs if isinstance(refs, list) else [refs]:
                head, _, tail = ref.partition(".")
                if head == "inputs":
                    carried = plan.inputs[tail].section.type
                else:
                    carried = plan.stages[head].kind.output_port(tail).type
                found.add((f"{stage.kind.kind}.{port.name}", carried))
    return plan.loaded.recipe.model.id, frozenset(found), frozenset(kinds)


def _ticked(cell: str) -> list[str]:
    """The recipes a ✔ cell names (``✔ a, b; ✗ ...``)."""
    if not cell.startswith("✔"):
        return []
    return [name.strip() for name in cell[1:].split(";")[0].split(",") if name.strip()]


def test_the_data_matrix_has_a_cell_for_every_consumer_port_and_type_it_takes() -> None:
    columns, rows = _table("data-matrix")
    assert columns == list(COLUMNS)
    ports = {f"{kind.kind}.{port.name}": port for kind in STAGE_KINDS for port in kind.inputs}
    assert sorted(rows) == sorted(ports)
    # A type no column shows would go unchecked (`metric`: tables take it, no port does).
    taken = {artifact for port in ports.values() for artifact in (port.type, *port.accepts)}
    assert taken <= set(COLUMNS.values()), f"no column for {taken - set(COLUMNS.values())}"
    for name, port in ports.items():
        for column, artifact in COLUMNS.items():
            cell = rows[name][column]
            if port.takes(artifact):
                assert cell.startswith(("✔", "✗")), f"{name} takes {column}: tick or refuse"
            else:
                assert cell == "·", f"{name} does not take {column}: the type check refuses"


def test_every_tick_of_the_data_matrix_is_a_connection_its_recipes_make() -> None:
    _, rows = _table("data-matrix")
    recipes = _recipes()
    for name, cells in rows.items():
        for column, cell in cells.items():
            for stem in _ticked(cell):
                assert stem in recipes, f"{name} / {column}: no recipe named {stem!r}"
                _, found, _ = _connections(stem)
                assert (name, COLUMNS[column]) in found, (
                    f"{stem} does not connect {column} to {name}"
                )


# Kinds that do not use the recipe's model (`model.id`): no row in the model matrix.
MODEL_FREE = {"caption.blip", "rank.clip", "figure.grid", "figure.animation", "compose.paste"}


def test_every_tick_of_the_model_matrix_runs_that_kind_on_that_model() -> None:
    columns, rows = _table("model-matrix")
    kinds = {kind.kind: kind for kind in STAGE_KINDS if kind.kind not in MODEL_FREE}
    assert sorted(rows) == sorted(kinds)
    for name, cells in rows.items():
        for column, cell in cells.items():
            model, _, tuned = column.partition(" + ")
            if tuned and not any(port.type == ArtifactType.WEIGHTS for port in kinds[name].inputs):
                assert cell == "·", f"{name} takes no weights"
                continue
            assert cell.startswith(("✔", "✗")), f"{name} on {column}: tick or refuse"
            for stem in _ticked(cell):
                recipe_model, _, stages = _connections(stem)
                assert recipe_model == model, f"{stem} runs on {recipe_model}, not {model}"
                assert (name, bool(tuned)) in stages, f"{stem} has no such {name} stage"


@pytest.mark.parametrize("recipe", sorted(COMPOSABILITY.glob("*.toml")), ids=lambda p: p.stem)
def test_each_composability_recipe_runs(recipe: Path, tmp_path: Path) -> None:
    result = run_recipe(recipe, cache=Cache(tmp_path / "c"), out_dir=None, device="cpu")
    assert sorted(result.computed) == sorted(
        plan_recipe(recipe, cache=Cache(tmp_path / "c")).stages
    )


def test_refusals_name_their_reason() -> None:
    for name in ("data-matrix", "model-matrix"):
        _, rows = _table(name)
        for row, cells in rows.items():
            for column, cell in cells.items():
                refused = cell.split("✗", 1)[1] if "✗" in cell else None
                if refused is not None:
                    assert re.search(r"\w{3}", refused), f"{row} / {column}: ✗ without a reason"
