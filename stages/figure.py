"""Stage ``figure.grid``: a labelled grid of images, the figure a recipe regenerates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from editflow.lazy import lazy
from editflow.stages.base import ArtifactType, Params, Port, StageContext, StageKind

torch = lazy("torch")
F = lazy("torch.nn.functional")

LABEL_HEIGHT = 14
PADDING = 4


def to_pil(image: torch.Tensor) -> Image.Image:
    """One (3, H, W) image in [0, 1] to an 8-bit RGB PIL image (round half to even)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image to a (1, 3, H, W) float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def image_grid(
    tiles: list[torch.Tensor], labels: list[str], columns: int, tile_size: int | None = None
) -> torch.Tensor:
    """Arrange images in a grid with a caption under each.

    Args:
        tiles: Images, each (3, H, W) in [0, 1]; resized (bilinear) to the first's size or to
            ``tile_size`` (the longer side) when given.
        labels: One caption per tile ('' for none).
        columns: Tiles per row.
        tile_size: Optional display size of the longer side of every tile.

    Returns:
        (1, 3, H_grid, W_grid) in [0, 1].
    """
    height, width = tiles[0].shape[-2:]
    if tile_size is not None:
        scale = tile_size / max(height, width)
        height, width = round(height * scale), round(width * scale)
    resized = [
        F.interpolate(tile[None].float(), size=(height, width), mode="bilinear")[0]
        if tile.shape[-2:] != (height, width)
        else tile.float()
        for tile in tiles
    ]
    rows = -(-len(resized) // columns)
    cell_h, cell_w = height + LABEL_HEIGHT + PADDING, width + PADDING
    canvas = Image.new("RGB", (columns * cell_w + PADDING, rows * cell_h + PADDING), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10)
    for index, (tile, label) in enumerate(zip(resized, labels, strict=True)):
        row, column = divmod(index, columns)
        left, top = PADDING + column * cell_w, PADDING + row * cell_h
        canvas.paste(to_pil(tile), (left, top))
        draw.text((left, top + height + 1), label, fill="black", font=font)
    return from_pil(canvas)


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
    def check(
        cls, params: FigureParams, references: Mapping[str, Any], sizes: Mapping[str, Any]
    ) -> list[tuple[str | None, str]]:
        images = references.get("images", [])
        if params.labels is not None and len(params.labels) != len(images):
            return [(None, f"labels has {len(params.labels)} entries but images has {len(images)}")]
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
