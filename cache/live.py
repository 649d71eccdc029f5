"""Following a step sequence while its entry is still being written: pipelined stages.

A producer that writes a stream with ``live=True`` stores each step as its own chunk, written
atomically when the step is given, in a staging folder whose name the run chose
(``Cache.writer(..., object_id=...)``). :class:`LiveSteps` reads those steps as they appear,
so a consumer on another worker can run a step behind its producer instead of waiting for
the whole entry (a sweep's edits follow the inversion they share). A sequence that is not
written live (attention maps, whose layer names are known only from the published entry, or
a tensor the stage returned whole) is read from the published entry once it is there.

Nothing read this way is trusted on its own. :meth:`LiveSteps.confirm` waits for the
producer's entry to be published and checks every step read against the published step
checksums; a consumer publishes its own entry only after that, so a published entry is
always made of published data. When the producer fails, or what was read differs from what
was published, the reader raises :class:`FollowLost` and the consumer is run again from the
published entry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from editflow.lazy import lazy

from .dtypes import checksum_of, from_stored
from .entry import Entry
from .store import Cache
from .streams import CachedSteps
from .writer import LIVE_ATTR

torch = lazy("torch")

POLL_SECONDS = (0.0005, 0.005)  # first and longest wait between looks for a step not yet there
STATE_SECONDS = 0.1  # how often a waiting reader asks whether its producer has ended


class FollowLost(RuntimeError):
    """The producer being followed failed, or its data is not what it published: the
    consumer must run again once the producer's entry is published."""


ProducerState = Callable[[], "bool | None"]
"""None while the producer runs, True once it returned (its entry published), False when it
failed."""


class LiveSteps:
    """One step-sequence output of an entry being written, read step by step as it is
    written: ``len(steps)`` and ``steps[i]`` (a new tensor of the stream's torch dtype).

    Both wait, as long as the producer runs, for what they need; once the producer has
    returned they read its published entry instead (another writer of the key may have won,
    and the staging folder is then gone), as they do for a sequence not written live.

    Args:
        cache: The cache the producer writes to.
        key: The producer's key.
        object_id: The producer's staging folder (``Cache.writer(..., object_id=...)``).
        array: The sequence's name (the producer's output).
        state: Whether the producer still runs, returned, or failed (:data:`ProducerState`).
    """

    def __init__(
        self, cache: Cache, key: str, object_id: str, array: str, state: ProducerState
    ) -> None:
        self.cache, self.key, self.object_id, self.array = cache, key, object_id, array
        self.state = state
        self.checksums: dict[int, str] = {}  # step -> checksum of what was read live
        self._metadata: dict[str, Any] | None = None
        self._live = True  # False once the staged array is found not to be live
        self._asked = 0.0  # when the producer's state was last asked
        self._cached: CachedSteps | None = None

    def __len__(self) -> int:
        if self._cached is None and (metadata := self._wait(self._read_metadata)) is not None:
            return int(metadata["shape"][0])
        return len(self._published_steps())

    def __getitem__(self, index: int) -> Any:
        steps = len(self)
        if not -steps <= index < steps:
            raise IndexError(f"step {index} out of range for {self.array!r} with {steps} steps")
        index %= steps
        if (
            self._cached is None
            and (values := self._wait(lambda: self._read_step(index))) is not None
        ):
            self.checksums[index] = checksum_of(values)
            torch_dtype = self._read_metadata()["attributes"][LIVE_ATTR]["torch_dtype"]
            return from_stored(values, torch_dtype)
        return self._published_steps()[index]

    def confirm(self) -> None:
        """Wait for the producer's entry and check each step read live against it.

        Raises:
            FollowLost: The producer failed, or a step read differs from the published one.
        """
        while (state := self.state()) is None:
            time.sleep(POLL_SECONDS[1])
        if not state:
            raise FollowLost(f"{self.key} ended without publishing {self.array!r}")
        if not self.checksums:
            return  # every step came from the published entry
        info = self._published().arrays.get(self.array)
        if info is None or info.step_checksums is None:
            raise FollowLost(f"{self.key} ended without publishing {self.array!r}")
        for index, checksum in sorted(self.checksums.items()):
            if info.step_checksums[index] != checksum:
                raise FollowLost(f"step {index} of {self.key}/{self.array} was not published")

    def _wait(self, read: Callable[[], Any]) -> Any:
        """``read()`` once it gives something, or None once the producer has returned
        without it there (read its published entry then: its staging folder is gone when
        another writer of the key won).

        Raises:
            FollowLost: The producer failed.
        """
        pause = POLL_SECONDS[0]
        while (value := read()) is None:
            now = time.monotonic()
            if now - self._asked >= STATE_SECONDS:
                self._asked = now
                state = self.state()
                if state is False:
                    raise FollowLost(f"the stage writing {self.key} failed")
                if state:
                    return read()  # it may have written the step just before returning
            time.sleep(pause)
            pause = min(2 * pause, POLL_SECONDS[1])
        return value

    def _published(self) -> Entry:
        entry = self.cache.get(self.key)
        if entry is None:
            raise FollowLost(f"{self.key} returned but is not published")
        return entry

    def _published_steps(self) -> CachedSteps:
        if self._cached is None:
            self._published()
            self._cached = CachedSteps(self.cache, self.key, self.array)
        return self._cached

    def _read_metadata(self) -> dict[str, Any] | None:
        if self._metadata is None and self._live:
            data = self.cache.read_staged(self.key, self.object_id, f"{self.array}/zarr.json")
            try:
                metadata = json.loads(data) if data else None
            except ValueError:  # still being written
                return None
            if metadata is not None and LIVE_ATTR not in metadata.get("attributes", {}):
                self._live = False  # written whole as the producer returns: wait for that
                return None
            self._metadata = metadata
        return self._metadata

    def _read_step(self, index: int) -> np.ndarray | None:
        metadata = self._read_metadata()
        if metadata is None:
            return None
        separator = metadata["chunk_key_encoding"]["configuration"]["separator"]
        shape = metadata["shape"]
        chunk = separator.join(["c", str(index)] + ["0"] * (len(shape) - 1))
        data = self.cache.read_staged(self.key, self.object_id, f"{self.array}/{chunk}")
        if data is None:
            return None
        dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        return np.frombuffer(data, dtype=dtype).reshape(shape[1:]).copy()
