"""Exported outputs: images written as PNG with their provenance in text chunks.

Files are written under a temporary name and renamed into place, so the output folder
never holds a half-written image. The bytes depend only on the pixels and the provenance
(no timestamps), which makes reruns byte-identical; so when the files already in the output
folder carry exactly the provenance a rerun would write (the same stage key, recipe and
version), they are left as they are, like an up-to-date target in make.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

import editflow
from editflow.engine.plan import Plan, PlannedStage
from editflow.stages import ArtifactType
from editflow.stages.figure import to_pil


def provenance(plan: Plan, stage: PlannedStage) -> dict[str, str]:
    """The text chunks every exported PNG carries."""
    return {
        "editflow:version": editflow.__version__,
        "editflow:recipe": plan.loaded.path.name,
        "editflow:recipe_sha256": plan.recipe_hash,
        "editflow:stage": stage.name,
        "editflow:kind": stage.kind.kind,
        "editflow:stage_key": stage.key,
    }


def _names(stage: PlannedStage, count: int) -> dict[str, list[str]]:
    """File names per exported image port: ``stage.png``, or ``stage-0.png`` ... for a batch."""
    ports = [port for port in stage.kind.outputs if port.export and port.type == ArtifactType.IMAGE]
    names = {}
    for port in ports:
        stem = stage.name if len(ports) == 1 else f"{stage.name}.{port.name}"
        names[port.name] = (
            [f"{stem}.png"] if count == 1 else [f"{stem}-{i}.png" for i in range(count)]
        )
    return names


def current_exports(plan: Plan, stage: PlannedStage, out_dir: Path) -> list[Path] | None:
    """The stage's files in ``out_dir`` if all are there with this run's provenance, else None."""
    expected = provenance(plan, stage)
    first = out_dir / _names(stage, 1).popitem()[1][0]
    batch = out_dir / _names(stage, 2).popitem()[1][0]
    probe = first if first.exists() else batch
    count = _count(probe, expected)
    if count is None:
        return None
    paths = [out_dir / name for names in _names(stage, count).values() for name in names]
    return paths if all(_count(path, expected) == count for path in paths) else None


def _count(path: Path, expected: dict[str, str]) -> int | None:
    """The batch size a file says it belongs to, if its provenance is ``expected``."""
    try:
        with Image.open(path) as image:
            text = dict(image.text)  # text chunks precede the pixels: nothing is decoded
    except (OSError, ValueError):
        return None
    count = text.pop("editflow:count", None)
    return int(count) if text == expected and count and count.isdigit() else None


def export_images(
    plan: Plan, stage: PlannedStage, outputs: dict[str, Any], out_dir: Path
) -> list[Path]:
    """Write a stage's exported image outputs; returns the paths written."""
    written = []
    ports = [port for port in stage.kind.outputs if port.export and port.type == ArtifactType.IMAGE]
    count = len(outputs[ports[0].name]) if ports else 0
    for port, names in _names(stage, count).items():
        for name, image in zip(names, outputs[port], strict=True):
            info = PngImagePlugin.PngInfo()
            for key, value in provenance(plan, stage).items():
                info.add_text(key, value)
            info.add_text("editflow:count", str(count))
            written.append(_write_atomically(out_dir / name, to_pil(image), info))
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomically(path: Path, image: Image.Image, info: PngImagePlugin.PngInfo) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=info)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
