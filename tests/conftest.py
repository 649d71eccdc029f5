"""Shared fixtures: offline hub, one tiny model folder per test session, fresh caches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from editflow.cache import Cache
from editflow.models.tiny import ensure_tiny


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``runs_long`` go first. pytest-xdist (``--dist loadfile``) gives each
    module to one worker in this order, so their minutes start beside the short tests
    instead of trailing alone once everything else has finished."""
    items.sort(key=lambda item: item.get_closest_marker("runs_long") is None)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per usable core, at most 4. The tests run torch on one thread,
    and each worker holds its own tiny model and imports (about 1 GiB at its peak)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    """Tests never touch the network, and share one built tiny model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EDITFLOW_MODELS", str(models_dir))
    monkeypatch.delenv("EDITFLOW_CACHE", raising=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_folder(models_dir: Path) -> Path:
    """The built-in tiny model's folder (built once per session)."""
    return ensure_tiny(models_dir)


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")
