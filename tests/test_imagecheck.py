"""Images within a tolerance: platform noise within, an edit beyond, sizes and frames exact,
PSNR from its formula, and the recipe's `[check]` table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editflow.files.inputs import skimage_photos
from editflow.imagecheck import CheckSection, compare_images, difference_image, pixel_digest

DEFAULT = CheckSection()


@pytest.fixture()
def photo() -> np.ndarray:
    with Image.open(skimage_photos()["chelsea"]) as image:
        return np.asarray(image.convert("RGB").resize((96, 64)))


def _save(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def test_one_level_of_noise_is_within_and_its_psnr_is_the_formulas(tmp_path, photo) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(-1, 2, size=photo.shape)
    noise[(photo == 0) | (photo == 255)] = 0  # no clipping: the difference is the noise
    base, noisy = _save(tmp_path / "a.png", photo), _save(tmp_path / "b.png", photo + noise)
    difference = compare_images(base, noisy, DEFAULT)
    expected_psnr = 10 * math.log10(255.0**2 / np.mean(noise.astype(np.float64) ** 2))
    assert difference.max_levels == 1 and difference.beyond == 0.0
    assert difference.psnr == pytest.approx(expected_psnr, rel=1e-12)
    assert difference.within(DEFAULT)
    assert (
        difference.describe(DEFAULT)
        == f"within tolerance (max 1 level, PSNR {expected_psnr:.0f} dB)"
    )


def test_an_edit_is_beyond_with_its_share_of_pixels(tmp_path, photo) -> None:
    edited = photo.astype(np.int16).copy()
    edited[:16] = 255 - edited[:16]  # a quarter of the rows inverted
    base, other = _save(tmp_path / "a.png", photo), _save(tmp_path / "b.png", edited)
    difference = compare_images(base, other, DEFAULT)
    per_pixel = np.abs(photo.astype(np.int16) - np.clip(edited, 0, 255)).max(axis=-1)
    assert difference.beyond == pytest.approx(np.mean(per_pixel > 8), abs=0)
    assert not difference.within(DEFAULT)
    assert difference.describe(DEFAULT).startswith(
        f"beyond tolerance (max {per_pixel.max()} levels, {np.mean(per_pixel > 8):.0%} of pixels"
        " beyond 8, PSNR "
    )


def test_identical_pixels_with_other_metadata_have_one_digest(tmp_path, photo) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("editflow:recipe", "other")
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo).save(tmp_path / "b.png", pnginfo=info)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert pixel_digest(tmp_path / "a.png") == pixel_digest(tmp_path / "b.png")
    assert compare_images(tmp_path / "a.png", tmp_path / "b.png", DEFAULT).describe(DEFAULT) == (
        "within tolerance (identical pixels)"
    )


def test_a_size_or_frame_count_that_differs_is_beyond_any_tolerance(tmp_path, photo) -> None:
    loose = CheckSection(psnr=0, levels=255, outliers=1)
    base = _save(tmp_path / "a.png", photo)
    small = _save(tmp_path / "b.png", photo[:32])
    assert compare_images(base, small, loose).describe(loose) == (
        "beyond tolerance (size 96x32, the baseline 96x64)"
    )
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "one.gif")
    assert compare_images(tmp_path / "two.gif", tmp_path / "one.gif", loose).describe(loose) == (
        "beyond tolerance (1 frames, the baseline 2)"
    )


def test_the_recipes_check_table_sets_the_tolerance(tmp_path, photo) -> None:
    shifted = np.minimum(photo.astype(np.int16) + 2, 255)  # PSNR about 20 log10(255 / 2) = 42
    base, other = _save(tmp_path / "a.png", photo), _save(tmp_path / "b.png", shifted)
    difference = compare_images(base, other, DEFAULT)
    assert difference.within(DEFAULT)
    strict = CheckSection(levels=1, outliers=0.0)
    assert not compare_images(base, other, strict).within(strict)
    assert not difference.within(CheckSection(psnr=45.0))


def test_a_recipe_check_table_is_validated_like_any_table(tmp_path) -> None:
    from editflow.engine.recipe import load_recipe
    from editflow.errors import RecipeError

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'schema_version = 1\n[check]\npsnr = 35\nlevels = 300\n[stages.e]\nkind = "encode.vae"\n'
        'images = "inputs.p"\n[inputs.p]\nimage = "skimage:chelsea"\nsize = [64, 64]\n'
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert error.value.render() == f"{recipe}:4: check.levels: must be <= 255, got 300"
    recipe.write_text(recipe.read_text().replace("levels = 300", "levels = 4"))
    assert load_recipe(recipe).recipe.check == CheckSection(psnr=35.0, levels=4)


def test_the_difference_picture_marks_pixels_beyond_in_red(tmp_path, photo) -> None:
    edited = photo.copy()
    edited[0, 0] = 255 - edited[0, 0]
    edited[0, 1] = np.clip(edited[0, 1].astype(np.int16) + 1, 0, 255)
    picture = np.asarray(
        difference_image(
            _save(tmp_path / "a.png", photo), _save(tmp_path / "b.png", edited), DEFAULT
        )
    )
    assert tuple(picture[0, 0]) == (255, 0, 0)
    assert picture[0, 1, 0] in (0, 32) and picture[1:, :].max() == 0
