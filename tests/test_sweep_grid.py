"""The sweep's X/Y/Z plot: the chosen output tiled under its headers (X across, Y down, one
block per Z value), the index beside it, and figure captions that follow the values."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_repro import RECIPE

from editflow.cache import Cache
from editflow.cli import main
from editflow.cli.sweep_grid import font_size, header_font, text_image
from editflow.cli.sweeps import run_sweep, table_axes
from editflow.documents import read_document
from editflow.engine.events import CollectEvents
from editflow.files.inputs import skimage_photos
from editflow.stages.base import StageContext
from editflow.stages.images import MARK_COLOUR, image_grid
from editflow.stages.io.figure import FigureGrid, FigureParams, caption

SMALL = RECIPE.replace("size = [64, 64]", "size = [32, 32]").replace(
    "num_inference_steps = 4", "num_inference_steps = 3"
)
XYZ = """
[sweep]
"stages.edit.target_prompt" = ["a dog", "a fox"]
"stages.edit.skip" = "range(0, 2)"
"stages.edit.cfg_tar" = "linspace(3.5, 7.5, 2)"

[sweep.grid]
image = "figure.images"
x = "edit.skip"
y = "stages.edit.cfg_tar"
"""


def _recipe(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(skimage_photos()["chelsea"], folder / "photo.png")
    (folder / "edit.toml").write_text(text)
    return folder / "edit.toml"


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_a_2x2x2_sweep_tiles_the_chosen_output_under_x_y_and_z_headers(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "recipe", SMALL + XYZ)
    out, events = tmp_path / "out", CollectEvents()
    axes = table_axes(read_document(recipe)[0])
    result = run_sweep(recipe, axes, cache=Cache(tmp_path / "c"), out_root=out, device="cpu",
                       events=events)  # fmt: skip
    layout = result.layout
    # The headers: per Z block its title, then X across, then Y down.
    texts = [" ".join(text.split()) for text, _ in layout.headers]
    block = ["edit.skip = 0", "edit.skip = 1", "edit.cfg_tar = 3.5", "edit.cfg_tar = 7.5"]
    assert texts == ["edit.target_prompt = a dog", *block, "edit.target_prompt = a fox", *block]
    with Image.open(result.grid) as opened:
        grid = opened.convert("RGB")
    assert grid.size == layout.size
    size = font_size(32)
    for number, (text, box) in enumerate(layout.headers):
        font = header_font(size, bold=number % 5 == 0)  # block titles are bold
        drawn = _pixels(grid.crop(box))
        assert np.array_equal(drawn, _pixels(text_image(text, font))), text
        assert (drawn < 128).any(), f"{text!r} is blank"
    # Each tile is the point's decoded image, pixel for pixel, at its row and column.
    assert len(layout.tiles) == len(result.points) == 8
    for point, (left, top, width, height) in zip(result.points, layout.tiles, strict=True):
        with Image.open(out / point.name / "figure.png") as image:
            assert (width, height) == image.size == (32, 32)
            assert np.array_equal(_pixels(grid.crop((left, top, left + width, top + height))),
                                  _pixels(image))  # fmt: skip
    # Points go prompt (Z) slowest, then skip (X), then cfg_tar (Y).
    lefts = [tile[0] for tile in layout.tiles]
    tops = [tile[1] for tile in layout.tiles]
    assert lefts[:4] == [lefts[0]] * 2 + [lefts[2]] * 2 and lefts[0] < lefts[2]
    assert lefts[4:] == lefts[:4] and tops[0] < tops[1] and tops[0] == tops[2]
    assert tops[4] > tops[3] and tops[5] - tops[4] == tops[1] - tops[0]
    x_header, y_header = layout.headers[1][1], layout.headers[3][1]
    assert x_header[3] <= tops[0] and x_header[0] < lefts[0] + 32 and x_header[2] > lefts[0]
    assert y_header[2] <= lefts[0] and y_header[1] < tops[0] + 32 and y_header[3] > tops[0]
    # The index beside the grid: folders, values, keys, seconds, tiles; the same in CSV.
    index = json.loads((out / "sweep.json").read_text())
    assert [axis["key"] for axis in index["axes"]] == [
        "stages.edit.target_prompt", "stages.edit.skip", "stages.edit.cfg_tar"]  # fmt: skip
    assert index["axes"][1]["values"] == [0, 1] and index["axes"][2]["values"] == [3.5, 7.5]
    for row, point, tile in zip(index["points"], result.points, layout.tiles, strict=True):
        assert row["folder"] == point.name and row["stages"] == point.keys
        assert row["values"] == dict(
            zip([a["key"] for a in index["axes"]], point.values, strict=True)
        )
        assert row["tile"] == list(tile) and row["seconds"] >= 0
    with open(out / "sweep.csv", newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["folder", "stages.edit.target_prompt", "stages.edit.skip",
                       "stages.edit.cfg_tar", "seconds", "key.encode", "key.invert", "key.edit",
                       "key.figure"]  # fmt: skip
    point = result.points[6]
    assert rows[7] == [point.name, "a fox", "1", "3.5", str(point.seconds),
                       *(point.keys[name] for name in ("encode", "invert", "edit", "figure"))]  # fmt: skip
    # Progress: each point begins ("point i/8") and ends (with its seconds).
    announced = [(e.step, e.total, e.seconds is None) for e in events.of("point")]
    assert announced == [(i, 8, begins) for i in range(1, 9) for begins in (True, False)]


def test_a_bad_grid_table_is_one_line_naming_its_key(tmp_path: Path, capsys) -> None:
    cases = {
        'image = "nope.images"': "sweep.grid.image: the recipe has no stage 'nope'",
        'image = "figure.imgs"': "sweep.grid.image: 'figure' (decode.vae) has no output 'imgs'"
        " (its outputs: images)",
        'image = "figure"': 'sweep.grid.image: expected "STAGE.OUTPUT" (for example'
        " \"decode_edit.images\"), got 'figure'",
        'x = "edit.cfg_tar"': "sweep.grid.x: 'edit.cfg_tar' is not swept (swept: stages.edit.skip)",
        'w = "edit.skip"': "sweep.grid.w: unknown key (known: image, x, y, z)",
    }
    recipe = _recipe(tmp_path / "recipe", SMALL)
    for table, expected in cases.items():
        recipe.write_text(
            SMALL + f'\n[sweep]\n"stages.edit.skip" = [1, 2]\n[sweep.grid]\n{table}\n'
        )
        assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 2, table
        assert capsys.readouterr().err.strip().splitlines()[-1] == expected


CTX = StageContext("figure", 0, torch.device("cpu"), torch.float32)


def test_captions_fill_in_the_frame_position_and_the_score() -> None:
    assert [caption("t = {t}", i, 9, None, False) for i in (0, 1, 4, 8)] == [
        "t = 0", "t = 0.125", "t = 0.5", "t = 1"]  # fmt: skip
    assert caption("{i} of {n}: {t:.2f}", 2, 3, None, False) == "2 of 3: 1.00"
    assert caption("frames", 1, 9, None, False) == "frames [1]", "no fields: as before"
    assert caption("{x} {t", 0, 1, None, False) == "{x} {t", "other braces are text"
    assert caption("path 2", 0, 1, -0.0204, True) == "path 2: -0.020 (best)"
    assert caption("p {score:+.2f}", 0, 1, 0.5, False) == "p +0.50"


def test_the_figure_marks_the_best_scored_image_and_captions_each_score() -> None:
    images = [
        torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    scores = torch.tensor([0.01, float("nan"), 0.034])  # the last three images'; NaN: not ranked
    params = FigureParams(labels=["input", "a", "b", "c"])
    figure = FigureGrid().call(CTX, params, {"images": images, "scores": scores})["image"]
    tiles = [image[0] for image in images]
    expected = image_grid(tiles, ["input", "a: 0.010", "b", "c: 0.034 (best)"], 4, marked=3)
    assert torch.equal(figure, expected)
    unmarked = image_grid(tiles, ["input", "a: 0.010", "b", "c: 0.034 (best)"], 4)
    changed = (figure != unmarked).any(dim=1)[0].nonzero()
    left = 4 + 3 * (16 + 4)  # the fourth tile's column
    assert changed[:, 1].min() == left - 3 and changed[:, 1].max() == left + 16 + 2
    frame = (figure[0, :, 4 - 3, left] * 255).round().tolist()
    assert frame == list(MARK_COLOUR)
    with pytest.raises(ValueError, match="scores has 5 values but the figure shows 4 images"):
        FigureGrid().call(CTX, params, {"images": images, "scores": torch.zeros(5)})


def test_a_score_caption_needs_scores(tmp_path: Path, capsys) -> None:
    recipe = _recipe(tmp_path / "recipe", SMALL + '\n[stages.grid]\nkind = "figure.grid"\n'
                     'images = ["figure.images"]\nlabels = ["{score}"]\n')  # fmt: skip
    assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("stages.grid.labels: a caption shows {score} but no scores are connected")
    )
