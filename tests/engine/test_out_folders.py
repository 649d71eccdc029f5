"""Where `run` writes: out/<the recipe's path under manifests/ (else its name)>/, a folder of
its own per set of --set overrides with those overrides beside the files, and --out above
both."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from PIL import Image

from editflow.cli import main
from editflow.cli.recipes import default_out_dir, overrides_digest, write_overrides

RECIPE = """schema_version = 1
[inputs.photo]
image = "skimage:chelsea"
size = [32, 32]
[stages.encode]
kind = "encode.vae"
images = "inputs.photo"
[stages.decode]
kind = "decode.vae"
latents = "encode.latents"
"""
COFFEE = "inputs.photo.image=skimage:coffee"


def test_the_out_folder_keeps_the_recipe_path_under_the_nearest_manifests_folder(
    tmp_path: Path,
) -> None:
    assert default_out_dir(Path("manifests/quickstart.toml")) == Path("out/quickstart")
    nested = Path("manifests/compositing/background.toml")
    assert default_out_dir(nested) == Path("out/compositing/background")
    # Two recipes named alike, in two method folders, no longer share a folder.
    other = Path("manifests/interpolation/background.toml")
    assert default_out_dir(other) == Path("out/interpolation/background")
    # The nearest manifests folder counts; outside any, the recipe's own folder is the root.
    inner = tmp_path / "manifests" / "a" / "manifests" / "b" / "edit.json"
    assert default_out_dir(inner) == Path("out/b/edit")
    assert default_out_dir(tmp_path / "experiments" / "edit.toml") == Path("out/edit")


def test_overrides_name_a_stable_folder_whatever_their_order_and_spacing() -> None:
    overrides = ["stages.edit.guidance_scale=5", "seed=3"]
    digest = overrides_digest(overrides)
    assert digest == "e1efc3ca7b43"  # the same on every machine and every run
    assert overrides_digest(["seed = 3", " stages.edit.guidance_scale= 5"]) == digest
    assert overrides_digest(["seed=4", "stages.edit.guidance_scale=5"]) != digest
    # A key set twice: the last one wins, so the order is part of the name.
    assert overrides_digest(["seed=1", "seed=2"]) != overrides_digest(["seed=2", "seed=1"])
    assert default_out_dir(Path("manifests/quickstart.toml"), overrides) == Path(
        "out/quickstart/e1efc3ca7b43"
    )


def test_the_overrides_file_lists_the_recipe_and_the_values_as_given(tmp_path: Path) -> None:
    assert write_overrides(tmp_path / "a", Path("manifests/q.toml"), []) is None
    path = write_overrides(tmp_path / "b", Path("manifests/q.toml"), ["seed = 3", COFFEE])
    assert path == tmp_path / "b" / "overrides.toml"
    text = path.read_text()
    assert text.startswith("# The --set values the outputs in this folder were made with.\n")
    assert tomllib.loads(text) == {"recipe": "manifests/q.toml", "set": ["seed = 3", COFFEE]}


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_folder: Path) -> Path:
    """A project folder with manifests/demo/ok.toml; commands run from it."""
    recipe = tmp_path / "manifests" / "demo" / "ok.toml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(project: Path, *argv: str) -> int:
    return main(["run", *argv, "--cache", str(project / "cache"), "--device", "cpu"])


def test_a_run_with_overrides_leaves_the_recipes_own_outputs_alone(project: Path, capsys) -> None:
    assert _run(project, "manifests/demo/ok.toml") == 0
    own = project / "out" / "demo" / "ok" / "decode.png"
    before = own.read_bytes()
    assert not (own.parent / "overrides.toml").exists()

    assert _run(project, "manifests/demo/ok.toml", "--set", COFFEE) == 0
    folder = own.parent / overrides_digest([COFFEE])
    assert sorted(p.name for p in folder.iterdir()) == ["decode.png", "overrides.toml"]
    assert own.read_bytes() == before  # the canonical output is untouched
    assert (folder / "decode.png").read_bytes() != before  # another photo, other pixels
    written = tomllib.loads((folder / "overrides.toml").read_text())
    assert written == {"recipe": "manifests/demo/ok.toml", "set": [COFFEE]}
    assert f"files in {Path('out/demo/ok') / overrides_digest([COFFEE])} (" in (
        capsys.readouterr().err
    )

    # A figure replayed with overrides gets a folder of its own too.
    assert _run(project, str(own), "--set", COFFEE) == 0
    replay = project / "out" / "decode" / overrides_digest([COFFEE])
    with Image.open(replay / "decode.png") as replayed, Image.open(folder / "decode.png") as ran:
        assert replayed.tobytes() == ran.tobytes()  # the text chunks say where it ran
    assert tomllib.loads((replay / "overrides.toml").read_text())["set"] == [COFFEE]


def test_out_wins_over_the_default_folder_and_gets_no_overrides_file(project: Path) -> None:
    assert _run(project, "manifests/demo/ok.toml", "--set", COFFEE, "--out", "mine") == 0
    assert sorted(p.name for p in (project / "mine").iterdir()) == ["decode.png"]
    assert not (project / "out").exists()
