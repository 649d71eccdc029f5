"""Attention maps are streamed: written to the cache step by step, read back one step at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import MANIFESTS

from editflow.cache import Cache, StreamedMaps
from editflow.cache.writer import MIN_CHUNK_BYTES
from editflow.engine.api import run_recipe

RECIPE = MANIFESTS / "pix2pix_zero" / "custom_sentences.toml"
STEPS = 4
FAST = [
    f"stages.{name}.num_inference_steps={STEPS}"
    for name in ("invert", "reference", "unguided", "guided")
] + ["stages.invert.regularize_rounds=1"]


@pytest.fixture
def step_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(step index, bytes returned) for every streamed read."""
    reads: list[tuple[int, int]] = []
    original = StreamedMaps.step

    def counting_step(self: StreamedMaps, index: int) -> dict[str, torch.Tensor]:
        maps = original(self, index)
        reads.append((index, sum(t.numel() * t.element_size() for t in maps.values())))
        return maps

    monkeypatch.setattr(StreamedMaps, "step", counting_step)
    return reads


def test_guided_edit_reads_reference_maps_one_step_at_a_time(
    tmp_path: Path, step_reads: list[tuple[int, int]]
) -> None:
    cache = Cache(tmp_path / "cache")
    result = run_recipe(RECIPE, FAST, cache=cache, out_dir=None, device="cpu", targets=["guided"])
    assert {"reference", "guided"} <= set(result.computed)

    entry = cache.get(result.keys["reference"])
    layers = entry.attrs["streams"]["attention_maps"]["layers"]
    assert len(layers) >= 2  # cross-attention at two resolutions (plus the mid block)
    step_bytes = 0
    for array, shape in layers.values():
        info = entry.arrays[array]
        assert info.shape == (STEPS, *shape)
        layer_step_bytes = info.nbytes // STEPS
        # One chunk per layer-step at SD sizes; the tiny model's small steps share chunks.
        assert info.chunks[0] == max(1, min(STEPS, MIN_CHUNK_BYTES // layer_step_bytes))
        assert info.torch_dtype == "float16"
        step_bytes += layer_step_bytes
    assert [index for index, _ in step_reads] == list(range(STEPS))
    assert all(count == step_bytes for _, count in step_reads)


def test_changing_only_the_guided_edit_streams_maps_from_the_cache(
    tmp_path: Path, step_reads: list[tuple[int, int]]
) -> None:
    cache = Cache(tmp_path / "cache")
    run_recipe(RECIPE, FAST, cache=cache, out_dir=None, device="cpu", targets=["guided"])
    step_reads.clear()
    second = run_recipe(
        RECIPE, FAST + ["stages.guided.xa_guidance=0.3"], cache=cache, out_dir=None,
        device="cpu", targets=["guided"],
    )  # fmt: skip
    assert second.computed == ["guided"]
    assert [index for index, _ in step_reads] == list(range(STEPS))


def test_unguided_edit_with_zero_direction_reproduces_the_reference_pass(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    result = run_recipe(
        RECIPE, FAST + ["stages.direction.multiplier=0.0"], cache=cache, out_dir=None,
        device="cpu", targets=["unguided", "reference"],
    )  # fmt: skip
    reference = cache.get(result.keys["reference"]).tensor("latents")
    unguided = cache.get(result.keys["unguided"]).tensor("latents")
    assert torch.equal(reference, unguided)


def test_a_damaged_map_chunk_is_recomputed_once_and_the_edit_still_runs(tmp_path: Path) -> None:
    from editflow.engine.events import CollectEvents

    cache = Cache(tmp_path / "cache")
    first = run_recipe(RECIPE, FAST, cache=cache, out_dir=None, device="cpu", targets=["guided"])
    reference = cache.get(first.keys["reference"])
    assert cache.local_root is not None
    objects = cache.local_root / "objects" / reference.key / reference.object_id
    chunk = max(
        (p for p in objects.rglob("*") if p.is_file() and "attention_maps" in str(p)),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))

    changed = FAST + ["stages.guided.xa_guidance=0.3"]
    for attempt in range(2):
        events = CollectEvents()
        result = run_recipe(
            RECIPE, changed, cache=cache, out_dir=None, device="cpu", targets=["guided"],
            events=events,
        )  # fmt: skip
        if attempt == 0:  # the edit meets the damage, the reference pass reruns, then the edit
            assert result.computed == ["reference", "guided"]
            assert [event.stage for event in events.of("damaged")] == ["reference"]
        else:
            assert result.computed == [] and events.of("damaged") == []
    assert cache.verify() == []
