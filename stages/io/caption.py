"""Stage ``caption.blip``: describe an image with BLIP (pix2pix-zero's source prompt).

pix2pix-zero (Parmar et al. 2023, Sec. 3) inverts the image conditioned on a caption so
that no prompt has to be written by hand. editflow captions with greedy decoding, so a
caption is a deterministic function of the image and the captioner's weights. A recipe may
give the caption instead; then no captioner is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy, no_grad
from editflow.models import providers, specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.images import to_uint8

torch = lazy("torch")


@no_grad
def caption_images(
    model: Any,
    processor: Any,
    images: torch.Tensor,
    max_new_tokens: int = 20,
    prompt: str = "",
) -> list[str]:
    """Caption images with a BLIP captioning model (Li et al. 2022), greedy decoding.

    Args:
        model: A ``BlipForConditionalGeneration``.
        processor: Its ``BlipProcessor`` (CLIP-style resizing and normalisation).
        images: (N, 3, H, W) in [0, 1].
        max_new_tokens: Longest caption, in tokens; cut to the room the text decoder's
            position embeddings leave after the prompt (tiny's BLIP has 64 positions).
        prompt: Optional start of the caption (conditional captioning), e.g. "a photo of".

    Returns:
        One caption per image, without special tokens.

    Raises:
        ValueError: The prompt leaves no position for the caption.
    """
    pixels = to_uint8(images)
    arrays = [image.permute(1, 2, 0).cpu().numpy() for image in pixels]
    text = [prompt] * len(arrays) if prompt else None
    batch = processor(images=arrays, text=text, return_tensors="pt")
    batch = {name: value.to(model.device) for name, value in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    # BLIP's generate starts from the decoder's BOS token plus the prompt without its [SEP];
    # decoding past the last position embedding fails with an IndexError.
    start = batch["input_ids"].shape[1] - 1 if "input_ids" in batch else 1
    room = model.config.text_config.max_position_embeddings - start
    if room < 1:
        raise ValueError(f"the prompt takes all {start} of the captioner's text positions")
    tokens = model.generate(
        **batch, max_new_tokens=min(max_new_tokens, room), do_sample=False, num_beams=1
    )
    return [caption.strip() for caption in processor.batch_decode(tokens, skip_special_tokens=True)]


class CaptionParams(Params):
    caption: str | None = Field(
        None, description="Use this caption instead of running the captioner"
    )
    max_new_tokens: int = Field(20, ge=1, le=77, description="Longest caption, in tokens")
    prompt: str = Field("", description="Start of the caption (conditional captioning)")


class CaptionBlip(StageKind):
    kind = "caption.blip"
    version = "1"
    description = "Caption the image with BLIP (the recipe's model.captioner), or pass one through"
    params = CaptionParams
    inputs = (Port("images", ArtifactType.IMAGE, "The image to describe, (1, 3, H, W)"),)
    outputs = (Port("caption", ArtifactType.TEXT, "The caption"),)
    components = (specs.CAPTIONER,)

    @classmethod
    def component_specs(
        cls, params: CaptionParams, references: Mapping[str, Any] | None = None
    ) -> tuple[specs.ComponentSpec, ...]:
        return () if params.caption is not None else cls.components

    @classmethod
    def check(cls, params: CaptionParams, view: CheckView) -> list[Problem]:
        captioner = view.models.get(specs.CAPTIONER.provider)
        if params.caption is not None or not params.prompt or captioner is None:
            return []
        positions = providers.CAPTIONER.text_positions(captioner)
        # The tokenizer's files, no weights.
        taken = providers.CAPTIONER.prompt_tokens(captioner, params.prompt)
        if positions is not None and taken is not None and taken >= positions:
            message = f"the prompt takes all {taken} of the captioner's text positions"
            return [Problem(message + ": shorten the prompt", key="prompt")]
        return []

    def run(
        self, ctx: StageContext, params: CaptionParams, *, images: torch.Tensor
    ) -> dict[str, Any]:
        if params.caption is not None:
            return {"caption": params.caption}  # nothing is loaded
        captioner = ctx.models.get("captioner")
        # The first image's caption: pix2pix-zero inverts one image per recipe stage.
        try:
            captions = caption_images(
                captioner.model, captioner.processor, images[:1], params.max_new_tokens,
                params.prompt,
            )  # fmt: skip
        except ValueError as error:
            raise EditflowError(
                str(error), key=f"stages.{ctx.name}.prompt", hint="shorten the prompt"
            ) from None
        return {"caption": captions[0]}
