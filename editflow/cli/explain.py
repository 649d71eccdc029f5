"""``editflow explain RECIPE STAGE``: why a stage's key is what it is, compared with the stage's
last run in this cache, with the recipe's lock (``--against lock``) or with the recipe at a
git revision (``--against REV``)."""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError

GIT_SECONDS = 60  # a git command on a local repository; more means something is wrong


def against_last_run(plan: Any, stage: Any, cache: Any) -> list[str]:
    """The stage's key against its last run in this cache, one line each."""
    from editflow.engine.execute import last_run_record
    from editflow.engine.keys import describe_changes

    record = cache.get_record(last_run_record(plan, stage.name))
    if record is None:
        return ["no earlier run of this stage is recorded in this cache"]
    if record["key"] == stage.key:
        state = "present" if cache.has(stage.key) else "missing from the cache"
        return [f"unchanged since the last run (entry {state})"]
    return [f"last run {record['key']}"] + describe_changes(
        record["preimage"], stage.preimage, width=None
    )


def against_lock(recipe: Path, plan: Any, stage: Any) -> list[str]:
    """The stage's key against the one ``RECIPE.lock`` records, and the key's parts that
    differ (parameters, inputs, models by digest, seed, dtype, library versions)."""
    from editflow.cli.check import _preimage_view
    from editflow.cli.lock import StageRun, lock_facts, lock_path, read_lock
    from editflow.engine.keys import describe_changes

    lock = read_lock(recipe)
    name = lock_path(recipe).name
    locked = lock.stage.get(stage.name)
    if locked is None:
        points = sorted(s for s in lock.stage if s.endswith(f"/{stage.name}"))
        if points:  # a sweep's lock keeps each point's stages
            return [f"{name} keeps this stage per sweep point ({', '.join(points)}),"
                    " not as one stage"]  # fmt: skip
        return [f"not in {name}: the stage is new since the recipe was locked"]
    if locked.key == stage.key:
        return [f"same key as {name}"]
    # The lock keeps models as digests: the rerun's stage in the lock's own terms.
    run = StageRun(stage.key, stage.preimage, [], None)
    facts = lock_facts(recipe.name, plan.recipe_hash, {}, {stage.name: run}, {})
    now = _preimage_view(facts["stage"][stage.name], facts["library"])
    then = _preimage_view(locked.model_dump(), lock.library)
    return [f"{name}: key {locked.key}"] + describe_changes(then, now, width=None)


def against_revision(recipe: Path, plan: Any, stage: Any, revision: str, cache: Any) -> list[str]:
    """The stage's key against the recipe as committed at ``revision``, planned in the
    recipe's folder (inputs read from the working tree) and confined to it, as untrusted."""
    from editflow.engine.api import plan_recipe
    from editflow.engine.keys import describe_changes

    document, label = recipe_at_revision(recipe, revision)
    try:
        then = plan_recipe(recipe, [], cache=cache, document=document, confined=True)
    except EditflowError as error:
        raise _relabelled(error, str(recipe), label) from None
    old = then.stages.get(stage.name)
    if old is None:
        return [f"not in the recipe at {label}"]
    if old.key == stage.key:
        return [f"same key as at {label}"]
    return [f"at {label}: key {old.key}"] + describe_changes(
        old.preimage, stage.preimage, width=None
    )


def recipe_at_revision(recipe: Path, revision: str) -> tuple[dict[str, Any], str]:
    """The recipe's document as committed at a git revision (``git show REV:path``), read as
    strictly as a recipe file, and its label ``REV:path``.

    Raises:
        EditflowError: No git, not a git repository, an unknown revision, the recipe not at
            that revision, or a document that cannot be read as a recipe.
    """
    from editflow.documents import MAX_RECIPE_BYTES, read_document

    if not revision or revision.startswith("-"):  # never an option to git
        raise EditflowError(f"{revision!r} is not a git revision", file="--against")
    folder = Path(recipe).resolve().parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise EditflowError(
            f"{recipe} is not in a git repository", file="--against",
            hint="--against REV reads the recipe from git; --against lock reads its lock file",
        )  # fmt: skip
    path = Path(recipe).resolve().relative_to(Path(top.stdout.strip()).resolve()).as_posix()
    label = f"{revision}:{path}"
    if _git(folder, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").returncode:
        raise EditflowError(f"unknown git revision {revision!r}", file="--against")
    kind = _git(folder, "cat-file", "-t", f"{revision}:{path}")
    if kind.returncode != 0 or kind.stdout.strip() != "blob":
        raise EditflowError(f"{path} is not in revision {revision}", file="--against")
    size = _git(folder, "cat-file", "-s", f"{revision}:{path}")
    if int(size.stdout.strip() or 0) > MAX_RECIPE_BYTES:
        raise EditflowError(f"larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe", file=label)
    blob = _git(folder, "cat-file", "blob", f"{revision}:{path}", text=False)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / Path(path).name  # its suffix says TOML or JSON
        copy.write_bytes(blob.stdout)
        try:
            document, _ = read_document(copy)
        except EditflowError as error:
            raise _relabelled(error, str(copy), label, keep_lines=True) from None
    return document, label


def _git(folder: Path, *arguments: str, text: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["git", "-C", str(folder), *arguments],
            capture_output=True, text=text, timeout=GIT_SECONDS, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise EditflowError("git is not installed", file="--against") from None


def _relabelled(
    error: EditflowError, file: str, label: str, keep_lines: bool = False
) -> EditflowError:
    """The error with problems in ``file`` said to be in ``label``. Lines are kept only
    where they count in the committed text (a planned document's lines are its JSON's)."""
    problems = [
        dataclasses.replace(p, file=label, line=p.line if keep_lines else None)
        if p.file == file
        else p
        for p in error.problems
    ]
    return type(error)(problems=problems)
