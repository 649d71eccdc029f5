"""Mechanical mutations of every example manifest are refused cleanly: exit 2, no traceback.

Each manifest is parsed and mutated one way at a time (an unknown key in every table, a value
of the wrong type, a number far out of range, a byte that is not UTF-8), written next to a
copy of the manifest's folder (so relative files still resolve), and validated in process.
"""

from __future__ import annotations

import json
import random
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import MANIFESTS

from editflow.cli import main

MANIFEST_FILES = sorted(MANIFESTS.rglob("*.toml"))
PER_MANIFEST = 1000  # mutations drawn per manifest (deterministically); today all of them


def _paths(document: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (key path, value) in the document, tables included."""
    yield prefix, document
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))


def _set(document: dict, path: tuple, value: Any) -> dict:
    copy = json.loads(json.dumps(document))
    table = copy
    for key in path[:-1]:
        table = table[key]
    table[path[-1]] = value
    return copy


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return "not an array"
    return [value]


def mutations(document: dict) -> Iterator[tuple[str, dict]]:
    for path, value in _paths(document):
        if isinstance(value, dict):
            if path[:1] != ("stages",) or len(path) == 2 or path == ():
                yield (
                    f"unknown key in {'.'.join(path) or 'the top level'}",
                    _set(document, (*path, "zz_unknown"), 1),
                )
            continue
        if path == ("schema_version",):
            continue
        yield f"{'.'.join(path)} of the wrong type", _set(document, path, _wrong_type(value))
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{'.'.join(path)} out of range", _set(document, path, 10**30)


@pytest.mark.parametrize(
    "manifest", MANIFEST_FILES, ids=[str(p.relative_to(MANIFESTS)) for p in MANIFEST_FILES]
)
def test_every_mutation_of_a_manifest_is_refused_cleanly(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "recipe"
    shutil.copytree(manifest.parent, folder)
    document = tomllib.loads(manifest.read_text())
    drawn = list(mutations(document))
    drawn = random.Random(manifest.name).sample(drawn, min(PER_MANIFEST, len(drawn)))
    text = (folder / manifest.name).read_text()
    broken = text.encode()
    position = random.Random(0).randrange(len(broken))
    drawn.append(("a byte that is not UTF-8", broken[:position] + b"\xff" + broken[position:]))
    accepted = []
    for what, mutated in drawn:
        recipe = folder / "mutated.json"
        if isinstance(mutated, bytes):
            recipe = folder / "mutated.toml"
            recipe.write_bytes(mutated)
        else:
            recipe.write_text(json.dumps(mutated))
        code = main(["validate", str(recipe), "--cache", str(tmp_path / "cache")])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, what
        if code != 2 or not captured.err.strip():
            accepted.append(what)
    assert accepted == []
    assert not (tmp_path / "cache").exists()
