"""Local ILVR composed on the pixel-space model ``tiny-pixel`` (encode.pixels -> compose.paste
-> sample.local_ilvr -> decode.pixels, with and without DiffusionCLIP-tuned weights), the
inpainting conditioning after the windows through a recipe, and what validate refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import MANIFESTS, RECIPES

from editflow.cache import Cache
from editflow.cli import main
from editflow.engine.api import run_recipe

PIXEL = RECIPES / "compose_ilvr_pixel.toml"
BACKGROUND = MANIFESTS / "compositing" / "background.toml"


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.mktemp("compose") / "cache")


def _tensor(cache: Cache, result, stage: str, output: str) -> torch.Tensor:
    return cache.get(result.keys[stage]).tensor(output)


@pytest.mark.parametrize("stage", ["immerse", "immerse_tuned"])
def test_local_ilvr_runs_on_the_pixel_model_and_keeps_the_outside(
    pixel_cache: Cache, tmp_path: Path, stage: str
) -> None:
    """t_out 1 with n_out 1: the outside of the mask ends equal to the composite itself (the
    last step's guidance is the clean reference), with or without tuned weights."""
    decode = "decode" if stage == "immerse" else "decode_tuned"
    result = run_recipe(PIXEL, [], cache=pixel_cache, out_dir=tmp_path, device="cpu",
                        targets=[decode])  # fmt: skip
    assert (tmp_path / f"{decode}.png").is_file()
    reference = _tensor(pixel_cache, result, "encode", "latents")
    sampled = _tensor(pixel_cache, result, stage, "latents")
    outside = (_tensor(pixel_cache, result, "paste", "mask") < 0.5).expand(-1, 3, -1, -1)
    assert sampled.shape == reference.shape == (1, 3, 32, 32)
    assert torch.allclose(sampled[outside], reference[outside], atol=1e-5)
    assert float((sampled - reference)[~outside].abs().max()) > 1e-2  # the inside is free


def test_tuned_weights_reach_local_ilvr_on_the_pixel_model(pixel_cache: Cache) -> None:
    """The same stage (same seed) with the tuned model mixed out (ratio 0) and in (ratio 1)."""
    outputs = {}
    for ratio in (0.0, 1.0):
        result = run_recipe(PIXEL, [f"stages.immerse_tuned.ratio={ratio}"], cache=pixel_cache,
                            out_dir=None, device="cpu", targets=["immerse_tuned"])  # fmt: skip
        outputs[ratio] = _tensor(pixel_cache, result, "immerse_tuned", "latents")
    assert float((outputs[1.0] - outputs[0.0]).abs().max()) > 1e-4


def test_generate_after_the_window_changes_only_an_inpainting_run(tmp_path: Path) -> None:
    """background.toml (tiny-inpaint, t_out 0.5) in 6 steps: 'generate' moves the result,
    'keep' is the default."""
    cache = Cache(tmp_path / "c")
    runs = {}
    for after in ("keep", "generate"):
        overrides = ["stages.generate.num_inference_steps=6",
                     f'stages.generate.inpaint_after_window="{after}"']  # fmt: skip
        result = run_recipe(BACKGROUND, overrides, cache=cache, out_dir=None, device="cpu",
                            targets=["generate"])  # fmt: skip
        runs[after] = result.keys["generate"], _tensor(cache, result, "generate", "latents")
    default = run_recipe(BACKGROUND, ["stages.generate.num_inference_steps=6"], cache=cache,
                         out_dir=None, device="cpu", targets=["generate"])  # fmt: skip
    assert default.keys["generate"] == runs["keep"][0] and default.computed == []
    keep, generate = runs["keep"][1], runs["generate"][1]
    assert float((keep - generate).norm() / keep.norm()) > 1e-3


# What cannot run on the pixel model (or would ignore what it was given) is refused by
# validate, one located line each.
REFUSALS = [
    ("prompt", ['stages.immerse.prompt="a cat"'],
     "--set stages.immerse.prompt=\"a cat\": stages.immerse.prompt: is 'a cat', but model"
     " 'tiny-pixel' has no text encoder (an unconditional UNet): the prompt would be ignored (leave"
     " prompt empty)"),
    ("negative prompt", ['stages.immerse_tuned.negative_prompt="blur"'],
     "--set stages.immerse_tuned.negative_prompt=\"blur\": stages.immerse_tuned.negative_prompt:"
     " is 'blur', but model 'tiny-pixel' has no text encoder (an unconditional UNet): the prompt would"
     " be ignored (leave negative_prompt empty)"),
    ("background preset", ['stages.immerse.preset="background"'],
     "--set stages.immerse.preset=\"background\": stages.immerse.preset: preset 'background'"
     " needs an inpainting UNet (9 input channels); this model's UNet takes 3 (set model.id to"
     " an inpainting model such as 'tiny-inpaint')"),
    ("generate after the window", ['stages.immerse.inpaint_after_window="generate"'],
     "--set stages.immerse.inpaint_after_window=\"generate\":"
     " stages.immerse.inpaint_after_window: is 'generate' but this model's UNet is not an"
     " inpainting UNet (it takes 3 input channels): it has no mask conditioning to change"
     " (leave inpaint_after_window out, or use an inpainting model)"),
    ("low-pass factor", ["stages.immerse.n_in=3"],
     "--set stages.immerse.n_in=3: stages.immerse.n_in: n_in = 3 does not divide the image"
     " size 32x32"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, expected", [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])  # fmt: skip
def test_what_the_pixel_model_cannot_do_is_refused_by_validate(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [arg for override in overrides for arg in ("--set", override)]
    code = main(["validate", str(PIXEL), "--cache", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [expected]


def test_the_pixel_recipe_and_generate_on_tiny_inpaint_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache = str(tmp_path / "c")
    assert main(["validate", str(PIXEL), "--cache", cache]) == 0
    generate = ["--set", 'stages.generate.inpaint_after_window="generate"']
    assert main(["validate", str(BACKGROUND), "--cache", cache, *generate]) == 0
    assert "problem" not in capsys.readouterr().err.lower()
