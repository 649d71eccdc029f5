"""Exported PNGs: a rerun whose batch shrank removes the stage's earlier extra files, and
only those (a user's file, or another recipe's, of the same name stays)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from editflow.files.outputs import export_images, remove_stale_exports
from editflow.stages.base import ArtifactType, Port

PORTS = [Port("images", ArtifactType.IMAGE, "frames", export=True)]


def _provenance(key: str, recipe: str = "recipes/frames.toml") -> dict[str, str]:
    return {"editflow:recipe_path": recipe, "editflow:stage": "frames", "editflow:stage_key": key}


def _export(count: int, provenance: dict[str, str], out: Path) -> list[Path]:
    images = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(count))
    written = export_images("frames", PORTS, {"images": images}, provenance, out)
    remove_stale_exports("frames", PORTS, provenance, out, written)
    return written


def _names(out: Path) -> list[str]:
    return sorted(path.name for path in out.iterdir())


def test_a_shrinking_batch_leaves_only_this_runs_files(tmp_path: Path) -> None:
    _export(4, _provenance("k4"), tmp_path)
    assert _names(tmp_path) == [f"frames-{i}.png" for i in range(4)]
    _export(2, _provenance("k2"), tmp_path)
    assert _names(tmp_path) == ["frames-0.png", "frames-1.png"]
    _export(1, _provenance("k1"), tmp_path)  # a batch of one is frames.png
    assert _names(tmp_path) == ["frames.png"]
    _export(3, _provenance("k3"), tmp_path)
    assert _names(tmp_path) == ["frames-0.png", "frames-1.png", "frames-2.png"]


def test_files_this_recipe_did_not_write_are_left_alone(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "frames-7.png")  # a user's own file
    other = PngImagePlugin.PngInfo()  # the same stage name, exported by another recipe
    for key, value in _provenance("x", recipe="recipes/other.toml").items():
        other.add_text(key, value)
    Image.new("RGB", (4, 4)).save(tmp_path / "frames-8.png", pnginfo=other)
    Image.new("RGB", (4, 4)).save(tmp_path / "frames-notes.png")  # not an export's name
    _export(4, _provenance("k4"), tmp_path)
    _export(1, _provenance("k1"), tmp_path)
    assert _names(tmp_path) == ["frames-7.png", "frames-8.png", "frames-notes.png", "frames.png"]
