"""How an input image is brought to a recipe's ``size``: center-crop, pad or stretch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from editflow.files.inputs import fit


def _bands(width: int, height: int, colours: list[tuple[int, int, int]]) -> Image.Image:
    """Vertical bands of equal width, one per colour."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for index, colour in enumerate(colours):
        pixels[:, index * width // len(colours) : (index + 1) * width // len(colours)] = colour
    return Image.fromarray(pixels)


def test_center_crop_keeps_the_middle_of_a_wide_image() -> None:
    # 64x16: red | green | green | blue; the centred 16x16 lies inside the two green bands.
    image = _bands(64, 16, [(255, 0, 0), (0, 255, 0), (0, 255, 0), (0, 0, 255)])
    out = np.asarray(fit(image, (8, 8), "center-crop")).astype(int)
    assert out.shape == (8, 8, 3)
    assert np.abs(out - [0, 255, 0]).max() <= 2  # bicubic ringing at most, no red or blue


def test_pad_centres_the_image_on_black_and_keeps_its_aspect() -> None:
    image = Image.new("RGB", (32, 16), (200, 100, 50))
    out = np.asarray(fit(image, (16, 16), "pad")).astype(int)
    assert out.shape == (16, 16, 3)
    assert (out[:4] == 0).all() and (out[12:] == 0).all()  # 4 rows of black above and below
    assert np.abs(out[5:11] - [200, 100, 50]).max() <= 2
    mask = fit(Image.new("L", (32, 16), 255), (16, 16), "pad")
    assert mask.mode == "L" and np.asarray(mask)[0].max() == 0


@pytest.mark.parametrize("policy", ["center-crop", "pad", "stretch"])
def test_an_image_of_the_right_aspect_is_only_resized(policy: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((32, 16), Image.Resampling.BICUBIC)).astype(int)
    out = np.asarray(fit(image, (16, 32), policy)).astype(int)
    assert np.abs(out - expected).max() <= 1
