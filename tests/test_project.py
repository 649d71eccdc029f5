"""Project-level checks: layering, docs that match the code, CI wiring, every manifest runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import MANIFESTS, ROOT

from editflow.cache import Cache
from editflow.stages.docs import BEGIN, END, stage_reference


def test_import_layering_contracts_hold(tmp_path: Path) -> None:
    """import-linter cannot follow pyproject's package-dir mapping, so lint a copy of the
    package laid out as it is installed (editflow/{engine,executors,stages,cache,models})."""
    package = tmp_path / "editflow"
    shutil.copytree(ROOT / "editflow", package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("engine", "executors", "stages", "cache", "models"):
        shutil.copytree(
            ROOT / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "pyproject.toml", "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_stage_reference_is_current() -> None:
    page = (ROOT / "docs" / "stages.md").read_text()
    start, end = page.index(BEGIN), page.index(END) + len(END)
    assert page[start:end] == stage_reference(), (
        "docs/stages.md is stale: python -m editflow.stages.docs > the block in docs/stages.md"
    )


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert "pytest" in commands[1]
    assert commands[1].endswith(" && HF_HUB_OFFLINE=1 .venv/bin/editflow figures --check manifests")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]
    assert "manifests/quickstart.toml" in commands[0]
    assert (
        "-e . " in commands[0] and "[test]" not in commands[0]
    )  # the quick start needs no test extra


def test_the_ci_job_users_copy_runs_the_commands_the_test_command_runs() -> None:
    """docs/ci/figures.yml (shown in docs/figures.md) installs as the test
    command does and runs the figure check CI ends with."""
    job = (ROOT / "docs" / "ci" / "figures.yml").read_text()
    assert f"```yaml\n{job}```" in (ROOT / "docs" / "figures.md").read_text()
    test_command = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[1]
    steps = [step.split(" && ") for step in re.findall(r"^      - run: (.+)$", job, re.MULTILINE)]
    install, check = steps
    parts = test_command.split(" && ")
    assert install == parts[:3]
    assert parts[-1] == f"HF_HUB_OFFLINE=1 {check[0]}"  # the job sets HF_HUB_OFFLINE for all
    assert 'HF_HUB_OFFLINE: "1"' in job and "path: out/" in job


MANIFEST_FILES = sorted(MANIFESTS.rglob("*.toml"))


@pytest.mark.runs_long
def test_every_manifest_writes_its_figure_and_checks_within_tolerance_on_another_platform(
    tmp_path: Path,
) -> None:
    """What CI checks, from another platform: every recipe in manifests/ (the sweep with all
    its points) rerun on a cold cache at 2 CPU threads. The locks were made at 1, so no byte
    can be compared: the tolerance path decides every verdict, as it does on a CPU with
    other vector units (AMX, AVX512-FP16), and each model part is loaded once for every
    recipe that names it. CI's last command, `editflow figures --check manifests`, checks
    the same locks exactly on the machine that wrote them."""
    from editflow.cli.figures import check_recipes, find_recipes
    from editflow.engine.events import CollectEvents

    events = CollectEvents()
    try:
        results = check_recipes(
            find_recipes([MANIFESTS]), cache=Cache(tmp_path / "cache"), out_root=tmp_path / "out",
            device="cpu", threads=(2, True), events=events,
        )  # fmt: skip
    finally:
        torch.set_num_threads(1)
    assert [result.label for result in results] == [
        str(p.relative_to(MANIFESTS)) for p in MANIFEST_FILES
    ]
    for result in results:
        assert result.state == "within tolerance", (result.label, result.lines)
        assert result.lines[0].startswith("platform differs from the lock's (")
        assert "threads 1 in the lock, 2 here" in result.lines[0]
        assert list(result.out_dir.rglob("figure*")), f"{result.label} wrote no figure"
    loads = [event.message for event in events.of("loaded")]
    # One UNet per built-in model (tiny, tiny-inpaint, tiny-pixel); tiny's CLIP and VAE once.
    assert loads.count("unet") == 3 and loads.count("clip") == 1 and loads.count("vae") == 2


def test_every_manifest_has_a_lock_and_a_baseline_of_each_file_it_locks() -> None:
    import tomllib

    from editflow.cli.lock import baseline_dir, file_sha256, lock_path

    for recipe in MANIFEST_FILES:
        lock = tomllib.loads(lock_path(recipe).read_text())
        assert lock["format"] == 2 and lock["file"], recipe
        for name, facts in lock["file"].items():
            assert file_sha256(baseline_dir(recipe) / name) == facts["sha256"], (recipe, name)


def test_the_engine_is_small_and_names_no_model_part() -> None:
    """engine/ knows artifact types and component specs, never a method's model part: a new
    part (CLIP, ControlNet, an inpainting UNet) touches models/ and stages/ only."""
    sources = {path.name: path.read_text() for path in sorted((ROOT / "engine").glob("*.py"))}
    assert sum(text.count("\n") for text in sources.values()) <= 1500
    parts = re.compile(
        r"captioner|blip|clip|controlnet|unet|vae|text_encoder|tokenizer|scheduler_config",
        re.IGNORECASE,
    )
    found = {name: sorted(set(parts.findall(text))) for name, text in sources.items()}
    assert {name: words for name, words in found.items() if words} == {}


def test_no_stage_module_passes_about_400_lines() -> None:
    lengths = {
        str(path.relative_to(ROOT)): path.read_text().count("\n")
        for path in (ROOT / "stages").rglob("*.py")
    }
    assert {name: n for name, n in lengths.items() if n > 420} == {}


def test_the_readme_recipe_validates_and_its_diagram_is_the_quick_start(tmp_path: Path) -> None:
    from editflow.cache import Cache
    from editflow.cli import main
    from editflow.engine.api import plan_recipe

    readme = (ROOT / "README.md").read_text()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(re.findall(r"```toml\n(.+?)```", readme, re.S)[0])
    assert main(["validate", str(recipe), "--cache", str(tmp_path / "c")]) == 0
    # The mermaid graph: each "a[...] --> b[...] --> c[...]" chain, as stage-name edges.
    diagram = re.findall(r"```mermaid\n(.+?)```", readme, re.S)[0]
    drawn = set()
    for line in diagram.splitlines()[1:]:
        names = [re.sub(r"\[.*\]", "", part).strip() for part in line.split("-->")]
        drawn |= {(a.removeprefix("inputs."), b) for a, b in zip(names, names[1:], strict=False)}
    plan = plan_recipe(MANIFESTS / "quickstart.toml", cache=Cache(tmp_path / "c"))
    edges = set()
    for stage in plan.stages.values():
        for refs in stage.references.values():
            for ref in refs if isinstance(refs, list) else [refs]:
                head, _, tail = ref.partition(".")
                edges.add((tail if head == "inputs" else head, stage.name))
    assert drawn == edges
