"""Conversion between caller tensors and the numpy arrays zarr stores, plus checksums.

zarr v3 has no bfloat16, so a bfloat16 tensor is stored as float32 (exact: every bfloat16 is a
float32) and the torch dtype is recorded next to it so that reads cast it back. Every other
supported dtype is stored as itself. The checksum of an array is the xxh3-128 of its values'
C-order bytes in the stored dtype (so float32 bytes for a bfloat16 tensor, and the decoded
float32 values of a pixel-encoded array, below): it guards against damage, not
against an adversary (cache keys are sha256), and at ~10 GB/s it never limits a read, where
sha256's ~1 GB/s did.

One encoding keeps values exactly while storing fewer bytes: a float32 array whose every
value is ``k / 255`` for an integer ``k`` in 0..255 (an image read from a PNG, a figure, a
binary mask) is stored as the uint8 codes ``k`` (:func:`pixel_codes`) and decoded on read by
the same float32 division (:func:`from_pixel_codes`), bit for bit, ``-0.0`` and NaN excluded.
The manifest then still describes the values (float32, their checksum), so an output's digest
does not depend on how it was stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

from editflow.lazy import lazy

torch = lazy("torch")

# Torch dtypes that numpy (and therefore zarr) can hold as they are, by name.
_NATIVE = (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip
# Torch dtypes stored as a wider numpy dtype; the torch dtype is restored on read.
_WIDENED = {"bfloat16": "float32"}
# Names only, so that importing the cache does not import torch.
DTYPE_NAMES = frozenset((*_NATIVE, *_WIDENED))


def torch_dtype_name(dtype: torch.dtype) -> str:
    """Return the name recorded for a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises:
        TypeError: The dtype cannot be cached (for example a float8 type).
    """
    name = str(dtype).removeprefix("torch.")
    if name in DTYPE_NAMES:
        return name
    raise TypeError(f"cannot cache tensors of dtype {dtype}; supported: {sorted(DTYPE_NAMES)}")


def stored_dtype(dtype: torch.dtype) -> np.dtype:
    """Return the numpy dtype that holds a torch dtype on disk."""
    name = torch_dtype_name(dtype)
    return np.dtype(_WIDENED.get(name, name))


def to_stored(
    value: torch.Tensor | np.ndarray, cast_to: torch.dtype | None = None
) -> tuple[np.ndarray, str]:
    """Turn a tensor or array into the numpy array written to zarr and its torch dtype name.

    Args:
        value: A tensor (any device, grad or not) or a numpy array of a numeric or bool dtype.
        cast_to: Cast to this torch dtype first (streams have a declared dtype).

    Returns:
        ``(stored, torch_dtype)``: a native-byte-order array (it may share memory with
        ``value``; it is only read) and the name of the torch dtype handed back on read.

    Raises:
        TypeError: The value is not a tensor or array, or its dtype cannot be cached.
    """
    if isinstance(value, np.ndarray):
        native = value.dtype.newbyteorder("=")
        if native.name not in _NATIVE:
            raise TypeError(
                f"cannot cache numpy arrays of dtype {value.dtype}; put text and small "
                "values in attrs instead"
            )
        if cast_to is None:
            return np.asarray(value, dtype=native, order="C"), native.name
        value = torch.from_numpy(np.array(value, dtype=native, order="C", copy=True))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    tensor = value.detach()
    if cast_to is not None and tensor.dtype != cast_to:
        tensor = tensor.to(cast_to)
    name = torch_dtype_name(tensor.dtype)
    if name in _WIDENED:
        tensor = tensor.to(getattr(torch, _WIDENED[name]))
    return tensor.cpu().contiguous().numpy(), name


def from_stored(stored: np.ndarray, torch_dtype: str) -> torch.Tensor:
    """Turn an array read from zarr into a new tensor of the recorded torch dtype.

    Raises:
        ValueError: ``torch_dtype`` is not a dtype this module writes.
    """
    if torch_dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown torch dtype {torch_dtype!r} in cache manifest")
    # zarr hands out a new array per read, so this copies only when it is not writable C-order.
    tensor = torch.from_numpy(np.require(stored, requirements=["C", "W"]))
    return tensor.to(getattr(torch, torch_dtype))


def new_checksum() -> Any:
    """An incremental xxh3-128 digest (``update(bytes)``, ``hexdigest()``)."""
    return xxhash.xxh3_128()


def checksum_of(array: np.ndarray) -> str:
    """Return the hex checksum of an array's C-order bytes."""
    return checksum_update(new_checksum(), array).hexdigest()


def checksum_update(digest: Any, array: np.ndarray) -> Any:
    """Feed an array's C-order bytes into ``digest`` (without copying when contiguous)."""
    contiguous = np.asarray(array, order="C")
    digest.update(contiguous.reshape(-1).view(np.uint8))
    return digest


PIXELS = "pixels"
"""The ``encoding`` of an array stored as uint8 codes ``k`` of float32 values ``k / 255``."""

PIXELS_MIN_BYTES = 1024
"""Smaller float32 arrays are stored as they are (nothing to save)."""

_SCALE = np.float32(255)
_BLOCK = 1 << 18  # values checked at a time


def pixel_codes(values: np.ndarray) -> np.ndarray | None:
    """The uint8 codes ``k`` such that ``from_pixel_codes(k)`` is ``values`` bit for bit, or
    None when ``values`` is not a float32 array of at least :data:`PIXELS_MIN_BYTES` whose
    every value lies on that grid (most are not: their first values decide, cheaply)."""
    if values.dtype != np.float32 or values.nbytes < PIXELS_MIN_BYTES:
        return None
    flat = np.ascontiguousarray(values).reshape(-1)
    if _codes(flat[:64]) is None:
        return None
    codes = np.empty(flat.shape, np.uint8)
    for start in range(0, len(flat), _BLOCK):  # a block off the grid ends the search
        block = _codes(flat[start : start + _BLOCK])
        if block is None:
            return None
        codes[start : start + _BLOCK] = block
    return codes.reshape(values.shape)


def _codes(flat: np.ndarray) -> np.ndarray | None:
    scaled = np.rint(flat * _SCALE)
    if not ((scaled >= 0) & (scaled <= 255)).all():  # NaN fails both
        return None
    codes = scaled.astype(np.uint8)
    exact = np.array_equal(from_pixel_codes(codes).view(np.uint32), flat.view(np.uint32))
    return codes if exact else None  # bitwise: -0.0 is not 0 / 255


def from_pixel_codes(codes: np.ndarray) -> np.ndarray:
    """The float32 values ``k / 255`` of uint8 codes ``k`` (what ``from_pil`` computes)."""
    return codes.astype(np.float32) / _SCALE
