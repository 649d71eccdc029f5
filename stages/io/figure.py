"""Stages ``figure.grid`` and ``figure.animation``: a labelled grid of images (the figure a
recipe regenerates) and an animated GIF.

Their images are what the export shows, to the bit: float32 ``k / 255`` with ``k`` the 8-bit
value the PNG holds or the GIF is made from (:func:`as_shown`). The cache stores such an
array as its uint8 codes ``k``, a quarter of float32's bytes, and reads back these very
floats (``cache.dtypes.pixel_codes``): a figure is cached as its pixels.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field

from editflow.errors import Problem
from editflow.lazy import lazy
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.images import image_grid, to_uint8

torch = lazy("torch")
F = lazy("torch.nn.functional")

# The fields a caption may hold, each with an optional format spec: ``{t:.2f}``. Nothing
# else in braces is touched, so a caption without these reads as it always did.
CAPTION_FIELD = re.compile(r"\{(i|n|t|score)(?::([^{}]*))?\}")
FIELD_FORMATS = {"i": "d", "n": "d", "t": ".3g", "score": ".3f"}


def as_shown(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as their 8-bit export shows them: ``to_uint8(images) / 255`` in
    float32, on the CPU. Exporting them again gives the same pixels; on the grid already
    (an image from a PNG), they are returned unchanged, bit for bit."""
    return to_uint8(images).cpu().float().div(255)


class FigureParams(Params):
    labels: list[str] | None = Field(
        None,
        description="One caption per reference (default: the references themselves); {i},"
        " {n}, {t} (i / (n - 1), an interpolation's frame position) and {score} are each"
        " image's, e.g. 't = {t}'",
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
    inputs = (
        Port("images", ArtifactType.IMAGE, "Images to show, in order", many=True),
        Port(
            "scores",
            ArtifactType.SCORES,
            "Scores of the last images shown, in order (a rank.clip's): each caption gets its"
            " score, the best is framed and marked (best)",
            optional=True,
        ),
    )
    outputs = (Port("image", ArtifactType.IMAGE, "The figure, (1, 3, H, W)", export=True),)

    @classmethod
    def check(cls, params: FigureParams, view: CheckView) -> list[Problem]:
        images = view.references.get("images", [])
        if params.labels is not None and len(params.labels) != len(images):
            return [
                Problem(f"labels has {len(params.labels)} entries but images has {len(images)}")
            ]
        scored = any("{score" in label for label in params.labels or [])
        if scored and not view.references.get("scores"):
            return [Problem("a caption shows {score} but no scores are connected", key="labels")]
        return []

    def run(
        self,
        ctx: StageContext,
        params: FigureParams,
        *,
        images: list[torch.Tensor],
        scores: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        labels = list(params.labels or ctx.references.get("images", []))
        tiles, places = [], []
        for batch, label in zip(images, labels, strict=True):
            for index, image in enumerate(batch):
                tiles.append(image)
                places.append((label, index, len(batch)))
        tile_scores = scores_of_tiles(scores, len(tiles))
        best = best_tile(tile_scores)
        tile_labels = [
            caption(label, index, count, tile_scores[number], number == best)
            for number, (label, index, count) in enumerate(places)
        ]
        columns = params.columns or len(tiles)
        grid = image_grid(tiles, tile_labels, columns, params.tile_size, marked=best)
        # image_grid draws on an 8-bit canvas: its figure is on the grid already (as_shown
        # changes no bit of it, so the version stays); said here, so it stays that way.
        return {"image": as_shown(grid)}


def scores_of_tiles(scores: torch.Tensor | None, count: int) -> list[float | None]:
    """Each tile's score: ``scores`` belong to the last tiles (a figure shows its inputs
    first, then what was ranked); None where there is none or it is NaN (not ranked)."""
    if scores is None:
        return [None] * count
    values = [float(value) for value in scores.flatten()]
    if len(values) > count:
        raise ValueError(f"scores has {len(values)} values but the figure shows {count} images")
    padded = [None] * (count - len(values)) + values
    return [None if value is None or math.isnan(value) else value for value in padded]


def best_tile(scores: list[float | None]) -> int | None:
    """The tile with the highest score (the first of equals), or None without scores."""
    ranked = [(value, -number) for number, value in enumerate(scores) if value is not None]
    return -max(ranked)[1] if ranked else None


def caption(label: str, index: int, count: int, score: float | None, best: bool) -> str:
    """An image's caption: the label with its fields filled in (``{i}``, ``{n}``, ``{t}`` =
    i / (n - 1), ``{score}``); without fields, ``label [i]`` in a batch of several, as
    before. A scored image's caption ends with its score unless the label places it, and
    the best one's with ``(best)``."""
    values = {"i": index, "n": count, "t": index / (count - 1) if count > 1 else 0.0}
    if score is not None:
        values["score"] = score

    def filled(match: re.Match[str]) -> str:
        name, spec = match.group(1), match.group(2)
        if name not in values:
            return ""
        return format(values[name], spec if spec is not None else FIELD_FORMATS[name])

    if CAPTION_FIELD.search(label):
        text = CAPTION_FIELD.sub(filled, label)
    else:
        text = label if count == 1 else f"{label} [{index}]"
    if score is not None and "{score" not in label:
        text += f": {score:.3f}"
    return f"{text} (best)" if best else text


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
    version = "2"  # 2: frames as the GIF shows them (8-bit values), cached as uint8
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
        frames = as_shown(torch.cat([batch.float() for batch in images]))
        if params.bounce and len(frames) > 2:
            frames = torch.cat([frames, frames[1:-1].flip(0)])
        durations = torch.full((len(frames),), float(params.frame_duration))
        durations[0] *= params.hold_ends
        if not params.bounce:  # bouncing, the last input frame sits in the middle of the loop
            durations[-1] *= params.hold_ends
        else:
            durations[len(frames) // 2] *= params.hold_ends
        return {"animation": frames, "durations": durations}
