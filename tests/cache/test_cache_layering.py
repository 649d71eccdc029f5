"""The cache knows nothing of the engine or the stages (checked on its source)."""

from __future__ import annotations

import ast
from pathlib import Path

import editflow.cache


def test_cache_imports_neither_engine_nor_stages() -> None:
    imported = []
    for source in Path(editflow.cache.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                imported += [(source.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{source.name} imports from outside the cache package"
                imported.append((source.name, node.module or ""))
    forbidden = [
        (name, module)
        for name, module in imported
        if module.split(".")[:2] in (["editflow", "engine"], ["editflow", "stages"])
        or module.split(".")[0] in ("engine", "stages")
    ]
    assert forbidden == []
