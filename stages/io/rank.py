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

from editflow.lazy import lazy
from editflow.models import specs
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind
from editflow.stages.clip import clip_scores

torch = lazy("torch")
F = lazy("torch.nn.functional")


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
