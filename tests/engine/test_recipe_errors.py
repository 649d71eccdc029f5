"""Bad recipes: one exact message per problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import RECIPES

from editflow.cli import main
from editflow.stages import KINDS_BY_NAME

BAD = RECIPES / "bad"

# (recipe file, extra CLI arguments, expected stderr with {f} for the recipe path)
CASES = [
    (
        "unknown_kind.toml",
        [],
        "{f}:3: stages.encode: unknown kind 'encode.vea'; known kinds: "
        + ", ".join(sorted(KINDS_BY_NAME)),
    ),
    (
        "typo_key.toml",
        [],
        "{f}:14: stages.invert.num_inference_step: unknown key "
        "(did you mean 'num_inference_steps'?)",
    ),
    (
        "dangling_reference.toml",
        [],
        "{f}:13: stages.decode.latents: 'encod.latents' refers to no stage named 'encod' "
        "(did you mean 'encode'?)",
    ),
    (
        "cycle.toml",
        [],
        "{f}:3: stages.first: cycle between stages: first -> second -> first",
    ),
    (
        "type_mismatch.toml",
        [],
        "{f}:17: stages.decode.latents: 'invert.prompt_embeds' is an embedding, "
        "but this input takes a clean latent (x0)",
    ),
    (
        "trajectory_as_noise_maps.toml",
        [],
        "{f}:17: stages.edit.noise_maps: 'invert.auxiliary_path' is a latent trajectory, "
        "but this input takes a noise sequence\n"
        "{f}:18: stages.edit.auxiliary_path: 'invert.noise_maps' is a noise sequence, "
        "but this input takes a latent trajectory",
    ),
    (
        "../../../manifests/quickstart.toml",
        ["--set", "stages.decode_edit.latents=invert.trajectory"],
        "--set stages.decode_edit.latents=invert.trajectory: stages.decode_edit.latents: "
        "'invert.trajectory' is a latent trajectory, but this input takes a clean latent (x0)",
    ),
    (
        "negative_steps.toml",
        [],
        "{f}:14: stages.invert.num_inference_steps: must be >= 1, got -5",
    ),
    ("missing_image.toml", [], "{f}:4: inputs.photo.image: file not found: no_such_photo.png"),
    (
        "unreadable_image.toml",
        [],
        "{f}:4: inputs.photo.image: cannot read image '../broken.png': cannot identify image file",
    ),
    (
        "unknown_model.toml",
        [],
        "{f}:4: model.id: model 'nobody/no-such-model' is not available offline "
        "(run 'hf download nobody/no-such-model' with network access, "
        "or set model.id to a local folder)",
    ),
    (
        "../../../manifests/pix2pix_zero/cat2dog.toml",
        ["--set", "model.captioner=nobody/no-such-blip"],
        "--set model.captioner=nobody/no-such-blip: model.captioner: captioner "
        "'nobody/no-such-blip' is not available offline (run 'hf download nobody/no-such-blip' "
        "with network access, give the caption in the recipe, or set model.captioner to a "
        "local folder)",
    ),
    ("bad_syntax.toml", [], "{f}:4: invalid TOML: Illegal character '\\n'"),
    (
        "bad_syntax.json",
        [],
        "{f}:4: invalid JSON: Expecting property name enclosed in double quotes",
    ),
    (
        "wrong_schema_version.toml",
        [],
        "{f}: schema_version: unsupported version 7; this editflow reads 1 to 1",
    ),
    ("missing_kind.toml", [], "{f}:6: stages.encode: missing 'kind' (every stage needs one)"),
    (
        "bad_size.toml",
        [],
        "{f}:3: inputs.photo: size must be positive multiples of 8, got [60, 64]",
    ),
    (
        "many_problems.toml",
        [],
        "{f}:14: stages.edit.eta: must be <= 1.0, got 1.5\n"
        "{f}:15: stages.edit.guidance_scale: must be >= 1.0, got 0.5\n"
        "{f}:19: stages.decode.latents: 'edits.latents' refers to no stage named 'edits' "
        "(did you mean 'edit'?)",
    ),
    (
        "../ok.toml",
        ["--set", "stages.decoder.latents=encode.latents"],
        "--set stages.decoder.latents=encode.latents: the recipe has no table 'stages.decoder'",
    ),
    (
        "../ok.toml",
        ["--set", "stages.encode.image=inputs.photo"],
        "--set stages.encode.image=inputs.photo: stages.encode.image: unknown key "
        "(did you mean 'images'?)",
    ),
    (
        "../ok.toml",
        ["--set", "stages.decode.guidance=2"],
        "--set stages.decode.guidance=2: stages.decode.guidance: unknown key",
    ),
    (
        "../ok.toml",
        ["--target", "decoder"],
        "--target: no stage named 'decoder' (did you mean 'decode'?)",
    ),
    ("no_such_recipe.toml", [], "{f}: recipe file not found"),
]


@pytest.mark.parametrize(
    ("name", "extra", "expected"), CASES, ids=[c[0] + str(c[1]) for c in CASES]
)
def test_bad_recipe_exact_message_exit_2_nothing_written(
    name: str, extra: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = BAD / name
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["run", str(recipe), "--cache", str(cache), "--out", str(out), *extra]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == expected.format(f=recipe)
    assert "Traceback" not in captured.err + captured.out
    assert not cache.exists()
    assert not out.exists()


def test_validate_accepts_a_good_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["validate", str(RECIPES / "ok.toml"), "--cache", str(tmp_path / "c")])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith("ok (2 stages, 1 inputs)")
    assert not (tmp_path / "c").exists()


def test_override_values_are_parsed_as_toml(tmp_path: Path) -> None:
    from editflow.engine.recipe import load_recipe

    loaded = load_recipe(
        RECIPES.parent.parent / "manifests" / "quickstart.toml",
        ["stages.edit.guidance_scale=12", "stages.edit.prompt=a photo of a horse", "seed=3"],
    )
    assert loaded.stages["edit"].params.guidance_scale == 12.0
    assert loaded.stages["edit"].params.prompt == "a photo of a horse"
    assert loaded.recipe.seed == 3


def test_set_indexes_an_array_of_tables_and_names_a_missing_entry() -> None:
    from editflow.documents import apply_overrides
    from editflow.errors import RecipeError

    document = {"model": {"lora": [{"path": "a.safetensors", "scale": 1.0}]}}
    changed = apply_overrides(document, ["model.lora.0.scale=0.25"])
    assert changed["model"]["lora"] == [{"path": "a.safetensors", "scale": 0.25}]
    assert document["model"]["lora"][0]["scale"] == 1.0  # the document itself is left alone
    for override, missing in [("model.lora.1.scale=2", "model.lora.1"),
                              ("model.lora.x.scale=2", "model.lora.x")]:  # fmt: skip
        with pytest.raises(RecipeError) as error:
            apply_overrides(document, [override])
        assert error.value.render() == f"--set {override}: the recipe has no table '{missing}'"
