"""Step sequences in the cache: written a step at a time into an entry being staged, read a
step at a time from a published one (docs/steps.md).

A step is a tensor (noise maps, a latent path) or ``{layer: tensor}`` (attention maps). A
tensor sequence is one array streamed along axis 0; a sequence of maps is one array per
layer (``OUTPUT.0``, ``OUTPUT.1`` ...) that the entry's ``streams`` attribute names
(:meth:`StepsWriter.description`). :class:`StepsWriter` writes either; :class:`CachedSteps`
reads either with ``len(steps)`` and ``steps[i]``. Nothing here knows which stage writes or
reads, nor which artifact a sequence is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from editflow.lazy import lazy

from .background import BackgroundWrites
from .entry import Entry
from .store import Cache
from .writer import EntryWriter, StreamHandle

torch = lazy("torch")

STREAMS_ATTR = "streams"
PREFETCH_MIN_BYTES = 4 * 2**20  # steps this big are read ahead (SD 1.x maps: 32 MiB a step)


class StepsWriter:
    """Writes one step-sequence output into a stage's entry, a step at a time in order.

    The arrays are created at the first write, from its shapes (attention-map layers are
    known only after the first UNet call). Without ``live`` each step is written as it is
    given (steps of a sharded stream wait in memory for their shard). With ``live`` each step
    is stored as its own chunk, in the staging folder, so another worker can follow it
    (:mod:`.live`); the copy to the host and the write then run on a thread of their own, so
    the stage's loop waits for neither (one object store request a step would cost more than a
    GPU step). The caller must not change a tensor it has written.

    Args:
        entry: Opens (once) the entry being staged.
        output: The output's name: the array's, or the prefix of the layers' arrays.
        length: Steps in the sequence.
        reader: What :meth:`result` returns: the sequence read back once published.
        dtype: Stored torch dtype (values are cast to it); ``None`` keeps the first step's.
        live: Write each step where a follower can read it before the entry is published.
    """

    def __init__(
        self,
        entry: Callable[[], EntryWriter],
        output: str,
        length: int,
        reader: Any = None,
        *,
        dtype: torch.dtype | None = None,
        live: bool = False,
    ) -> None:
        self.entry, self.output, self.length = entry, output, length
        self.reader, self.dtype, self.live = reader, dtype, live
        self.arrays: dict[str | None, str] = {}  # layer (None for a tensor step) -> array
        self.shapes: dict[str | None, tuple[int, ...]] = {}  # layer -> per-step shape
        self.handles: dict[str | None, StreamHandle] = {}
        self.written = 0
        self._writes = BackgroundWrites("editflow-steps") if live else None

    def write(self, index: int, value: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        if index != self.written:
            raise RuntimeError(f"steps must come in order: got {index}, expected {self.written}")
        parts = dict(value) if isinstance(value, Mapping) else {None: value}
        if not self.handles:
            self._create(parts)
        for layer, handle in self.handles.items():
            if self._writes is None:
                handle[index] = parts[layer]
            else:
                self._writes.submit(handle.__setitem__, index, parts[layer])
        self.written += 1

    def _create(self, parts: Mapping[str | None, torch.Tensor]) -> None:
        writer = self.entry()
        for index, (layer, tensor) in enumerate(parts.items()):
            array = self.output if layer is None else f"{self.output}.{index}"
            shape = (self.length, *tensor.shape)
            dtype = self.dtype if self.dtype is not None else tensor.dtype
            self.arrays[layer], self.shapes[layer] = array, tuple(tensor.shape)
            self.handles[layer] = writer.create_stream(array, shape, dtype, live=self.live)

    def result(self) -> Any:
        """The reader of the sequence (once the entry is published).

        Raises:
            RuntimeError: Not every step was written.
        """
        if self.written != self.length:
            raise RuntimeError(f"{self.output}: {self.written} of {self.length} steps written")
        return self.reader

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for the steps still being written (before the entry is published or
        discarded); raises the first write's failure unless told not to."""
        if self._writes is not None:
            self._writes.finish(raise_errors)

    def description(self) -> dict[str, Any] | None:
        """What the entry's ``streams`` attribute records so a reader finds a sequence of maps
        again (``None`` for a tensor sequence: its array has the output's name)."""
        if None in self.arrays:
            return None
        return {
            "num_steps": self.length,
            "layers": {
                layer: [self.arrays[layer], list(shape)] for layer, shape in self.shapes.items()
            },
        }


class CachedSteps:
    """A step sequence of a published entry, read a step at a time: ``len`` and ``[i]``.

    May be made before the entry is published (a producing stage returns it), so the entry
    is looked up on first use. With prefetching, reading step ``i`` starts reading step
    ``i + 1`` on a background thread, so a consumer that walks the steps in order overlaps its
    compute with the next read; a read that fails there fails the ``[i]`` that asks for that
    step, as a plain read would. By default it is on for steps of at least
    :data:`PREFETCH_MIN_BYTES`: a local read of a smaller step (tiny's 0.12 MiB: 0.1 ms)
    costs less than handing it to a thread (the guided edit took 1.17x its in-memory time
    with prefetching and 1.02x without).

    Args:
        cache: The cache holding the entry.
        key: The entry's key.
        output: The sequence's output name.
        prefetch: Read ahead; ``None`` decides by the size of a step.
        ready: Called before the first read: waits for the entry's publication.
    """

    def __init__(
        self,
        cache: Cache,
        key: str,
        output: str,
        *,
        prefetch: bool | None = None,
        ready: Callable[[], Any] | None = None,
    ) -> None:
        self.cache, self.key, self.output = cache, key, output
        self.ready = ready
        self.prefetch = prefetch
        self._entry: Entry | None = None
        self._arrays: dict[str | None, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[int, Future[Any]] | None = None
        self.bytes_read = 0

    def _open(self) -> Entry:
        if self._entry is None:
            if self.ready is not None:
                self.ready()
            entry = self.cache.get(self.key)
            if entry is None:
                raise RuntimeError(f"step sequence {self.output} of {self.key} is not published")
            maps = entry.attrs.get(STREAMS_ATTR, {}).get(self.output)
            if maps is None:
                self._arrays = {None: self.output}
            else:
                self._arrays = {layer: array for layer, (array, _) in maps["layers"].items()}
            self._entry = entry
        return self._entry

    def __len__(self) -> int:
        entry = self._open()
        return entry.arrays[next(iter(self._arrays.values()))].shape[0] if self._arrays else 0

    @property
    def step_bytes(self) -> int:
        """Bytes of one step (of every layer), as stored."""
        entry = self._open()
        return sum(
            entry.arrays[array].nbytes // entry.arrays[array].shape[0]
            for array in self._arrays.values()
        )

    def __getitem__(self, index: int) -> Any:
        """Step ``index``, read from one chunk (per layer)."""
        steps = len(self)
        if not -steps <= index < steps:
            raise IndexError(f"step {index} out of range for {self.output!r} with {steps} steps")
        index %= steps
        if self.prefetch is None:
            self.prefetch = self.step_bytes >= PREFETCH_MIN_BYTES
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == index:
            step = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            step = self._read(index)
        if self.prefetch and index + 1 < steps:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="editflow-prefetch")
            self._next = (index + 1, self._pool.submit(self._read, index + 1))
        elif self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        parts = step.values() if isinstance(step, dict) else [step]
        self.bytes_read += sum(tensor.numel() * tensor.element_size() for tensor in parts)
        return step

    def _read(self, index: int) -> Any:
        entry = self._open()
        if None in self._arrays:
            return entry.step(self._arrays[None], index)
        return {layer: entry.step(array, index) for layer, array in self._arrays.items()}
