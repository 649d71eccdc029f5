"""Exported outputs: images written as PNG with their provenance in text chunks.

Files are written under a temporary name and renamed into place, so the output folder
never holds a half-written image. The bytes depend only on the pixels and the provenance
(no timestamps), which makes reruns byte-identical.
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


def export_images(
    plan: Plan, stage: PlannedStage, outputs: dict[str, Any], out_dir: Path
) -> list[Path]:
    """Write a stage's exported image outputs; returns the paths written."""
    ports = [port for port in stage.kind.outputs if port.export]
    written = []
    for port in ports:
        if port.type != ArtifactType.IMAGE:
            continue
        batch = outputs[port.name]
        stem = stage.name if len(ports) == 1 else f"{stage.name}.{port.name}"
        for index, image in enumerate(batch):
            name = f"{stem}.png" if len(batch) == 1 else f"{stem}-{index}.png"
            info = PngImagePlugin.PngInfo()
            for key, value in provenance(plan, stage).items():
                info.add_text(key, value)
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
