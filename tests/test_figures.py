"""`editflow figures --check`: the one CI gate. Progress per recipe, a table, the reasons,
exit codes, report.html (checked in a real headless browser) and the CI step summary."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support import MANIFESTS

from editflow.cli import main
from editflow.cli.lock import baseline_dir, lock_path


@pytest.fixture(autouse=True)
def keep_threads():
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like a paper's repository: the quick start with its committed lock and
    baseline images, under a subfolder."""
    folder = tmp_path_factory.mktemp("paper") / "figures"
    (folder / "intro").mkdir(parents=True)
    recipe = MANIFESTS / "quickstart.toml"
    shutil.copy(recipe, folder / "intro" / "quickstart.toml")
    shutil.copy(lock_path(recipe), folder / "intro" / lock_path(recipe).name)
    shutil.copytree(baseline_dir(recipe), folder / "intro" / baseline_dir(recipe).name)
    return folder


def _figures(paper: Path, tmp_path: Path, capsys, *extra: str, cache: Path | None = None):
    argv = ["figures", str(paper), "--check", "--cache", str(cache or tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--device", "cpu", *extra]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_a_checked_folder_prints_progress_a_table_and_a_report_and_exits_0(
    paper, tmp_path, capsys, monkeypatch
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, err = _figures(paper, tmp_path, capsys)
    assert code == 0, out
    # The committed lock was made on one machine: exact there, within tolerance elsewhere.
    verdict = re.fullmatch(
        r"\[1/1\] intro/quickstart\.toml: (matches its lock|within tolerance) \(7 computed,"
        r" 0 cached, [\d.]+ s\)",
        err[0],
    ).group(1)
    assert out[0].split() == ["recipe", "computed", "cached", "outputs", "verdict"]
    assert out[1].split() == ["intro/quickstart.toml", "7", "0", "3", *verdict.split()]
    assert (tmp_path / "out" / "intro" / "quickstart" / "figure.png").is_file()
    assert err[-1] == f"report: {tmp_path / 'out' / 'report.html'}"
    assert summary.read_text().splitlines()[:5] == [
        "## editflow figures check", "", "| recipe | verdict | computed | cached |",
        "|---|---|---|---|", f"| `intro/quickstart.toml` | {verdict} | 7 | 0 |",
    ]  # fmt: skip


def test_a_parameter_changed_without_relocking_exits_1_naming_recipe_stage_and_parameter(
    paper, tmp_path, capsys
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(paper, edited)
    recipe = edited / "intro" / "quickstart.toml"
    recipe.write_text(recipe.read_text().replace("guidance_scale = 3.0", "guidance_scale = 5.0"))
    code, out, err = _figures(edited, tmp_path, capsys)
    assert code == 1
    assert "intro/quickstart.toml: drift (" in err[0]
    assert "intro/quickstart.toml: edit: params.guidance_scale: 3.0 -> 5.0" in out
    figure = next(line for line in out if line.startswith("intro/quickstart.toml: figure.png"))
    assert "beyond tolerance" in figure


def test_missing_locks_and_failed_recipes_exit_1_and_the_others_still_run(
    paper, tmp_path, capsys
) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(paper, folder)
    (folder / "broken.toml").write_text("schema_version = 1\n[stages.x]\nkind = 'nope'\n")
    shutil.copy(folder / "intro" / "quickstart.toml", folder / "unlocked.toml")
    code, out, _ = _figures(folder, tmp_path, capsys, "--json")
    assert code == 1
    states = {row["recipe"]: row["state"] for row in json.loads("\n".join(out))}
    assert states.pop("intro/quickstart.toml") in ("matches its lock", "within tolerance")
    assert states == {"broken.toml": "failed", "unlocked.toml": "no lock"}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="no headless Chromium to open report.html (apt-get install chromium to run it)",
)
def test_the_report_loads_in_a_browser_with_every_image_and_no_console_error(
    paper, tmp_path, capsys
) -> None:
    _figures(paper, tmp_path, capsys, "--threads", "2", cache=tmp_path / "two")
    report = tmp_path / "out" / "report.html"
    done = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
         report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body[^>]*>", done.stdout).group(0)
    # Three files, each as the lock's copy, the new image and their difference.
    assert 'data-images="9"' in body and 'data-broken="0"' in body, body
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "ERR_" in line]
    assert console == []
    assert "within tolerance (max 1 level" in done.stdout or "identical pixels" in done.stdout


def test_a_lock_is_parsed_once_per_text_and_a_changed_lock_is_parsed_again(tmp_path, monkeypatch):
    import tomllib

    from editflow.cache import Cache
    from editflow.cli import lock as lock_module

    recipe = tmp_path / "quickstart.toml"
    shutil.copy(MANIFESTS / "quickstart.toml", recipe)
    shutil.copy(lock_path(MANIFESTS / "quickstart.toml"), lock_path(recipe))
    parses, loads = [], tomllib.loads

    def counting_loads(text: str) -> dict:
        parses.append(text)
        return loads(text)

    monkeypatch.setattr(lock_module.tomllib, "loads", counting_loads)
    memo = Cache(str(tmp_path / "cache"))
    first = lock_module.read_lock(recipe, memo=memo)
    again = lock_module.read_lock(recipe, memo=memo)
    assert len(parses) == 1 and again == first
    # Another text is another record: a relocked or edited lock is never read from the memo.
    text = lock_path(recipe).read_text()
    lock_path(recipe).write_text(text.replace(f'recipe = "{recipe.name}"', 'recipe = "other.toml"'))
    with pytest.raises(lock_module.EditflowError, match="the lock of another recipe"):
        lock_module.read_lock(recipe, memo=memo)
    assert len(parses) == 2
