"""Cache keys: sha256 over canonical JSON of everything that determines a stage's outputs.

Keys chain like a Merkle tree (a stage's preimage holds its upstream keys), never use
Python's ``hash()`` or pickle, and are identical across processes and machines that share
the same library versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from editflow.files.inputs import LOADER_VERSION
from editflow.models import ComponentSpec, ResolvedModel
from editflow.stages import StageKind

# 2: model parts enter as {provider: fingerprint} under "models".
KEY_FORMAT = 2


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, exact floats (shortest round-trip repr). Keys are
    strings, as JSON's are (a preimage is made of JSON documents and JSON dumps)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)  # fmt: skip
    except ValueError as error:  # NaN or infinity: no JSON, and no key
        raise ValueError(f"non-finite float cannot be part of a cache key: {error}") from None


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


def input_key(section: BaseModel, digest: str) -> str:
    """The key of an input file: its recipe section, the sha256 of its bytes, and the loader."""
    facts = {"input": section.model_dump(mode="json"), "digest": digest, "loader": LOADER_VERSION}
    return key_of({"format": KEY_FORMAT, **facts})


def stage_preimage(
    *,
    kind: type[StageKind],
    params: BaseModel,
    references: Mapping[str, str | list[str]],
    upstream_key: Callable[[str], dict[str, str]],
    components: Iterable[ComponentSpec],
    models: Mapping[str, ResolvedModel | None],
    seed: int,
    stage_name: str,
    dtype: str,
) -> dict[str, Any]:
    """Everything that determines a stage's outputs (ENGINE.md, "Cache keys").

    ``upstream_key`` maps a reference to its producer's ``{"stage" | "input", ..., "key"}``;
    ``models`` maps providers to resolved models (``None`` while a stage is not needed); of
    each one the stage's ``components`` name, what can change those parts enters. The seed
    enters only seeded configurations, the dtype only stages that use a model.
    """
    seeded = kind.is_seeded(params)
    parts: dict[str, set[str]] = {}
    for spec in components:
        parts.setdefault(spec.provider, set()).add(spec.name)
    return {
        "format": KEY_FORMAT,
        "kind": kind.kind,
        "kind_version": kind.version,
        "params": params.model_dump(mode="json"),
        "inputs": {
            port: [upstream_key(ref) for ref in refs]
            if isinstance(refs, list)
            else upstream_key(refs)
            for port, refs in references.items()
        },
        "models": {
            provider: model.fingerprint(names) if (model := models.get(provider)) else None
            for provider, names in sorted(parts.items())
        }
        or None,
        "seed": seed if seeded else None,
        "seed_path": [stage_name] if seeded else None,
        "dtype": dtype if parts else None,
        "versions": library_versions(),
    }


def diff_preimages(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """The (dotted path, old value, new value) leaves that differ between two preimages.

    Dicts and equally long lists are compared item by item; a list that changed length
    is one difference.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new), key=str):
            child = f"{path}.{key}" if path else str(key)
            changes += diff_preimages(old.get(key, _MISSING), new.get(key, _MISSING), child)
        return changes
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            change
            for index, (before, after) in enumerate(zip(old, new, strict=True))
            for change in diff_preimages(before, after, f"{path}.{index}")
        ]
    return [] if old == new else [(path, old, new)]


def describe_changes(
    old: dict[str, Any] | None, new: dict[str, Any], width: int | None = 40
) -> list[str]:
    """Why a key differs from its last run's, in words ``plan`` and ``explain`` share.

    ``width`` shortens long values (``None`` keeps them whole).
    """

    def short(value: Any) -> str:
        text = repr(value)
        return text if width is None or len(text) <= width else text[: width - 3] + "..."

    if old is None:
        return ["never run"]
    changes = diff_preimages(old, new)
    if not changes:
        return ["entry missing (removed or damaged)"]
    parts = []
    for path, before, after in changes:
        segments = path.split(".")
        if segments[0] == "inputs" and len(segments) > 1:
            parts.append(_describe_input_change(segments, old, new))
        elif segments[0] == "models":
            provider = ".".join(segments[1:3]) if len(segments) > 2 else "a model"
            parts.append(f"the model behind {provider} changed")
        elif segments[0] == "versions" and len(segments) > 1:
            parts.append(f"{segments[1]} version: {short(before)} -> {short(after)}")
        elif segments[0] == "kind_version":
            parts.append(f"stage version: {short(before)} -> {short(after)}")
        else:
            parts.append(f"{path}: {short(before)} -> {short(after)}")
    return list(dict.fromkeys(parts))


def describe_change(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 3) -> str:
    """:func:`describe_changes` on one line, at most ``limit`` reasons."""
    parts = describe_changes(old, new)
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def _describe_input_change(segments: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    port = segments[1]
    before, after = old["inputs"].get(port), new["inputs"].get(port)
    if before is None or after is None:
        return f"input {port!r} {'connected' if before is None else 'disconnected'}"
    if isinstance(after, list) and (not isinstance(before, list) or len(before) != len(after)):
        count = len(before) if isinstance(before, list) else 1
        return f"input {port!r} now reads {len(after)} references (was {count})"
    origin = after[int(segments[2])] if isinstance(after, list) else after
    source = origin.get("stage") or f"inputs.{origin.get('input')}"
    return f"input {port!r} changed upstream ({source})"


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()
