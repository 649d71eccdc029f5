"""Locks and `repro`: TOML locks with baselines, exact checks on the lock's platform,
tolerant ones elsewhere, drift named by stage and reason, and locks that cannot lie."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import modules_imported_by

from editflow import fingerprint
from editflow.cli import main
from editflow.cli.lock import baseline_dir, lock_path
from editflow.files.inputs import skimage_photos
from editflow.stages.edit_friendly.kinds import SampleEditFriendly
from editflow.stages.io.decode import DecodeVae

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


@pytest.fixture(autouse=True)
def keep_threads():
    """Checks set torch's thread count (the lock's, or --threads); the suite runs at one."""
    yield
    torch.set_num_threads(1)


@pytest.fixture()
def locked(tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    folder = tmp_path / "recipe"
    folder.mkdir()
    shutil.copy(skimage_photos()["chelsea"], folder / "photo.png")
    recipe = folder / "edit.toml"
    recipe.write_text(RECIPE)
    assert main(["lock", str(recipe), *_where(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{lock_path(recipe)}: 4 stages, 1 files in edit.toml.baseline/"
    )
    return recipe


def _where(tmp_path: Path, cache: str = "cache") -> list[str]:
    return ["--cache", str(tmp_path / cache), "--out", str(tmp_path / "out"), "--device", "cpu"]


def _check(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str):
    code = main(["repro", "--check", str(recipe), *_where(tmp_path), *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def _edit_lock(recipe: Path, old: str, new: str) -> None:
    path = lock_path(recipe)
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_a_lock_is_toml_with_tables_and_a_baseline_of_each_image(locked: Path) -> None:
    lock = tomllib.loads(lock_path(locked).read_text())
    assert lock["format"] == 2 and lock["recipe"] == "edit.toml"
    assert lock["stage"]["edit"]["kind"] == "sample.edit_friendly@1"
    assert lock["stage"]["edit"]["params"]["skip"] == 1
    assert set(lock["stage"]["edit"]["digest"]) == {"latents"}
    assert lock["library"]["torch"] == torch.__version__
    assert "tiny" in lock["model"]["model.id"]["identity"]
    (platform_name,) = lock["platforms"]
    facts = lock["platforms"][platform_name]
    assert fingerprint.digest(facts) == platform_name
    assert (
        facts["threads"] == 1 and facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )
    assert {stage["platform"] for stage in lock["stage"].values()} == {platform_name}
    assert list(lock["file"]) == ["figure.png"]
    baseline = baseline_dir(locked) / "figure.png"
    assert baseline.read_bytes() == (locked.parents[1] / "out" / "edit" / "figure.png").read_bytes()
    lines = lock_path(locked).read_text().splitlines()
    assert max(len(line) for line in lines) < 120  # no 3,000-character identity line


def test_an_unchanged_rerun_matches_its_lock_exactly(locked, tmp_path, capsys) -> None:
    code, lines = _check(locked, tmp_path, capsys)
    assert (code, lines) == (0, [f"{locked}: matches its lock"])
    # A cold cache on the same platform computes the same bytes.
    code, lines = _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "cold"))
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
          "invert: input 'latents' changed upstream (encode)"]),
    ],
    ids=["parameter", "seed", "input image"],
)  # fmt: skip
def test_a_change_is_drift_named_by_stage_and_reason_and_its_figure_is_beyond_tolerance(
    locked, tmp_path, capsys, change, expected
) -> None:
    change(locked)
    code, lines = _check(locked, tmp_path, capsys)
    assert code == 1
    assert lines[: len(expected) + 1] == [f"{locked}: drift", *(f"  {line}" for line in expected)]
    (figure,) = lines[len(expected) + 1 :]
    assert figure.startswith(
        "  figure.png: other pixels than the lock's on the lock's platform: beyond tolerance (max "
    )


def test_a_stage_version_bump_is_drift(locked, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(SampleEditFriendly, "version", "2")
    code, lines = _check(locked, tmp_path, capsys)
    assert code == 1
    assert "  edit: stage version: '1' -> '2'" in lines


def _brighter(monkeypatch: pytest.MonkeyPatch, amount: float) -> None:
    """A change of a stage's code that its version does not say: keys stay, pixels move."""
    original = DecodeVae.run

    def brighter(self, ctx, params, *, latents):
        return {"images": (original(self, ctx, params, latents=latents)["images"] + amount)}

    monkeypatch.setattr(DecodeVae, "run", brighter)


def test_on_the_locks_platform_other_outputs_under_the_same_key_are_drift_without_blaming_non_determinism(
    locked, tmp_path, capsys, monkeypatch
) -> None:
    _brighter(monkeypatch, 0.001)  # too little to move a pixel: the digests still see it
    code, lines = _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "cold"))
    assert (code, lines[:2]) == (1, [
        f"{locked}: drift",
        "  figure: same key and platform as the lock, other outputs (images): something the key"
        " does not cover changed (a stage's code without a version bump?)",
    ])  # fmt: skip
    # Within tolerance, yet drift: on the lock's platform every pixel must match.
    assert lines[2:] == [
        "  figure.png: other pixels than the lock's on the lock's platform: within tolerance"
        f" (max 1 level, PSNR {lines[2].split('PSNR ')[1]}"
    ]
    # --update rewrites the lock and its baseline; then it matches.
    code, lines = _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "cold"), "--update")
    assert code == 0 and lines[0] == f"{locked}: drift (lock updated)"
    assert _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "cold")) == (
        0, [f"{locked}: matches its lock"]
    )  # fmt: skip


def test_another_thread_count_is_named_and_checked_within_tolerance(
    locked, tmp_path, capsys
) -> None:
    code, lines = _check(
        locked, tmp_path, capsys, "--cache", str(tmp_path / "two"), "--threads", "2"
    )
    assert code == 0
    assert lines[0] == f"{locked}: within tolerance"
    assert lines[1] == (
        "  platform differs from the lock's (threads 1 in the lock, 2 here): images compared"
        " within tolerance"
    )
    assert lines[2].startswith("  figure.png: within tolerance (")


def test_another_cpu_is_named_by_its_features_and_checked_within_tolerance(
    locked, tmp_path, capsys, monkeypatch
) -> None:
    real = fingerprint.cpu_facts()
    amx = {**real, "cpu_features": sorted({*real["cpu_features"], "amx_tile", "avx512_fp16"})}
    if amx == real:
        amx = {**real, "cpu_features": [f for f in real["cpu_features"] if f != "amx_tile"]}
    monkeypatch.setattr(fingerprint, "cpu_facts", lambda: amx)
    code, lines = _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "other-cpu"))
    assert code == 0 and lines[0] == f"{locked}: within tolerance"
    added = [f for f in amx["cpu_features"] if f not in real["cpu_features"]]
    assert lines[1] == (
        f"  platform differs from the lock's (CPU features differ: {', '.join(added)} here, not in"
        " the lock): images compared within tolerance"
    )
    # A real change of the pixels is caught there too, by the tolerance.
    _brighter(monkeypatch, 0.2)
    code, lines = _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "other-cpu-edit"))
    assert code == 1 and lines[0] == f"{locked}: drift"
    assert lines[-1].startswith("  figure.png: beyond tolerance (max ")
    assert "of pixels beyond 8" in lines[-1]


def test_a_check_runs_at_the_locks_thread_count_whatever_omp_num_threads_says(
    locked, tmp_path
) -> None:
    for threads in ("2", "1"):
        done = subprocess.run(
            [sys.executable, "-m", "editflow", "repro", "--check", str(locked),
             *_where(tmp_path, cache=f"omp{threads}")],
            capture_output=True, text=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{locked}: matches its lock", threads


# ------------------------------------------------------------------ locks that cannot lie


def test_edited_platform_lines_are_distrusted_and_fail(locked, tmp_path, capsys) -> None:
    _edit_lock(locked, "threads = 1", "threads = 64")
    code, lines = _check(locked, tmp_path, capsys)
    assert code == 1
    assert lines[1].startswith("  distrusted: platforms.")
    assert lines[1].endswith(
        ": its lines do not hash to its name (edited after locking?); rewrite it with"
        " `editflow lock RECIPE` or `editflow figures --update`"
    )


def test_an_edited_recipe_hash_does_not_switch_off_the_pixel_check(
    locked, tmp_path, capsys, monkeypatch
) -> None:
    lock = tomllib.loads(lock_path(locked).read_text())
    _edit_lock(locked, lock["recipe_sha256"], "0" * 64)
    code, lines = _check(locked, tmp_path, capsys)
    assert code == 0
    assert lines[-1] == (
        "  recipe_sha256 is not this recipe's, yet no key changed (an edit that touches no stage,"
        " or the line was edited): exported files are compared by their pixels"
    )
    _brighter(monkeypatch, 0.2)
    code, lines = _check(locked, tmp_path, capsys, "--cache", str(tmp_path / "cold"))
    assert code == 1
    assert any(line.startswith("  figure.png: other pixels than the lock's") for line in lines)


def test_a_replaced_baseline_is_distrusted(locked, tmp_path, capsys) -> None:
    Image.new("RGB", (64, 64)).save(baseline_dir(locked) / "figure.png")
    code, lines = _check(
        locked, tmp_path, capsys, "--cache", str(tmp_path / "two"), "--threads", "2"
    )
    assert code == 1
    assert lines[-1] == (
        "  figure.png: its baseline edit.toml.baseline/figure.png is not the locked file (rewrite"
        " it with `editflow lock RECIPE` or `editflow figures --update`)"
    )


def test_a_lock_without_digests_or_files_is_drift(locked, tmp_path, capsys) -> None:
    text = lock_path(locked).read_text()
    start = text.index("[stage.edit.digest]")
    lock_path(locked).write_text(text[:start] + text[text.index("\n\n", start) + 2 :])
    code, lines = _check(locked, tmp_path, capsys)
    assert (code, lines[1]) == (1, "  edit: the lock has no digest of latents")
    shutil.rmtree(baseline_dir(locked))
    text = lock_path(locked).read_text()
    start = text.index('[file."figure.png"]')
    lock_path(locked).write_text(text[:start] + text[text.index("\n\n", start) + 2 :])
    code, lines = _check(locked, tmp_path, capsys)
    assert lines[-1] == "  figure.png: written but not in the lock"


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        (lambda text: text.replace('recipe = "edit.toml"', 'recipe = "other.toml"'),
         "{lock}:5: recipe: the lock of another recipe ('other.toml', not 'edit.toml') (rewrite it"
         " with `editflow lock RECIPE` or `editflow figures --update`)"),
        (lambda text: text.replace("format = 2", "format = 1"),
         "{lock}: lock format 1, this editflow reads format 2 (rewrite it with `editflow lock"
         " RECIPE` or `editflow figures --update`)"),
        (lambda text: text.replace("format = 2", "format = 3"),
         "{lock}:4: format: must be one of 2, got 3"),
        (lambda text: text + 'deep = ' + "[" * 100_000 + "]" * 100_000 + "\n",
         "{lock}: tables or arrays nested deeper than 32 levels"),
        (lambda text: text + '\n["stage.edit"]\nkey = 1\n',
         "{lock}:{table}: \"stage.edit\": unknown key (did you mean 'stage'?)"),
        (lambda text: text.replace("[stage.edit]\n", "[stage.edit]\nkind = 3\n", 1),
         "{lock}:{kind}: invalid TOML: Cannot overwrite a value"),
        (lambda text: text.replace('kind = "sample.edit_friendly@1"', "kind = 3"),
         "{lock}:{line}: stage.edit.kind: must be a string, got 3"),
    ],
    ids=["other recipe", "format 1", "format 3", "nesting", "quoted dotted name",
         "duplicate key", "wrong type"],
)  # fmt: skip
def test_a_crafted_lock_is_one_located_line(locked, tmp_path, capsys, craft, message) -> None:
    path = lock_path(locked)
    text = craft(path.read_text())
    path.write_text(text)
    code = main(["repro", "--check", str(locked), *_where(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    rows = text.splitlines()
    line = next((n for n, row in enumerate(rows, 1) if row.startswith("kind = 3")), None)
    table = next((n for n, row in enumerate(rows, 1) if row == '["stage.edit"]'), None)
    kind = next((n for n, row in enumerate(rows, 1) if row == 'kind = "sample.edit_friendly@1"'), 0)
    expected = message.format(lock=path, line=line, table=table, kind=kind)
    assert out.splitlines()[0] == f"{locked}: failed"
    if "Cannot overwrite" in expected:
        assert out.splitlines()[1].startswith(f"  {expected}")
    else:
        assert out.splitlines()[1:] == [f"  {expected}"]


def test_a_lock_that_is_not_utf8_is_one_located_line(locked, tmp_path, capsys) -> None:
    data = lock_path(locked).read_bytes().replace(b"format = 2", b"\xff = 2")
    lock_path(locked).write_bytes(data)
    code = main(["repro", "--check", str(locked), *_where(tmp_path)])
    assert code == 1
    offset = data.index(b"\xff")
    assert capsys.readouterr().out.splitlines()[1] == (
        f"  {lock_path(locked)}:4: not UTF-8 text (byte 0xff at offset {offset})"
        " (rewrite it with `editflow lock RECIPE` or `editflow figures --update`)"
    )


# ------------------------------------------------------------------ commands


def test_a_missing_lock_fails_the_check(tmp_path, capsys) -> None:
    folder = tmp_path / "recipe"
    folder.mkdir()
    shutil.copy(skimage_photos()["chelsea"], folder / "photo.png")
    recipe = folder / "edit.toml"
    recipe.write_text(RECIPE)
    code, lines = _check(recipe, tmp_path, capsys)
    assert (code, lines) == (1, [
        f"{recipe}: no lock", f"  no lock: run `editflow lock {recipe}` and commit its lock"
    ])  # fmt: skip


def test_a_recipe_that_does_not_exist_is_not_found(tmp_path, capsys) -> None:
    code = main(["repro", "--check", str(tmp_path / "nope.toml"), *_where(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'nope.toml'}: not found"


def test_repro_takes_folders_and_lays_outputs_out_like_figures(locked, tmp_path, capsys) -> None:
    root, out = locked.parent.parent, tmp_path / "layout"
    where = ["--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert main(["repro", "--check", str(root / "recipe"), *where]) == 0
    assert capsys.readouterr().out.strip() == f"{locked}: matches its lock"
    assert main(["figures", str(root), "--check", *where]) == 0
    assert main(["repro", "--check", str(root), *where]) == 0
    figures = sorted(p.relative_to(out).as_posix() for p in out.rglob("figure.png"))
    assert figures == ["edit/figure.png", "recipe/edit/figure.png"]  # folder given: path under it


def test_repro_json_carries_what_the_text_says(locked, tmp_path, capsys) -> None:
    locked.write_text(locked.read_text().replace("skip = 1", "skip = 2"))
    code = main(["repro", str(locked), "--json", *_where(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0  # without --check drift is reported, not an error
    assert result[0]["state"] == "drift"
    assert result[0]["lines"][0] == "edit: params.skip: 1 -> 2"
    assert result[0]["computed"] == ["edit", "figure"]
    _, lines = _check(locked, tmp_path, capsys)
    assert [line.strip() for line in lines[1:]] == result[0]["lines"]


@pytest.mark.parametrize(
    ("argv", "environment", "message"),
    [
        (["--threads", "0"], {}, "--threads: must be >= 1, got 0"),
        ([], {"EDITFLOW_THREADS": "two"}, "EDITFLOW_THREADS: must be a whole number >= 1, got 'two'"),
    ],
)  # fmt: skip
def test_a_bad_thread_count_is_one_line(locked, tmp_path, capsys, monkeypatch, argv, environment,
                                        message) -> None:  # fmt: skip
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["repro", str(locked), *_where(tmp_path), *argv]) == 2
    assert capsys.readouterr().err.strip() == message


def test_a_figure_reruns_the_recipe_that_made_it_byte_for_byte(locked, tmp_path, capsys) -> None:
    figure = tmp_path / "out" / "edit" / "figure.png"
    with Image.open(figure) as image:
        document = json.loads(image.text["editflow:recipe_json"])
    assert document["stages"]["edit"]["skip"] == 1
    locked.write_text(locked.read_text().replace("skip = 1", "skip = 3"))  # the file moves on
    again = ["--cache", str(tmp_path / "fresh"), "--out", str(tmp_path / "again"), "--device",
             "cpu", "--base", str(locked.parent)]  # fmt: skip
    assert main(["run", str(figure), *again]) == 0
    assert (tmp_path / "again" / "figure.png").read_bytes() == figure.read_bytes()
    assert "4 computed" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "again" / "figure.png"), *again]) == 0
    assert "4 stages were in the cache, 0 computed" in capsys.readouterr().err


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
    commands = {
        "validate": ["validate", str(locked), "--cache", str(tmp_path / "cache")],
        "plan": ["plan", str(locked), "--cache", str(tmp_path / "cache")],
        "run": ["run", str(locked), "--cache", str(tmp_path / "cache"), "--out",
                str(tmp_path / "out" / "edit")],
        "repro --check": ["repro", "--check", str(locked), *_where(tmp_path)],
    }  # fmt: skip
    for name, argv in commands.items():
        assert modules_imported_by(argv, ("torch", "diffusers", "transformers")) == [], name
