"""`editflow explain RECIPE STAGE --against lock|REV`: a stage's key compared with the one the
recipe's lock records, or with the recipe as committed at a git revision (planned confined
to the recipe's folder, as untrusted). Plan-only: nothing here runs a stage."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import MANIFESTS

from editflow.cli import main
from editflow.cli.lock import StageRun, lock_facts, write_lock
from editflow.engine.api import open_cache, plan_recipe

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


def _explain(capsys: pytest.CaptureFixture, recipe: Path, *argv: str) -> tuple[int, list[str]]:
    code = main(["explain", str(recipe), *argv, "--cache", str(recipe.parent / "cache")])
    captured = capsys.readouterr()
    return code, (captured.out if code == 0 else captured.err).strip().splitlines()


def _key(recipe: Path, stage: str, *overrides: str) -> str:
    plan = plan_recipe(recipe, list(overrides), cache=open_cache(recipe.parent / "cache"))
    return plan.stages[stage].key


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    """The quick start in a folder of its own (a photo it reads beside it)."""
    path = tmp_path / "project" / "recipes" / "quick.toml"
    path.parent.mkdir(parents=True)
    shutil.copy(MANIFESTS / "quickstart.toml", path)
    return path


def _lock_from_plan(recipe: Path) -> None:
    """A lock written from the plan alone (keys and key parts; no outputs, no files)."""
    plan = plan_recipe(recipe, cache=open_cache(recipe.parent / "cache"))
    stages = {s.name: StageRun(s.key, s.preimage, [], None) for s in plan.stages.values()}
    facts = lock_facts(recipe.name, plan.recipe_hash, plan.models, stages, {})
    write_lock(recipe, facts, {})


def test_against_the_lock_names_the_parameters_that_changed(recipe: Path, capsys) -> None:
    code, lines = _explain(capsys, recipe, "edit", "--against", "lock")
    assert code == 2
    assert lines == [
        f"{recipe}: no lock file quick.toml.lock next to the recipe (run `editflow lock"
        f" {recipe}` and commit quick.toml.lock and quick.toml.baseline/)"
    ]
    _lock_from_plan(recipe)
    locked = _key(recipe, "edit")
    code, lines = _explain(capsys, recipe, "edit", "--against", "lock")
    assert (code, lines) == (
        0,
        [f"edit (sample.ddim) key {locked}", "  same key as quick.toml.lock"],
    )

    change = ["--set", "stages.edit.guidance_scale=5", "--set", "stages.invert.prompt=a fox"]
    code, lines = _explain(capsys, recipe, "edit", "--against", "lock", *change)
    assert code == 0
    assert lines == [
        f"edit (sample.ddim) key {_key(recipe, 'edit', *change[1::2])}",
        f"  quick.toml.lock: key {locked}",
        "  input 'latents' changed upstream (invert)",
        "  params.guidance_scale: 3.0 -> 5.0",
    ]


def _git(folder: Path, *argv: str) -> None:
    subprocess.run([*GIT, "-C", str(folder), *argv], check=True, capture_output=True)


@needs_git
def test_against_a_git_revision_plans_the_committed_recipe(recipe: Path, capsys) -> None:
    code, lines = _explain(capsys, recipe, "edit", "--against", "HEAD")
    assert (code, lines) == (2, [
        f"--against: {recipe} is not in a git repository (--against REV reads the recipe from"
        " git; --against lock reads its lock file)"
    ])  # fmt: skip
    project = recipe.parents[1]
    _git(project, "init", "-q")
    _git(project, "add", "recipes/quick.toml")
    _git(project, "commit", "-q", "-m", "quick start")
    committed = _key(recipe, "edit")
    code, lines = _explain(capsys, recipe, "edit", "--against", "HEAD")
    assert lines == [
        f"edit (sample.ddim) key {committed}",
        "  same key as at HEAD:recipes/quick.toml",
    ]
    recipe.write_text(recipe.read_text().replace("a photo of a dog", "a photo of a fox"))
    code, lines = _explain(capsys, recipe, "edit", "--against", "HEAD")
    assert (code, lines) == (0, [
        f"edit (sample.ddim) key {_key(recipe, 'edit')}",
        f"  at HEAD:recipes/quick.toml: key {committed}",
        "  params.prompt: 'a photo of a dog' -> 'a photo of a fox'",
    ])  # fmt: skip
    # A stage added since that revision is said to be new there.
    recipe.write_text(recipe.read_text() + '\n[stages.again]\nkind = "decode.vae"\n'
                      'latents = "edit.latents"\n')  # fmt: skip
    assert _explain(capsys, recipe, "again", "--against", "HEAD")[1][1:] == [
        "  not in the recipe at HEAD:recipes/quick.toml"
    ]

    for revision, message in [
        ("nope", "--against: unknown git revision 'nope'"),
        ("--output=x", "--against: '--output=x' is not a git revision"),
    ]:
        assert _explain(capsys, recipe, "edit", f"--against={revision}") == (2, [message])
    other = recipe.with_name("other.toml")
    shutil.copy(recipe, other)
    assert _explain(capsys, other, "edit", "--against", "HEAD") == (2, [
        "--against: recipes/other.toml is not in revision HEAD"
    ])  # fmt: skip


@needs_git
def test_a_committed_recipe_reads_no_file_outside_the_recipes_folder(recipe: Path, capsys) -> None:
    project = recipe.parents[1]
    (project / "secret.png").write_bytes(b"not for a committed recipe to read")
    text = recipe.read_text()
    recipe.write_text(text.replace('"skimage:chelsea"', '"../secret.png"'))
    _git(project, "init", "-q")
    _git(project, "add", "recipes/quick.toml")
    _git(project, "commit", "-q", "-m", "reads outside")
    recipe.write_text(text)
    code, lines = _explain(capsys, recipe, "edit", "--against", "HEAD")
    assert code == 2
    assert lines == [
        f"HEAD:recipes/quick.toml: inputs.photo.image: ../secret.png is outside the base folder"
        f" {recipe.parent}: an untrusted recipe (a figure's, or one read from git) reads only"
        " files under it (replaying a figure? --base DIR names the folder its inputs are in)"
    ]
