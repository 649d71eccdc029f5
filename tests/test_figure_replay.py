"""`editflow run FIGURE.png`: a downloaded figure replays its recipe confined to one base
folder (the figure's, or --base), writes only to --out or out/<figure stem>, and a crafted
one is one located line, exit 2, with nothing read outside the base and nothing written."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from editflow.cli import main

QUICK = {
    "schema_version": 1,
    "seed": 0,
    "model": {"id": "tiny"},
    "inputs": {"photo": {"image": "skimage:chelsea", "size": [64, 64]}},
    "stages": {
        "encode": {"kind": "encode.vae", "images": "inputs.photo"},
        "decode": {"kind": "decode.vae", "latents": "encode.latents"},
    },
}
SECRET = "sentinel-never-read-9d1f"


def _figure(path: Path, document, *, name: str = "edit.toml", raw: str | None = None, **extra):
    """A PNG carrying ``document`` (or ``raw`` text) as editflow writes its provenance."""
    info = PngImagePlugin.PngInfo()
    info.add_text("editflow:recipe", name)
    info.add_text("editflow:recipe_json", raw if raw is not None else json.dumps(document))
    for key, value in extra.items():
        info.add_text(f"editflow:{key}", value)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A download folder beside a secret the figures must never read; runs from tmp_path."""
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "downloads").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(world: Path, capsys, *argv: str) -> tuple[int, str]:
    code = main(["run", *argv, "--cache", str(world / "cache"), "--device", "cpu"])
    return code, capsys.readouterr().err.strip()


def _nothing_secret_cached_or_written(world: Path, before: set[Path]) -> None:
    for path in (world / "cache").rglob("*") if (world / "cache").exists() else []:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    after = {p for p in world.rglob("*") if "cache" not in p.parts}
    assert after == before, sorted(map(str, after - before))


def _with_text_input(value: str) -> dict:
    document = json.loads(json.dumps(QUICK))
    document["inputs"]["prompt"] = {"text": value}
    return document


@pytest.mark.parametrize(
    "value", ["../secret.txt", "../../" * 12 + "etc/hostname", "/etc/hostname", "link.txt"]
)
def test_a_figures_inputs_never_leave_its_base_folder(world, capsys, value) -> None:
    (world / "downloads" / "link.txt").symlink_to(world / "secret.txt")
    figure = _figure(world / "downloads" / "f.png", _with_text_input(value))
    before = {p for p in world.rglob("*")}
    code, err = _run(world, capsys, str(figure))
    assert code == 2
    assert err == (
        f"{world / 'downloads' / 'edit.toml'}: inputs.prompt.text: {value} is outside the base"
        f" folder {world / 'downloads'}: an untrusted recipe (a figure's, or one read from git)"
        " reads only files under it (replaying a figure? --base DIR names the folder its inputs"
        " are in)"
    )
    _nothing_secret_cached_or_written(world, before)


def test_the_figure_chooses_neither_the_base_nor_the_output_folder(world, capsys) -> None:
    figure = _figure(
        world / "downloads" / "f.png", QUICK, name="../../etc/passwd",
        recipe_path="/etc/passwd",
    )  # fmt: skip
    code, err = _run(world, capsys, str(figure))
    assert code == 0, err
    written = sorted(p.relative_to(world).as_posix() for p in (world / "out").rglob("*.png"))
    assert written == ["out/f/decode.png"]  # out/<figure stem>, the recipe's name unused
    assert "the recipe it carries (recipe.toml, inputs from " + str(world / "downloads") in err
    code, err = _run(world, capsys, str(figure), "--out", str(world / "mine"))
    assert code == 0 and (world / "mine" / "decode.png").is_file()


def test_a_figure_with_built_in_inputs_replays_anywhere_and_base_places_file_inputs(
    world, capsys
) -> None:
    document = json.loads(json.dumps(QUICK))
    document["inputs"]["photo"] = {"image": "photo.png", "size": [64, 64]}
    (world / "repo").mkdir()
    shutil.copy(Path(__import__("skimage").__file__).parent / "data" / "chelsea.png",
                world / "repo" / "photo.png")  # fmt: skip
    figure = _figure(world / "downloads" / "f.png", document)
    code, err = _run(world, capsys, str(figure))
    assert code == 2
    assert err == (
        f"{world / 'downloads' / 'edit.toml'}: inputs.photo.image: file not found: photo.png"
        f" (looked in {world / 'downloads'})"
    )
    code, err = _run(world, capsys, str(figure), "--base", str(world / "repo"))
    assert code == 0, err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"schema_version": 1, "stages": {', "invalid JSON: Expecting property name enclosed in"
         " double quotes"),
        ("[1, 2]", "the recipe must be an object at the top level"),
        ('"a recipe"', "the recipe must be an object at the top level"),
        ("[" * 100_000 + "]" * 100_000, "tables or arrays nested deeper than 32 levels"),
        ('{"seed": 0, "seed": 1}', "duplicate key 'seed'"),
        (json.dumps({**QUICK, "x": "a" * (1 << 20)}), "larger than 1 MiB: not a recipe"),
        (json.dumps({**QUICK, "sweep": {"stages.decode.x": [1, 2]}}),
         "the recipe has a [sweep] table: a figure replays one run, not a sweep (rerun the sweep"
         " from its recipe file)"),
    ],
    ids=["truncated", "list", "string", "nested", "duplicate", "2 MB", "sweep"],
)  # fmt: skip
def test_a_garbled_carried_recipe_is_one_located_line(world, capsys, raw, message) -> None:
    figure = _figure(world / "downloads" / "f.png", None, raw=raw)
    code, err = _run(world, capsys, str(figure))
    assert code == 2
    line = ":1" if message.startswith("invalid JSON") else ""
    assert err == f"{figure}: editflow:recipe_json{line}: {message}"
    assert not (world / "out").exists()


def test_a_null_or_missing_recipe_and_a_ztxt_bomb_are_refused(world, capsys) -> None:
    figure = _figure(world / "downloads" / "null.png", None, raw="null")
    assert _run(world, capsys, str(figure)) == (
        2, f"{figure}: editflow:recipe_json: the recipe must be an object at the top level"
    )  # fmt: skip
    plain = world / "downloads" / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert _run(world, capsys, str(plain)) == (
        2, f"{plain}: not a figure editflow wrote (no editflow:recipe_json text chunk)"
    )  # fmt: skip
    bomb = world / "downloads" / "bomb.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("editflow:recipe_json", "x" * (64 << 20), zip=True)  # inflates past PIL's limit
    Image.new("RGB", (8, 8)).save(bomb, pnginfo=info)
    assert len(bomb.read_bytes()) < len(zlib.compress(b"x" * (64 << 20))) + 1000
    code, err = _run(world, capsys, str(bomb))
    assert code == 2 and err.startswith(f"{bomb}: cannot read the figure's text: ")
    assert "\n" not in err


def test_sweeping_a_figure_is_refused_and_validate_and_plan_read_it(world, capsys) -> None:
    figure = _figure(world / "downloads" / "f.png", QUICK)
    assert _run(world, capsys, str(figure), "--sweep", "stages.decode.x=1,2") == (
        2, "--sweep: a figure replays one run, not a sweep (sweep the recipe file it came from)"
    )  # fmt: skip
    cache = ["--cache", str(world / "cache")]
    assert main(["validate", str(figure), *cache]) == 0
    assert capsys.readouterr().out.strip() == f"{figure}: ok (2 stages, 1 inputs)"
    assert main(["plan", str(figure), *cache]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "encode",
        "decode",
    ]
    assert main(["validate", str(world / "downloads"), "--base", "x", *cache]) == 2
    assert capsys.readouterr().err.strip() == "--base: only for a figure given as RECIPE"


def test_an_animation_replays_like_a_png(world, capsys) -> None:
    comment = json.dumps({"editflow:recipe": "a.toml", "editflow:recipe_json": json.dumps(QUICK)})
    frames = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")]
    gif = world / "downloads" / "animation.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], comment=comment.encode())
    code, err = _run(world, capsys, str(gif))
    assert code == 0, err
    assert (world / "out" / "animation" / "decode.png").is_file()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "../models/sd"),
        ("id", "/etc"),
        ("clip", "link"),
        ("lora", "../secret.safetensors"),
    ],
)
def test_a_figures_model_paths_never_leave_its_base_folder(world, capsys, field, value) -> None:
    (world / "models" / "sd").mkdir(parents=True)
    (world / "downloads" / "link").symlink_to(world / "models" / "sd")
    document = json.loads(json.dumps(QUICK))
    if field == "lora":
        document["model"]["lora"] = [{"path": value}]
        key = "model.lora[0].path"
    else:
        document["model"][field] = value
        key = f"model.{field}"
    figure = _figure(world / "downloads" / "f.png", document)
    before = {p for p in world.rglob("*")}
    code, err = _run(world, capsys, str(figure))
    assert code == 2
    assert err == (
        f"{world / 'downloads' / 'edit.toml'}: {key}: {value} is outside the base folder"
        f" {world / 'downloads'}: an untrusted recipe reads models only from under it"
    )
    _nothing_secret_cached_or_written(world, before)
