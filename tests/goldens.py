"""Stage-version guards: a small golden of every stage kind's numbers on the tiny models.

Each kind's golden comes from the first example recipe with a stage of that kind (the quick
start, tests/recipes/metrics.toml, then manifests/ in sorted order): a summary of every output (the first 1,024 values of its flattened tensors,
their sum and absolute sum in float64; texts as they are), stored as safetensors under
tests/goldens/ with the kind's version. A kind whose numbers change while its version does
not fails ``tests/test_goldens.py``; bump the kind's ``version`` and regenerate its golden
(every kind's without arguments) with

    HF_HUB_OFFLINE=1 .venv/bin/python tests/goldens.py KIND ...

The comparison must hold on any CPU and thread count, whose float32 rounding differs, and
must catch a change of method. So each value may move by ``RELATIVE`` (1e-4) of its tensor's
scale (the largest magnitude of the golden's values; at least 1 for scores, which are
differences of cosine similarities bounded by 2 and whose rounding is relative to 1), plus
two units of the stored dtype's precision at its own magnitude (attention maps are stored in
float16, whose last bit flips with any rounding upstream); sums may move by ``RELATIVE`` of
the absolute sum, plus those units. Measured with ``--measure`` (the largest share of that
allowance used, per kind), against goldens made at one thread on an AVX512 CPU:

    2 threads:              finetune.diffusionclip 0.51, rank.clip 0.26, the rest <= 0.04
    1 thread, ATEN_CPU_CAPABILITY=avx2 and DNNL_MAX_CPU_ISA=AVX2 (another kernel family):
                            finetune.diffusionclip 0.47, guide.attention_reference 0.46,
                            rank.clip 0.25, the rest <= 0.08

(fine-tuning carries rounding through its gradient steps; a CPU with AMX moved the
pix2pix-zero latents by 2.6e-6 of their scale, a share of 0.03), while a kind whose output
moves by 1e-3 of its scale uses about 10x the allowance and fails (``tests/test_goldens.py``).
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
RELATIVE = 1e-4  # of each tensor's scale: 20x the worst rounding measured, 1/10 of a real change


def sources() -> dict[str, tuple[Path, str]]:
    """Stage kind -> (recipe, stage): the first example stage of each kind."""
    from editflow.engine.recipe import load_recipe

    found: dict[str, tuple[Path, str]] = {}
    quickstart = MANIFESTS / "quickstart.toml"  # the canonical uses of the common kinds
    metrics = ROOT / "tests" / "recipes" / "metrics.toml"  # every metric.* kind, on tiny
    others = sorted(path for path in MANIFESTS.rglob("*.toml") if path != quickstart)
    for recipe in [quickstart, metrics, *others]:
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


def precision(outputs: Mapping[str, Any]) -> dict[str, float]:
    """Output name -> the relative precision its values were stored with (float32 and wider
    count as exact: their rounding is within ``RELATIVE``)."""
    found = {}
    for name, value in outputs.items():
        if isinstance(value, str):
            continue
        dtypes = {part.dtype for part in _tensors(value)}
        found[name] = max(
            (
                torch.finfo(dtype).eps
                for dtype in dtypes
                if dtype in (torch.float16, torch.bfloat16)
            ),
            default=0.0,
        )
    return found


def allowance_used(
    kind: Any, outputs: Mapping[str, Any], golden: Mapping[str, torch.Tensor]
) -> float:
    """The largest share of the allowed deviation any summarised value uses (> 1 fails)."""
    from editflow.stages import ArtifactType

    tensors, _ = summary(outputs)
    if set(tensors) != set(golden):
        return float("inf")
    eps = precision(outputs)
    scores = {port.name for port in kind.outputs if port.type == ArtifactType.SCORES}
    worst = 0.0
    for name, value in tensors.items():
        output = name.rsplit(".", 1)[0]
        old, new = golden[name].double(), value.double()
        if old.shape != new.shape:
            return float("inf")
        if old.numel() == 0:
            continue
        sums = name.endswith(".sums")
        scale = old[1].abs() if sums else old.abs().nan_to_num(0.0).max()
        if output in scores:
            scale = scale.clamp_min(1.0)
        allowed = RELATIVE * scale + 2 * eps.get(output, 0.0) * (scale if sums else old.abs())
        both_nan = old.isnan() & new.isnan()
        if (old.isnan() != new.isnan()).any():
            return float("inf")
        difference = (new - old).abs().masked_fill(both_nan, 0.0)
        share = difference / allowed.clamp_min(1e-300)
        worst = max(worst, float(share.max()))
    return worst


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):  # tuned weights
        return [value[key] for key in sorted(value)]
    if hasattr(value, "__getitem__"):  # attention maps, step by step: the first and the last
        steps = (value[0], value[len(value) - 1])
        return [step[layer] for step in steps for layer in sorted(step)]
    raise TypeError(f"cannot summarise {type(value).__name__}")


def compare(kind: Any, outputs: Mapping[str, Any]) -> str | None:
    """Why a kind's outputs break its golden (``None`` when they keep it)."""
    path = GOLDENS / f"{kind.kind}.safetensors"
    if not path.is_file():
        return f"{kind.kind} has no golden: make it with `{REGENERATE} {kind.kind}`"
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    golden = load_file(path)
    if metadata.get("version") != kind.version:
        return (f"{kind.kind} is at version {kind.version} but its golden at "
                f"{metadata.get('version')}: regenerate it with `{REGENERATE} {kind.kind}`")  # fmt: skip
    _, texts = summary(outputs)
    used = allowance_used(kind, outputs, golden)
    if used > 1 or json.loads(metadata.get("texts", "{}")) != texts:
        return (f"{kind.kind} computes other numbers than its golden at version {kind.version}:"
                f" bump {kind.__name__}.version and regenerate its golden with `{REGENERATE} {kind.kind}`")  # fmt: skip
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


def regenerate(kinds: list[str]) -> None:
    """Write the goldens of ``kinds`` (every kind when empty)."""
    from editflow.cache import Cache

    torch.set_num_threads(1)
    GOLDENS.mkdir(exist_ok=True)
    unknown = set(kinds) - set(sources())
    if unknown:
        raise SystemExit(f"no example recipe has a stage of kind {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as folder:
        cache = Cache(Path(folder) / "cache")
        for kind_name, (recipe, stage) in sorted(sources().items()):
            if kinds and kind_name not in kinds:
                continue
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


def measure(threads: int) -> None:
    """Print, per kind, the share of the allowance its outputs use under this process's
    settings (thread count, ATEN_CPU_CAPABILITY, DNNL_MAX_CPU_ISA ...)."""
    from editflow.cache import Cache
    from editflow.stages import KINDS_BY_NAME

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        cache = Cache(Path(folder) / "cache")
        for kind_name, (recipe, stage) in sorted(sources().items()):
            kind, outputs = stage_outputs(cache, recipe, stage)
            golden = load_file(GOLDENS / f"{kind_name}.safetensors")
            used = allowance_used(KINDS_BY_NAME[kind_name], outputs, golden)
            print(f"{kind_name:32s} {used:.3f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--measure"]:
        measure(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    else:
        regenerate(sys.argv[1:])
