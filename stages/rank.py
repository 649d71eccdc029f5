"""The ``rank`` family: score images against prompts and keep the best.

``rank.clip`` scores every image by ``cos(image, positive) - cos(image, negative)`` in CLIP's
embedding space (Radford et al. 2021), with CLIP's own preprocessing: resize, centre crop
and normalisation (the released interpolation code skips the normalisation). It is the
ranking image interpolation uses for its candidates, and it scores any images: the edits
of a recipe, a sweep's points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from editflow.lazy import lazy, no_grad
from editflow.models import specs
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind

torch = lazy("torch")
F = lazy("torch.nn.functional")


@no_grad
def clip_scores(
    model: Any, processor: Any, images: torch.Tensor, positive: str, negative: str = ""
) -> torch.Tensor:
    """CLIP ranking score ``cos(image, positive) - cos(image, negative)`` per image.

    Args:
        model: A transformers ``CLIPModel``.
        processor: Its ``CLIPProcessor`` (resize, centre crop, normalise; tokenizer).
        images: (N, 3, H, W) in [0, 1].
        positive: The prompt images should match.
        negative: The prompt they should not.

    Returns:
        (N,) float32 scores on the CPU.
    """
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = [image.permute(1, 2, 0).cpu().numpy() for image in pixels]
    batch = processor(images=arrays, text=[positive, negative], padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    image_features = model.get_image_features(
        pixel_values=batch["pixel_values"].to(device, model.dtype)
    )
    text_features = model.get_text_features(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    image_features = projected(image_features)
    text_features = projected(text_features)
    cosine = (
        F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    )
    return (cosine[:, 0] - cosine[:, 1]).cpu()


def projected(output: Any) -> torch.Tensor:
    """The projected embeddings of a CLIP ``get_*_features`` call."""
    # transformers 5 returns a model output with the projected embeddings in pooler_output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class RankClipParams(Params):
    positive_prompt: str = Field(description="What the best image shows")
    negative_prompt: str = Field("", description="What it should not show")


class RankClip(StageKind):
    """Score images with CLIP against a positive and a negative prompt; keep the best."""

    kind = "rank.clip"
    version = "1"
    description = "CLIP scores cos(image, positive) - cos(image, negative), and the best image"
    params = RankClipParams
    inputs = (
        Port(
            "images",
            ArtifactType.IMAGE,
            "Images to rank (every image of every reference)",
            many=True,
        ),
    )
    outputs = (
        Port("scores", ArtifactType.SCORES, "One score per image, in input order"),
        Port("best", ArtifactType.IMAGE, "The highest-scoring image", export=True),
    )
    components = (specs.CLIP,)

    def run(
        self, ctx: StageContext, params: RankClipParams, *, images: Sequence[torch.Tensor]
    ) -> dict[str, Any]:
        clip = ctx.models.get("clip")
        batch = torch.cat([image.float() for image in images])
        scores = clip_scores(
            clip.model, clip.processor, batch, params.positive_prompt, params.negative_prompt
        )
        return {"scores": scores, "best": batch[int(scores.argmax())][None]}
