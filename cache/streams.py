"""Streamed artifacts: attention maps written to the cache step by step and read back the
same way, so neither the stage that records them nor the one that consumes them ever holds
the whole sequence in memory.

The engine offers stages a writer through ``ctx.stream_writer(output, layers={layer:
(steps, *per_step_shape)}, dtype=...)``: an object with ``write(step, {layer: tensor})`` and
``close() -> handle``; the handle is the stage's output value. A consumer receives a
:class:`StreamedMaps` with ``num_steps``, ``layers`` and ``step(i)``. Nothing here knows
which stage writes or reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from editflow.lazy import lazy

from .background import BackgroundWrites
from .store import Cache

torch = lazy("torch")

STREAMS_ATTR = "streams"
PREFETCH_MIN_BYTES = 4 * 2**20  # steps this big are read ahead (SD 1.x maps: 32 MiB a step)


class StreamWriter:
    """Writes one streamed output of a stage into the stage's open cache entry."""

    def __init__(
        self,
        entry_writer: Any,
        output: str,
        layers: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        reader: StreamedMaps | None,
    ) -> None:
        self.arrays = {layer: f"{output}.{index}" for index, layer in enumerate(layers)}
        self.num_steps = next(iter(layers.values()))[0] if layers else 0
        self.handles = {
            layer: entry_writer.create_stream(self.arrays[layer], tuple(shape), dtype)
            for layer, shape in layers.items()
        }
        self.layers = {layer: tuple(shape[1:]) for layer, shape in layers.items()}
        self.written = 0
        self.reader = reader

    def write(self, step: int, maps: Mapping[str, torch.Tensor]) -> None:
        if step != self.written:
            raise RuntimeError(
                f"stream steps must come in order: got {step}, expected {self.written}"
            )
        for layer, handle in self.handles.items():
            handle[step] = maps[layer]
        self.written += 1

    def close(self) -> StreamedMaps:
        if self.written != self.num_steps:
            raise RuntimeError(f"stream closed after {self.written} of {self.num_steps} steps")
        return self.reader

    def description(self) -> dict[str, Any]:
        """What the entry's attributes record so a reader can find the arrays again."""
        return {
            "num_steps": self.num_steps,
            "layers": {
                layer: [self.arrays[layer], list(shape)] for layer, shape in self.layers.items()
            },
        }


class StepWriter:
    """Writes one step-sequence output of a stage (noise maps, a latent path) into the
    stage's open cache entry, a step at a time in order. With ``live`` each step is stored
    as its own chunk as soon as it is given, so another worker can follow it (:mod:`.live`);
    the copy to the host and the write run on a thread of their own, so the stage's loop
    waits for neither (one object store request a step would cost more than a GPU step).
    The stage must not change a tensor it has written."""

    def __init__(
        self,
        entry_writer: Any,
        output: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        live: bool = False,
    ) -> None:
        self.handle = entry_writer.create_stream(output, tuple(shape), dtype, live=live)
        self.written = 0
        self._writes = BackgroundWrites("editflow-steps") if live else None

    def write(self, step: int, values: torch.Tensor) -> None:
        if step != self.written:
            raise RuntimeError(
                f"stream steps must come in order: got {step}, expected {self.written}"
            )
        if self._writes is None:
            self.handle[step] = values
        else:
            self._writes.submit(self.handle.__setitem__, step, values)
        self.written += 1

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for the steps still being written (before the entry is published or
        discarded); raises the first write's failure unless told not to."""
        if self._writes is not None:
            self._writes.finish(raise_errors)


class StreamedMaps:
    """Reads a streamed output back from the cache one step at a time.

    Created before the entry is published (the producing stage returns it), so the entry is
    looked up on first use. With prefetching, reading step ``i`` starts reading step ``i + 1``
    on a background thread, so a consumer that walks the steps in order overlaps its compute
    with the next read; a read that fails there fails the ``step`` call that asks for that
    step, as a plain read would. By default it is on for steps of at least
    :data:`PREFETCH_MIN_BYTES`: a local read of a smaller step (tiny's 0.12 MiB: 0.1 ms)
    costs less than handing it to a thread (the guided edit took 1.17x its in-memory time
    with prefetching and 1.02x without).
    """

    def __init__(
        self,
        cache: Cache,
        key: str,
        output: str,
        *,
        prefetch: bool | None = None,
        ready: Any = None,
    ) -> None:
        self.cache, self.key, self.output = cache, key, output
        self.ready = ready  # called before the first read: waits for the entry's publication
        self.prefetch = prefetch
        self._entry: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[int, Future[dict[str, torch.Tensor]]] | None = None
        self.bytes_read = 0

    def _open(self) -> Any:
        if self._entry is None:
            if self.ready is not None:
                self.ready()
            self._entry = self.cache.get(self.key)
            if self._entry is None:
                raise RuntimeError(f"streamed output {self.output} of {self.key} is not published")
        return self._entry

    @property
    def _description(self) -> dict[str, Any]:
        return self._open().attrs[STREAMS_ATTR][self.output]

    @property
    def num_steps(self) -> int:
        return int(self._description["num_steps"])

    @property
    def layers(self) -> dict[str, tuple[int, ...]]:
        return {layer: tuple(shape) for layer, (_, shape) in self._description["layers"].items()}

    @property
    def step_bytes(self) -> int:
        """Bytes of one step of every layer, as stored."""
        entry = self._open()
        return sum(
            entry.arrays[array].nbytes // entry.arrays[array].shape[0]
            for array, _ in self._description["layers"].values()
        )

    def step(self, index: int) -> dict[str, torch.Tensor]:
        """The maps of one step, read from one chunk per layer."""
        if self.prefetch is None:
            self.prefetch = self.step_bytes >= PREFETCH_MIN_BYTES
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == index:
            maps = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            maps = self._read(index)
        if self.prefetch and index + 1 < self.num_steps:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="editflow-prefetch")
            self._next = (index + 1, self._pool.submit(self._read, index + 1))
        elif self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.bytes_read += sum(tensor.numel() * tensor.element_size() for tensor in maps.values())
        return maps

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        entry = self._open()
        return {
            layer: entry.step(array, index)
            for layer, (array, _) in self._description["layers"].items()
        }
