"""Where a cache lives: folders, file:// and memory:// URLs, and clear errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editflow.cache import Cache
from editflow.errors import CacheError

KEY = "0a" * 32


def test_unknown_protocol_is_a_cache_error_naming_the_url() -> None:
    with pytest.raises(CacheError, match="nosuchproto://x"):
        Cache("nosuchproto://x")


def test_a_file_where_the_folder_should_be_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(CacheError, match="not-a-folder"):
        Cache(blocker / "cache")


def test_local_folder_is_created_on_first_write(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "cache"
    cache = Cache(root)
    assert cache.is_local and cache.local_root == root
    assert not root.exists()

    cache.put(KEY, {"latent": torch.ones(2)}, {})

    assert (root / "refs" / KEY[:2] / f"{KEY}.json").is_file()
    assert (root / "editflow-cache.json").is_file()


def test_file_url_is_local_and_shares_entries_with_the_plain_path(tmp_path: Path) -> None:
    Cache(tmp_path).put(KEY, {"latent": torch.ones(2)}, {})
    cache = Cache(tmp_path.as_uri())
    assert cache.is_local and cache.local_root == tmp_path
    assert torch.equal(cache.get(KEY).tensor("latent"), torch.ones(2))


def test_memory_url_is_not_local() -> None:
    cache = Cache("memory://editflow-location-test")
    assert not cache.is_local and cache.local_root is None
    assert cache.url == "memory://editflow-location-test"


def test_cache_of_another_layout_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "editflow-cache.json").write_text('{"format": 99}')
    with pytest.raises(CacheError, match="format 99"):
        Cache(tmp_path)


def test_malformed_keys_are_rejected(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for key in ["../escape", "ABC" * 10, "x"]:
        with pytest.raises(CacheError, match="invalid cache key"):
            cache.has(key)
