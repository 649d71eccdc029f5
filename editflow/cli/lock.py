"""Lock files: what a recipe produced, written as TOML next to it with its baseline images.

``RECIPE.lock`` (format 2) holds the library versions, each model's identity, per stage its
kind@version, key, the parts of its key preimage, a digest per output and the platform its
cache entry was computed on (a fingerprint name; ``[platforms.NAME]`` holds its facts),
and per exported file its sha256 and the sha256 of its decoded pixels. Tables are sorted,
so ``git diff`` of a lock reads as a list of what changed. ``RECIPE.baseline/`` holds a
copy of every exported image: where the platform differs from the lock's, exact bytes are
impossible and images are compared with these within a tolerance (:mod:`editflow.cli.check`).

Reading a lock is as strict as reading a recipe: size, encoding, nesting and every key are
checked, and each problem is one located line. A format-1 lock (``KEY = JSON`` lines) is
refused with the command that rewrites it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError

from editflow import fingerprint as platform
from editflow.documents import TooDeep, error_message, parse_bounded, toml_error, toml_locator
from editflow.errors import EditflowError, Problem

LOCK_FORMAT = 2
MAX_LOCK_BYTES = 16 << 20  # a sweep's lock holds every point's stages; no lock nears this
MAX_LOCK_DEPTH = 32
HEADER = (
    "# editflow lock (format 2): what this recipe produced. `editflow figures --check` and\n"
    "# `editflow repro --check` compare a rerun with it; `--update` rewrites it and the\n"
    "# baseline images beside it.\n"
)
REWRITE = "rewrite it with `editflow lock RECIPE` or `editflow figures --update`"
# Preimage parts stored per stage (models as digests; library versions once per lock).
STAGE_PARTS = ("params", "inputs", "seed", "seed_path", "dtype")


def lock_path(recipe: Path) -> Path:
    """``RECIPE.lock`` next to the recipe."""
    return recipe.with_name(recipe.name + ".lock")


def baseline_dir(recipe: Path) -> Path:
    """``RECIPE.baseline/``: the lock's copies of the exported images."""
    return recipe.with_name(recipe.name + ".baseline")


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_digests(entry: Any, outputs: Iterable[str]) -> dict[str, str]:
    """A digest per output of a cache entry, from the checksums its manifest holds (no array
    is read): arrays named ``OUTPUT`` or ``OUTPUT.PART``, and text outputs."""
    texts = entry.attrs.get("texts") or {}
    digests = {}
    for name in outputs:
        arrays = {
            array: [info.shape, info.dtype, info.torch_dtype, info.checksum, info.step_checksums]
            for array, info in entry.arrays.items()
            if array == name or array.startswith(f"{name}.")
        }
        digests[name] = _sha256_json({"arrays": arrays, "text": texts.get(name)})
    return digests


# ------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class StageRun:
    """One stage as a rerun planned and cached it."""

    key: str
    preimage: Mapping[str, Any]
    outputs: list[str]
    entry: Any  # the cache entry (None if missing)


def lock_facts(
    recipe_name: str,
    recipe_hash: str,
    models: Mapping[str, Any],
    stages: Mapping[str, StageRun],
    files: Mapping[str, Path],
    known_pixels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every fact of a lock, as the nested tables its TOML holds (normalised as TOML reads
    them back, so a fresh run's facts compare equal to a lock's).

    Args:
        recipe_name: The recipe's file name.
        recipe_hash: sha256 of the recipe document as run.
        models: Provider field -> resolved model (``None`` where the recipe names none).
        stages: Stage name (``POINT/STAGE`` in a sweep) -> what the rerun planned and cached.
        files: Exported file name (relative to the output folder) -> path.
        known_pixels: File sha256 -> pixel digest already known (a lock's): a file with
            those bytes has those pixels, so it is not decoded again.
    """
    from editflow.files.textcheck import exported_digest  # tables and SVG: their bytes

    facts: dict[str, Any] = {
        "format": LOCK_FORMAT,
        "recipe": recipe_name,
        "recipe_sha256": recipe_hash,
        "library": {},
        "model": {name: model.fingerprint() for name, model in models.items() if model},
        "platforms": {},
        "stage": {},
        "file": {},
    }
    for name, stage in stages.items():
        preimage = stage.preimage
        facts["library"] = dict(preimage["versions"])
        table: dict[str, Any] = {
            "kind": f"{preimage['kind']}@{preimage['kind_version']}",
            "key": stage.key,
            "models": {
                provider: _sha256_json(identity)
                for provider, identity in (preimage.get("models") or {}).items()
            },
        }
        table.update({part: preimage.get(part) for part in STAGE_PARTS})
        facts_of_platform = (stage.entry.attrs.get("platform") if stage.entry else None) or None
        if facts_of_platform is not None:
            table["platform"] = platform.digest(facts_of_platform)
            facts["platforms"][table["platform"]] = facts_of_platform
        if stage.entry is not None:
            table["digest"] = output_digests(stage.entry, stage.outputs)
        facts["stage"][name] = table
    for name, path in sorted(files.items()):
        sha256 = file_sha256(path)
        pixels = (known_pixels or {}).get(sha256) or exported_digest(path)
        facts["file"][name] = {"sha256": sha256, "pixels": pixels}
    # As TOML reads them back (sorted tables, lists, no None), without writing TOML here.
    return _tomlable(facts)


def render(facts: Mapping[str, Any]) -> str:
    """The lock file's text: a header comment, then TOML with every table's keys sorted."""
    return HEADER + tomli_w.dumps(_tomlable(facts))


def _tomlable(value: Any) -> Any:
    """TOML has no null: an absent key means None; None inside an array is spelt "null"
    (no lock fact holds one; it would only change how a difference is worded)."""
    if isinstance(value, Mapping):
        return {str(k): _tomlable(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, list | tuple):
        return [_tomlable(item) if item is not None else "null" for item in value]
    return value


def write_lock(recipe: Path, facts: Mapping[str, Any], files: Mapping[str, Path]) -> Path:
    """Write ``RECIPE.lock`` atomically and make ``RECIPE.baseline/`` hold exactly the
    exported images (files whose bytes are unchanged are left alone)."""
    path = lock_path(recipe)
    _write_atomic(path, render(facts).encode())
    folder = baseline_dir(recipe)
    for name, source in files.items():
        target = folder / name
        if not target.is_file() or file_sha256(target) != file_sha256(source):
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(target, source.read_bytes())
    if folder.is_dir():
        for stale in sorted(folder.rglob("*"), reverse=True):
            relative = stale.relative_to(folder).as_posix()
            if stale.is_file() and relative not in files:
                stale.unlink()
            elif stale.is_dir() and not any(stale.iterdir()):
                stale.rmdir()
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------- reading


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StageLock(_Strict):
    kind: str
    key: str
    platform: str | None = None
    models: dict[str, str] = {}
    params: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    seed: int | None = None
    seed_path: list[Any] | None = None
    dtype: str | None = None
    digest: dict[str, str] = {}


class FileLock(_Strict):
    sha256: str
    pixels: str


class Lock(_Strict):
    """A lock file as read: every table typed, unknown keys refused."""

    format: Literal[2]
    recipe: str
    recipe_sha256: str
    library: dict[str, str] = {}
    model: dict[str, dict[str, Any]] = {}
    platforms: dict[str, dict[str, Any]] = {}
    stage: dict[str, StageLock] = {}
    file: dict[str, FileLock] = {}

    def threads(self) -> int | None:
        """The CPU thread count most of the lock's stages were computed with."""
        counts = [
            self.platforms.get(stage.platform or "", {}).get("threads")
            for stage in self.stage.values()
        ]
        counts = [count for count in counts if isinstance(count, int) and count > 0]
        return max(set(counts), key=counts.count) if counts else None


_FORMAT_1 = re.compile(r"^format = 1\s*$", re.MULTILINE)


def read_lock(recipe: Path, memo: Any = None) -> Lock:
    """The lock next to ``recipe``, read and checked.

    ``memo``: a cache whose records keep each lock text's parsed document by its sha256, so
    checking many recipes does not parse the same TOML again (pure-Python TOML parsing was a
    tenth of an all-hit ``figures --check``); the text is still read and hashed each time.

    Raises:
        EditflowError: No lock, or one that is unreadable, malformed, of an older format or
            of another recipe; each problem is a located line.
    """
    path = lock_path(recipe)
    label = str(path)
    if not path.is_file():
        raise EditflowError(
            f"no lock file {path.name} next to the recipe",
            file=str(recipe),
            hint=f"run `editflow lock {recipe}` and commit {path.name} and {path.stem}.baseline/",
        )
    with open(path, "rb") as handle:
        data = handle.read(MAX_LOCK_BYTES + 1)
    if len(data) > MAX_LOCK_BYTES:
        raise EditflowError(f"larger than {MAX_LOCK_BYTES >> 20} MiB: not a lock", file=label)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EditflowError(
            f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})",
            file=label, line=data[: error.start].count(b"\n") + 1, hint=REWRITE,
        ) from None  # fmt: skip
    if _FORMAT_1.search(text):
        raise EditflowError("lock format 1, this editflow reads format 2", file=label, hint=REWRITE)
    record = f"lock-documents/{hashlib.sha256(data).hexdigest()}"
    document = memo.get_record(record) if memo is not None else None
    if document is None:
        try:
            document = parse_bounded(tomllib.loads, text, MAX_LOCK_DEPTH)
        except tomllib.TOMLDecodeError as error:
            message, line = toml_error(error)
            raise EditflowError(message, file=label, line=line) from None
        except TooDeep as error:
            raise EditflowError(str(error), file=label) from None
        if memo is not None:
            memo.put_record(record, document)
    try:
        lock = Lock.model_validate(document)
    except ValidationError as error:
        locate = toml_locator(text)
        problems = []
        for item in error.errors():
            parts = tuple(str(part) for part in item["loc"])
            key = ".".join(json.dumps(part) if "." in part else part for part in parts)
            problems.append(
                Problem(error_message(item, list(Lock.model_fields)), file=label,
                        line=locate(parts), key=key)
            )  # fmt: skip
        raise EditflowError(problems=problems) from None
    if lock.recipe != recipe.name:
        raise EditflowError(
            f"the lock of another recipe ({lock.recipe!r}, not {recipe.name!r})",
            file=label, line=toml_locator(text)("recipe"), key="recipe", hint=REWRITE,
        )  # fmt: skip
    return lock
