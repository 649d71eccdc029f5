"""Cache keys: sha256 over canonical JSON of everything that determines a stage's outputs.

Keys chain like a Merkle tree (a stage's preimage holds its upstream keys), never use
Python's ``hash()`` or pickle, and are identical across processes and machines that share
the same library versions.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cache
from importlib import metadata
from typing import Any

KEY_FORMAT = 1


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, exact floats (shortest round-trip repr)."""
    return json.dumps(_check(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite float {value!r} cannot be part of a cache key")
    if isinstance(value, dict):
        return {str(key): _check(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_check(item) for item in value]
    return value


def key_of(preimage: dict[str, Any]) -> str:
    """The cache key of a preimage: 64 hex digits."""
    return hashlib.sha256(canonical_json(preimage).encode()).hexdigest()


@cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics a cached result depends on."""
    versions = {}
    for package in ("torch", "diffusers", "transformers", "editflow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def diff_preimages(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """The (dotted path, old value, new value) leaves that differ between two preimages."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new), key=str):
            child = f"{path}.{key}" if path else str(key)
            changes += diff_preimages(old.get(key, _MISSING), new.get(key, _MISSING), child)
        return changes
    return [] if old == new else [(path, old, new)]


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()
