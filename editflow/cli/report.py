"""What ``editflow figures --check`` leaves for people: ``report.html`` beside the figures
(per recipe: the lock's image | the new image | their difference, the numbers and the
reasons) and a Markdown summary for a CI job's page (``$GITHUB_STEP_SUMMARY``).

The report links its images by relative paths (the new ones where the run wrote them, the
lock's copies and the difference pictures under ``report/``), so the output folder uploaded
as one CI artifact opens anywhere.
"""

from __future__ import annotations

import html
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editflow.files.textcheck import is_text
from editflow.imagecheck import difference_image

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table.summary td, table.summary th { padding: 2px 12px; text-align: left; }
.drift, .failed, .no-lock { color: #b00; } .matches { color: #070; } .within { color: #06a; }
figure { display: inline-block; margin: 4px 12px 12px 0; } figure img { max-width: 420px;
image-rendering: pixelated; border: 1px solid #ccc; } figcaption { font-size: 12px; }
li { font-family: ui-monospace, monospace; font-size: 12px; }
"""
# Marks the page once every image has loaded or failed, so a headless browser can tell.
SCRIPT = """
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.broken = images.filter((i) => !i.complete || !i.naturalWidth).length;
});
"""


def _css_class(state: str) -> str:
    return {"matches its lock": "matches", "within tolerance": "within", "no lock": "no-lock"}.get(
        state, state.split()[0]
    )


def write_report(path: Path, results: Sequence[Any]) -> Path:
    """Write ``report.html`` for the results of ``figures`` (see :mod:`editflow.cli.figures`)."""
    root = path.parent
    pictures = root / "report"
    if pictures.is_dir():
        shutil.rmtree(pictures)
    rows, sections = [], []
    for result in results:
        state = result.state
        label = html.escape(result.label)
        rows.append(
            f'<tr><td><a href="#{label}">{label}</a></td>'
            f'<td class="{_css_class(state)}">{html.escape(state)}</td>'
            f"<td>{len(result.computed)}</td><td>{len(result.cached)}</td>"
            f"<td>{result.seconds:.1f} s</td></tr>"
        )
        body = [f'<h2 id="{label}">{label} <span class="{_css_class(state)}">'
                f"{html.escape(state)}</span></h2>"]  # fmt: skip
        if result.lines:
            body.append(
                "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in result.lines) + "</ul>"
            )
        for check in result.verdict.files if result.verdict else []:
            body.append(_file_figures(check, result, root, pictures))
        sections.append("\n".join(body))
    page = (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>editflow figures check</title>"
        f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>"
        "<h1>editflow figures check</h1>"
        '<table class="summary"><tr><th>recipe</th><th>verdict</th><th>computed</th>'
        "<th>cached</th><th>time</th></tr>" + "".join(rows) + "</table>"
        + "\n".join(sections) + "</body></html>\n"
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _file_figures(check: Any, result: Any, root: Path, pictures: Path) -> str:
    """One exported file: the lock's copy, the new image and their difference."""
    cells = []
    folder = pictures / result.label
    if check.baseline is not None and check.baseline.is_file():
        copy = folder / f"{check.name}.lock{check.baseline.suffix}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(check.baseline, copy)
        cells.append((copy, "lock"))
    if check.image is not None and check.image.is_file():
        cells.append((check.image, "new"))
    pictured = not is_text(Path(check.name)) or check.name.endswith(".svg")
    if len(cells) == 2 and check.status != "exact" and not is_text(Path(check.name)):
        picture = folder / f"{check.name}.difference.png"
        difference_image(check.baseline, check.image, result.tolerance).save(picture)
        cells.append((picture, "difference"))
    figures = "".join(  # a table is linked, not shown as a (broken) image
        f'<figure><img src="{html.escape(os.path.relpath(path, root))}" alt="{caption}">'
        f"<figcaption>{caption}</figcaption></figure>"
        if pictured
        else f'<figure><a href="{html.escape(os.path.relpath(path, root))}">{caption}</a></figure>'
        for path, caption in cells
    )
    return (f"<h3>{html.escape(check.name)}: {html.escape(check.line)}</h3>"
            f"<div>{figures}</div>")  # fmt: skip


def step_summary(results: Sequence[Any]) -> str:
    """The check as Markdown: a table, then each recipe's reasons."""
    lines = ["## editflow figures check", "", "| recipe | verdict | computed | cached |",
             "|---|---|---|---|"]  # fmt: skip
    for result in results:
        lines.append(f"| `{result.label}` | {result.state} | {len(result.computed)} |"
                     f" {len(result.cached)} |")  # fmt: skip
    for result in results:
        if result.lines:
            lines += ["", f"### `{result.label}`: {result.state}", ""]
            lines += [f"- {line}" for line in result.lines]
    return "\n".join(lines) + "\n"
