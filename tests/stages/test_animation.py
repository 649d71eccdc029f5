"""figure.animation and the GIF export: frames, display times, provenance, reruns."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from editflow.files.outputs import current_exports, export_images
from editflow.stages.base import StageContext
from editflow.stages.io.figure import AnimationParams, FigureAnimation


def _animate(frames: torch.Tensor, **params) -> dict:
    ctx = StageContext("animation", 0, torch.device("cpu"), torch.float32)
    return FigureAnimation().call(ctx, AnimationParams(**params), {"images": [frames]})


def _frames(count: int) -> torch.Tensor:
    # Frame i is flat grey i / count: each frame is told apart by its first pixel.
    return torch.arange(count).float().div(count).view(count, 1, 1, 1).expand(count, 3, 16, 16)


def test_display_times_hold_the_ends_and_bouncing_plays_back() -> None:
    outputs = _animate(_frames(5), frame_duration=100, hold_ends=3)
    assert outputs["durations"].tolist() == [300, 100, 100, 100, 300]
    bounced = _animate(_frames(5), frame_duration=100, hold_ends=3, bounce=True)
    order = (bounced["animation"][:, 0, 0, 0] * 5).round().tolist()
    assert order == [0, 1, 2, 3, 4, 3, 2, 1]
    assert bounced["durations"].tolist() == [300, 100, 100, 100, 300, 100, 100, 100]


def test_the_gif_holds_every_frame_with_its_time_and_the_provenance(tmp_path: Path) -> None:
    outputs = _animate(_frames(5), frame_duration=100, hold_ends=2)
    ports = list(FigureAnimation.outputs[:1])
    provenance = {"editflow:key": "abc", "editflow:recipe": "r.toml"}
    written = export_images("animation", ports, outputs, provenance, tmp_path)
    assert written == [tmp_path / "animation.gif"]
    with Image.open(written[0]) as gif:
        assert gif.n_frames == 5 and gif.info["loop"] == 0
        seen = []
        for index in range(gif.n_frames):
            gif.seek(index)
            seen.append((gif.convert("RGB").getpixel((0, 0))[0], gif.info["duration"]))
    assert seen == [(0, 200), (51, 100), (102, 100), (153, 100), (204, 200)]
    assert current_exports("animation", ports, provenance, tmp_path) == written
    changed = {**provenance, "editflow:key": "def"}
    assert current_exports("animation", ports, changed, tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["animation.gif"]  # no temporary left
