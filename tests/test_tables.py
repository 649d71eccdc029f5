"""Tables and plots of a recipe: a 2 x 3 sweep's numbers as CSV, Markdown and LaTeX (parsed
back), its plots read from their SVG, their bytes reproducible, their lock checked as text,
and bad specs named by their key."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editflow.cache import Cache
from editflow.cli import main
from editflow.cli.lock import baseline_dir, lock_path
from editflow.errors import RecipeError
from editflow.files.textcheck import compare_texts
from editflow.imagecheck import CheckSection

RECIPE = Path(__file__).parent / "recipes" / "tables.toml"
PROMPTS = ["a photo of a dog", "a photo of a fox"]
SCALES = [1.0, 3.0, 5.0]
COLUMNS = ["CLIP score", "latent mean", "edit|image"]
OUTPUTS = {"CLIP score": ("clip", "scores"), "latent mean": ("edit", "latents"),
           "edit|image": ("decode_edit", "images")}  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Path]:
    """The recipe locked once (its 2 x 3 sweep run through a fresh cache): every test reads
    these files."""
    root = tmp_path_factory.mktemp("tables")
    recipe = root / "recipe" / "tables.toml"
    recipe.parent.mkdir()
    shutil.copy(RECIPE, recipe)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("EDITFLOW_MODELS", str(models_dir))
        arguments = ["--cache", str(root / "cache"), "--out", str(root / "out"), "--device", "cpu"]
        assert main(["lock", str(recipe), *arguments]) == 0
    return {"recipe": recipe, "out": root / "out" / "tables", "cache": root / "cache", "root": root}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _cached_mean(cache: Cache, out: Path, point: str, column: str) -> float:
    """What a cell should hold: the float64 mean of the cached output, read independently."""
    import json

    index = json.loads((out / "sweep.json").read_text())
    (row,) = [row for row in index["points"] if row["folder"] == point]
    stage, output = OUTPUTS[column]
    return float(cache.get(row["stages"][stage]).tensor(output).double().mean())


def parse_markdown(text: str) -> tuple[list[str], list[str], list[list[str]], list[str]]:
    """A pipe table: its header, alignment row, body rows (cells stripped, ``\\|`` read as
    ``|``) and the lines after it."""
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    rest = lines[len(table) :]

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [part.strip().replace("\\|", "|") for part in parts]

    return cells(table[0]), cells(table[1]), [cells(line) for line in table[2:]], rest


def test_a_2x3_sweep_makes_a_csv_of_six_rows_led_by_the_swept_values(swept) -> None:
    rows = _rows(swept["out"] / "numbers.csv")
    assert list(rows[0]) == ["edit.prompt", "edit.guidance_scale", *COLUMNS]
    assert len(rows) == 6
    assert [(row["edit.prompt"], float(row["edit.guidance_scale"])) for row in rows] == [
        (prompt, scale) for prompt in PROMPTS for scale in SCALES
    ]
    cache = Cache(swept["cache"])
    folders = [row["folder"] for row in _rows(swept["out"] / "sweep.csv")]
    for folder, row in zip(folders, rows, strict=True):
        for column in COLUMNS:  # full float64 precision: the exact mean
            assert float(row[column]) == _cached_mean(cache, swept["out"], folder, column)
    scores = [float(row["CLIP score"]) for row in rows]
    assert len(set(scores)) == 6  # each point its own number


def test_the_markdown_table_has_the_format_and_the_best_value_per_column_in_bold(swept) -> None:
    header, aligns, body, rest = parse_markdown((swept["out"] / "numbers.md").read_text())
    assert header == ["edit.prompt", "edit.guidance_scale", *COLUMNS]
    assert aligns == ["---", "---:", "---:", "---:", "---:"]
    assert rest == ["", "Table: Tiny's numbers over prompt x guidance (100% noise)"]
    rows = _rows(swept["out"] / "numbers.csv")
    assert [cells[:2] for cells in body] == [[p, str(s)] for p in PROMPTS for s in SCALES]
    for index, column in enumerate(COLUMNS, start=2):
        values = [float(row[column]) for row in rows]
        printed = [cells[index].strip("*") for cells in body]
        assert printed == [f"{value:.4f}" for value in values]
        bold = [i for i, cells in enumerate(body) if cells[index].startswith("**")]
        rule = {"CLIP score": "max", "latent mean": "min"}.get(column)
        if rule is None:
            assert bold == []
        else:
            best = f"{(max if rule == 'max' else min)(values):.4f}"
            assert bold == [i for i, text in enumerate(printed) if text == best] != []


def test_the_latex_table_is_booktabs_with_bold_and_escapes(swept) -> None:
    text = (swept["out"] / "numbers.tex").read_text()
    lines = text.splitlines()
    assert lines[:6] == [
        r"\begin{table}[t]",
        r"  \centering",
        r"  \caption{Tiny's numbers over prompt x guidance (100\% noise)}",
        r"  \label{tab:numbers}",
        r"  \begin{tabular}{lrrrr}",
        r"    \toprule",
    ]
    assert lines[6] == (
        r"    edit.prompt & edit.guidance\_scale & CLIP score & latent mean & edit\textbar{}image \\"
    )
    assert lines[7] == r"    \midrule" and lines[-3:] == [
        r"    \bottomrule", r"  \end{tabular}", r"\end{table}",
    ]  # fmt: skip
    body = [line.removesuffix(r" \\").strip().split(" & ") for line in lines[8:-3]]
    assert len(body) == 6 and all(len(cells) == 5 for cells in body)
    markdown = parse_markdown((swept["out"] / "numbers.md").read_text())[2]
    for cells, md_cells in zip(body, markdown, strict=True):
        for cell, md_cell in zip(cells[2:], md_cells[2:], strict=True):
            bold = md_cell.startswith("**")
            assert cell == (rf"\textbf{{{md_cell.strip('*')}}}" if bold else md_cell)
    if shutil.which("pdflatex"):
        document = swept["root"] / "document.tex"
        document.write_text(
            "\\documentclass{article}\\usepackage{booktabs}\\begin{document}"
            f"\\input{{{swept['out'] / 'numbers.tex'}}}\\end{{document}}\n"
        )
        result = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
            cwd=document.parent, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:]


def _group(svg: str, gid: str) -> str:
    """The text of one ``<g id=...>`` group, up to the next group of the same depth."""
    start = svg.index(f'<g id="{gid}">')
    indent = svg.rfind("\n", 0, start)
    depth = start - indent - 1
    end = svg.find("\n" + " " * depth + "</g>", start)
    return svg[start:end]


def _label(svg: str, gid: str) -> str:
    return re.search(r"<!-- (.*?) -->", _group(svg, gid)).group(1)


def test_the_plot_has_its_labels_legend_and_one_line_of_three_markers_per_series(swept) -> None:
    svg = (swept["out"] / "tradeoff.svg").read_text()
    assert _label(svg, "xlabel") == "edit.guidance_scale"
    assert _label(svg, "ylabel") == "CLIP score (tiny)"
    assert _label(svg, "title") == "CLIP score (tiny) vs edit.guidance_scale"
    assert _label(svg, "legend-title") == "edit.prompt"
    assert [_label(svg, f"legend-{i}") for i in range(2)] == PROMPTS
    assert '<g id="legend-2">' not in svg and '<g id="series-2">' not in svg
    for index in range(2):
        group = _group(svg, f"series-{index}")
        assert group.count("<use ") == 3  # one marker per guidance scale
        assert group.count("\nL ") == 2  # joined in the sweep's order
    with Image.open(swept["out"] / "tradeoff.png") as image:
        assert image.size == (750, 525) and image.mode == "RGB"
        assert image.info["editflow:plot"] == "tradeoff"
        assert image.info["editflow:recipe"] == "tables.toml"
        assert '"stages.edit.guidance_scale":[1.0,3.0,5.0]' in image.info["editflow:recipe_json"]
    scatter = (swept["out"] / "scatter.svg").read_text()
    assert _label(scatter, "xlabel") == "latent mean" and _label(scatter, "title") == (
        "CLIP score vs latent mean"
    )
    assert _group(scatter, "series-0").count("<use ") == 6 and "legend-0" not in scatter


def test_a_point_writes_no_table_and_a_plain_run_one_row_and_no_plot(swept) -> None:
    folder = next(path for path in swept["out"].iterdir() if path.is_dir())
    assert sorted(path.name for path in folder.iterdir()) == ["clip.png", "decode_edit.png"]
    # The recipe without its [sweep] (every stage cached by the sweep): one row, no plot of
    # one marker.
    text = swept["recipe"].read_text()
    plain = swept["recipe"].with_name("plain.toml")
    plain.write_text(text[: text.index("[sweep]")])
    out = swept["root"] / "plain"
    arguments = ["--cache", str(swept["cache"]), "--out", str(out), "--device", "cpu"]
    assert main(["run", str(plain), *arguments]) == 0
    rows = _rows(out / "numbers.csv")
    assert len(rows) == 1 and list(rows[0]) == COLUMNS  # no swept keys lead it
    assert sorted(path.name for path in out.iterdir()) == [
        "clip.png", "decode_edit.png", "numbers.csv", "numbers.md", "numbers.tex",
    ]  # fmt: skip


def test_a_rerun_in_another_process_writes_the_same_bytes(swept, models_dir) -> None:
    out = swept["root"] / "again"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITFLOW_MODELS": str(models_dir)}
    subprocess.run(
        [sys.executable, "-m", "editflow", "run", str(swept["recipe"]), "--cache",
         str(swept["cache"]), "--out", str(out), "--device", "cpu", "--log-json"],
        check=True, env=environment, capture_output=True, timeout=120,
    )  # fmt: skip
    for name in ("tradeoff.svg", "tradeoff.png", "scatter.svg", "numbers.csv", "numbers.tex"):
        assert (out / name).read_bytes() == (swept["out"] / name).read_bytes(), name


def test_the_lock_records_the_tables_and_plots_and_a_rerun_matches_it(swept, capsys) -> None:
    lock = tomllib.loads(lock_path(swept["recipe"]).read_text())
    for name in ("numbers.csv", "numbers.md", "numbers.tex", "tradeoff.svg", "scatter.svg"):
        data = (swept["out"] / name).read_bytes()
        assert lock["file"][name]["pixels"] == hashlib.sha256(data).hexdigest()
        assert (baseline_dir(swept["recipe"]) / name).read_bytes() == data
    assert "tradeoff.png" in lock["file"]
    arguments = ["--cache", str(swept["cache"]), "--out", str(swept["root"] / "check"),
                 "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(["repro", "--check", str(swept["recipe"]), *arguments]) == 0
    assert capsys.readouterr().out.strip() == f"{swept['recipe']}: matches its lock"


def _variant(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    changed = tmp_path / path.name
    changed.write_text(text.replace(old, new, 1))
    return changed


def test_a_table_elsewhere_is_compared_by_its_numbers_within_the_tolerance(swept, tmp_path) -> None:
    tolerance = CheckSection()
    csv_file, md_file = swept["out"] / "numbers.csv", swept["out"] / "numbers.md"
    value = _rows(csv_file)[0]["latent mean"]  # about 0.57
    close = _variant(csv_file, tmp_path, value, repr(float(value) * 1.004))
    difference = compare_texts(csv_file, close, tolerance)
    assert difference.within(tolerance) and (difference.numbers, difference.changed) == (24, 1)
    assert difference.describe(tolerance) == (
        "within tolerance (1 of 24 numbers differ, the most by 0.40% of their value)"
    )
    far = _variant(csv_file, tmp_path, value, repr(float(value) * 1.05))
    assert compare_texts(csv_file, far, tolerance).describe(tolerance) == (
        "beyond tolerance (1 of 24 numbers differ by more than 1.00%, the most by 4.76% of their"
        " value)"
    )
    # A printed number may round either way: one unit of its last digit is allowed.
    cell = parse_markdown(md_file.read_text())[2][0][3]
    nudged = f"{float(cell) + 0.0001:.4f}"
    assert compare_texts(md_file, _variant(md_file, tmp_path, cell, nudged), tolerance).within(
        CheckSection(numbers=0)
    )
    other = _variant(md_file, tmp_path, "a photo of a dog", "a photo of a cat")
    assert (
        compare_texts(md_file, other, tolerance)
        .describe(tolerance)
        .startswith("beyond tolerance (other text on line 3: '| a photo of a cat | 1.0 |")
    )


def test_an_svg_elsewhere_is_compared_by_its_text_with_ids_renumbered(swept, tmp_path) -> None:
    tolerance = CheckSection()
    svg = swept["out"] / "tradeoff.svg"
    text = svg.read_text()
    marker = re.search(r'<path id="(m[0-9a-f]+)"', text).group(1)
    coordinate = re.search(r'<use xlink:href="#m[0-9a-f]+" x="([0-9.]+)"', text).group(1)
    moved = text.replace(marker, "m0123456789").replace(
        f'x="{coordinate}"', f'x="{float(coordinate) + 1.5:.6f}"', 1
    )
    (tmp_path / "moved.svg").write_text(moved)
    difference = compare_texts(svg, tmp_path / "moved.svg", tolerance)
    assert difference.within(tolerance) and difference.changed == 1  # 1.5 pt of 360
    (tmp_path / "far.svg").write_text(
        text.replace(f'x="{coordinate}"', f'x="{float(coordinate) + 20:.6f}"', 1)
    )
    assert not compare_texts(svg, tmp_path / "far.svg", tolerance).within(tolerance)


BAD = """
schema_version = 1
[model]
id = "tiny"
[inputs.photo]
image = "skimage:chelsea"
size = [32, 32]
[stages.encode]
kind = "encode.vae"
images = "inputs.photo"
[stages.caption]
kind = "caption.blip"
images = "inputs.photo"
[tables.numbers]
columns = { "a" = "encode.latents", "b" = "encdoe.latents", "c" = "encode.noise", "d" = "caption.caption", "e" = "latents" }
format = ".3q"
bold = { "f" = "max" }
[plots.curve]
kind = "figure.plot"
table = "numbrs"
x = "a"
y = "b"
[plots.other]
kind = "figure.plot"
table = "numbers"
x = "stages.encode.scale"
y = "nothing"
[plots.encode]
kind = "figure.plot"
table = "numbers"
x = "a"
y = "b"
[plots.styled]
kind = "figure.plot"
table = "numbers"
x = "a"
y = "b"
style = "bar"
"""


def test_bad_tables_and_plots_are_named_by_their_key_before_anything_runs(tmp_path) -> None:
    from editflow.engine.api import plan_recipe

    recipe = tmp_path / "bad.toml"
    recipe.write_text(BAD)
    with pytest.raises(RecipeError) as raised:
        plan_recipe(recipe, cache=Cache(tmp_path / "cache"))
    where = str(recipe)
    assert raised.value.render().splitlines() == [
        f"{where}:15: tables.numbers.columns.b: no stage 'encdoe' (did you mean 'encode'?)",
        f"{where}:15: tables.numbers.columns.c: stage 'encode' (encode.vae) has no output"
        " 'noise'; its outputs: latents",
        f"{where}:15: tables.numbers.columns.d: 'caption.caption' is a text, not a tensor of"
        " numbers",
        f"{where}:15: tables.numbers.columns.e: must be a reference like 'stage.output', got"
        " 'latents'",
        f"{where}:16: tables.numbers.format: not a Python format spec for numbers: '.3q'"
        " (e.g. '.3f')",
        f"{where}:17: tables.numbers.bold.f: no column 'f'; columns: a, b, c, d, e",
        f"{where}:20: plots.curve.table: no table 'numbrs'; tables: numbers",
        f"{where}:27: plots.other.y: 'nothing' is no column of table 'numbers' (a, b, c, d, e)"
        " and no swept key",
        f"{where}:28: plots.encode: stage 'encode' exports encode.png too: name the plot otherwise",
        f"{where}:38: plots.styled.style: must be one of 'line' or 'scatter', got 'bar'",
    ]


def test_the_schema_describes_tables_and_plots() -> None:
    from editflow.engine.recipe import recipe_json_schema

    schema = recipe_json_schema()
    assert {"tables", "plots"} <= set(schema["properties"])
    definitions = schema["$defs"]
    assert set(definitions["TableSpec"]["properties"]) == {
        "columns", "reduce", "format", "bold", "caption"
    }  # fmt: skip
    assert definitions["PlotSpec"]["properties"]["style"]["enum"] == ["line", "scatter"]
    assert np.isclose(CheckSection().numbers, 0.01)


def test_a_plots_png_is_checked_by_its_svg_and_other_pngs_by_their_pixels(tmp_path) -> None:
    from PIL import PngImagePlugin

    from editflow.files.textcheck import compare_exported

    def written(folder: Path, shade: int, y: str, plot: bool = True) -> Path:
        folder.mkdir()
        info = PngImagePlugin.PngInfo()
        if plot:
            info.add_text("editflow:plot", "curve")
        noise = np.random.default_rng(shade).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "curve.png", pnginfo=info)
        svg = f'<svg width="360pt" height="252pt"><path d="M 10 {y} L 20 30"/></svg>'
        (folder / "curve.svg").write_text(svg)
        return folder / "curve.png"

    baseline = written(tmp_path / "lock", 1, "100.0")
    # Other pixels everywhere (antialiasing after an axis moved), the same drawing: within.
    same = compare_exported(baseline, written(tmp_path / "a", 2, "100.5"), CheckSection())
    assert same.within(CheckSection()), same.describe(CheckSection())
    # The drawing moved by 50 of 360 points: beyond, though the PNG is checked at all.
    moved = compare_exported(baseline, written(tmp_path / "b", 1, "150.0"), CheckSection())
    assert not moved.within(CheckSection())
    assert moved.describe(CheckSection()).startswith(
        "beyond tolerance (1 of 6 numbers differ by more than 1.00%"
    )
    # A PNG that is not a plot's keeps the pixel check, SVG beside it or not.
    other = baseline.parent / "grid.png"
    shutil.copy(baseline, other)
    (baseline.parent / "grid.svg").write_text((baseline.parent / "curve.svg").read_text())
    noise = written(tmp_path / "c", 2, "100.0", plot=False)
    shutil.copy(noise, noise.parent / "grid.png")
    (noise.parent / "grid.svg").write_text((noise.parent / "curve.svg").read_text())
    assert not compare_exported(other, noise.parent / "grid.png", CheckSection()).within(
        CheckSection()
    )
