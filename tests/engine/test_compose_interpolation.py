"""sample.interpolate composed with an unconditional pixel-space model (`tiny-pixel`), with
and without DiffusionCLIP-tuned weights, and what such a model cannot take, refused by
validate in one located line each (tests/recipes/compose_interp_*.toml)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import RECIPES

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.engine.events import CollectEvents

PIXEL = RECIPES / "compose_interp_pixel.toml"
TUNED = RECIPES / "compose_interp_tuned.toml"
TEXTUAL = RECIPES / "compose_interp_textual.toml"


def _frames(cache: Cache, result, stage: str = "interpolate") -> torch.Tensor:
    return cache.get(result.keys[stage]).tensor("latents")


def _assert_inputs_at_the_ends(cache: Cache, result) -> torch.Tensor:
    """METHODS.md section 4: the first and last frames are the inputs' (here: exactly the
    encoded pixels, which a pixel model needs no reconstruction of)."""
    frames = _frames(cache, result)
    assert frames.shape == (5, 3, 32, 32)
    for end, encode in ((0, "encode_left"), (-1, "encode_right")):
        assert torch.equal(frames[end], cache.get(result.keys[encode]).tensor("latents")[0])
    assert (frames[1:-1] - frames[:1]).abs().max() > 1e-3  # the new frames are new
    return frames


def test_plain_interpolation_runs_on_a_pixel_model_without_text(tmp_path: Path) -> None:
    cache, events = Cache(tmp_path / "c"), CollectEvents()
    result = run_recipe(PIXEL, cache=cache, out_dir=tmp_path / "out", device="cpu",
                        events=events)  # fmt: skip
    frames = _assert_inputs_at_the_ends(cache, result)
    assert bool(cache.get(result.keys["interpolate"]).tensor("scores").isnan().all())
    assert sorted(path.name for path in result.written) == [f"frames-{i}.png" for i in range(5)]
    # The frames leave as pixels: decode.pixels' images are the frames mapped to [0, 1].
    images = cache.get(result.keys["frames"]).tensor("images")
    torch.testing.assert_close(images, ((frames + 1) / 2).clamp(0, 1))
    # Nothing textual, no VAE, no CLIP: the UNet (and the scheduler config) only.
    assert [event.message for event in events.of("loaded")] == ["unet"]


def test_ranked_interpolation_decodes_pixels_for_the_recipes_clip(tmp_path: Path) -> None:
    cache, events = Cache(tmp_path / "c"), CollectEvents()
    ranked = ['stages.interpolate.variant="quality"', "stages.interpolate.candidates=3",
              'stages.interpolate.positive_prompt="a photo of a motorcycle"',
              'stages.interpolate.negative_prompt="blurry"']  # fmt: skip
    result = run_recipe(PIXEL, ranked, cache=cache, out_dir=None, device="cpu", events=events)
    _assert_inputs_at_the_ends(cache, result)
    scores = cache.get(result.keys["interpolate"]).tensor("scores")
    assert scores[0].isnan() and scores[-1].isnan() and bool(scores[1:-1].isfinite().all())
    loaded = [event.message for event in events.of("loaded")]
    assert "clip" in loaded and "vae" not in loaded and "tokenizer" not in loaded


def test_tuned_weights_steer_pixel_interpolation_and_ratio_0_is_the_original(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path / "c")
    tuned = run_recipe(TUNED, cache=cache, out_dir=tmp_path / "out", device="cpu")
    tuned_frames = _assert_inputs_at_the_ends(cache, tuned)
    original = run_recipe(PIXEL, cache=cache, out_dir=None, device="cpu")
    # The same stage name and seed draw the same noise: only the denoiser differs.
    assert (tuned_frames[1:-1] - _frames(cache, original)[1:-1]).abs().max() > 1e-4
    mixed_out = run_recipe(TUNED, ["stages.interpolate.ratio=0.0"], cache=cache, out_dir=None,
                           device="cpu")  # fmt: skip
    assert "finetune" not in mixed_out.computed  # the tuned weights are reused
    assert torch.equal(_frames(cache, mixed_out), _frames(cache, original))


def test_slerp_and_rounding_are_recipe_parameters_whose_defaults_keep_the_key(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path / "c")

    def key(*overrides: str) -> str:
        return plan_recipe(PIXEL, list(overrides), cache=cache).stages["interpolate"].key

    default = key()
    assert key('stages.interpolate.slerp="unit-direction"',
               'stages.interpolate.rounding="half-even"') == default  # fmt: skip
    others = {key('stages.interpolate.slerp="raw"'), key('stages.interpolate.rounding="half-up"')}
    assert default not in others and len(others) == 2


def _set(*overrides: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def recipe(folder: Path) -> tuple[Path, list[str]]:
        return PIXEL, [arg for value in overrides for arg in ("--set", value)]

    return recipe


NO_TEXT = "model 'tiny-pixel' has no text encoder (an unconditional UNet)"
POSES = '["inputs.left", "inputs.right", "inputs.left", "inputs.right", "inputs.left"]'
KEYPOINTS = '["inputs.left_pose", "inputs.right_pose"]'

# What an unconditional pixel model cannot run: refused by validate, one located line each,
# in the words every sampler uses for text (editflow.stages.conditioning.text_problems).
MISUSES = [
    ("a prompt", _set('stages.interpolate.prompt="a motorcycle"'),
     ['--set stages.interpolate.prompt="a motorcycle": stages.interpolate.prompt: is'
      f" 'a motorcycle', but {NO_TEXT}: the prompt would be ignored (leave prompt empty)"]),
    ("a negative prompt with nothing ranked", _set('stages.interpolate.negative_prompt="blurry"'),
     ['--set stages.interpolate.negative_prompt="blurry": stages.interpolate.negative_prompt: is'
      f" 'blurry', but {NO_TEXT}: the prompt would be ignored (leave negative_prompt empty)"]),
    ("keypoints", _set(f"stages.interpolate.keypoints={KEYPOINTS}"),
     [f"--set stages.interpolate.keypoints={KEYPOINTS}: stages.interpolate.keypoints: {NO_TEXT}:"
      " pose guidance needs a ControlNet, which steers a text-conditioned UNet (disconnect it)"]),
    ("pose images", _set(f"stages.interpolate.poses={POSES}"),
     [f"--set stages.interpolate.poses={POSES}: stages.interpolate.poses: {NO_TEXT}: pose"
      " guidance needs a ControlNet, which steers a text-conditioned UNet (disconnect it)"]),
    ("a textual inversion and its embeddings", lambda folder: (TEXTUAL, []),
     [f"{TEXTUAL}:25: stages.embeddings: invert.textual_inversion fits prompt embeddings, but"
      f" {NO_TEXT}: sample.interpolate needs none on it",
      f"{TEXTUAL}:33: stages.interpolate.prompt_embeds: {NO_TEXT}: prompt_embeds would be"
      " ignored (disconnect it)",
      f"{TEXTUAL}:34: stages.interpolate.negative_embeds: {NO_TEXT}: negative_embeds would be"
      " ignored (disconnect it)"]),
]  # fmt: skip


@pytest.mark.parametrize("recipe, expected", [case[1:] for case in MISUSES],
                         ids=[case[0] for case in MISUSES])  # fmt: skip
def test_what_a_pixel_model_cannot_take_is_refused_by_validate_one_line_each(
    recipe, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from editflow.cli import main

    path, args = recipe(tmp_path)
    code = main(["validate", str(path), "--cache", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == expected


def test_a_ranked_negative_prompt_and_guidance_scale_are_accepted_on_a_pixel_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """CLIP ranking scores against the negative prompt too; CFG's scale has no second
    branch to scale on an unconditional model and is left as it is."""
    from editflow.cli import main

    args = ["--set", 'stages.interpolate.variant="quality"',
            "--set", 'stages.interpolate.positive_prompt="a motorcycle"',
            "--set", 'stages.interpolate.negative_prompt="blurry"',
            "--set", "stages.interpolate.guidance_scale=3.0"]  # fmt: skip
    assert main(["validate", str(PIXEL), "--cache", str(tmp_path / "c"), *args]) == 0
    assert capsys.readouterr().err == ""
