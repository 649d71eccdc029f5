"""pix2pix-zero through the engine: composition with other inversions, sentence files."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import MANIFESTS, RECIPES

from editflow.cache import Cache
from editflow.cli import main
from editflow.engine.api import plan_recipe

CUSTOM = MANIFESTS / "pix2pix_zero" / "custom_sentences.toml"


def test_an_edit_friendly_x_T_is_refused_by_pix2pix_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # It used to run: the reference pass reconstructed nothing (relative error 9.86), so the
    # guided edit followed noise. A stochastic x_T needs its noise maps to come back.
    recipe = RECIPES / "edit_friendly_into_pix2pix_zero.toml"
    assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 2
    wanted = "is a stochastic x_T (an edit-friendly inversion), but this input takes a" \
        " deterministic x_T (a DDIM inversion)"  # fmt: skip
    assert capsys.readouterr().err.splitlines() == [
        f"{recipe}:27: stages.reference.x_T: 'invert.x_T' {wanted}",
        f"{recipe}:33: stages.guided.x_T: 'invert.x_T' {wanted}",
    ]


def _copy_recipe(tmp_path: Path, dog_text: str) -> Path:
    folder = tmp_path / "recipe"
    folder.mkdir(exist_ok=True)
    (folder / "recipe.toml").write_text(CUSTOM.read_text())
    (folder / "cat.txt").write_text((CUSTOM.parent / "cat.txt").read_text())
    (folder / "dog.txt").write_text(dog_text)
    return folder / "recipe.toml"


def test_editing_a_sentence_file_changes_only_the_direction_and_what_follows(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path / "c")
    recipe = _copy_recipe(tmp_path, (CUSTOM.parent / "dog.txt").read_text())
    before = {n: s.key for n, s in plan_recipe(recipe, cache=cache).stages.items()}
    _copy_recipe(tmp_path, "A dog runs on the beach.\n")
    after = {n: s.key for n, s in plan_recipe(recipe, cache=cache).stages.items()}
    changed = {name for name in before if before[name] != after[name]}
    # cat_bank keeps its key: a direction from cat.txt to any other bank reuses its mean.
    assert changed == {
        "dog_bank",
        "direction",
        "unguided",
        "guided",
        "decode_unguided",
        "decode_guided",
        "figure",
    }


def test_an_empty_sentence_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = _copy_recipe(tmp_path, "\n  \n")
    code = main(["run", str(recipe), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
                 "--target", "direction"])  # fmt: skip
    assert code == 2
    # Found while planning: nothing upstream (captioning, encoding) ran first.
    assert (
        capsys.readouterr().err.strip()
        == f"{recipe}:19: inputs.dog_sentences.text: dog.txt is empty"
    )
    assert not (tmp_path / "c").exists()
