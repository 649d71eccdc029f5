"""Shared fixtures: offline hub, one tiny model folder per test session, fresh caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from editflow.cache import Cache


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    """Tests never touch the network, and share one built tiny model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EDITFLOW_MODELS", str(models_dir))
    monkeypatch.delenv("EDITFLOW_CACHE", raising=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")
