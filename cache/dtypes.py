"""Conversion between caller tensors and the numpy arrays zarr stores, plus checksums.

zarr v3 has no bfloat16, so a bfloat16 tensor is stored as float32 (exact: every bfloat16 is a
float32) and the torch dtype is recorded next to it so that reads cast it back. Every other
supported dtype is stored as itself. The checksum of an array is the xxh3-128 of its C-order
bytes *as stored* (so float32 bytes for a bfloat16 tensor): it guards against damage, not
against an adversary (cache keys are sha256), and at ~10 GB/s it never limits a read, where
sha256's ~1 GB/s did.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xxhash

# Torch dtypes that numpy (and therefore zarr) can hold as they are.
_NATIVE = {
    torch.bool: "bool",
    torch.uint8: "uint8",
    torch.uint16: "uint16",
    torch.uint32: "uint32",
    torch.uint64: "uint64",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}
# Torch dtypes stored as a wider numpy dtype; the torch dtype is restored on read.
_WIDENED = {torch.bfloat16: ("bfloat16", torch.float32)}

TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in _NATIVE.items()}
TORCH_DTYPES.update({name: dtype for dtype, (name, _) in _WIDENED.items()})


def torch_dtype_name(dtype: torch.dtype) -> str:
    """Return the name recorded for a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises:
        TypeError: The dtype cannot be cached (for example a float8 type).
    """
    if dtype in _NATIVE:
        return _NATIVE[dtype]
    if dtype in _WIDENED:
        return _WIDENED[dtype][0]
    raise TypeError(f"cannot cache tensors of dtype {dtype}; supported: {sorted(TORCH_DTYPES)}")


def stored_dtype(dtype: torch.dtype) -> np.dtype:
    """Return the numpy dtype that holds a torch dtype on disk."""
    torch_dtype_name(dtype)  # validates
    wide = _WIDENED.get(dtype)
    return np.dtype(_NATIVE[wide[1]] if wide else _NATIVE[dtype])


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
        if native.name not in TORCH_DTYPES:
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
    if tensor.dtype in _WIDENED:
        tensor = tensor.to(_WIDENED[tensor.dtype][1])
    return tensor.cpu().contiguous().numpy(), name


def from_stored(stored: np.ndarray, torch_dtype: str) -> torch.Tensor:
    """Turn an array read from zarr into a new tensor of the recorded torch dtype.

    Raises:
        ValueError: ``torch_dtype`` is not a dtype this module writes.
    """
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown torch dtype {torch_dtype!r} in cache manifest")
    # zarr hands out a new array per read, so this copies only when it is not writable C-order.
    tensor = torch.from_numpy(np.require(stored, requirements=["C", "W"]))
    return tensor.to(TORCH_DTYPES[torch_dtype])


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
