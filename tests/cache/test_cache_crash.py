"""Crash safety: a writer that fails publishes nothing and leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from editflow.cache import Cache

KEY = "b2" * 32


def test_exception_inside_writer_publishes_nothing_and_leaves_no_files(
    cache: Cache, stored_files: Callable[[str], list[str]]
) -> None:
    with pytest.raises(RuntimeError, match="stage failed"):
        with cache.writer(KEY, {"stage": "invert"}) as writer:
            writer.write("noise_maps", torch.randn(4, 3, 8, 8), stream_axis=0)
            assert stored_files("objects")  # staged data exists while writing ...
            raise RuntimeError("stage failed")

    assert not cache.has(KEY)  # ... and is gone after the failure
    assert cache.get(KEY) is None
    assert stored_files("objects") == []
    assert stored_files("refs") == []
    assert writer.published is None and not writer.won


def test_staged_data_is_invisible_until_publish(cache: Cache) -> None:
    with cache.writer(KEY, {}) as writer:
        writer.write("latent", torch.ones(2, 2))
        assert not cache.has(KEY)
        assert cache.get(KEY) is None
        assert cache.ls() == []
    assert cache.has(KEY)


def test_killed_writer_leaves_an_invisible_orphan_that_gc_removes(
    cache: Cache, stored_files: Callable[[str], list[str]]
) -> None:
    writer = cache.writer(KEY, {})
    writer.__enter__()  # the process "dies" here: __exit__ never runs
    writer.write("latent", torch.ones(2, 2))

    assert not cache.has(KEY)
    assert cache.du().staging_objects == 1
    assert cache.gc().removed_staging == 0  # younger than the default hour: maybe still writing
    assert cache.gc(older_than_s=0).removed_staging == 1
    assert stored_files("objects") == []


def test_a_writer_is_used_once(cache: Cache) -> None:
    with cache.writer(KEY, {}) as writer:
        writer.write("x", torch.zeros(1))
    with pytest.raises(RuntimeError, match="used once"):
        writer.__enter__()
    with pytest.raises(ValueError, match="already written"):
        with cache.writer("b3" * 32, {}) as other:
            other.write("x", torch.zeros(1))
            other.write("x", torch.zeros(1))


def test_a_stream_cannot_be_written_after_its_writer_failed(
    cache: Cache, stored_files: Callable[[str], list[str]]
) -> None:
    with pytest.raises(KeyboardInterrupt):
        with cache.writer(KEY, {}) as writer:
            handle = writer.create_stream("attention", (3, 4), torch.float16)
            handle[0] = torch.ones(4)
            raise KeyboardInterrupt  # any exception, not only Exception subclasses
    with pytest.raises(RuntimeError, match="finished EntryWriter"):
        handle[1] = torch.ones(4)
    assert stored_files("objects") == []
