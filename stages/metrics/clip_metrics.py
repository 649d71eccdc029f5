"""CLIP metrics with the recipe's CLIP (``model.clip``; Radford et al. 2021).

- ``metric.clip_score``: how well each image matches a prompt, the cosine similarity of
  their CLIP embeddings. By default in the CLIPScore convention torchmetrics uses,
  ``100 * max(cos, 0)`` (Hessel et al. 2021 weigh by 2.5 instead of 100); ``raw = true``
  gives the cosine itself, in [-1, 1].
- ``metric.clip_direction``: the directional similarity of an edit (StyleGAN-NADA,
  InstructPix2Pix, DiffusionCLIP's L_direction), the cosine between
  ``E_img(edit) - E_img(source)`` and ``E_txt(target) - E_txt(source)`` with every
  embedding unit-normalised first. NaN where the edit's embedding equals the source's.

Images go through CLIP's own processor (resize, centre crop, normalise) as 8-bit pixels,
as ``rank.clip`` scores them; the cosines are taken in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from editflow.errors import EditflowError
from editflow.lazy import lazy, no_grad
from editflow.models import specs
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind
from editflow.stages.clip import projected
from editflow.stages.images import to_uint8
from editflow.stages.metrics.common import IMAGES, OUTPUTS, metric_outputs

torch = lazy("torch")
F = lazy("torch.nn.functional")


@no_grad
def clip_embeddings(
    model: Any, processor: Any, images: torch.Tensor | None, texts: Sequence[str] = ()
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Unit-normalised CLIP embeddings of images and texts, float64 on the CPU.

    Args:
        model: A transformers ``CLIPModel``.
        processor: Its ``CLIPProcessor``.
        images: (N, 3, H, W) in [0, 1], or ``None``.
        texts: Prompts (may be empty).

    Returns:
        (N, D) image and (T, D) text embeddings (``None`` for what was not given).
    """
    device = next(model.parameters()).device
    image_embeddings = text_embeddings = None
    if images is not None:
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in to_uint8(images)]
        pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels.to(device, model.dtype))
        image_embeddings = F.normalize(projected(features).double().cpu(), dim=-1)
    if texts:
        tokens = processor(text=list(texts), padding=True, return_tensors="pt")
        features = model.get_text_features(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
        )
        text_embeddings = F.normalize(projected(features).double().cpu(), dim=-1)
    return image_embeddings, text_embeddings


def clip_score(
    image_embeddings: torch.Tensor, text_embedding: torch.Tensor, raw: bool
) -> torch.Tensor:
    """Cosine of each unit image embedding (N, D) with a unit text embedding (D,); in the
    CLIPScore convention ``100 * max(cos, 0)`` unless ``raw``."""
    cosine = image_embeddings @ text_embedding
    return cosine if raw else 100 * cosine.clamp_min(0)


def directional_similarity(
    edits: torch.Tensor, sources: torch.Tensor, target_text: torch.Tensor, source_text: torch.Tensor
) -> torch.Tensor:
    """cos(E(edit) - E(source), E(target text) - E(source text)) per edit.

    Args:
        edits: (N, D) unit image embeddings of the edits.
        sources: (N, D) or (1, D) unit image embeddings of their sources.
        target_text: (D,) unit embedding of the target prompt.
        source_text: (D,) unit embedding of the source prompt.

    Returns:
        (N,) float64 (NaN where an edit's embedding equals its source's).
    """
    image_direction = edits - sources
    text_direction = target_text - source_text
    dot = image_direction @ text_direction
    return dot / (image_direction.norm(dim=-1) * text_direction.norm())


class ClipScoreParams(Params):
    prompt: str = Field(description="What the images should show")
    raw: bool = Field(
        False, description="The cosine itself in [-1, 1] instead of 100 * max(cos, 0)"
    )


class MetricClipScore(StageKind):
    """CLIP score of images against a prompt."""

    kind = "metric.clip_score"
    version = "1"
    description = "CLIP score per image: 100 * max(cos(image, prompt), 0), or the raw cosine"
    params = ClipScoreParams
    inputs = (IMAGES,)
    outputs = OUTPUTS
    components = (specs.CLIP,)

    def run(
        self, ctx: StageContext, params: ClipScoreParams, *, images: torch.Tensor
    ) -> dict[str, Any]:
        clip = ctx.models.get("clip")
        image, text = clip_embeddings(clip.model, clip.processor, images, [params.prompt])
        return metric_outputs(clip_score(image, text[0], params.raw))


class ClipDirectionParams(Params):
    source_prompt: str = Field(description="What the source images show")
    target_prompt: str = Field(description="What the edits should show")


class MetricClipDirection(StageKind):
    """Directional CLIP similarity of edits to their sources against a text direction."""

    kind = "metric.clip_direction"
    version = "1"
    description = (
        "Directional CLIP similarity per edit: cos(E(edit) - E(source), E(target) - E(source"
        " prompt))"
    )
    params = ClipDirectionParams
    inputs = (
        IMAGES,
        Port(
            "reference",
            ArtifactType.IMAGE,
            "The source images: one for all edits, or one per edit (any size)",
        ),
    )
    outputs = OUTPUTS
    components = (specs.CLIP,)

    def run(
        self,
        ctx: StageContext,
        params: ClipDirectionParams,
        *,
        images: torch.Tensor,
        reference: torch.Tensor,
    ) -> dict[str, Any]:
        if len(reference) not in (1, len(images)):
            raise EditflowError(
                f"reference has {len(reference)} images but images has {len(images)}",
                key=f"stages.{ctx.name}.reference",
                hint="give one reference for all images, or one per image",
            )
        clip = ctx.models.get("clip")
        texts = [params.target_prompt, params.source_prompt]
        edits, text = clip_embeddings(clip.model, clip.processor, images, texts)
        sources, _ = clip_embeddings(clip.model, clip.processor, reference)
        return metric_outputs(directional_similarity(edits, sources, text[0], text[1]))
