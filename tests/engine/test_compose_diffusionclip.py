"""DiffusionCLIP composed on the latent model ``tiny``: encode.vae -> invert.ddim with t0 ->
finetune.diffusionclip -> sample.ddim with the tuned weights, and what validate refuses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from support import MANIFESTS, RECIPES

from editflow.cache import Cache
from editflow.cache.artifacts import read_outputs
from editflow.cli import main
from editflow.engine.api import run_recipe
from editflow.errors import EditflowError
from editflow.models.tiny import ensure_tiny

LATENT = RECIPES / "compose_dclip_latent.toml"
PIXEL = MANIFESTS / "diffusionclip" / "finetune.toml"


def _losses(cache: Cache, overrides: list[str]) -> torch.Tensor:
    result = run_recipe(LATENT, overrides, cache=cache, out_dir=None, device="cpu",
                        targets=["finetune"])  # fmt: skip
    return cache.get(result.keys["finetune"]).tensor("losses")


@pytest.mark.parametrize("mode", ["full", "light"])
def test_a_latent_unet_is_tuned_and_its_weights_drive_sample_ddim(
    tmp_path: Path, models_dir: Path, mode: str
) -> None:
    cache = Cache(tmp_path / "c")
    result = run_recipe(LATENT, [f'stages.finetune.mode="{mode}"'], cache=cache, out_dir=None,
                        device="cpu")  # fmt: skip
    assert "finetune" in result.computed
    losses = cache.get(result.keys["finetune"]).tensor("losses")
    # One step per image (full), or one per generation step and image (light).
    assert len(losses) == 2 * (1 if mode == "full" else 3)
    assert bool(torch.isfinite(losses).all())

    weights = read_outputs(cache, cache.get(result.keys["finetune"]), {"weights": "tensors"})
    tuned = weights["weights"]
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny(models_dir) / "unet")
    original = unet.state_dict()
    assert sorted(tuned) == sorted(original)  # the UNet's parameters, and only the UNet's
    assert all(bool(torch.isfinite(value).all()) for value in tuned.values())
    assert any(not torch.equal(tuned[name], original[name]) for name in original)

    def latents(stage: str) -> torch.Tensor:
        return cache.get(result.keys[stage]).tensor("latents")

    # Mixing: ratio 0 is the original model exactly; ratio 1 (the default) the tuned one.
    assert torch.equal(latents("edit_0"), latents("reconstruct"))
    assert float((latents("edit") - latents("reconstruct")).abs().max()) > 1e-3


def test_the_prompt_and_the_template_set_reach_the_latent_fine_tune(tmp_path: Path) -> None:
    """The first loss is taken before any update, on the original model's generation: the
    prompt changes that generation, the template set the text direction."""
    cache = Cache(tmp_path / "c")
    first = {
        name: float(_losses(cache, overrides)[0])
        for name, overrides in {
            "default": [],
            "prompt": ['stages.finetune.prompt="a photo"'],
            "imagenet-80": ['stages.finetune.templates="imagenet-80"'],
        }.items()
    }
    assert all(math.isfinite(value) for value in first.values())
    assert first["prompt"] != first["default"]
    assert first["imagenet-80"] != first["default"]


def test_checkpointing_the_chain_and_the_vae_decoder_changes_no_loss(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    checkpointed = _losses(cache, [])
    plain = _losses(cache, ["stages.finetune.checkpointing=false"])
    assert checkpointed[0] == plain[0]  # before any update: the same forward pass
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=0.0)


def test_training_images_of_two_sizes_are_refused_when_they_arrive(tmp_path: Path) -> None:
    """The plan knows the size of a list's first image only."""
    with pytest.raises(
        EditflowError,
        match=r"stages\.finetune\.latents: holds x0 of 2 sizes"
        r" \(h, w\) \[\(4, 4\), \(8, 8\)\]: the training images are batched",
    ):
        _losses(Cache(tmp_path / "c"), ["inputs.astronaut.size=[64, 64]"])


def test_what_cannot_be_tuned_is_refused_at_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def errors(recipe: Path, *overrides: str) -> list[str]:
        argv = ["validate", str(recipe), "--cache", str(tmp_path / "c")]
        assert main([*argv, *(arg for o in overrides for arg in ("--set", o))]) == 2
        return capsys.readouterr().err.strip().splitlines()

    # A pixel-space model has no text encoder to condition on.
    assert errors(PIXEL, 'stages.finetune.prompt="a cat"') == [
        "--set stages.finetune.prompt=\"a cat\": stages.finetune.prompt: model 'tiny-pixel'"
        " denoises pixels unconditionally and takes no text: leave prompt empty"
    ]
    # An inpainting UNet needs a mask and a masked image besides the latents.
    assert (
        f"{LATENT}:42: stages.finetune: model 'tiny-inpaint' has a UNet of 9 input channels"
        " for 4-channel latents (an inpainting model): DiffusionCLIP tunes a UNet that"
        " denoises the latents alone"
    ) in errors(LATENT, 'model.id="tiny-inpaint"')
    assert errors(LATENT, 'stages.finetune.templates="imagenet-81"') == [
        '--set stages.finetune.templates="imagenet-81": stages.finetune.templates: must be one'
        " of 'editflow-16' or 'imagenet-80', got 'imagenet-81'"
    ]
    # A prompt on a latent model is what it is for.
    code = main(["validate", str(LATENT), "--cache", str(tmp_path / "c"), "--set",
                 'stages.finetune.prompt="a photo"'])  # fmt: skip
    assert code == 0
    assert not (tmp_path / "c").exists()
