"""Stage-version guards: a small golden of every stage kind's numbers on the tiny models.

Each kind's golden comes from the first example recipe with a stage of that kind (the quick
start, then manifests/ in sorted order): a summary of every output (the first 1,024 values of its flattened tensors,
their sum and absolute sum in float64; texts as they are), stored as safetensors under
tests/goldens/ with the kind's version. A kind whose numbers change while its version does
not fails ``tests/test_goldens.py``; bump the kind's ``version`` and regenerate with

    HF_HUB_OFFLINE=1 .venv/bin/python tests/goldens.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
GOLDENS = Path(__file__).resolve().parent / "goldens"
REGENERATE = "HF_HUB_OFFLINE=1 .venv/bin/python tests/goldens.py"
HEAD = 1024
# Loose enough for the thread count's last-bit differences, far below any change of method.
RTOL, ATOL = 1e-4, 1e-5


def sources() -> dict[str, tuple[Path, str]]:
    """Stage kind -> (recipe, stage): the first example stage of each kind."""
    from editflow.engine.recipe import load_recipe

    found: dict[str, tuple[Path, str]] = {}
    quickstart = MANIFESTS / "quickstart.toml"  # the canonical uses of the common kinds
    others = sorted(path for path in MANIFESTS.rglob("*.toml") if path != quickstart)
    for recipe in [quickstart, *others]:
        for name, stage in load_recipe(recipe).stages.items():
            found.setdefault(stage.kind.kind, (recipe, name))
    return found


def summary(outputs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, texts) summarising a stage's outputs."""
    tensors, texts = {}, {}
    for name, value in sorted(outputs.items()):
        if isinstance(value, str):
            texts[name] = value
            continue
        parts = _tensors(value)
        flat = torch.cat([part.detach().double().flatten() for part in parts])
        tensors[f"{name}.head"] = flat[:HEAD].float().contiguous()
        tensors[f"{name}.sums"] = torch.stack([flat.sum(), flat.abs().sum()]).contiguous()
    return tensors, texts


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):  # tuned weights
        return [value[key] for key in sorted(value)]
    if hasattr(value, "num_steps"):  # streamed attention maps: the first and the last step
        steps = (value.step(0), value.step(value.num_steps - 1))
        return [step[layer] for step in steps for layer in sorted(step)]
    raise TypeError(f"cannot summarise {type(value).__name__}")


def compare(kind: Any, outputs: Mapping[str, Any]) -> str | None:
    """Why a kind's outputs break its golden (``None`` when they keep it)."""
    path = GOLDENS / f"{kind.kind}.safetensors"
    if not path.is_file():
        return f"{kind.kind} has no golden: regenerate them with `{REGENERATE}`"
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    golden = load_file(path)
    if metadata.get("version") != kind.version:
        return (f"{kind.kind} is at version {kind.version} but its golden at "
                f"{metadata.get('version')}: regenerate them with `{REGENERATE}`")  # fmt: skip
    tensors, texts = summary(outputs)
    same = set(tensors) == set(golden) and all(
        tensors[name].shape == golden[name].shape
        and torch.allclose(
            tensors[name].double(), golden[name].double(), rtol=RTOL, atol=ATOL, equal_nan=True
        )
        for name in tensors
    )
    if not same or json.loads(metadata.get("texts", "{}")) != texts:
        return (f"{kind.kind} computes other numbers than its golden at version {kind.version}:"
                f" bump {kind.__name__}.version and regenerate the goldens with `{REGENERATE}`")  # fmt: skip
    return None


def stage_outputs(cache: Any, recipe: Path, stage: str) -> tuple[Any, dict[str, Any]]:
    """(kind, outputs) of one stage of a recipe, computed through ``cache`` if missing."""
    from editflow.cache.artifacts import read_outputs
    from editflow.engine.api import plan_recipe, run_recipe
    from editflow.engine.execute import layouts

    result = run_recipe(recipe, cache=cache, out_dir=None, device="cpu", targets=[stage])
    planned = plan_recipe(recipe, cache=cache, targets=[stage]).stages[stage]
    entry = cache.get(result.keys[stage])
    return planned.kind, read_outputs(cache, entry, layouts(planned))


def regenerate() -> None:
    from editflow.cache import Cache

    torch.set_num_threads(1)
    GOLDENS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        cache = Cache(Path(folder) / "cache")
        for kind_name, (recipe, stage) in sorted(sources().items()):
            kind, outputs = stage_outputs(cache, recipe, stage)
            tensors, texts = summary(outputs)
            metadata = {
                "kind": kind_name,
                "version": kind.version,
                "recipe": recipe.relative_to(ROOT).as_posix(),
                "stage": stage,
                "texts": json.dumps(texts, sort_keys=True),
            }
            save_file(tensors, GOLDENS / f"{kind_name}.safetensors", metadata=metadata)
            print(f"{kind_name}: {recipe.relative_to(ROOT)} [{stage}] at version {kind.version}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    regenerate()
