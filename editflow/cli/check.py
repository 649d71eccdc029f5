"""Checking a rerun against its lock: exact where the platform allows, tolerant elsewhere.

Keys are compared on every platform: a stage whose key changed is drift, named down to the
parameter, input file, seed, library, model or stage version (the words of ``plan``). Where
a stage's cache entry was computed on the platform the lock records for it (the same
:mod:`fingerprint <editflow.fingerprint>`), its output digests and the exported pixels must
match exactly; anything else there is drift that the key does not cover. Where the platform
differs, the difference is named and exported images are compared with the baselines beside
the lock within the recipe's ``[check]`` tolerance.

A lock cannot switch its own check off: a platform table whose lines do not hash to its name,
a baseline whose bytes are not the locked file's, or a stage without digests is distrusted
and reported as drift; a ``recipe_sha256`` that is not the recipe's only means exported
files are compared by pixels (they always are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow import fingerprint as platform
from editflow.cli.lock import (
    REWRITE,
    Lock,
    StageRun,
    baseline_dir,
    file_sha256,
    lock_facts,
)
from editflow.files.textcheck import compare_exported
from editflow.imagecheck import CheckSection, ImageDifference

# File statuses that are drift.
BAD = ("beyond", "differs", "missing", "new", "no baseline", "distrusted")


@dataclass
class FileCheck:
    """One exported file against the lock."""

    name: str
    status: str  # exact | within | beyond | differs | missing | new | no baseline | distrusted
    line: str  # what the report says of it
    image: Path | None = None  # the rerun's file
    baseline: Path | None = None  # the lock's copy
    difference: ImageDifference | None = None


@dataclass
class Verdict:
    """How a rerun compares with its lock."""

    stages: dict[str, list[str]] = field(default_factory=dict)  # stage -> drift reasons
    files: list[FileCheck] = field(default_factory=list)
    platform: list[str] = field(default_factory=list)  # how the platform differs, if it does
    distrusted: list[str] = field(default_factory=list)  # lock lines not believed
    notes: list[str] = field(default_factory=list)  # worth saying, not drift

    @property
    def exact(self) -> bool:
        return not self.platform and not self.distrusted

    @property
    def drifted(self) -> bool:
        bad_files = any(check.status in BAD for check in self.files)
        return bool(self.stages or self.distrusted or bad_files)

    @property
    def state(self) -> str:
        if self.drifted:
            return "drift"
        return "matches its lock" if self.exact else "within tolerance"

    def lines(self) -> list[str]:
        """The verdict in lines, as ``repro`` and ``figures`` print them."""
        lines = [f"distrusted: {line}" for line in self.distrusted]
        if self.platform:
            lines.append(
                "platform differs from the lock's (" + "; ".join(self.platform) + "):"
                " images compared within tolerance"
            )
        for stage, reasons in self.stages.items():
            lines += [f"{stage}: {reason}" for reason in reasons]
        lines += [f"{check.name}: {check.line}" for check in self.files if check.status != "exact"]
        return lines + self.notes


def compare(
    lock: Lock, facts: dict[str, Any], *, recipe: Path, files: dict[str, Path],
    tolerance: CheckSection,
) -> Verdict:  # fmt: skip
    """Compare a rerun's facts (:func:`editflow.cli.lock.lock_facts`) and exported files with
    a lock and its baselines."""
    from editflow.engine.keys import describe_changes

    verdict = Verdict()
    trusted = {}
    for name, facts_of_platform in sorted(lock.platforms.items()):
        if platform.digest(facts_of_platform) == name:
            trusted[name] = facts_of_platform
        else:
            verdict.distrusted.append(
                f"platforms.{name}: its lines do not hash to its name (edited after locking?);"
                f" {REWRITE}"
            )
    new_stages, new_platforms = facts["stage"], facts["platforms"]
    for stage in sorted(set(lock.stage) - set(new_stages)):
        verdict.stages[stage] = ["in the lock but not in the recipe"]
    for stage in sorted(set(new_stages) - set(lock.stage)):
        verdict.stages[stage] = ["new: not in the lock"]
    phrases: list[str] = []
    for stage in sorted(set(lock.stage) & set(new_stages)):
        old, new = lock.stage[stage], new_stages[stage]
        if old.key != new["key"]:
            verdict.stages[stage] = describe_changes(
                _preimage_view(old.model_dump(), lock.library),
                _preimage_view(new, facts["library"]),
            )
            continue
        here = new_platforms.get(new.get("platform", ""))
        there = trusted.get(old.platform or "")
        if here is None or there is None or here != there:
            if here is None:
                phrases.append(f"the cache entry of {stage} records no platform")
            elif there is not None:
                phrases += platform.differences(there, here)
            continue
        missing = sorted(set(new.get("digest", {})) - set(old.digest))
        changed = sorted(o for o in old.digest if old.digest[o] != new.get("digest", {}).get(o))
        if missing:
            verdict.stages[stage] = [f"the lock has no digest of {', '.join(missing)}"]
        elif changed:
            verdict.stages[stage] = [
                f"same key and platform as the lock, other outputs ({', '.join(changed)}):"
                " something the key does not cover changed (a stage's code without a version"
                " bump?)"
            ]
    verdict.platform = list(dict.fromkeys(phrases))
    if lock.recipe_sha256 != facts["recipe_sha256"] and not verdict.stages:
        verdict.notes.append(
            "recipe_sha256 is not this recipe's, yet no key changed (an edit that touches no"
            " stage, or the line was edited): exported files are compared by their pixels"
        )
    verdict.files = _check_files(lock, facts, recipe, files, tolerance, exact=verdict.exact)
    return verdict


def _check_files(
    lock: Lock, facts: dict[str, Any], recipe: Path, files: dict[str, Path],
    tolerance: CheckSection, *, exact: bool,
) -> list[FileCheck]:  # fmt: skip
    checks = []
    folder = baseline_dir(recipe)
    for name in sorted(set(lock.file) | set(facts["file"])):
        image, baseline = files.get(name), folder / name
        if name not in facts["file"]:
            checks.append(FileCheck(name, "missing", "in the lock but not written"))
            continue
        if name not in lock.file:
            checks.append(FileCheck(name, "new", "written but not in the lock", image))
            continue
        locked, written = lock.file[name], facts["file"][name]
        if exact and locked.pixels == written["pixels"]:
            checks.append(FileCheck(name, "exact", "same pixels", image, baseline))
            continue
        if not baseline.is_file():
            line = f"no baseline image {baseline.relative_to(folder.parent)} beside the lock"
            checks.append(FileCheck(name, "no baseline", f"{line} ({REWRITE})", image))
            continue
        if file_sha256(baseline) != locked.sha256:
            line = f"its baseline {baseline.relative_to(folder.parent)} is not the locked file"
            checks.append(FileCheck(name, "distrusted", f"{line} ({REWRITE})", image))
            continue
        difference = compare_exported(baseline, image, tolerance)  # tables, SVG: as text
        described = difference.describe(tolerance)
        if exact:  # the lock's platform: any other pixel is drift
            line = f"other pixels than the lock's on the lock's platform: {described}"
            checks.append(FileCheck(name, "differs", line, image, baseline, difference))
        else:
            status = "within" if difference.within(tolerance) else "beyond"
            checks.append(FileCheck(name, status, described, image, baseline, difference))
    return checks


def _preimage_view(stage: dict[str, Any], library: dict[str, str]) -> dict[str, Any]:
    """A stage's lock table as a preimage-shaped dict for ``describe_changes``."""
    kind, _, version = str(stage.get("kind", "@")).partition("@")
    view = {"kind": kind, "kind_version": version, "models": stage.get("models") or None,
            "versions": library}  # fmt: skip
    for part in ("params", "inputs", "seed", "seed_path", "dtype"):
        view[part] = stage.get(part)
    return view


# ------------------------------------------------------------------------------- rerunning


@dataclass
class Rerun:
    """One recipe run through the cache (a sweep's every point), as a lock sees it."""

    recipe: Path
    facts: dict[str, Any]
    files: dict[str, Path]  # exported file name (relative to the output folder) -> path
    computed: list[str]
    cached: list[str]
    tolerance: CheckSection
    registry: Any = None  # the models the run used, to share with the next recipe


def rerun(
    recipe: Path, *, cache: Any, out_dir: Path, device: str = "auto", events: Any = None,
    registry: Any = None, threads: int | None = None, known_pixels: Any = None,
) -> Rerun:  # fmt: skip
    """Run a recipe (all its ``[sweep]`` points when it has a table) through the cache and
    collect its lock facts."""
    from editflow.cli.sweeps import run_sweep, table_axes
    from editflow.documents import read_document
    from editflow.engine.api import run_recipe

    document, _ = read_document(recipe)
    axes = table_axes(document)
    if axes:
        sweep = run_sweep(recipe, axes, cache=cache, out_root=out_dir, device=device,
                          events=events, registry=registry, threads=threads)  # fmt: skip
        runs = [(f"{point.name}/", outcome) for point, outcome in zip(
            sweep.points, sweep.outcomes, strict=True)]  # fmt: skip
        written = sweep.written + ([sweep.grid] if sweep.grid else [])
    else:
        outcome = run_recipe(recipe, cache=cache, out_dir=out_dir, device=device, events=events,
                             registry=registry, threads=threads)  # fmt: skip
        runs, written = [("", outcome)], outcome.written
    stages, models = {}, {}
    for prefix, outcome in runs:
        models.update(outcome.plan.models)
        for stage in outcome.plan.needed:
            outputs = [port.name for port in stage.kind.outputs]
            stages[prefix + stage.name] = StageRun(
                stage.key, stage.preimage, outputs, cache.get(stage.key)
            )
    plan = runs[0][1].plan
    recipe_hash = plan.recipe_hash if not axes else _sweep_hash(document)
    files = {path.relative_to(out_dir).as_posix(): path for path in written}
    facts = lock_facts(recipe.name, recipe_hash, models, stages, files, known_pixels)
    return Rerun(
        recipe, facts, files,
        computed=[prefix + name for prefix, outcome in runs for name in outcome.computed],
        cached=[prefix + name for prefix, outcome in runs for name in outcome.hits],
        tolerance=plan.loaded.recipe.check, registry=runs[-1][1].registry,
    )  # fmt: skip


def _sweep_hash(document: dict[str, Any]) -> str:
    import hashlib

    from editflow.engine.keys import canonical_json

    return hashlib.sha256(canonical_json(document).encode()).hexdigest()
