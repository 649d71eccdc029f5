"""Exported outputs: images written as PNG with their provenance in text chunks, and
animations as GIF with it in the comment.

Files are written under a temporary name and renamed into place, so the output folder
never holds a half-written image. The bytes depend only on the pixels and the provenance
(no timestamps), which makes reruns byte-identical; so when the files already in the output
folder carry exactly the provenance a rerun would write (the same stage key, recipe and
version), they are left as they are, like an up-to-date target in make.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from editflow.stages.base import Port
from editflow.stages.images import to_pil


def _names(stage: str, ports: list[Port], count: int) -> dict[str, list[str]]:
    """File names per exported image port: ``stage.png``, or ``stage-0.png`` ... for a batch;
    ``stage.gif`` for an animation (``stage.PORT...`` when the stage exports several)."""
    names = {}
    for port in ports:
        stem = stage if len(ports) == 1 else f"{stage}.{port.name}"
        if port.timing is not None:
            names[port.name] = [f"{stem}.gif"]
        else:
            names[port.name] = (
                [f"{stem}.png"] if count == 1 else [f"{stem}-{i}.png" for i in range(count)]
            )
    return names


def current_exports(
    stage: str, ports: list[Port], provenance: dict[str, str], out_dir: Path
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


def _provenance_of(path: Path) -> dict[str, str] | None:
    """The text an exported file carries (PNG text chunks, GIF comment), None if unreadable."""
    try:
        with Image.open(path) as image:
            # We write text chunks before the pixels and a GIF's comment before its frames, so
            # opening parses them and nothing is decoded (``image.text`` would decode the
            # pixels to look for chunks after them).
            if path.suffix == ".gif":
                text = json.loads(image.info.get("comment", b"{}"))
            else:
                text = {
                    name: value
                    for name, value in image.info.items()
                    if name.startswith("editflow:") and isinstance(value, str)
                }
    except (OSError, ValueError):
        return None
    return text if isinstance(text, dict) else None


def _count(path: Path, expected: dict[str, str]) -> int | None:
    """The batch size a file says it belongs to, if its provenance is ``expected``."""
    text = _provenance_of(path)
    count = text.pop("editflow:count", None) if text is not None else None
    return int(count) if text == expected and count and count.isdigit() else None


def remove_stale_exports(
    stage: str, ports: list[Port], provenance: dict[str, str], out_dir: Path, keep: list[Path]
) -> list[Path]:
    """Delete the stage's earlier exports that this export did not write (a batch that
    shrank, a batch that became one image); returns the paths removed.

    Only files named as this stage's exports whose provenance says this recipe's stage wrote
    them are removed: a user's file, or another recipe's, is left alone.
    """
    kept, removed = set(keep), []
    for port in ports:
        stem = stage if len(ports) == 1 else f"{stage}.{port.name}"
        pattern = re.compile(rf"{re.escape(stem)}(-\d+)?\.(png|gif)")
        for path in sorted(out_dir.glob(f"{glob.escape(stem)}*")):
            if path in kept or not pattern.fullmatch(path.name) or not path.is_file():
                continue
            text = _provenance_of(path) or {}
            ours = text.get("editflow:recipe_path") == provenance.get("editflow:recipe_path")
            if ours and text.get("editflow:stage") == stage:
                path.unlink()
                removed.append(path)
    return removed


def export_images(
    stage: str,
    ports: list[Port],
    outputs: dict[str, Any],
    provenance: dict[str, str],
    out_dir: Path,
) -> list[Path]:
    """Write a stage's exported image outputs ((N, 3, H, W) in [0, 1]) as PNGs carrying
    ``provenance`` in text chunks, or as an animated GIF carrying it in its comment; returns
    the paths written."""
    written = []
    count = len(outputs[ports[0].name]) if ports else 0
    by_name = {port.name: port for port in ports}
    for name, files in _names(stage, ports, count).items():
        port = by_name[name]
        if port.timing is not None:
            durations = [round(float(ms)) for ms in outputs[port.timing]]
            frames = [to_pil(image) for image in outputs[name]]
            comment = json.dumps({**provenance, "editflow:count": str(count)}, sort_keys=True)
            written.append(_write_gif(out_dir / files[0], frames, durations, comment))
            continue
        for file, image in zip(files, outputs[name], strict=True):
            info = PngImagePlugin.PngInfo()
            for key, value in provenance.items():
                info.add_text(key, value)
            info.add_text("editflow:count", str(count))
            written.append(write_png(out_dir / file, to_pil(image), info))
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_png(path: Path, image: Image.Image, info: PngImagePlugin.PngInfo) -> Path:
    """Write a PNG with these text chunks under a temporary name, then rename it into place."""
    return _write_file(path, lambda stream: image.save(stream, format="PNG", pnginfo=info))


def write_text(path: Path, text: str) -> Path:
    """Write a text file under a temporary name, then rename it into place."""
    return _write_file(path, lambda stream: stream.write(text.encode("utf-8")))


def _write_gif(path: Path, frames: list[Image.Image], durations: list[int], comment: str) -> Path:
    # One shared palette would band; per-frame palettes keep each frame's colours.
    return _write_file(
        path,
        lambda stream: frames[0].save(
            stream, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
            loop=0, comment=comment.encode(), disposal=1, optimize=False,
        ),
    )  # fmt: skip


def _write_file(path: Path, save: Callable[[Any], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            save(stream)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are for sharing
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
