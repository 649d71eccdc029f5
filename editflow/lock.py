"""Lock files and ``repro``: what a recipe produced, and why a rerun differs from it.

``RECIPE.lock`` sits next to its recipe: one fact per line, ``KEY = JSON``, sorted, so a
diff of two locks reads like a list of what changed. It holds the library versions, the
platform (torch build, device, CPU threads: results may change with any of them while keys
do not), each model's identity, and per stage its kind@version, key, the parts of its key
preimage, and a digest per output; per exported file its sha256.

``repro`` reruns the recipe through the cache and compares. A stage whose key changed is
drift, explained in the words ``plan`` uses (a parameter, an input file, a library version,
the model, the stage version). A stage whose key did not change but whose outputs did is
non-determinism on this platform; output and file digests are compared only when the
platform is the lock's, otherwise keys alone decide. Exported files carry their recipe, so
their bytes are compared only while the recipe is unchanged (stage digests cover the rest).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError

LOCK_FORMAT = 1
_PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")
# Preimage fields stored per stage (models as digests; versions once for the whole lock).
_STAGE_FIELDS = ("params", "inputs", "seed", "seed_path", "dtype")


def lock_path(recipe: Path) -> Path:
    """``RECIPE.lock`` next to the recipe."""
    return recipe.with_name(recipe.name + ".lock")


def lock_key(*parts: str) -> str:
    """A dotted key; parts that are not plain words are JSON-quoted (``model."model.id"``)."""
    return ".".join(part if _PLAIN.match(part) else json.dumps(part) for part in parts)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def platform_facts(device: Any) -> dict[str, Any]:
    """What besides the keys decides the bytes of a result: torch's build, the device, the
    CPU's thread count, architecture and vector instructions."""
    import torch

    facts: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        # The vector instructions torch's CPU kernels use (AVX2, AVX512 ...): other kernels
        # round differently, so results from another CPU family are not comparable.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        facts["cuda"] = torch.version.cuda
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


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
        digests[name] = _digest({"arrays": arrays, "text": texts.get(name)})
    return digests


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lock_facts(plan: Any, cache: Any, device: Any, files: Mapping[str, Path]) -> dict[str, Any]:
    """Every fact of a lock for a planned (and run) recipe.

    Args:
        plan: The recipe's plan; its needed stages must be in ``cache``.
        cache: The cache holding their entries.
        device: Where the run computed.
        files: Exported file name (relative to the output folder) -> path.
    """
    facts: dict[str, Any] = {
        "format": LOCK_FORMAT,
        "recipe": plan.loaded.path.name,
        # Exported files carry the recipe, so their bytes follow its every edit.
        "recipe_sha256": plan.recipe_hash,
    }
    versions = None
    for provider, model in sorted(plan.models.items()):
        facts[lock_key("model", provider)] = model.fingerprint() if model is not None else None
    for key, value in platform_facts(device).items():
        facts[lock_key("platform", key)] = value
    for stage in plan.needed:
        preimage = stage.preimage
        versions = preimage["versions"]
        facts.update(stage_facts(stage.name, stage.key, preimage))
        entry = cache.get(stage.key)
        if entry is not None:
            outputs = [port.name for port in stage.kind.outputs]
            for output, digest in output_digests(entry, outputs).items():
                facts[lock_key("stage", stage.name, "digest", output)] = digest
    for package, version in (versions or {}).items():
        facts[lock_key("library", package)] = version
    for name, path in files.items():
        facts[lock_key("file", name)] = file_sha256(path)
    return facts


def stage_facts(name: str, key: str, preimage: Mapping[str, Any]) -> dict[str, Any]:
    """The lock lines of one stage: its key and the parts of its preimage (models as digests
    of their fingerprints, which the lock holds once each)."""
    facts = {
        lock_key("stage", name, "kind"): f"{preimage['kind']}@{preimage['kind_version']}",
        lock_key("stage", name, "key"): key,
        lock_key("stage", name, "models"): {
            provider: _digest(fingerprint) for provider, fingerprint in preimage["models"].items()
        }
        if preimage.get("models")
        else None,
    }
    for part in _STAGE_FIELDS:
        facts[lock_key("stage", name, part)] = preimage.get(part)
    return facts


def render(facts: Mapping[str, Any]) -> str:
    """The lock file's text: a header comment, then ``KEY = JSON`` lines sorted by key."""
    lines = [
        "# editflow lock: what this recipe produced. `editflow repro --check` compares a",
        "# rerun with it; `editflow lock` or `repro --update` rewrites it.",
    ]
    lines += [
        f"{key} = {json.dumps(facts[key], sort_keys=True, separators=(', ', ': '))}"
        for key in sorted(facts)
    ]
    return "\n".join(lines) + "\n"


def parse(text: str, label: str) -> dict[str, Any]:
    """The facts of a lock file's text."""
    facts = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, separator, value = line.partition(" = ")
        try:
            if not separator:
                raise ValueError("no ' = '")
            facts[key] = json.loads(value)
        except ValueError as error:
            raise EditflowError(f"not a lock line ({error})", file=label, line=number) from None
    if facts.get("format") != LOCK_FORMAT:
        raise EditflowError(
            f"lock format {facts.get('format')!r}, this editflow reads {LOCK_FORMAT}",
            file=label,
            hint="rewrite it with `editflow lock`",
        )
    return facts


def read_lock(recipe: Path) -> dict[str, Any]:
    path = lock_path(recipe)
    if not path.is_file():
        raise EditflowError(
            f"no lock file {path.name} next to the recipe",
            file=str(recipe),
            hint=f"run `editflow lock {recipe}` and commit {path.name}",
        )
    return parse(path.read_text(encoding="utf-8"), str(path))


def write_lock(recipe: Path, facts: Mapping[str, Any]) -> Path:
    """Write ``RECIPE.lock`` atomically (a reader never sees half a lock)."""
    path = lock_path(recipe)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(render(facts))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------ comparing


@dataclass
class Drift:
    """How a rerun differs from its lock."""

    stages: dict[str, list[str]] = field(default_factory=dict)  # stage -> reasons
    files: dict[str, str] = field(default_factory=dict)  # exported file -> reason
    comparable: bool = True  # the platform is the lock's, so digests were compared
    platform_changes: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.stages or self.files)


def _stage_names(facts: Mapping[str, Any]) -> set[str]:
    return {
        json.loads(key.split(".")[1]) if key.split(".")[1].startswith('"') else key.split(".")[1]
        for key in facts
        if key.startswith("stage.") and key.endswith(".kind")
    }


def _preimage_view(facts: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """A stage's facts as a preimage-shaped dict for :func:`describe_changes`."""
    kind, _, version = str(facts.get(lock_key("stage", stage, "kind"), "@")).partition("@")
    view: dict[str, Any] = {
        "kind": kind,
        "kind_version": version,
        "models": facts.get(lock_key("stage", stage, "models")),
        "versions": {
            key.split(".", 1)[1]: value
            for key, value in facts.items()
            if key.startswith("library.")
        },
    }
    for part in _STAGE_FIELDS:
        view[part] = facts.get(lock_key("stage", stage, part))
    return view


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> Drift:
    """What differs between a lock's facts and a rerun's."""
    from editflow.engine.keys import describe_changes

    drift = Drift()
    platform_keys = {key for key in (*old, *new) if key.startswith("platform.")}
    drift.platform_changes = [
        f"{key.split('.', 1)[1]} {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(platform_keys)
        if old.get(key) != new.get(key)
    ]
    drift.comparable = not drift.platform_changes
    old_stages, new_stages = _stage_names(old), _stage_names(new)
    for stage in sorted(old_stages - new_stages):
        drift.stages[stage] = ["in the lock but not in the recipe"]
    for stage in sorted(new_stages - old_stages):
        drift.stages[stage] = ["new: not in the lock"]
    for stage in sorted(old_stages & new_stages):
        key = lock_key("stage", stage, "key")
        if old.get(key) != new.get(key):
            drift.stages[stage] = describe_changes(
                _preimage_view(old, stage), _preimage_view(new, stage)
            )
        elif drift.comparable:
            prefix = lock_key("stage", stage, "digest") + "."
            outputs = sorted(key[len(prefix) :] for key in (*old, *new) if key.startswith(prefix))
            changed = [o for o in outputs if old.get(prefix + o) != new.get(prefix + o)]
            if changed:
                drift.stages[stage] = [
                    f"same key, other outputs ({', '.join(dict.fromkeys(changed))}): the"
                    " computation is not deterministic on this platform"
                ]
    if drift.comparable and old.get("recipe_sha256") == new.get("recipe_sha256"):
        files = {key for key in (*old, *new) if key.startswith("file.")}
        for key in sorted(files):
            name = key.split(".", 1)[1]
            name = json.loads(name) if name.startswith('"') else name
            if key not in new:
                drift.files[name] = "in the lock but not written"
            elif key not in old:
                drift.files[name] = "written but not in the lock"
            elif old[key] != new[key]:
                drift.files[name] = "other bytes than the lock's"
    return drift


# ------------------------------------------------------------------------------ running


@dataclass
class ReproResult:
    """One recipe's rerun: its facts, and its drift from the lock when there is one."""

    recipe: Path
    facts: dict[str, Any]
    computed: list[str]
    cached: list[str]
    written: list[Path]
    drift: Drift | None = None


def rerun(
    recipe: Path,
    *,
    cache: Any,
    out_dir: Path,
    device: str = "auto",
    events: Any = None,
    registry: Any = None,
) -> tuple[ReproResult, Any]:
    """Run a recipe through the cache and collect its lock facts; returns the result and
    the models the run used (to share with the next recipe)."""
    from editflow.engine.api import run_recipe
    from editflow.models.section import resolve_device

    result = run_recipe(
        recipe, cache=cache, out_dir=out_dir, device=device, events=events, registry=registry
    )
    plan = result.plan
    files = {path.relative_to(out_dir).as_posix(): path for path in result.written}
    facts = lock_facts(plan, cache, resolve_device(device), files)
    outcome = ReproResult(recipe, facts, result.computed, result.hits, result.written)
    return outcome, result.registry


def describe(drift: Drift) -> list[str]:
    """The drift in lines, as ``repro`` prints them."""
    lines = []
    if drift.platform_changes:
        lines.append(
            "platform differs from the lock's (" + ", ".join(drift.platform_changes) + "):"
            " output digests are not comparable; keys decide"
        )
    for stage, reasons in drift.stages.items():
        lines += [f"{stage}: {reason}" for reason in reasons]
    lines += [f"{name}: {reason}" for name, reason in drift.files.items()]
    return lines
