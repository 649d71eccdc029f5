"""Live streams: steps readable while their entry is being written, and never trusted alone."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from editflow.cache import Cache, FollowLost, LiveSteps, StepsWriter

KEY = "ab" * 32


class Producer:
    """Writes a live stream of ``steps`` in a thread, one step each time ``advance`` is called."""

    def __init__(self, cache: Cache, steps: torch.Tensor, object_id: str = "live1") -> None:
        self.cache, self.steps, self.object_id = cache, steps, object_id
        self.go = threading.Semaphore(0)
        self.done: bool | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.cache.writer(KEY, {}, object_id=self.object_id) as writer:
                stream = StepsWriter(lambda: writer, "noise", len(self.steps), live=True)
                for index, step in enumerate(self.steps):
                    self.go.acquire()
                    stream.write(index, step)
                stream.finish()  # the engine does this before it publishes
            self.done = True
        except BaseException as error:
            self.error, self.done = error, False

    def state(self) -> bool | None:
        return self.done

    def advance(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.go.release()

    def finish(self) -> None:
        self.advance(len(self.steps))
        self.thread.join()


def test_steps_are_read_as_they_are_written_before_the_entry_is_published(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    steps = torch.randn(4, 2, 3).to(torch.bfloat16)
    steps[1] = 0  # a step of zeros is stored too (zarr skips such chunks by default)
    producer = Producer(cache, steps)
    live = LiveSteps(cache, KEY, "live1", "noise", producer.state)
    producer.advance(2)
    assert len(live) == 4
    first, second = live[0], live[1]
    assert cache.get(KEY) is None, "read while the entry is unpublished"
    assert first.dtype == torch.bfloat16 and torch.equal(first, steps[0])
    assert torch.equal(second, torch.zeros(2, 3, dtype=torch.bfloat16))
    producer.finish()
    assert torch.equal(live[3], steps[3])
    live.confirm()
    entry = cache.get(KEY)
    assert entry.arrays["noise"].chunks == (1, 2, 3) and entry.arrays["noise"].shards is None
    assert torch.equal(entry.tensor("noise"), steps)


def test_a_failed_producer_makes_its_follower_stop(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    live = LiveSteps(cache, KEY, "never", "noise", lambda: False)
    with pytest.raises(FollowLost, match=f"the stage writing {KEY} failed"):
        len(live)
    producer = Producer(cache, torch.ones(3, 2))
    producer.advance(1)
    state: list[bool | None] = [None]
    live = LiveSteps(cache, KEY, "live1", "noise", lambda: state[0])
    assert torch.equal(live[0], torch.ones(2))
    state[0] = False  # what Ray says of a worker that died
    with pytest.raises(FollowLost, match="failed"):
        live[1]  # never written: the producer is said to have failed
    producer.finish()


def test_when_another_writer_won_the_follower_reads_the_published_entry(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    steps = torch.arange(6.0).reshape(3, 2)
    producer = Producer(cache, steps)
    live = LiveSteps(cache, KEY, "live1", "noise", producer.state)
    producer.advance(1)
    assert torch.equal(live[0], steps[0])
    with cache.writer(KEY, {}) as winner:
        winner.write("noise", steps, stream_axis=0)
    producer.finish()  # it loses the race and deletes its staging folder
    assert producer.error is None and not (tmp_path / "objects" / KEY / "live1").exists()
    assert torch.equal(live[2], steps[2])
    live.confirm()


def test_confirm_refuses_steps_that_differ_from_what_was_published(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    producer = Producer(cache, torch.ones(2, 3))
    live = LiveSteps(cache, KEY, "live1", "noise", producer.state)
    producer.advance(1)
    assert torch.equal(live[0], torch.ones(3))
    with cache.writer(KEY, {}) as winner:  # what a nondeterministic producer would publish
        winner.write("noise", np.full((2, 3), 2.0, dtype=np.float32), stream_axis=0)
    producer.finish()
    with pytest.raises(FollowLost, match=f"step 0 of {KEY}/noise was not published"):
        live.confirm()


def test_a_live_stream_is_raw_along_its_first_axis(tmp_path: Path) -> None:
    with Cache(tmp_path).writer(KEY, {}) as writer:
        with pytest.raises(ValueError, match="a live stream is raw and streams along axis 0"):
            writer.create_stream("maps", (2, 3), torch.float16, stream_axis=1, live=True)
        writer.write("other", torch.zeros(1))


def test_a_live_write_that_fails_fails_finish_and_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    with pytest.raises(ValueError, match=r"step must have shape \(2,\), got \(3,\)"):
        with cache.writer(KEY, {}, object_id="live1") as writer:
            stream = StepsWriter(lambda: writer, "noise", 2, live=True)
            stream.write(0, torch.zeros(2))
            stream.write(1, torch.zeros(3))  # fails on the writing thread...
            stream.finish()  # ...and here
    assert cache.get(KEY) is None and not (tmp_path / "objects" / KEY / "live1").exists()


def test_a_sequence_written_whole_is_followed_from_its_published_entry(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    steps = torch.arange(6.0).reshape(3, 2)
    state: list[bool | None] = [None]
    live = LiveSteps(cache, KEY, "live1", "noise", lambda: state[0])
    with cache.writer(KEY, {}, object_id="live1") as writer:
        writer.write("noise", steps, stream_axis=0)  # not live: as a stage's returned tensor
        assert live._read_metadata() is None  # staged, but not to be read before publishing
    state[0] = True
    assert len(live) == 3 and torch.equal(live[2], steps[2]) and torch.equal(live[-3], steps[0])
    live.confirm()  # nothing was read live: nothing to check


def test_maps_are_followed_from_the_published_entry(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    maps = [{"down": torch.rand(2, 3).half(), "up": torch.rand(1, 3).half()} for _ in range(3)]
    state: list[bool | None] = [None]
    live = LiveSteps(cache, KEY, "live1", "attention_maps", lambda: state[0])
    with cache.writer(KEY, {}, object_id="live1") as writer:
        stream = StepsWriter(lambda: writer, "attention_maps", 3)
        for index, step in enumerate(maps):
            stream.write(index, step)
        writer.set_attrs(streams={"attention_maps": stream.description()})
    state[0] = True
    assert len(live) == 3
    for index, step in enumerate(maps):
        got = live[index]
        assert got.keys() == step.keys()
        assert all(torch.equal(got[layer], step[layer]) for layer in step)
    live.confirm()
