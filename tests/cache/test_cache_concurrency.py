"""Two processes computing the same key at once: first writer wins, the loser discards."""

from __future__ import annotations

import importlib
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

from editflow.cache import Cache

KEY = "c0" * 32


def test_two_processes_writing_one_key_publish_exactly_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spawned children import the worker by module name, whatever pytest's import mode.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    workers = importlib.import_module("cache_workers")
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    # One spawned writer and this process as the other: two processes, one import of torch.
    child = context.Process(
        target=workers.write_same_key, args=(str(root), KEY, 1, barrier, results)
    )
    child.start()
    workers.write_same_key(str(root), KEY, 0, barrier, results)
    reports = [results.get(timeout=120) for _ in range(2)]
    child.join(timeout=60)
    assert child.exitcode == 0

    winners = [report for report in reports if report["won"]]
    assert len(winners) == 1
    winner_object = winners[0]["object"]
    assert all(report["published"] == winner_object for report in reports)

    cache = Cache(root)
    assert [info.key for info in cache.ls()] == [KEY]
    assert cache.get(KEY).object_id == winner_object
    assert cache.verify() == []
    assert [path.name for path in (root / "objects" / KEY).iterdir()] == [winner_object]
    assert list((root / "refs").rglob(".tmp-*")) == []


def test_threads_racing_to_publish_one_key_leave_one_winner(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    barrier = threading.Barrier(4)
    writers = []

    def write(index: int) -> None:
        with cache.writer(KEY, {"writer": index}) as writer:
            writer.write("latent", torch.arange(64.0).reshape(8, 8), stream_axis=0)
            barrier.wait(timeout=30)
        writers.append(writer)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(writer.won for writer in writers) == [False, False, False, True]
    winner = next(writer for writer in writers if writer.won)
    assert {writer.published.object_id for writer in writers} == {winner.object_id}
    assert [path.name for path in (tmp_path / "objects" / KEY).iterdir()] == [winner.object_id]
    assert cache.verify() == []
