"""Images compared within a tolerance: how a lock checks a figure made on another platform.

Another CPU or thread count rounds float32 differently, and a diffusion loop carries that
rounding to the pixels: about one grey level here and there, PSNR far above 40 dB. A real
edit (another prompt, guidance scale or seed) moves them by tens of levels over much of the
image. The tolerance sits between the two, as image-comparison suites (matplotlib's
``compare_images``, pytest-mpl) do: an image is within it when its PSNR against the lock's
baseline is at least ``psnr`` dB and at most a fraction ``outliers`` of its pixels differ by
more than ``levels`` (of 255) in any channel. A recipe sets its own in a ``[check]`` table.

Animations (GIF) compare frame by frame; a different size or frame count is beyond any
tolerance.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence
from pydantic import Field

from editflow.documents import Table


class CheckSection(Table):
    """How exported images are compared with a lock's baselines where bytes cannot match."""

    psnr: float = Field(
        40.0, ge=0, le=200, description="An image within tolerance has at least this PSNR (dB)"
    )
    levels: int = Field(
        8, ge=0, le=255, description="A pixel may differ by up to this many levels of 255 ..."
    )
    outliers: float = Field(
        0.01, ge=0, le=1, description="... except in at most this fraction of the pixels"
    )
    numbers: float = Field(
        0.01, ge=0, le=1, description="Numbers in exported tables may differ by this fraction"
        " of their value (in SVG plots: of the plot's size)",
    )  # fmt: skip


@dataclass(frozen=True)
class ImageDifference:
    """How far an image is from its baseline."""

    max_levels: int  # the largest difference of any channel of any pixel, in levels of 255
    psnr: float  # dB over every channel of every frame; inf when identical
    beyond: float  # fraction of pixels beyond ``levels`` of the tolerance compared with
    mismatch: str | None = None  # a size or frame count that differs: beyond any tolerance

    def within(self, tolerance: CheckSection) -> bool:
        return (
            self.mismatch is None
            and self.psnr >= tolerance.psnr
            and self.beyond <= tolerance.outliers
        )

    def describe(self, tolerance: CheckSection) -> str:
        """``within tolerance (max 1 level, PSNR 79 dB)`` or ``beyond tolerance (...)``."""
        if self.mismatch is not None:
            return f"beyond tolerance ({self.mismatch})"
        if self.max_levels == 0:
            return "within tolerance (identical pixels)"
        unit = "level" if self.max_levels == 1 else "levels"
        parts = [f"max {self.max_levels} {unit}", f"PSNR {self.psnr:.0f} dB"]
        if self.beyond > 0:
            parts.insert(1, f"{_percent(self.beyond)} of pixels beyond {tolerance.levels}")
        verdict = "within" if self.within(tolerance) else "beyond"
        return f"{verdict} tolerance ({', '.join(parts)})"


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.2%}"


def frames(path: Path) -> list[np.ndarray]:
    """An image file's frames as (H, W, 3) uint8 arrays (one for a PNG)."""
    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


def pixel_digest(path: Path) -> str:
    """sha256 of an image's decoded pixels (size and frames included), blind to its
    metadata: the exported files carry their recipe, whose edits change their bytes."""
    digest = hashlib.sha256()
    for frame in frames(path):
        digest.update(f"{frame.shape}".encode())
        digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()


def compare_images(baseline: Path, image: Path, tolerance: CheckSection) -> ImageDifference:
    """How far ``image`` is from ``baseline``."""
    old, new = frames(baseline), frames(image)
    if len(old) != len(new):
        return ImageDifference(255, 0.0, 1.0, f"{len(new)} frames, the baseline {len(old)}")
    for old_frame, new_frame in zip(old, new, strict=True):
        if old_frame.shape != new_frame.shape:
            size = "x".join(map(str, new_frame.shape[1::-1]))
            other = "x".join(map(str, old_frame.shape[1::-1]))
            return ImageDifference(255, 0.0, 1.0, f"size {size}, the baseline {other}")
    difference = np.stack([_difference(a, b) for a, b in zip(old, new, strict=True)])
    squared = float(np.mean(difference.astype(np.float64) ** 2))
    psnr = math.inf if squared == 0 else 10 * math.log10(255.0**2 / squared)
    per_pixel = difference.max(axis=-1)
    beyond = float(np.mean(per_pixel > tolerance.levels))
    return ImageDifference(int(difference.max()), psnr, beyond)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)


def difference_image(baseline: Path, image: Path, tolerance: CheckSection) -> Image.Image:
    """A picture of the difference (first frame): black where equal, grey rising 32 per
    level, red where a pixel is beyond the tolerance's ``levels``."""
    old, new = frames(baseline)[0], frames(image)[0]
    if old.shape != new.shape:
        return Image.new("RGB", new.shape[1::-1], (255, 0, 0))
    per_pixel = _difference(old, new).max(axis=-1).astype(np.int32)
    grey = np.minimum(per_pixel * 32, 255).astype(np.uint8)
    picture = np.stack([grey, grey, grey], axis=-1)
    picture[per_pixel > tolerance.levels] = (255, 0, 0)
    return Image.fromarray(picture)
