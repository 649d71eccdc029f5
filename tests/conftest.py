"""Shared fixtures: offline hub, one tiny model folder per test session, fresh caches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from editflow.cache import Cache
from editflow.models.tiny import ensure_tiny


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
