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

from editflow.stages.figure import to_pil


def _names(stage: str, ports: list[str], count: int) -> dict[str, list[str]]:
    """File names per exported image port: ``stage.png``, or ``stage-0.png`` ... for a batch."""
    names = {}
    for port in ports:
        stem = stage if len(ports) == 1 else f"{stage}.{port}"
        names[port] = [f"{stem}.png"] if count == 1 else [f"{stem}-{i}.png" for i in range(count)]
    return names


def current_exports(
    stage: str, ports: list[str], provenance: dict[str, str], out_dir: Path
) -> list[Path] | None:
    """The stage's files in ``out_dir`` if all are there with this provenance, else None.

    Args:
        stage: The stage's name (the files' stem).
        ports: Its exported image outputs.
        provenance: The text chunks a rerun would write.
        out_dir: The output folder.
    """
    first = out_dir / _names(stage, ports, 1).popitem()[1][0]
    batch = out_dir / _names(stage, ports, 2).popitem()[1][0]
    probe = first if first.exists() else batch
    count = _count(probe, provenance)
    if count is None:
        return None
    paths = [out_dir / name for names in _names(stage, ports, count).values() for name in names]
    return paths if all(_count(path, provenance) == count for path in paths) else None


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
    stage: str,
    ports: list[str],
    outputs: dict[str, Any],
    provenance: dict[str, str],
    out_dir: Path,
) -> list[Path]:
    """Write a stage's exported image outputs ((N, 3, H, W) in [0, 1]) as PNGs carrying
    ``provenance`` in text chunks; returns the paths written."""
    written = []
    count = len(outputs[ports[0]]) if ports else 0
    for port, names in _names(stage, ports, count).items():
        for name, image in zip(names, outputs[port], strict=True):
            info = PngImagePlugin.PngInfo()
            for key, value in provenance.items():
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
