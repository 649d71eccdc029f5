"""Fixtures for the cache tests: every behaviour is checked on a local folder and on memory://."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import fsspec
import pytest

from editflow.cache import Cache


@pytest.fixture(params=["local", "memory"])
def cache(request: pytest.FixtureRequest, tmp_path) -> Iterator[Cache]:
    """An empty cache in a fresh tmp folder, or under a unique memory:// URL (removed after)."""
    if request.param == "local":
        yield Cache(tmp_path / "cache")
        return
    url = f"memory://editflow-cache-test-{uuid.uuid4().hex}"
    yield Cache(url)
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def stored_files(cache: Cache) -> Callable[[str], list[str]]:
    """List the files under a folder of the cache root, as paths relative to that folder."""

    def list_files(folder: str) -> list[str]:
        fs, root = fsspec.core.url_to_fs(cache.url)
        base = f"{root.rstrip('/')}/{folder}"
        if not fs.exists(base):
            return []
        return sorted(path.removeprefix(base + "/") for path in fs.find(base))

    return list_files
