"""Running recipes end to end on the tiny model: reuse, selective reruns, reproducibility."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import ROOT

from editflow.cache import Cache
from editflow.engine.api import run_recipe
from editflow.engine.events import CollectEvents

QUICKSTART = ROOT / "manifests" / "quickstart.toml"
# Fewer steps keep the suite fast; the structure of the run is what these tests check.
FAST = [
    "stages.invert.num_inference_steps=4",
    "stages.reconstruct.num_inference_steps=4",
    "stages.edit.num_inference_steps=4",
]
ALL_STAGES = {
    "encode",
    "invert",
    "reconstruct",
    "edit",
    "decode_reconstruction",
    "decode_edit",
    "figure",
}


def _run(cache: Cache, out: Path, extra: list[str] | None = None, **kwargs):
    events = CollectEvents()
    result = run_recipe(
        QUICKSTART,
        FAST + (extra or []),
        cache=cache,
        out_dir=out,
        device="cpu",
        events=events,
        **kwargs,
    )
    return result, events


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))
    }


def test_quickstart_writes_its_figure_and_images(cache: Cache, tmp_path: Path) -> None:
    result, events = _run(cache, tmp_path / "out")
    assert set(result.computed) == ALL_STAGES
    names = sorted(path.name for path in result.written)
    assert names == ["decode_edit.png", "decode_reconstruction.png", "figure.png"]
    with Image.open(tmp_path / "out" / "decode_edit.png") as image:
        assert image.size == (64, 64)
        assert image.text["editflow:stage"] == "decode_edit"
        assert image.text["editflow:stage_key"] == result.keys["decode_edit"]
        assert image.text["editflow:version"]
        assert len(image.text["editflow:recipe_sha256"]) == 64
    with Image.open(tmp_path / "out" / "figure.png") as figure:
        assert figure.width > 3 * 128  # three labelled tiles side by side


def test_rerun_hits_every_stage_and_loads_no_model(cache: Cache, tmp_path: Path) -> None:
    first, first_events = _run(cache, tmp_path / "a")
    assert first_events.of("loaded"), "the cold run must load model parts"
    second, events = _run(cache, tmp_path / "b")
    assert second.computed == []
    assert set(second.hits) == ALL_STAGES
    assert events.of("loaded") == []
    assert second.registry is None
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_changing_the_edit_prompt_reruns_only_its_dependents(cache: Cache, tmp_path: Path) -> None:
    _run(cache, tmp_path / "a")
    result, events = _run(cache, tmp_path / "b", ["stages.edit.prompt=a photo of a horse"])
    assert set(result.computed) == {"edit", "decode_edit", "figure"}
    reasons = {event.stage: event.message for event in events.of("running")}
    assert reasons["edit"] == "params.prompt: 'a photo of a dog' -> 'a photo of a horse'"
    assert reasons["decode_edit"] == "input 'latents' changed upstream (edit)"


def test_two_fresh_runs_give_byte_identical_pngs(tmp_path: Path) -> None:
    _run(Cache(tmp_path / "c1"), tmp_path / "a")
    _run(Cache(tmp_path / "c2"), tmp_path / "b")
    first, second = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(first) == 3
    assert first == second


def test_targets_run_only_what_they_need(cache: Cache, tmp_path: Path) -> None:
    result, _ = _run(cache, tmp_path / "out", targets=["decode_reconstruction"])
    assert set(result.computed) == {"encode", "invert", "reconstruct", "decode_reconstruction"}
    assert [path.name for path in result.written] == ["decode_reconstruction.png"]


def test_corrupted_entry_is_found_by_verify_and_recomputed(cache: Cache, tmp_path: Path) -> None:
    first, _ = _run(cache, tmp_path / "a")
    invert_key = first.keys["invert"]
    chunk = _largest_chunk(cache, invert_key)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    damaged = cache.verify()
    assert {damage.key for damage in damaged} == {invert_key}
    for key in {damage.key for damage in damaged}:
        cache.discard(key)
    second, _ = _run(cache, tmp_path / "b")
    assert second.computed == ["invert"]
    assert cache.verify() == []
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_damaged_entry_read_during_a_run_is_recomputed(cache: Cache, tmp_path: Path) -> None:
    first, _ = _run(cache, tmp_path / "a")
    chunk = _largest_chunk(cache, first.keys["invert"])
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    # A new edit prompt makes `edit` read invert's (damaged) latents.
    second, _ = _run(cache, tmp_path / "b", ["stages.edit.prompt=a photo of a horse"])
    assert "invert" in second.computed
    assert "edit" in second.computed


def _largest_chunk(cache: Cache, key: str) -> Path:
    root = cache.local_root
    assert root is not None
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and key in str(p) and "zarr.json" not in p.name and p.suffix != ".json"
    ]
    assert files, "expected chunk files for the entry"
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fmt", ["json"])
def test_json_recipe_runs_like_toml(tmp_path: Path, cache: Cache, fmt: str) -> None:
    import json
    import tomllib

    document = tomllib.loads(QUICKSTART.read_text())
    path = tmp_path / "quickstart.json"
    path.write_text(json.dumps(document))
    toml_result, _ = _run(cache, tmp_path / "a")
    json_result = run_recipe(path, FAST, cache=cache, out_dir=tmp_path / "b", device="cpu")
    assert json_result.computed == []  # same stages, same keys: everything hits
    assert json_result.keys == toml_result.keys


def test_rerun_into_the_same_folder_leaves_current_files_alone(
    cache: Cache, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _run(cache, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    figure = out / "figure.png"
    figure.write_bytes(b"not a png any more")
    second, _ = _run(cache, out)
    assert sorted(p.name for p in second.written) == sorted(before)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert after["decode_edit.png"] == before["decode_edit.png"]  # current: untouched
    assert Image.open(figure).text["editflow:stage"] == "figure"  # damaged: rewritten


def _ref(cache: Cache, key: str) -> Path:
    assert cache.local_root is not None
    return cache.local_root / "refs" / key[:2] / f"{key}.json"


@pytest.mark.parametrize("damage", ["", "{not json", '{"key": "x"}'])
def test_a_damaged_manifest_heals_on_the_next_run(
    cache: Cache, tmp_path: Path, damage: str
) -> None:
    first, _ = _run(cache, tmp_path / "a")
    _ref(cache, first.keys["invert"]).write_text(damage)
    second, events = _run(cache, tmp_path / "b")
    assert second.computed == ["invert"]
    [line] = events.of("damaged")
    assert line.stage == "invert" and line.message.startswith("cache entry damaged (")
    assert line.message.endswith("); recomputing it")
    third, events = _run(cache, tmp_path / "c")
    assert third.computed == [] and events.of("damaged") == []
    assert _digests(tmp_path / "a") == _digests(tmp_path / "c")


def test_an_edited_text_output_is_damage_not_a_silent_change(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    recipe = ROOT / "manifests" / "pix2pix_zero" / "cat2dog.toml"
    first = run_recipe(recipe, cache=cache, out_dir=None, device="cpu", targets=["caption"])
    key = first.keys["caption"]
    ref = _ref(cache, key)
    manifest = ref.read_text()
    caption = cache.get(key).attrs["texts"]["caption"]
    ref.write_text(manifest.replace(f'"caption": "{caption}"', '"caption": "a photo of a dog"'))
    assert [damage.key for damage in cache.verify()] == [key]
    ref.write_text(manifest.replace('"texts"', '"gone"'))
    events = CollectEvents()
    second = run_recipe(
        recipe, cache=cache, out_dir=None, device="cpu", targets=["caption"], events=events
    )
    assert second.computed == ["caption"] and len(events.of("damaged")) == 1
    assert cache.get(key).attrs["texts"]["caption"] == caption


def test_bfloat16_runs_on_the_cpu_and_is_cached_as_float32_with_its_dtype(
    cache: Cache, tmp_path: Path
) -> None:
    result, _ = _run(cache, tmp_path / "o", ['model.dtype="bfloat16"'])
    assert set(result.computed) == ALL_STAGES
    inverted = cache.get(result.keys["invert"])
    assert inverted.arrays["latents"].dtype == "float32"
    assert inverted.arrays["latents"].torch_dtype == "bfloat16"
    assert inverted.tensor("latents").dtype == torch.bfloat16
    assert inverted.attrs["preimage"]["dtype"] == "bfloat16"
    # Another dtype is another key: float32 results are never served for bfloat16.
    again, _ = _run(cache, tmp_path / "o32")
    assert again.keys["invert"] != result.keys["invert"]


def test_float16_runs_end_to_end_on_the_cpu_and_is_cached_as_float16(
    cache: Cache, tmp_path: Path
) -> None:
    result, _ = _run(cache, tmp_path / "o", ['model.dtype="float16"'])
    assert set(result.computed) == ALL_STAGES
    inverted = cache.get(result.keys["invert"])
    for name in ("latents", "trajectory", "prompt_embeds"):
        assert (inverted.arrays[name].dtype, inverted.arrays[name].torch_dtype) == (
            "float16",
            "float16",
        ), name
    assert torch.isfinite(inverted.tensor("trajectory").float()).all()
    assert inverted.attrs["preimage"]["dtype"] == "float16"
    decoded = cache.get(result.keys["decode_edit"]).tensor("images")
    assert torch.isfinite(decoded).all() and decoded.std() > 0


def _inductor_works() -> bool:
    """torch.compile on the CPU needs a C++ compiler and Python's headers."""
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
    except Exception:  # any failure: this machine cannot compile
        return False
    return True


def test_compiled_mode_compiles_once_not_per_step_and_matches_eager(
    cache: Cache, tmp_path: Path
) -> None:
    from torch._dynamo.utils import counters

    if not _inductor_works():
        pytest.skip("torch.compile cannot build CPU kernels here (no C++ compiler?)")
    torch._dynamo.reset()
    counters.clear()
    invert = {"targets": ["invert"]}
    eager, _ = _run(cache, tmp_path / "eager", **invert)
    compiled, _ = _run(cache, tmp_path / "compiled", ["model.compile=true"], **invert)
    graphs = counters["stats"]["unique_graphs"]
    assert compiled.keys["invert"] != eager.keys["invert"]  # compiled results are others
    # The timesteps reach the UNet as tensors: more steps add no graph (an int per step
    # would compile every step anew).
    more_steps = ["model.compile=true", "stages.invert.num_inference_steps=9"]
    more, _ = _run(cache, tmp_path / "more", more_steps, **invert)
    assert more.computed == ["invert"] and counters["stats"]["unique_graphs"] == graphs == 1
    torch.testing.assert_close(
        cache.get(compiled.keys["invert"]).tensor("latents"),
        cache.get(eager.keys["invert"]).tensor("latents"),
        rtol=1e-4,
        atol=1e-4,
    )
    torch._dynamo.reset()


def test_entries_are_written_on_the_writer_thread_and_all_published_on_return(
    cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from editflow.cache import artifacts

    threads: list[str] = []
    original = artifacts.write_outputs

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(artifacts, "write_outputs", recorded)
    result, _ = _run(cache, tmp_path / "o")
    assert len(threads) == len(ALL_STAGES)
    assert all(name.startswith("editflow-cache-writer") for name in threads)
    assert all(cache.has(key) for key in result.keys.values())


def test_each_prompt_is_encoded_once_per_run_however_many_stages_use_it(tmp_path: Path) -> None:
    import torch

    from editflow.engine.api import models_dir_for, plan_recipe
    from editflow.models import RunModels

    cache = Cache(tmp_path / "c")
    plan = plan_recipe(QUICKSTART, cache=cache)
    models = RunModels(plan.models, device=torch.device("cpu"), dtype=torch.float32,
                       models_dir=models_dir_for(cache))  # fmt: skip
    encoder = models.registry("model.id").get("text_encoder")
    encoded: list[int] = []
    encoder.register_forward_hook(lambda module, args, output: encoded.append(len(args[0])))
    run_recipe(QUICKSTART, cache=cache, out_dir=None, device="cpu", registry=models)
    # The inversion and the reconstruction share "a photo of a cat", the edit adds "a photo of
    # a dog" and CFG's empty prompt: three encodings for four uses of a prompt.
    uses = sum(1 for s in plan.stages.values() if s.kind.kind.endswith(".ddim"))
    assert uses == 3 and len(encoded) == 3
