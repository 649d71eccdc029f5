"""Attention maps are a step sequence: written to the cache step by step, read back one step at
a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import MANIFESTS

from editflow.cache import Cache, CachedSteps, LiveSteps
from editflow.cache.writer import MIN_CHUNK_BYTES
from editflow.engine.api import models_dir_for, plan_recipe, run_recipe
from editflow.engine.events import CollectEvents
from editflow.engine.execute import Follow, Session, compute_stage

RECIPE = MANIFESTS / "pix2pix_zero" / "custom_sentences.toml"
STEPS = 4
FAST = [
    f"stages.{name}.num_inference_steps={STEPS}"
    for name in ("invert", "reference", "unguided", "guided")
] + ["stages.invert.regularize_rounds=1"]


@pytest.fixture
def step_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(step index, bytes returned) for every read of a step from the cache."""
    reads: list[tuple[int, int]] = []
    original = CachedSteps.__getitem__

    def counting_step(self: CachedSteps, index: int) -> dict[str, torch.Tensor]:
        maps = original(self, index)
        reads.append((index, sum(t.numel() * t.element_size() for t in maps.values())))
        return maps

    monkeypatch.setattr(CachedSteps, "__getitem__", counting_step)
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


EDIT_FRIENDLY = MANIFESTS / "edit_friendly" / "text_edit.toml"
EDIT_FRIENDLY_FAST = ["stages.invert.num_inference_steps=4", "stages.edit.skip=1"]


def _session(cache: Cache) -> Session:
    return Session(cache, None, "cpu", CollectEvents(), models_dir_for(cache))


def test_where_steps_go_is_the_executors_choice_and_changes_no_checksum(tmp_path: Path) -> None:
    """In process the noise maps are written whole (chunks grouped, as any returned tensor);
    where others may follow (a live id) each step is its own chunk; the values are the same."""
    whole_cache, live_cache = Cache(tmp_path / "whole"), Cache(tmp_path / "live")
    result = run_recipe(
        EDIT_FRIENDLY, EDIT_FRIENDLY_FAST, cache=whole_cache, out_dir=None, device="cpu",
        targets=["invert"],
    )  # fmt: skip
    run_recipe(
        EDIT_FRIENDLY, EDIT_FRIENDLY_FAST, cache=live_cache, out_dir=None, device="cpu",
        targets=["encode"],
    )  # fmt: skip
    plan = plan_recipe(EDIT_FRIENDLY, EDIT_FRIENDLY_FAST, cache=live_cache)
    compute_stage(plan, _session(live_cache), "invert", live_id="live1")  # as a Ray worker
    key = plan.stages["invert"].key
    assert key == result.keys["invert"]
    whole, live = whole_cache.get(key), live_cache.get(key)
    for name, steps in (("noise_maps", 4), ("auxiliary_path", 5)):
        assert whole.arrays[name].chunks[0] == steps  # 1 KiB steps share a chunk
        assert live.arrays[name].chunks[0] == 1 and live.arrays[name].shards is None
        assert whole.arrays[name].checksum == live.arrays[name].checksum
        assert whole.arrays[name].step_checksums == live.arrays[name].step_checksums
    assert live.attrs["streams"] == whole.attrs["streams"] == {}


def test_a_follower_reads_its_step_inputs_from_the_producer_and_confirms_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit computed as a Ray worker following its inversion (noise maps) or reference
    pass (attention maps) reads them through the live reader and makes the entry an
    in-process run makes."""
    from editflow.engine.graph import producer_of

    confirmed: list[str] = []
    original = LiveSteps.confirm

    def confirm(self: LiveSteps) -> None:
        confirmed.append(self.array)
        original(self)

    monkeypatch.setattr(LiveSteps, "confirm", confirm)
    cases = (
        (EDIT_FRIENDLY, EDIT_FRIENDLY_FAST, "invert", "edit"),
        (RECIPE, FAST, "reference", "guided"),
    )
    for recipe, overrides, producer, consumer in cases:
        whole_cache = Cache(tmp_path / consumer / "whole")
        expected = run_recipe(
            recipe, overrides, cache=whole_cache, out_dir=None, device="cpu", targets=[consumer]
        )
        cache = Cache(tmp_path / consumer / "followed")
        plan = plan_recipe(recipe, overrides, cache=cache)
        inputs: set[str] = set()
        for refs in plan.stages[consumer].references.values():
            inputs |= {producer_of(ref) for ref in ([refs] if isinstance(refs, str) else refs)}
        run_recipe(
            recipe, overrides, cache=cache, out_dir=None, device="cpu", targets=sorted(inputs)
        )
        # The producer has returned: the follower finds no live step and reads its entry.
        following = {plan.stages[producer].key: Follow("live1", lambda: True)}
        compute_stage(plan, _session(cache), consumer, following=following)
        key = expected.keys[consumer]
        assert plan.stages[consumer].key == key
        latents = [c.get(key).arrays["latents"].checksum for c in (whole_cache, cache)]
        assert latents[0] == latents[1]
    assert confirmed == ["noise_maps", "auxiliary_path", "attention_maps"]
