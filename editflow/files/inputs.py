"""Input files: resolve, check and hash them at plan time; load them when a stage needs them.

Paths are relative to the recipe's folder. ``skimage:NAME`` names one of the photographs
scikit-image ships in its wheel (``chelsea``, ``astronaut``, ``coffee`` ...), so recipes and
tests can use a real image without downloading anything.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field, model_validator

from editflow.documents import Table
from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy
from editflow.stages.base import ArtifactType
from editflow.stages.interpolation.pose import check_openpose, read_openpose

torch = lazy("torch")

SKIMAGE_PREFIX = "skimage:"
# How load_input turns a file into pixels, in every input's cache key: a change that moves
# pixels (2: fit by Pillow's ImageOps.fit and pad) must never meet entries of the old way.
LOADER_VERSION = 2
MAX_SIDE = 8192  # px; bigger images do not fit a diffusion model (SD 1.x works at 512)
MIN_SIDE = 8  # px; latent models map 8x8 pixels to one latent pixel
MAX_TEXT_BYTES = 16 << 20
MAX_IMAGE_BYTES = 256 << 20
_IMAGE_SUFFIXES = (".png", ".jpg")
MAX_KEYPOINTS_BYTES = 1 << 20
# The fields of an input section, in the order messages name them, and what each provides.
_SOURCES = {
    "image": ArtifactType.IMAGE,
    "mask": ArtifactType.MASK,
    "text": ArtifactType.TEXT,
    "keypoints": ArtifactType.KEYPOINTS,
}


class InputSection(Table):
    """A file the recipe reads (``[inputs.NAME]``). Exactly one of image, mask, text or
    keypoints."""

    image: str | None = Field(
        None, description="Image path relative to the recipe, or 'skimage:NAME'"
    )
    mask: str | None = Field(None, description="Mask image path (white = 1)")
    text: str | None = Field(None, description="UTF-8 text file path")
    keypoints: str | None = Field(
        None, description="OpenPose JSON file path (18 body points of the first person)"
    )
    size: tuple[int, int] | None = Field(
        None, description="[height, width] to resize to; each a multiple of 8"
    )
    resize: Literal["center-crop", "stretch", "pad"] = Field(
        "center-crop", description="How to reach `size` when the aspect ratio differs"
    )

    @model_validator(mode="after")
    def _one_file(self) -> InputSection:
        if (
            sum(value is not None for value in (self.image, self.mask, self.text, self.keypoints))
            != 1
        ):
            raise ValueError("give exactly one of 'image', 'mask', 'text' or 'keypoints'")
        given = self.model_fields_set & {"size", "resize"}
        if (self.text is not None or self.keypoints is not None) and given:
            field = "text" if self.text is not None else "keypoints"
            names = " and ".join(f"'{name}'" for name in sorted(given))
            verb = "is" if len(given) == 1 else "are"
            raise ValueError(f"{names} {verb} for images, not for {field}")
        if self.size is not None and any(side <= 0 or side % 8 for side in self.size):
            raise ValueError(f"size must be positive multiples of 8, got {list(self.size)}")
        if self.size is not None and max(self.size) > MAX_SIDE:
            raise ValueError(
                f"size must be at most {MAX_SIDE} px per side (diffusion models work at a few"
                f" hundred), got {list(self.size)}"
            )
        return self

    def source(self) -> tuple[str, str]:
        """(field name, value) of the one file this input names."""
        given = [(name, getattr(self, name)) for name in _SOURCES]
        given = [(name, value) for name, value in given if value is not None]
        return given[0]

    @property
    def type(self) -> ArtifactType:
        """The artifact type this input provides."""
        field, _ = self.source()
        return _SOURCES[field]


@dataclass(frozen=True)
class ResolvedInput:
    """An input file located, read and hashed (its bytes are kept: inputs are small)."""

    name: str
    section: InputSection
    path: Path
    data: bytes
    digest: str
    size: tuple[int, int] | None = None  # (height, width) of an image as stages will see it


@functools.cache  # a folder listing per process: checking 17 recipes listed it 35 times
def skimage_photos() -> dict[str, Path]:
    """The photographs scikit-image ships in its wheel, by name (``chelsea``, ``coffee`` ...).

    Found without importing scikit-image (a recipe's validation needs its files, not it).
    Callers read the mapping and never change it.
    """
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not folder.is_dir():
        return {}
    return {
        path.stem: path
        for path in sorted(folder.iterdir())
        if path.suffix in _IMAGE_SUFFIXES and path.is_file()
    }


def resolve_input(
    name: str, section: InputSection, base_dir: Path, label: str, confined: bool = False
) -> Any:
    """Locate, read and check one input. Returns a ResolvedInput or a Problem.

    ``confined`` (a recipe a figure carries): a file path must resolve inside ``base_dir``,
    links followed; absolute paths and ``..`` out of it are refused, unread.
    """
    field, value = section.source()
    key = f"inputs.{name}.{field}"
    if value.startswith(SKIMAGE_PREFIX):
        photos = skimage_photos()
        path = photos.get(value[len(SKIMAGE_PREFIX) :])
        if path is None:
            known = ", ".join(photos) or "none (scikit-image is not installed)"
            return Problem(
                f"scikit-image has no photo {value!r}", file=label, key=key, hint=f"it has: {known}"
            )
    else:
        path = (base_dir / value).resolve()
        if confined and (Path(value).is_absolute() or not path.is_relative_to(base_dir.resolve())):
            return Problem(
                f"{value} is outside the base folder {base_dir}: an untrusted recipe (a"
                " figure's, or one read from git) reads only files under it", file=label,
                key=key, hint="replaying a figure? --base DIR names the folder its inputs are in",
            )  # fmt: skip
    if not path.is_file():
        where = f" (looked in {base_dir})" if confined else ""
        return Problem(f"file not found: {value}{where}", file=label, key=key)
    limit = {"text": MAX_TEXT_BYTES, "keypoints": MAX_KEYPOINTS_BYTES}.get(field, MAX_IMAGE_BYTES)
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)  # a bound on what validation reads
    if len(data) > limit:
        return Problem(f"{value} is larger than {limit >> 20} MiB", file=label, key=key)
    check = _checked if len(data) <= MEMO_BYTES else _checked.__wrapped__
    reason, digest = check(data, field, section.size is None)
    if reason is not None:
        return Problem(reason.format(value=value), file=label, key=key)
    return ResolvedInput(name, section, path, data, digest, _pixel_size(data, section, field))


MEMO_BYTES = 16 << 20  # bigger files are checked every time rather than held in memory


@functools.lru_cache(maxsize=16)
def _checked(data: bytes, field: str, unsized: bool) -> tuple[str | None, str]:
    """Why a file's bytes cannot be used (or None), and their sha256. Kept for the same
    bytes: every point of a sweep and every recipe of a figure check reads the same photos
    again, and looking bytes up (a hash and a compare) is cheaper than checking them."""
    checks = {"text": _check_text, "keypoints": _check_keypoints}
    reason = checks[field](data) if field in checks else _check_image(data, unsized)
    return reason, hashlib.sha256(data).hexdigest()


def _pixel_size(data: bytes, section: InputSection, field: str) -> tuple[int, int] | None:
    """What :func:`load_input` will make of an image: ``size``, else cropped to multiples of 8."""
    if field in ("text", "keypoints"):
        return None
    if section.size is not None:
        return tuple(section.size)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return height - height % 8, width - width % 8


def _check_image(data: bytes, unsized: bool) -> str | None:
    """Why an image file cannot be used (``{value}`` names it; ``unsized``: the recipe sets
    no ``size``, so the file's own must do), or ``None``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: nothing is decoded
            image.verify()  # checks structure and checksums without decoding pixels
    except Exception as error:  # PIL raises many types for bad files
        # PIL appends the file object or name; the recipe key already says which file.
        reason = re.sub(r"\s*(<[^>]*>|'[^']*')$", "", str(error)) or type(error).__name__
        return f"cannot read image {{value!r}}: {reason}"
    if unsized and min(width, height) < MIN_SIDE:
        return f"{{value}} is {width}x{height} px; images need at least {MIN_SIDE} px per side (or set size)"
    if unsized and max(width, height) > MAX_SIDE:
        return f"{{value}} is {width}x{height} px; set size (at most {MAX_SIDE} px per side)"
    return None


def _check_text(data: bytes) -> str | None:
    """Why a text file cannot be used (``{value}`` names it), or ``None``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text: {value}"
    if not text.strip():
        return "{value} is empty"
    return None


def _check_keypoints(data: bytes) -> str | None:
    """Why a keypoint file cannot be used (``{value}`` names it), or ``None``."""
    try:
        check_openpose(data)
    except ValueError as error:
        return "{value}: " + str(error).replace("{", "{{").replace("}", "}}")
    return None


def load_input(item: ResolvedInput) -> Any:
    """The artifact value of an input: (1, 3, H, W) / (1, 1, H, W) float tensors, text, or
    (1, 18, 3) keypoints."""
    field, value = item.section.source()
    if field == "text":
        return item.data.decode("utf-8")
    if field == "keypoints":
        return read_openpose(item.data)[None]
    try:
        return _load_image(item, field)
    except OSError as error:  # a file that passed verify() but cannot be decoded
        raise EditflowError(
            f"cannot decode image {value!r}: {error}", key=f"inputs.{item.name}.{field}"
        ) from None


def _load_image(item: ResolvedInput, field: str) -> torch.Tensor:
    with Image.open(io.BytesIO(item.data)) as image:
        image = image.convert("RGB" if field == "image" else "L")
        if item.section.size is not None:
            image = fit(image, item.section.size, item.section.resize)
        else:
            # Latent models need sides divisible by 8: crop the remainder from the bottom/right.
            width, height = image.size
            image = image.crop((0, 0, width - width % 8, height - height % 8))
        array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    if tensor.ndim == 2:
        return tensor[None, None]
    return tensor.permute(2, 0, 1)[None]


def fit(image: Image.Image, size: tuple[int, int], policy: str) -> Image.Image:
    """Resize to (height, width) by center-crop, stretch or pad (pad fills with black).

    Pillow's own: ``ImageOps.fit`` resamples the centred crop box straight to the size (no
    crop after a rounded resize), ``ImageOps.pad`` fits inside and centres on black.
    """
    height, width = size
    if policy == "stretch":
        return image.resize((width, height), Image.Resampling.BICUBIC)
    if policy == "center-crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (width, height), Image.Resampling.BICUBIC, color=0)
