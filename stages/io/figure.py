"""Stage ``figure.grid``: a labelled grid of images, the figure a recipe regenerates."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.images import image_grid

torch = lazy("torch")
F = lazy("torch.nn.functional")


class FigureParams(Params):
    labels: list[str] | None = Field(
        None, description="One caption per image (default: the references themselves)"
    )
    columns: int | None = Field(None, ge=1, le=64, description="Images per row (default: all)")
    tile_size: int | None = Field(
        None, ge=8, le=2048, description="Display size of each tile's longer side"
    )


class FigureGrid(StageKind):
    kind = "figure.grid"
    version = "1"
    description = "A labelled grid of images (every image of every reference, in order)"
    params = FigureParams
    inputs = (Port("images", ArtifactType.IMAGE, "Images to show, in order", many=True),)
    outputs = (Port("image", ArtifactType.IMAGE, "The figure, (1, 3, H, W)", export=True),)

    @classmethod
    def check(cls, params: FigureParams, view: CheckView) -> list[Problem]:
        images = view.references.get("images", [])
        if params.labels is not None and len(params.labels) != len(images):
            return [
                Problem(f"labels has {len(params.labels)} entries but images has {len(images)}")
            ]
        return []

    def run(
        self, ctx: StageContext, params: FigureParams, *, images: list[torch.Tensor]
    ) -> dict[str, Any]:
        labels = list(params.labels or ctx.references.get("images", []))
        tiles, tile_labels = [], []
        for batch, label in zip(images, labels, strict=True):
            for index, image in enumerate(batch):
                tiles.append(image)
                tile_labels.append(label if len(batch) == 1 else f"{label} [{index}]")
        columns = params.columns or len(tiles)
        return {"image": image_grid(tiles, tile_labels, columns, params.tile_size)}


class AnimationParams(Params):
    frame_duration: int = Field(
        125, ge=10, le=60000, description="Display time of each frame, in milliseconds"
    )
    hold_ends: int = Field(
        4, ge=1, le=100, description="The first and last frames show this many times as long"
    )
    bounce: bool = Field(False, description="Play forward then backward (a seamless loop)")


class FigureAnimation(StageKind):
    kind = "figure.animation"
    version = "1"
    description = "The images as an animated GIF that loops (every image of every reference)"
    params = AnimationParams
    inputs = (Port("images", ArtifactType.IMAGE, "Frames, in order", many=True),)
    outputs = (
        Port(
            "animation", ArtifactType.IMAGE, "The frames as shown", export=True, timing="durations"
        ),
        Port("durations", ArtifactType.SCORES, "Display time of each frame in milliseconds"),
    )

    def run(
        self, ctx: StageContext, params: AnimationParams, *, images: list[torch.Tensor]
    ) -> dict[str, Any]:
        frames = torch.cat([batch.float() for batch in images])
        if params.bounce and len(frames) > 2:
            frames = torch.cat([frames, frames[1:-1].flip(0)])
        durations = torch.full((len(frames),), float(params.frame_duration))
        durations[0] *= params.hold_ends
        if not params.bounce:  # bouncing, the last input frame sits in the middle of the loop
            durations[-1] *= params.hold_ends
        else:
            durations[len(frames) // 2] *= params.hold_ends
        return {"animation": frames, "durations": durations}
