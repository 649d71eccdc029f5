"""Cache keys: stable across processes, and sensitive to every part of their preimage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from editflow.cache import Cache
from editflow.engine import keys as keys_module
from editflow.engine.api import plan_recipe
from editflow.engine.keys import canonical_json, key_of

QUICKSTART = ROOT / "manifests" / "quickstart.toml"
SEEDED = ["stages.edit.eta=0.5"]  # makes `edit` a seeded stage


def _keys(tmp_path: Path, overrides: list[str], recipe: Path = QUICKSTART) -> dict[str, str]:
    plan = plan_recipe(recipe, SEEDED + overrides, cache=Cache(tmp_path / "cache"))
    return {name: stage.key for name, stage in plan.stages.items()}


def test_canonical_json_is_sorted_compact_and_exact() -> None:
    assert canonical_json({"b": 0.1, "a": [1, 2.5e-10]}) == '{"a":[1,2.5e-10],"b":0.1}'
    with pytest.raises(ValueError, match="non-finite"):
        canonical_json({"x": float("nan")})
    assert key_of({"a": 1}) == key_of({"a": 1}) != key_of({"a": 1.5})


def test_keys_are_identical_in_another_process(tmp_path: Path) -> None:
    script = (
        "import json, sys; from editflow.cache import Cache; "
        "from editflow.engine.api import plan_recipe; "
        f"plan = plan_recipe(sys.argv[1], {SEEDED!r}, cache=Cache(sys.argv[2])); "
        "print(json.dumps({n: s.key for n, s in plan.stages.items()}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    output = subprocess.run(
        [sys.executable, "-c", script, str(QUICKSTART), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert json.loads(output) == _keys(tmp_path, [])


def _copy_recipe_with_photo(tmp_path: Path, pixel: int) -> Path:
    from PIL import Image

    folder = tmp_path / f"recipe{pixel}"
    folder.mkdir()
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    image.putpixel((5, 5), (pixel, 0, 0))
    image.save(folder / "photo.png")
    text = QUICKSTART.read_text().replace('"skimage:chelsea"', '"photo.png"')
    (folder / "recipe.toml").write_text(text)
    return folder / "recipe.toml"


def _local_model(tmp_path: Path, models_dir: Path, name: str) -> Path:
    from editflow.models.tiny import ensure_tiny

    folder = tmp_path / name
    shutil.copytree(ensure_tiny(models_dir), folder)
    return folder


# Each case: (stage whose key must change, how to change one component of its preimage).
COMPONENTS = [
    "params",
    "upstream",
    "input_file",
    "model_weights",
    "scheduler_config",
    "seed",
    "stage_name",
    "dtype",
    "library_version",
    "kind_version",
]


@pytest.mark.parametrize("component", COMPONENTS)
def test_key_changes_when_any_component_changes(
    component: str, tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, base_overrides, changed_overrides = QUICKSTART, [], []
    stage = "edit"
    if component == "params":
        changed_overrides = ["stages.edit.guidance_scale=4.5"]
    elif component == "upstream":
        changed_overrides = ["stages.invert.prompt=a cat"]
    elif component == "input_file":
        stage = "encode"
        recipe = _copy_recipe_with_photo(tmp_path, 1)
        before = _keys(tmp_path, [], recipe)[stage]
        after = _keys(tmp_path, [], _copy_recipe_with_photo(tmp_path, 2))[stage]
        assert before != after
        return
    elif component in ("model_weights", "scheduler_config"):
        folder = _local_model(tmp_path, models_dir, "model")
        base_overrides = [f'model.id="{folder}"']
        before = _keys(tmp_path, base_overrides)[stage]
        if component == "model_weights":
            weights = next((folder / "unet").glob("*.safetensors"))
            data = bytearray(weights.read_bytes())
            data[-1] ^= 1
            weights.write_bytes(bytes(data))
        else:
            config_path = folder / "scheduler" / "scheduler_config.json"
            config = json.loads(config_path.read_text())
            config["beta_end"] = 0.013
            config_path.write_text(json.dumps(config))
        # A new resolver call sees the changed file (the hash memo keys on size and mtime).
        assert _keys(tmp_path, base_overrides)[stage] != before
        return
    elif component == "seed":
        changed_overrides = ["seed=1"]
    elif component == "stage_name":
        text = (
            QUICKSTART.read_text()
            .replace("[stages.edit]", "[stages.edit2]")
            .replace('"edit.latents"', '"edit2.latents"')
        )
        renamed = tmp_path / "renamed.toml"
        renamed.write_text(text)
        before = _keys(tmp_path, [])["edit"]
        after = plan_recipe(renamed, ["stages.edit2.eta=0.5"], cache=Cache(tmp_path / "c"))
        assert after.stages["edit2"].key != before
        return
    elif component == "dtype":
        changed_overrides = ['model.dtype="bfloat16"']
    elif component == "library_version":
        before = _keys(tmp_path, [])[stage]
        keys_module.library_versions.cache_clear()
        monkeypatch.setattr(
            keys_module.metadata, "version", lambda package: "9.9.9" if package == "torch" else "1"
        )
        try:
            assert _keys(tmp_path, [])[stage] != before
        finally:
            keys_module.library_versions.cache_clear()
        return
    elif component == "kind_version":
        from editflow.stages.ddim.kinds import SampleDdim

        before = _keys(tmp_path, [])[stage]
        monkeypatch.setattr(SampleDdim, "version", "999")
        assert _keys(tmp_path, [])[stage] != before
        return
    before = _keys(tmp_path, base_overrides)
    after = _keys(tmp_path, base_overrides + changed_overrides)
    assert before[stage] != after[stage]


def test_seed_does_not_enter_deterministic_keys(tmp_path: Path) -> None:
    base, reseeded = _keys(tmp_path, []), _keys(tmp_path, ["seed=7"])
    assert base["invert"] == reseeded["invert"]  # DDIM inversion draws no noise
    assert base["edit"] != reseeded["edit"]  # eta > 0 draws noise


def test_keys_do_not_depend_on_the_recipe_location(tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.toml"
    moved.write_text(QUICKSTART.read_text())
    assert _keys(tmp_path, [], moved) == _keys(tmp_path, [])


def test_an_inputs_key_changes_with_how_its_file_becomes_pixels(monkeypatch) -> None:
    from editflow.engine import keys
    from editflow.files.inputs import InputSection

    section = InputSection.model_validate({"image": "photo.png", "size": [64, 64]})
    before = keys.input_key(section, "0" * 64)
    monkeypatch.setattr(keys, "LOADER_VERSION", keys.LOADER_VERSION + 1)
    assert keys.input_key(section, "0" * 64) != before
