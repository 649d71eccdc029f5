"""Edit-friendly and DDIM sampling composed with other methods' outputs, through the engine
(#23, "what the math allows, the engine allows"): a pix2pix-zero direction, a textual
inversion's embeddings, an inversion's own embeddings, a pixel-space model and its
DiffusionCLIP-tuned weights; and the exact line validate refuses each misuse with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import RECIPES

from editflow.cache import Cache
from editflow.cli import main
from editflow.engine.api import run_recipe

DIRECTION = RECIPES / "compose_ef_direction.toml"
EMBEDDINGS = RECIPES / "compose_ef_embeddings.toml"
PIXEL = RECIPES / "compose_ef_pixel.toml"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(recipe: Path, cache: Cache, overrides: list[str] | None = None, **kwargs):
    """Run ``recipe`` on the CPU and return (its result, {stage: latents})."""
    result = run_recipe(recipe, overrides or [], cache=cache, out_dir=None, device="cpu", **kwargs)
    latents = {
        stage: cache.get(key).tensor("latents")
        for stage, key in result.keys.items()
        if "latents" in cache.get(key).arrays
    }
    return result, latents


def test_edit_friendly_and_ddim_sampling_follow_a_pix2pix_zero_direction(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    _, along = run(DIRECTION, cache)
    zero_run, zero = run(DIRECTION, cache, ["stages.direction.multiplier=0"])
    x0 = along["encode"]
    # A zero direction at skip 0 and cfg_tar 1 is the plain empty prompt: the edit-friendly
    # invariant gives x0 back, and DDIM sampling is bit for bit the sample without it.
    assert relative(zero["edit"], x0) < 1e-5  # measured 2e-10
    assert torch.equal(zero["edit_ddim"], zero["sample_ddim"])
    assert {"invert", "invert_ddim", "sample_ddim"} <= set(zero_run.hits)
    # The cat -> dog direction moves both.
    assert along["edit"].shape == x0.shape == along["edit_ddim"].shape
    assert relative(along["edit"], x0) > 0.05  # measured 0.13
    assert relative(along["edit_ddim"], along["sample_ddim"]) > 0.01  # measured 0.59


def test_embeddings_from_other_stages_drive_edit_friendly_and_ddim_sampling(
    tmp_path: Path,
) -> None:
    _, latents = run(EMBEDDINGS, Cache(tmp_path / "cache"))
    x0 = latents["encode"]
    # The inversion's own prompt embeddings, back from the cache, retrace it exactly, and
    # sample the same as the prompt they encode.
    assert relative(latents["reconstruct"], x0) < 1e-5
    assert torch.equal(latents["sample_embeds"], latents["sample_prompt"])
    # A textual inversion's embedding (started from the same prompt) moves both samplers.
    assert latents["edit"].shape == x0.shape == latents["sample_textual"].shape
    assert relative(latents["edit"], latents["edit_prompt"]) > 0.01  # measured 0.057
    assert relative(latents["sample_textual"], latents["sample_prompt"]) > 0.01  # 0.16


def test_edit_friendly_on_a_pixel_model_is_exact_with_and_without_tuned_weights(
    tmp_path: Path,
) -> None:
    result, latents = run(PIXEL, Cache(tmp_path / "cache"))
    x0 = latents["encode"]
    assert x0.shape == (1, 3, 32, 32)
    # The method's invariant, for any weights: the model's own, and DiffusionCLIP's tuned ones
    # when the inversion ran with them too.
    assert relative(latents["reconstruct"], x0) < 1e-5
    assert relative(latents["reconstruct_tuned"], x0) < 1e-5  # measured 1e-10
    # Maps of the original model, edited by the tuned one; and DDIM sampling with the weights.
    assert relative(latents["edit"], latents["reconstruct"]) > 0.01  # measured 0.52
    assert latents["edit_ddim"].shape == x0.shape and latents["edit_ddim"].isfinite().all()
    assert "decode" in result.computed


def _pixel_with_direction(folder: Path) -> Path:
    path = folder / "pixel.toml"
    path.write_text(PIXEL.read_text() + '\n[stages.direction]\nkind = "direction.pix2pix_zero"\n'
                    'source_word = "photo"\ntarget_word = "sketch"\n')  # fmt: skip
    return path


_NO_TEXT = "has no text encoder (an unconditional UNet)"

# Each misuse refused by validate, with every line it prints.
MISUSES: list[tuple[str, Callable[[Path], Path], list[str], list[str]]] = [
    ("source prompt on a pixel model", lambda d: PIXEL,
     ["--set", 'stages.invert.source_prompt="a photo"'],
     ['--set stages.invert.source_prompt="a photo": stages.invert.source_prompt: is \'a photo\','
      f" but model 'tiny-pixel' {_NO_TEXT}: the prompt would be ignored (leave source_prompt"
      " empty)"]),
    ("target prompt on a pixel model", lambda d: PIXEL,
     ["--set", 'stages.reconstruct.target_prompt="a sketch"'],
     ['--set stages.reconstruct.target_prompt="a sketch": stages.reconstruct.target_prompt: is'
      f" 'a sketch', but model 'tiny-pixel' {_NO_TEXT}: the prompt would be ignored (leave"
      " target_prompt empty)"]),
    ("prompt_embeds on a pixel model", lambda d: PIXEL,
     ["--set", "stages.reconstruct.prompt_embeds=invert.prompt_embeds"],
     ["--set stages.reconstruct.prompt_embeds=invert.prompt_embeds:"
      f" stages.reconstruct.prompt_embeds: model 'tiny-pixel' {_NO_TEXT}: prompt_embeds would be"
      " ignored (disconnect it)"]),
    ("direction on a pixel model", _pixel_with_direction,
     ["--set", "stages.edit.direction=direction.direction"],
     ["{f}:105: stages.direction: direction.pix2pix_zero works with text embeddings, but model"
      f" 'tiny-pixel' {_NO_TEXT}",
      "--set stages.edit.direction=direction.direction: stages.edit.direction: model"
      f" 'tiny-pixel' {_NO_TEXT}: direction would be ignored (disconnect it)"]),
    ("sample.ddim prompt on a pixel model", lambda d: PIXEL,
     ["--set", 'stages.edit_ddim.prompt="a sketch"'],
     ['--set stages.edit_ddim.prompt="a sketch": stages.edit_ddim.prompt: is \'a sketch\', but'
      f" model 'tiny-pixel' {_NO_TEXT}: the prompt would be ignored (leave prompt empty)"]),
    ("invert.ddim negative prompt on a pixel model", lambda d: PIXEL,
     ["--set", 'stages.invert_ddim.negative_prompt="blurry"'],
     ['--set stages.invert_ddim.negative_prompt="blurry": stages.invert_ddim.negative_prompt: is'
      f" 'blurry', but model 'tiny-pixel' {_NO_TEXT}: the prompt would be ignored (leave"
      " negative_prompt empty)"]),
    ("two tuned models for one inversion", lambda d: PIXEL,
     ["--set", 'stages.invert_tuned.weights=["finetune.weights", "finetune.weights"]'],
     ['--set stages.invert_tuned.weights=["finetune.weights", "finetune.weights"]:'
      " stages.invert_tuned.weights: has 2 references, but the inversion runs one tuned model"
      " (give one; sample.edit_friendly mixes several by its ratio)"]),
    ("target prompt and prompt_embeds", lambda d: EMBEDDINGS,
     ["--set", 'stages.reconstruct.target_prompt="a cat"'],
     ['--set stages.reconstruct.target_prompt="a cat": stages.reconstruct.target_prompt: is'
      " 'a cat', but prompt_embeds is connected and replaces it (leave target_prompt empty or"
      " disconnect prompt_embeds)"]),
    ("sample.ddim prompt and prompt_embeds", lambda d: EMBEDDINGS,
     ["--set", 'stages.sample_textual.prompt="a cat"'],
     ['--set stages.sample_textual.prompt="a cat": stages.sample_textual.prompt: is \'a cat\','
      " but prompt_embeds is connected and replaces it (leave prompt empty or disconnect"
      " prompt_embeds)"]),
]  # fmt: skip


@pytest.mark.parametrize("recipe, args, expected", [case[1:] for case in MISUSES],
                         ids=[case[0] for case in MISUSES])  # fmt: skip
def test_text_a_sampler_cannot_use_is_refused_by_validate_in_located_lines(
    recipe: Callable[[Path], Path],
    args: list[str],
    expected: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    path = recipe(tmp_path)
    code = main(["validate", str(path), "--cache", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [line.format(f=path) for line in expected]


def test_the_composed_recipes_validate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for recipe in (DIRECTION, EMBEDDINGS, PIXEL):
        assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().err == ""
