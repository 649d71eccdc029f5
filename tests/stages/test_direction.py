"""pix2pix-zero edit directions: sentence banks, bank means, the stage, and diffusers' port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from editflow.errors import EditflowError
from editflow.stages.base import StageContext
from editflow.stages.diffusion import encode_prompts
from editflow.stages.pix2pix_zero.direction import (
    DeriveDirection,
    DeriveDirectionParams,
    bank_mean,
    edit_direction,
    read_sentence_file,
    sentences_for,
)


@pytest.fixture(scope="module")
def text(tiny_folder: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder").eval()
    return tokenizer, text_encoder


class TextModels:
    """The ModelComponents a direction stage needs, without the engine."""

    def __init__(self, tokenizer: Any, text_encoder: Any) -> None:
        self.parts = {"tokenizer": tokenizer, "text_encoder": text_encoder}

    def get(self, component: str) -> Any:
        return self.parts[component]

    @property
    def scheduler_config(self) -> dict[str, Any]:
        raise AssertionError("a direction stage never builds a scheduler")


def context(text) -> StageContext:
    return StageContext(
        name="direction",
        seed=0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        models=TextModels(*text),
    )


def test_built_in_banks_have_at_least_50_distinct_sentences_about_the_word():
    for word in ("cat", "dog", "owl", "horse"):
        sentences = sentences_for(word)
        assert len(set(sentences)) == len(sentences) >= 50
        assert all(word in sentence for sentence in sentences)
    assert "a photo of an owl" in sentences_for("owl")
    assert "a photo of the sea at night" in sentences_for("the sea")
    assert set(sentences_for("cat")).isdisjoint(sentences_for("dog"))


def test_sentence_file_skips_blank_lines_and_keeps_order():
    text = "a cat on a mat\n\n   \n  a cat in a hat  \r\na cat on a mat\n"
    assert read_sentence_file(text) == ["a cat on a mat", "a cat in a hat", "a cat on a mat"]


@pytest.mark.parametrize("text", ["", "\n\n", "   \n\t\n"])
def test_empty_sentence_file_is_a_clear_error(text):
    with pytest.raises(ValueError, match="no sentences: write one sentence per line"):
        read_sentence_file(text)


def test_bank_mean_equals_the_mean_of_the_full_77_token_outputs(text):
    tokenizer, text_encoder = text
    sentences = sentences_for("cat")[:37]
    by_hand = encode_prompts(tokenizer, text_encoder, sentences).mean(dim=0, keepdim=True)
    mean = bank_mean(tokenizer, text_encoder, sentences, batch_size=8)  # a ragged last batch
    assert mean.shape == (1, 77, 32)
    torch.testing.assert_close(mean, by_hand, rtol=1e-5, atol=1e-6)


def test_direction_is_target_mean_minus_source_mean(text):
    tokenizer, text_encoder = text
    source, target = ["a photo of a cat", "a cat"], ["a photo of a dog", "a dog", "dogs"]
    source_embeds = encode_prompts(tokenizer, text_encoder, source)
    target_embeds = encode_prompts(tokenizer, text_encoder, target)
    by_hand = target_embeds.mean(0, keepdim=True) - source_embeds.mean(0, keepdim=True)
    direction = edit_direction(
        bank_mean(tokenizer, text_encoder, source), bank_mean(tokenizer, text_encoder, target)
    )
    torch.testing.assert_close(direction, by_hand, rtol=1e-5, atol=1e-6)
    doubled = edit_direction(
        bank_mean(tokenizer, text_encoder, source), bank_mean(tokenizer, text_encoder, target), 2
    )
    torch.testing.assert_close(doubled, 2 * direction)


def test_bank_means_and_direction_equal_diffusers_pix2pix_zero_port(text, tiny_folder):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPix2PixZeroPipeline,
        UNet2DConditionModel,
    )

    tokenizer, text_encoder = text
    pipe = StableDiffusionPix2PixZeroPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae"),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(tiny_folder, subfolder="scheduler"),
        feature_extractor=None,
        safety_checker=None,
        inverse_scheduler=None,
        caption_generator=None,
        caption_processor=None,
        requires_safety_checker=False,
    )
    cats, dogs = sentences_for("cat")[:40], sentences_for("dog")[:40]
    source, target = (
        bank_mean(tokenizer, text_encoder, cats),
        bank_mean(tokenizer, text_encoder, dogs),
    )
    peer_source, peer_target = pipe.get_embeds(cats), pipe.get_embeds(dogs)
    torch.testing.assert_close(source, peer_source, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target, peer_target, rtol=1e-5, atol=1e-6)
    # construct_direction takes the stacked embeddings and averages them itself.
    peer_direction = pipe.construct_direction(
        encode_prompts(tokenizer, text_encoder, cats), encode_prompts(tokenizer, text_encoder, dogs)
    )
    torch.testing.assert_close(edit_direction(source, target), peer_direction, rtol=1e-5, atol=1e-6)


def test_stage_uses_built_in_banks_and_sentence_files(text):
    tokenizer, text_encoder = text
    stage = DeriveDirection()
    params = DeriveDirectionParams(source_word="cat", target_word="dog")
    out = stage.call(context(text), params, {})
    assert set(out) == {"direction", "source_mean", "target_mean"}
    torch.testing.assert_close(
        out["source_mean"], bank_mean(tokenizer, text_encoder, sentences_for("cat"))
    )
    torch.testing.assert_close(out["direction"], out["target_mean"] - out["source_mean"])

    from_file = stage.call(
        context(text),
        DeriveDirectionParams(target_word="dog", multiplier=0.5),
        {"source_sentences": "a cat\n\na photo of a cat\n"},
    )
    expected_source = bank_mean(tokenizer, text_encoder, ["a cat", "a photo of a cat"])
    torch.testing.assert_close(from_file["source_mean"], expected_source)
    torch.testing.assert_close(from_file["direction"], 0.5 * (out["target_mean"] - expected_source))


def test_stage_reports_an_empty_sentence_file_as_a_user_error(text):
    with pytest.raises(EditflowError) as error:
        DeriveDirection().call(
            context(text), DeriveDirectionParams(source_word="cat"), {"target_sentences": "\n \n"}
        )
    assert str(error.value) == (
        "stages.direction.target_sentences: the sentence file has no sentences: write one"
        " sentence per line (or leave it out to use target_word's built-in bank)"
    )


def test_stage_needs_a_word_or_a_file_for_each_side(text):
    with pytest.raises(EditflowError, match="no target sentences"):
        DeriveDirection().call(context(text), DeriveDirectionParams(source_word="cat"), {})


def test_params_refuse_equal_words():
    with pytest.raises(pydantic.ValidationError, match="direction would be zero"):
        DeriveDirectionParams(source_word="cat", target_word=" Cat ")
