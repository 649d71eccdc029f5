"""Lock files and `repro`: drift named by stage and reason, non-determinism, updates,
figures that carry their recipe, and JSON outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from editflow.cli import main
from editflow.inputs import skimage_photos
from editflow.lock import lock_path
from editflow.stages.sample import SampleEditFriendly

RECIPE = """schema_version = 1
seed = 0

[model]
id = "tiny"

[inputs.photo]
image = "photo.png"
size = [64, 64]

[stages.encode]
kind = "encode.vae"
images = "inputs.photo"

[stages.invert]
kind = "invert.edit_friendly"
latents = "encode.latents"
source_prompt = "a photo of a cat"
num_inference_steps = 4

[stages.edit]
kind = "sample.edit_friendly"
noise_maps = "invert.noise_maps"
auxiliary_path = "invert.auxiliary_path"
target_prompt = "a photo of a dog"
skip = 1

[stages.figure]
kind = "decode.vae"
latents = "edit.latents"
"""


@pytest.fixture()
def locked(tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    folder = tmp_path / "recipe"
    folder.mkdir()
    shutil.copy(skimage_photos()["chelsea"], folder / "photo.png")
    recipe = folder / "edit.toml"
    recipe.write_text(RECIPE)
    assert main(["lock", str(recipe), *_where(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{lock_path(recipe)}: 4 stages, 1 files"
    return recipe


def _where(tmp_path: Path) -> list[str]:
    return ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--device", "cpu"]


def _check(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str):
    code = main(["repro", "--check", str(recipe), *_where(tmp_path), *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def test_a_lock_is_sorted_facts_one_per_line(locked: Path) -> None:
    lines = [
        line for line in lock_path(locked).read_text().splitlines() if not line.startswith("#")
    ]
    assert lines == sorted(lines)
    facts = dict(line.split(" = ", 1) for line in lines)
    assert json.loads(facts["stage.edit.kind"]) == "sample.edit_friendly@1"
    assert json.loads(facts["platform.threads"]) >= 1
    assert json.loads(facts["library.torch"]).startswith("2.")
    assert "tiny" in json.loads(facts['model."model.id"'])["identity"]
    assert len(json.loads(facts['file."figure.png"'])) == 64


def test_an_unchanged_rerun_matches_its_lock(locked, tmp_path, capsys) -> None:
    code, lines = _check(locked, tmp_path, capsys)
    assert (code, lines) == (0, [f"{locked}: matches its lock"])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r.write_text(r.read_text().replace("skip = 1", "skip = 2")),
         ["edit: params.skip: 1 -> 2", "figure: input 'latents' changed upstream (edit)"]),
        (lambda r: r.write_text(r.read_text().replace("seed = 0", "seed = 1")),
         ["edit: input 'auxiliary_path' changed upstream (invert)",
          "edit: input 'noise_maps' changed upstream (invert)",
          "figure: input 'latents' changed upstream (edit)", "invert: seed: 0 -> 1"]),
        (lambda r: shutil.copy(skimage_photos()["coffee"], r.parent / "photo.png"),
         ["edit: input 'auxiliary_path' changed upstream (invert)",
          "edit: input 'noise_maps' changed upstream (invert)",
          "encode: input 'images' changed upstream (inputs.photo)",
          "figure: input 'latents' changed upstream (edit)",
          "invert: input 'latents' changed upstream (encode)",
          "figure.png: other bytes than the lock's"]),
    ],
    ids=["parameter", "seed", "input image"],
)  # fmt: skip
def test_a_change_is_drift_named_by_stage_and_reason(
    locked, tmp_path, capsys, change, expected
) -> None:
    change(locked)
    code, lines = _check(locked, tmp_path, capsys)
    assert code == 1
    assert lines == [f"{locked}: drift", *(f"  {line}" for line in expected)]


def test_a_stage_version_bump_is_drift(locked, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(SampleEditFriendly, "version", "2")
    code, lines = _check(locked, tmp_path, capsys)
    assert code == 1
    assert "  edit: stage version: '1' -> '2'" in lines


def test_other_outputs_under_the_same_key_are_non_determinism(locked, tmp_path, capsys) -> None:
    path = lock_path(locked)
    text = path.read_text()
    line = next(line for line in text.splitlines() if line.startswith("stage.edit.digest.latents"))
    path.write_text(text.replace(line, 'stage.edit.digest.latents = "0000"'))
    code, lines = _check(locked, tmp_path, capsys)
    assert (code, lines) == (1, [
        f"{locked}: drift",
        "  edit: same key, other outputs (latents): the computation is not deterministic on"
        " this platform",
    ])  # fmt: skip
    # --update rewrites the lock from the rerun; then it matches.
    code, lines = _check(locked, tmp_path, capsys, "--update")
    assert code == 0 and lines[0] == f"{locked}: drift (lock updated)"
    assert _check(locked, tmp_path, capsys) == (0, [f"{locked}: matches its lock"])


def test_on_another_platform_keys_alone_decide(locked, tmp_path, capsys) -> None:
    path = lock_path(locked)
    text = path.read_text()
    threads = next(line for line in text.splitlines() if line.startswith("platform.threads"))
    lines = [line for line in text.splitlines() if not line.startswith("stage.edit.digest")]
    path.write_text("\n".join(lines).replace(threads, "platform.threads = 64") + "\n")
    code, out = _check(locked, tmp_path, capsys)
    assert code == 0
    assert out[1].startswith("  platform differs from the lock's (threads 64 -> ")
    assert out[1].endswith("): output digests are not comparable; keys decide")


def test_a_missing_lock_says_to_run_lock(tmp_path, capsys) -> None:
    recipe = tmp_path / "edit.toml"
    recipe.write_text(RECIPE)
    code = main(["repro", "--check", str(recipe), *_where(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"{recipe}: no lock file edit.toml.lock next to the recipe (run `editflow lock {recipe}`"
        " and commit edit.toml.lock)"
    )


def test_repro_json_carries_what_the_text_says(locked, tmp_path, capsys) -> None:
    locked.write_text(locked.read_text().replace("skip = 1", "skip = 2"))
    code = main(["repro", str(locked), "--json", *_where(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0  # without --check drift is reported, not an error
    assert result[0]["drift"]["edit"] == ["params.skip: 1 -> 2"]
    assert result[0]["computed"] == ["edit", "figure"]
    _, lines = _check(locked, tmp_path, capsys)
    assert [line.strip() for line in lines[1:]] == result[0]["lines"]


def test_a_figure_reruns_the_recipe_that_made_it_byte_for_byte(
    locked, tmp_path, capsys, monkeypatch
) -> None:
    figure = tmp_path / "out" / "edit" / "figure.png"
    with Image.open(figure) as image:
        document = json.loads(image.text["editflow:recipe_json"])
    assert document["stages"]["edit"]["skip"] == 1
    locked.write_text(locked.read_text().replace("skip = 1", "skip = 3"))  # the file moves on
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(figure), "--cache", str(tmp_path / "fresh"), "--out",
                 str(tmp_path / "again"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert (tmp_path / "again" / "figure.png").read_bytes() == figure.read_bytes()
    assert "4 computed" in capsys.readouterr().err
    code = main(["run", str(tmp_path / "again" / "figure.png"), "--cache", str(tmp_path / "fresh"),
                 "--out", str(tmp_path / "again"), "--device", "cpu"])  # fmt: skip
    assert code == 0 and "4 stages were in the cache, 0 computed" in capsys.readouterr().err


def test_a_png_without_a_recipe_is_refused(tmp_path, capsys) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code = main(["run", str(tmp_path / "plain.png"), "--cache", str(tmp_path / "c")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"{tmp_path / 'plain.png'}: not a figure editflow wrote (no editflow:recipe_json text chunk)"
    )


def test_plan_and_cache_ls_json_carry_the_text_facts(locked, tmp_path, capsys) -> None:
    locked.write_text(locked.read_text().replace("skip = 1", "skip = 2"))
    assert main(["plan", str(locked), "--json", "--cache", str(tmp_path / "cache")]) == 0
    rows = {row["stage"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["encode"]["status"] == "hit"
    assert rows["edit"]["status"] == "miss"
    assert rows["edit"]["reasons"] == ["params.skip: 1 -> 2"]
    assert main(["cache", "ls", "--json", "--cache", str(tmp_path / "cache")]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert sorted(entry["stage"] for entry in entries) == ["edit", "encode", "figure", "invert"]
    assert all(len(entry["key"]) == 64 and entry["stored_bytes"] > 0 for entry in entries)


def test_validate_plan_and_an_all_hit_run_import_no_torch_diffusers_or_transformers(
    locked, tmp_path
) -> None:
    """A cached run is a lookup: declaring stages, planning and hitting the cache load no ML
    library (checked in a fresh interpreter after each command)."""
    import subprocess
    import sys

    commands = {
        "validate": ["validate", str(locked), "--cache", str(tmp_path / "cache")],
        "plan": ["plan", str(locked), "--cache", str(tmp_path / "cache")],
        "run": ["run", str(locked), "--cache", str(tmp_path / "cache"), "--out",
                str(tmp_path / "out" / "edit")],
    }  # fmt: skip
    for name, argv in commands.items():
        script = (
            "import sys\nfrom editflow.cli import main\n"
            f"assert main({argv!r}) == 0\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", name
    assert "0 computed, 4 cached" in done.stderr


def test_figures_json_and_table_say_the_same(locked, tmp_path, capsys) -> None:
    folder = locked.parent
    assert main(["figures", str(folder), *_where(tmp_path)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["recipe", "computed", "cached", "outputs", "drift"]
    assert table[1].split() == ["edit.toml", "0", "4", "1", "none"]
    assert main(["figures", str(folder), "--json", *_where(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["recipe"], r["computed"], r["cached"], r["outputs"], r["drift"]) for r in rows] == [
        ("edit.toml", 0, 4, 1, "none")
    ]
