"""Sweeps: shared upstream computed once, one folder per point, the grid, command line and
table alike, and bad axes named by where they were given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_repro import RECIPE

from editflow.cli import main
from editflow.files.inputs import skimage_photos

SWEEP = ["--sweep", "stages.edit.skip=1,2", "--sweep", "stages.edit.cfg_tar=3.5,7.5"]
POINTS = [
    "edit.skip=1,edit.cfg_tar=3.5",
    "edit.skip=1,edit.cfg_tar=7.5",
    "edit.skip=2,edit.cfg_tar=3.5",
    "edit.skip=2,edit.cfg_tar=7.5",
]


def _recipe(folder: Path, text: str = RECIPE) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(skimage_photos()["chelsea"], folder / "photo.png")
    (folder / "edit.toml").write_text(text)
    return folder / "edit.toml"


def _run(recipe: Path, tmp_path: Path, out: str, *extra: str) -> list[str]:
    from editflow.cache import Cache
    from editflow.cli.sweeps import combine, parse_sweep, run_sweep, table_axes
    from editflow.documents import read_document
    from editflow.engine.events import CollectEvents

    axes = combine(table_axes(read_document(recipe)[0]), [parse_sweep(a) for a in extra[1::2]])
    result = run_sweep(recipe, axes, cache=Cache(tmp_path / "cache"), out_root=tmp_path / out,
                       device="cpu", events=CollectEvents())  # fmt: skip
    return result.computed


def test_a_2x2_sweep_computes_its_shared_inversion_once_and_writes_four_points_and_a_grid(
    tmp_path: Path,
) -> None:
    recipe = _recipe(tmp_path / "recipe")
    computed = _run(recipe, tmp_path, "out", *SWEEP)
    stages = [entry.split("/")[1] for entry in computed]
    assert stages.count("encode") == 1 and stages.count("invert") == 1
    assert stages.count("edit") == 4 and stages.count("figure") == 4
    folders = sorted(path.name for path in (tmp_path / "out").iterdir() if path.is_dir())
    assert folders == POINTS
    for point in POINTS:
        assert (tmp_path / "out" / point / "figure.png").is_file()
    with (
        Image.open(tmp_path / "out" / "sweep.png") as grid,
        Image.open(tmp_path / "out" / POINTS[0] / "figure.png") as tile,
    ):
        assert grid.width > 2 * tile.width and grid.height > 2 * tile.height


def test_the_same_sweep_from_the_command_line_and_from_a_table_gives_identical_files(
    tmp_path: Path,
) -> None:
    recipe = _recipe(tmp_path / "recipe")
    _run(recipe, tmp_path, "from-flags", *SWEEP)
    # The same file, now with the axes in its table.
    recipe.write_text(
        RECIPE + '\n[sweep]\n"stages.edit.skip" = [1, 2]\n"stages.edit.cfg_tar" = [3.5, 7.5]\n'
    )
    assert _run(recipe, tmp_path, "from-table") == []  # the same keys: all cached
    files = sorted(
        p.relative_to(tmp_path / "from-flags") for p in (tmp_path / "from-flags").rglob("*.png")
    )
    assert len(files) == 5
    for name in files:
        assert (tmp_path / "from-flags" / name).read_bytes() == (
            tmp_path / "from-table" / name
        ).read_bytes()


def test_plan_shows_the_points_and_what_they_share(tmp_path: Path, capsys) -> None:
    recipe = _recipe(tmp_path / "recipe")
    assert main(["plan", str(recipe), *SWEEP, "--cache", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "4 points over stages.edit.skip (2) x stages.edit.cfg_tar (2):"
    assert lines[1] == "  edit.skip=1, edit.cfg_tar=3.5  (0 of 4 stages cached)"
    assert lines[5:] == [
        "encode  shared by every point: computed once",
        "invert  shared by every point: computed once",
        "edit    4 variants",
        "figure  4 variants",
    ]


@pytest.mark.parametrize(
    ("argument", "table", "expected"),
    [
        ("stages.edit.skip=1,abc", "",
         "--sweep stages.edit.skip=1,abc: stages.edit.skip: must be an integer, got 'abc'"),
        ("stages.edit.skp=1,2", "",
         "--sweep stages.edit.skp=1,2: stages.edit.skp: unknown key (did you mean 'skip'?)"),
        ("stages.edit.skip", "", "--sweep stages.edit.skip: expected KEY.PATH=VALUE,VALUE,..."),
        (None, '"stages.edit.skip" = 3', 'sweep."stages.edit.skip": must be a non-empty array of values'),
        (None, '"stages.nope.x" = [1]', 'sweep."stages.nope.x": the recipe has no table \'stages.nope\''),
    ],
)  # fmt: skip
def test_a_bad_axis_is_one_line_naming_where_it_was_given(
    tmp_path: Path, capsys, argument, table, expected
) -> None:
    recipe = _recipe(tmp_path / "recipe", RECIPE + (f"\n[sweep]\n{table}\n" if table else ""))
    extra = ["--sweep", argument] if argument else []
    code = main(["run", str(recipe), *extra, "--cache", str(tmp_path / "c"), "--out",
                 str(tmp_path / "o")])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_point_folders_are_unique_by_construction_for_any_strings() -> None:
    """A seeded property test: random values (unsafe characters, long shared prefixes, "1"
    beside 1) never share a folder, and a folder is its readable name when that is exact."""
    import random

    from editflow.cli.sweeps import Axis, points

    rng = random.Random(0)
    alphabet = 'ab _/.\\:*?"<>|~é1'
    for _ in range(300):
        prefix = "p" * rng.choice([0, 5, 199, 210])
        values = {prefix + "".join(rng.choices(alphabet, k=rng.randint(0, 4))) for _ in range(6)}
        values = [*values, *rng.sample([1, "1", 1.5, True], 2)]
        values = list(dict.fromkeys(values, None))
        axes = [Axis("stages.edit.prompt", tuple(values), "--sweep"),
                Axis("stages.edit.skip", (1, 2), "--sweep")]  # fmt: skip
        names = [point.name for point in points(axes)]
        assert len(set(names)) == len(names)
        assert all(len(name) <= 200 and "/" not in name for name in names)
    (plain,) = points([Axis("stages.edit.skip", (3,), "--sweep")])
    assert plain.name == "edit.skip=3"


def test_lossy_names_get_a_digest_and_the_index_maps_folders_to_values(tmp_path: Path) -> None:
    from editflow.cli.sweeps import Axis, points

    axis = Axis("stages.edit.target_prompt", ("a photo of a dog", "a_photo_of_a_dog"), "--sweep")
    names = [point.name for point in points([axis])]
    assert names[1] == "edit.target_prompt=a_photo_of_a_dog"  # exact, kept readable
    assert names[0].startswith("edit.target_prompt=a_photo_of_a_dog~") and len(names[0]) == 48
    recipe = _recipe(tmp_path / "recipe")
    _run(recipe, tmp_path, "out", "--sweep", "stages.edit.skip=1,2")
    index = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(p["folder"], p["values"]) for p in index["points"]] == [
        ("edit.skip=1", {"stages.edit.skip": 1}), ("edit.skip=2", {"stages.edit.skip": 2})
    ]  # fmt: skip
    assert set(index["points"][0]["stages"]) == {"encode", "invert", "edit", "figure"}


@pytest.mark.parametrize(
    ("argument", "table", "expected"),
    [
        (None, '"stages.edit.skip" = [1, nan]', 'sweep."stages.edit.skip": nan is not a finite value'),
        (None, '"stages.edit.cfg_tar" = [inf]', 'sweep."stages.edit.cfg_tar": inf is not a finite value'),
        ("stages.edit.cfg_tar=3.5,nan", "", "--sweep stages.edit.cfg_tar=3.5,nan: nan is not a finite value"),
        ("stages.edit.skip=1,1", "", "--sweep stages.edit.skip=1,1: the value 1 is given twice"),
        (None, "", "sweep: an empty table: give it an axis or remove it"),
    ],
)  # fmt: skip
def test_unsweepable_values_are_one_line(tmp_path: Path, capsys, argument, table, expected) -> None:
    recipe = _recipe(
        tmp_path / "recipe", RECIPE + f"\n[sweep]\n{table}\n" if table or not argument else RECIPE
    )
    extra = ["--sweep", argument] if argument else []
    code = main(["run", str(recipe), *extra, "--cache", str(tmp_path / "c"), "--out",
                 str(tmp_path / "o")])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("top", ["sweep = [1, 2]", 'sweep = "stages.edit.skip=1,2"'])
def test_a_sweep_that_is_not_a_table_is_one_line(tmp_path: Path, capsys, top) -> None:
    recipe = _recipe(tmp_path / "recipe", top + "\n" + RECIPE)
    assert (
        main(["run", str(recipe), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        'sweep: must be a table of axes: [sweep] "stages.NAME.PARAMETER" = [values]'
    )


def test_validate_plans_every_point_and_refuses_a_bogus_key(tmp_path: Path, capsys) -> None:
    recipe = _recipe(tmp_path / "recipe", RECIPE + '\n[sweep]\n"stages.edit.skip" = [1, 2]\n')
    assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == f"{recipe}: ok (4 stages, 1 inputs, 2 sweep points)"
    recipe.write_text(RECIPE + '\n[sweep]\n"stages.edit.bogus" = [1, 2]\n')
    assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == (
        'sweep."stages.edit.bogus": stages.edit.bogus: unknown key'
    )


def test_a_huge_sweep_or_a_key_swept_twice_is_refused_before_planning(
    tmp_path: Path, capsys
) -> None:
    recipe = _recipe(tmp_path / "recipe")
    values = ",".join(str(v / 1000) for v in range(100))
    argv = ["run", str(recipe), "--sweep", f"stages.edit.cfg_tar={values}", "--sweep",
            "stages.edit.skip=" + ",".join(map(str, range(1, 21))), "--cache", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sweep: 2000 points (100 x 20), more than 1024: nothing was planned (sweep fewer values,"
        " or several smaller sweeps)"
    )
    argv = ["plan", str(recipe), "--sweep", "stages.edit.skip=1", "--sweep", "stages.edit.skip=2",
            "--cache", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "--sweep stages.edit.skip=2: stages.edit.skip is swept twice (also --sweep"
        " stages.edit.skip=1)"
    )


def test_an_all_hit_sweep_keeps_its_grid_and_imports_no_torch(tmp_path: Path) -> None:
    from support import modules_imported_by

    recipe = _recipe(tmp_path / "recipe")
    argv = ["run", str(recipe), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            *SWEEP[:2]]  # fmt: skip
    assert main(argv) == 0
    grid = tmp_path / "out" / "sweep.png"
    made = grid.stat().st_mtime_ns
    records = _files_and_times(tmp_path / "cache")
    # Rerun in a fresh interpreter: every point hits, and the grid of the same figures is
    # the one already there (building it again would import torch for nothing).
    assert modules_imported_by(argv, ("torch",)) == []
    assert grid.stat().st_mtime_ns == made
    assert _files_and_times(tmp_path / "cache") == records, "the rerun wrote to the cache"
    # A grid that does not say what it was made of is made again.
    Image.new("RGB", (8, 8), "red").save(grid)
    assert main(argv) == 0
    with Image.open(grid) as remade:
        assert remade.width > 8 and "editflow:made_of" in remade.info


def _files_and_times(folder: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_each_point_is_told_what_changed_since_its_own_last_run(tmp_path: Path) -> None:
    """One set of last-run records for all points would tell the second point its skip
    differs from the first's; each point has its own."""
    from editflow.cache import Cache
    from editflow.cli.sweeps import parse_sweep, run_sweep
    from editflow.engine.events import CollectEvents

    recipe = _recipe(tmp_path / "recipe")
    axes = [parse_sweep("stages.edit.skip=1,2")]
    cache = Cache(tmp_path / "cache")
    for guidance in ("3.5", "5.0"):
        events = CollectEvents()
        run_sweep(recipe, axes, cache=cache, out_root=tmp_path / "out", device="cpu",
                  events=events, overrides=[f"stages.edit.cfg_tar={guidance}"])  # fmt: skip
    reasons = {(event.point, event.stage): event.message for event in events.of("running")}
    assert reasons == {
        ("edit.skip=1", "edit"): "params.cfg_tar: 3.5 -> 5.0",
        ("edit.skip=1", "figure"): "input 'latents' changed upstream (edit)",
        ("edit.skip=2", "edit"): "params.cfg_tar: 3.5 -> 5.0",
        ("edit.skip=2", "figure"): "input 'latents' changed upstream (edit)",
    }


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("range(10,40,10)", [10, 20, 30]),
        ("range(3, 0, -1)", [3, 2, 1]),
        ("range(2)", None),  # not two or three numbers: an error below, not a range
        ("range(0, 0.3, 0.1)", [0.0, 0.1, 0.2]),  # exact decimal steps, 0.3 excluded
        ("linspace(10, 40, 4)", [10, 20, 30, 40]),  # whole: integers, for integer keys
        ("linspace(1, 2, 3)", [1.0, 1.5, 2.0]),
        ("linspace(0, 1, 4)", [0.0, 1 / 3, 2 / 3, 1.0]),
        ("1,2,3", None),
    ],
)
def test_range_and_linspace_spell_evenly_spaced_values(text: str, values) -> None:
    from editflow.cli.sweeps import span

    if text == "range(2)":
        with pytest.raises(Exception, match=r"expected range\(START, STOP\[, STEP\]\)"):
            span(text, "x")
        return
    got = span(text, "x")
    assert got == values and [type(v) for v in got or []] == [type(v) for v in values or []]


@pytest.mark.parametrize(
    ("argument", "table", "expected"),
    [
        ("stages.edit.skip=range(1,3,0)", "", "--sweep stages.edit.skip=range(1,3,0): range(1,3,0): STEP must not be 0"),
        ("stages.edit.skip=range(3,1)", "", "--sweep stages.edit.skip=range(3,1): range(3,1): no values (STOP is not beyond START in STEP's direction)"),
        ("stages.edit.skip=range(a,3)", "", "--sweep stages.edit.skip=range(a,3): range(a,3): expected range(START, STOP[, STEP]) with numbers"),
        ("stages.edit.cfg_tar=linspace(1,2,1)", "", "--sweep stages.edit.cfg_tar=linspace(1,2,1): linspace(1,2,1): COUNT must be a whole number >= 2"),
        ("stages.edit.cfg_tar=linspace(1,2,2000)", "", "--sweep stages.edit.cfg_tar=linspace(1,2,2000): linspace(1,2,2000): more than 1024 values"),
        (None, '"stages.edit.skip" = "range(1, 1)"', 'sweep."stages.edit.skip": range(1, 1): no values (STOP is not beyond START in STEP\'s direction)'),
        (None, '"stages.edit.skip" = "1, 2"', "sweep.\"stages.edit.skip\": must be an array of values, 'range(START, STOP[, STEP])' or 'linspace(START, STOP, COUNT)'"),
        (None, '"stages.edit.skip" = "range(1, 3)"\n[sweep.grid]\nx = "edit.skip"\ny = "edit.skip"', "sweep.grid.y: 'edit.skip' is already on another axis"),
    ],
)  # fmt: skip
def test_a_bad_range_is_one_line_naming_where_it_was_given(
    tmp_path: Path, capsys, argument, table, expected
) -> None:
    recipe = _recipe(tmp_path / "recipe", RECIPE + (f"\n[sweep]\n{table}\n" if table else ""))
    extra = ["--sweep", argument] if argument else []
    assert main(["plan", str(recipe), *extra, "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected


def test_a_range_in_the_table_plans_as_its_values_and_set_fixes_a_value_in_every_point(
    tmp_path: Path, capsys
) -> None:
    from editflow.cache import Cache
    from editflow.engine.api import plan_recipe

    recipe = _recipe(
        tmp_path / "recipe", RECIPE + '\n[sweep]\n"stages.edit.skip" = "range(1, 3)"\n'
    )
    where = ["--cache", str(tmp_path / "c"), "--json"]
    assert main(["plan", str(recipe), "--set", "stages.edit.cfg_tar=5", *where]) == 0
    planned = json.loads(capsys.readouterr().out)["points"]
    assert [point["name"] for point in planned] == ["edit.skip=1", "edit.skip=2"]
    plain = recipe.parent / "plain.toml"
    plain.write_text(RECIPE)
    for point, skip in zip(planned, (1, 2), strict=True):
        assert point["overrides"] == ["stages.edit.cfg_tar=5", f"stages.edit.skip={skip}"]
        alone = plan_recipe(plain, [f"stages.edit.skip={skip}", "stages.edit.cfg_tar=5"],
                            cache=Cache(tmp_path / "c"))  # fmt: skip
        assert point["keys"] == {name: stage.key for name, stage in alone.stages.items()}
    # The value set is in the keys: without it, the edits differ.
    assert main(["plan", str(recipe), *where]) == 0
    unset = json.loads(capsys.readouterr().out)["points"]
    assert unset[0]["keys"]["invert"] == planned[0]["keys"]["invert"]
    assert unset[0]["keys"]["edit"] != planned[0]["keys"]["edit"]
    # A key set and swept at once is refused, naming both.
    argv = ["run", str(recipe), "--set", "stages.edit.skip=3", "--cache", str(tmp_path / "c")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        '--set stages.edit.skip=3: stages.edit.skip is also swept (sweep."stages.edit.skip"):'
        " set it or sweep it"
    )
