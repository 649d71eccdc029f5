"""caption.blip: BLIP captions on the tiny captioner, equal to a plain transformers call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import MANIFESTS
from transformers import BlipForConditionalGeneration, BlipProcessor

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.errors import EditflowError
from editflow.files.inputs import load_input
from editflow.models import Captioner, ModelRegistry
from editflow.models.tiny import ensure_tiny
from editflow.stages import StageContext
from editflow.stages.diffusion import encode_prompts
from editflow.stages.io.caption import CaptionBlip, caption_images

RECIPE = MANIFESTS / "pix2pix_zero" / "cat2dog.toml"


@pytest.fixture
def photo(tmp_path: Path) -> torch.Tensor:
    plan = plan_recipe(RECIPE, cache=Cache(tmp_path / "c"))
    return load_input(plan.inputs["photo"])


def test_tiny_captions_are_deterministic_and_equal_a_plain_transformers_call(
    photo: torch.Tensor, models_dir: Path
) -> None:
    folder = ensure_tiny(models_dir) / "captioner"
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    ours = caption_images(model, processor, photo, max_new_tokens=12)
    assert ours == caption_images(model, processor, photo, max_new_tokens=12)

    pixels = (photo[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    batch = processor(images=[pixels], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=12, do_sample=False, num_beams=1)
    theirs = processor.batch_decode(tokens, skip_special_tokens=True)
    assert ours == [text.strip() for text in theirs]
    assert isinstance(ours[0], str) and ours[0]


class _NoModels:
    scheduler_config: dict = {}

    def get(self, component: str) -> None:
        raise AssertionError(f"loaded {component}")


def test_a_given_caption_is_passed_through_without_loading_anything(photo: torch.Tensor) -> None:
    ctx = StageContext("caption", 0, torch.device("cpu"), torch.float32, models=_NoModels())
    params = CaptionBlip.params(caption="a photo of a cat")
    assert CaptionBlip().call(ctx, params, {"images": photo}) == {"caption": "a photo of a cat"}


class _TinyCaptioner:
    """Model parts holding only tiny's captioner, loaded from its folder."""

    scheduler_config: dict = {}

    def __init__(self, folder: Path) -> None:
        model = BlipForConditionalGeneration.from_pretrained(folder).eval()
        self.captioner = Captioner(model, BlipProcessor.from_pretrained(folder))

    def get(self, component: str) -> Captioner:
        assert component == "captioner"
        return self.captioner


def test_the_longest_caption_fits_the_captioners_positions(
    photo: torch.Tensor, models_dir: Path
) -> None:
    models = _TinyCaptioner(ensure_tiny(models_dir) / "captioner")
    limit = models.captioner.model.config.text_config.max_position_embeddings
    ctx = StageContext("caption", 0, torch.device("cpu"), torch.float32, models=models)
    for prompt in ("", "a photo of a"):
        params = CaptionBlip.params(max_new_tokens=77, prompt=prompt)
        caption = CaptionBlip().call(ctx, params, {"images": photo})["caption"]
        assert isinstance(caption, str) and caption.startswith(prompt)

    too_long = CaptionBlip.params(prompt=" ".join(["cat"] * limit))
    with pytest.raises(EditflowError) as error:
        CaptionBlip().call(ctx, too_long, {"images": photo})
    assert str(error.value) == (
        f"stages.caption.prompt: the prompt takes all {limit + 1} of the captioner's text "
        "positions (shorten the prompt)"
    )


def test_the_caption_conditions_the_inversion(tmp_path: Path, models_dir: Path) -> None:
    cache = Cache(tmp_path / "cache")
    overrides = ["stages.invert.num_inference_steps=2", "stages.invert.regularize=false"]
    result = run_recipe(
        RECIPE, overrides, cache=cache, out_dir=None, device="cpu", targets=["invert"]
    )
    assert result.computed == ["caption", "encode", "invert"]
    caption = cache.get(result.keys["caption"]).attrs["texts"]["caption"]
    embeds = cache.get(result.keys["invert"]).tensor("prompt_embeds")
    plan = plan_recipe(RECIPE, overrides, cache=cache)
    registry = ModelRegistry(
        plan.models["model.id"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        models_dir=models_dir,
    )
    expected = encode_prompts(registry.get("tokenizer"), registry.get("text_encoder"), [caption])
    assert torch.equal(embeds, expected)


def test_a_given_caption_needs_no_captioner_on_disk(tmp_path: Path) -> None:
    overrides = ['stages.caption.caption="a photo of a cat"', "model.captioner=nobody/no-such-blip"]
    plan = plan_recipe(RECIPE, overrides, cache=Cache(tmp_path / "c"))  # no error: not resolved
    assert "model.captioner" not in plan.models
    assert plan.stages["caption"].preimage["models"] is None
    result = run_recipe(
        RECIPE, overrides, cache=Cache(tmp_path / "c"), out_dir=None, device="cpu",
        targets=["caption"],
    )  # fmt: skip
    assert result.computed == ["caption"] and result.registry is None
