"""figure.grid and figure.animation hand out what their exports show, and the cache keeps it
as uint8: the PNG's or the GIF's pixels, read back as the very same floats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editflow.cache import Cache
from editflow.files.outputs import export_images
from editflow.stages.base import StageContext
from editflow.stages.images import image_grid, to_uint8
from editflow.stages.io.figure import (
    AnimationParams,
    FigureAnimation,
    FigureGrid,
    FigureParams,
    as_shown,
)

CTX = StageContext("figure", 0, torch.device("cpu"), torch.float32)


def _images(count: int, size: int = 24) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(count))


def _cached(value: torch.Tensor, tmp_path: Path) -> tuple[torch.Tensor, object]:
    cache = Cache(tmp_path / "cache")
    entry = cache.put("f1" * 32, {"image": value}, {})
    return Cache(tmp_path / "cache").get("f1" * 32).tensor("image"), entry.arrays["image"]


def test_as_shown_is_the_export_quantisation_and_leaves_grid_values_bit_for_bit() -> None:
    images = _images(2)
    shown = as_shown(images)
    assert shown.dtype == torch.float32
    assert torch.equal(to_uint8(shown), to_uint8(images))
    assert torch.equal(as_shown(shown).view(torch.int32), shown.view(torch.int32))


def test_the_grid_is_the_png_and_is_cached_as_its_pixels(tmp_path: Path) -> None:
    images = [_images(1), _images(2)]
    image = FigureGrid().call(CTX, FigureParams(labels=["a", "b"]), {"images": images})["image"]
    tiles = [images[0][0], images[1][0], images[1][1]]
    drawn = image_grid(tiles, ["a", "b [0]", "b [1]"], 3)
    assert torch.equal(image.view(torch.int32), drawn.view(torch.int32)), "no value changed"
    [png] = export_images("figure", list(FigureGrid.outputs), {"image": image}, {}, tmp_path)
    with Image.open(png) as opened:
        pixels = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1)
    read, info = _cached(image, tmp_path)
    assert (info.encoding, info.nbytes) == ("pixels", image.numel())  # uint8 on disk
    assert torch.equal(read.view(torch.int32), image.view(torch.int32))
    assert torch.equal(to_uint8(read)[0], pixels)


def test_the_animation_frames_are_the_gifs_and_are_cached_as_uint8(tmp_path: Path) -> None:
    frames = _images(3)
    outputs = FigureAnimation().call(CTX, AnimationParams(), {"images": [frames]})
    animation = outputs["animation"]
    assert torch.equal(animation.view(torch.int32), as_shown(frames).view(torch.int32))
    read, info = _cached(animation, tmp_path)
    assert (info.encoding, info.nbytes) == ("pixels", animation.numel())
    assert torch.equal(read.view(torch.int32), animation.view(torch.int32))
