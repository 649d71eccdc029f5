"""Edit-friendly recipes through the engine: exactness, reuse across recipes, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import MANIFESTS

from editflow.cache import Cache
from editflow.cli import main
from editflow.engine.api import run_recipe

FOLDER = MANIFESTS / "edit_friendly"
STEPS = ["stages.invert.num_inference_steps=20"]


def _steps(*stages: str) -> list[str]:
    overrides = STEPS + [f"stages.{stage}.num_inference_steps=20" for stage in stages]
    if "edit" in stages:
        overrides.append("stages.edit.skip=7")
    if "recolour" in stages:
        overrides.append("stages.recolour.colour_window=[0, 10]")
    return overrides


def test_skip_zero_same_prompt_reconstructs_x0_exactly(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    result = run_recipe(
        FOLDER / "text_edit.toml", _steps("edit", "reconstruct"), cache=cache, out_dir=None,
        device="cpu", targets=["reconstruct"],
    )  # fmt: skip
    x0 = cache.get(result.keys["encode"]).tensor("latents")
    reconstruction = cache.get(result.keys["reconstruct"]).tensor("latents")
    error = ((reconstruction - x0).norm() / x0.norm()).item()
    assert error < 1e-5, error


@pytest.mark.parametrize(
    "inversion",
    [["stages.invert.eta=0.5"], ['stages.invert.scheduler="dpmsolver++"']],
    ids=["eta 0.5", "dpmsolver++"],
)
def test_the_edit_takes_the_inversions_settings_and_stays_exact(
    tmp_path: Path, inversion: list[str]
) -> None:
    """Only the inversion names eta or the scheduler; the edit inherits them (an edit that
    disagreed would lose exact reconstruction, so it is refused by validate instead)."""
    cache = Cache(tmp_path / "cache")
    result = run_recipe(
        FOLDER / "text_edit.toml", [*STEPS, "stages.edit.skip=7", *inversion], cache=cache,
        out_dir=None, device="cpu",
        targets=["reconstruct"],
    )  # fmt: skip
    x0 = cache.get(result.keys["encode"]).tensor("latents")
    reconstruction = cache.get(result.keys["reconstruct"]).tensor("latents")
    assert ((reconstruction - x0).norm() / x0.norm()).item() < 1e-5
    preimage = cache.get(result.keys["reconstruct"]).attrs["preimage"]["params"]
    invert = cache.get(result.keys["invert"]).attrs["preimage"]["params"]
    assert {k: preimage[k] for k in ("num_inference_steps", "eta", "scheduler")} == {
        k: invert[k] for k in ("num_inference_steps", "eta", "scheduler")
    }


def test_a_second_recipe_with_the_same_inversion_reuses_it(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    run_recipe(
        FOLDER / "text_edit.toml", _steps("edit", "reconstruct"), cache=cache,
        out_dir=tmp_path / "a", device="cpu",
    )  # fmt: skip
    shifted = run_recipe(
        FOLDER / "shift.toml", _steps("shift"), cache=cache, out_dir=tmp_path / "b", device="cpu"
    )
    assert set(shifted.hits) == {"encode", "invert"}
    assert shifted.computed == ["shift", "decode_shift", "figure"]


def test_inversion_seeds_give_different_edits_and_reruns_the_same(tmp_path: Path) -> None:
    overrides = [f"stages.invert_{i}.num_inference_steps=10" for i in (1, 2)] + [
        f"stages.edit_{i}.{key}" for i in (1, 2) for key in ("num_inference_steps=10", "skip=4")
    ]
    runs = []
    for name in ("a", "b"):
        cache = Cache(tmp_path / name)
        result = run_recipe(
            FOLDER / "diversity.toml", overrides, cache=cache, out_dir=None, device="cpu",
            targets=["edit_1", "edit_2"],
        )  # fmt: skip
        runs.append({s: cache.get(result.keys[s]).tensor("latents") for s in ("edit_1", "edit_2")})
    first, second = runs
    assert torch.equal(first["edit_1"], second["edit_1"])  # same seed path: identical
    assert not torch.allclose(first["edit_1"], first["edit_2"], atol=1e-3)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["stages.recolour.skip=100"],
            "{f}:32: stages.recolour: skip must be < num_inference_steps",
        ),
        (
            ["stages.recolour.colour_window=[30, 10]"],
            "{f}:32: stages.recolour: colour_window start must be <= end",
        ),
        (
            ["inputs.region.size=[32, 32]"],
            "{f}:36: stages.recolour.colour_mask: colour_mask is 32x32 but the edited image is "
            "64x64: give it the image's size with inputs.NAME.size",
        ),
    ],
)
def test_bad_colour_edits_fail_with_clear_messages(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = FOLDER / "color.toml"
    sets = [a for o in _steps("recolour") + overrides for a in ("--set", o)]
    code = main(
        ["run", str(recipe), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), *sets]
    )
    assert code == 2
    # Earlier lines are the progress display; the error is the last line.
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected.format(f=recipe)
    assert not (tmp_path / "o").exists()


def test_a_colour_mask_without_a_colour_image_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = (FOLDER / "color.toml").read_text().replace('colour_image = "inputs.paint"\n', "")
    recipe = tmp_path / "color.toml"
    recipe.write_text(text)
    (tmp_path / "mask.png").write_bytes((FOLDER / "mask.png").read_bytes())
    (tmp_path / "red.png").write_bytes((FOLDER / "red.png").read_bytes())
    code = main(["validate", str(recipe), "--cache", str(tmp_path / "c")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"{recipe}:32: stages.recolour: colour_mask and colour_image go together: "
        "colour_image is missing"
    )
