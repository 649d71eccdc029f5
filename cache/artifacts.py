"""A stage's outputs in one cache entry, each stored by its layout.

The cache knows storage layouts, not artifact types: the engine says how each output is kept.

- ``"text"``: a string, kept in the entry's attributes (covered by the manifest).
- ``"maps"``: a step sequence of ``{layer: tensor}`` (:mod:`.streams`), one array per layer
  with a chunk per step, read back as :class:`CachedSteps`.
- ``"steps"``: a tensor stored one step per chunk along axis 0, so one step can be read alone.
- ``"tensors"``: a mapping of names to tensors (model weights), one array per tensor named
  ``OUTPUT.NAME``, each read back bit for bit.
- ``"whole"``: any other tensor, one array.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from editflow.lazy import lazy

from .background import BackgroundWrites
from .entry import Entry
from .store import Cache
from .streams import STREAMS_ATTR, CachedSteps, StepsWriter
from .writer import EntryWriter

torch = lazy("torch")

LAYOUTS = ("text", "maps", "steps", "tensors", "whole")


class LazyEntry:
    """An entry opened when first written: a stage writing steps to it opens it while it
    runs, any other when it returns. ``abandon`` discards what was written; ``publish`` makes
    it live."""

    def __init__(
        self, cache: Cache, key: str, attrs: dict[str, Any], object_id: str | None = None
    ) -> None:
        self.cache, self.key, self.attrs, self.object_id = cache, key, attrs, object_id
        self._writer: EntryWriter | None = None

    def writer(self) -> EntryWriter:
        if self._writer is None:
            self._writer = self.cache.writer(self.key, self.attrs, object_id=self.object_id)
            self._writer.__enter__()
        return self._writer

    def abandon(self, error: BaseException) -> None:
        if self._writer is not None:
            self._writer.__exit__(type(error), error, error.__traceback__)

    def publish(self) -> None:
        self.writer().__exit__(None, None, None)


def write_outputs(
    writer: EntryWriter,
    outputs: Mapping[str, Any],
    layouts: Mapping[str, str],
    streams: dict[str, StepsWriter],
    seconds: float,
) -> None:
    """Write every output into an open entry (outputs already in ``streams`` are there).

    Args:
        writer: The open entry.
        outputs: Output name -> value.
        layouts: Output name -> one of :data:`LAYOUTS`.
        streams: Outputs written step by step while the stage ran (filled in for maps given
            whole); their values are not written again.
        seconds: The stage's compute time, recorded in the attributes.
    """
    for stream in streams.values():
        stream.finish()
    texts = {}
    for name, layout in layouts.items():
        value = outputs[name]
        if layout == "text":
            texts[name] = value
        elif name in streams:
            continue
        elif layout == "tensors":
            for part, tensor in value.items():
                writer.write(f"{name}.{part}", tensor.detach().cpu())
        elif layout == "maps":
            # Maps given whole (not written through the stage's writer): fp16, one chunk per
            # layer-step all the same.
            stream = StepsWriter(lambda: writer, name, len(value), dtype=torch.float16)
            streams[name] = stream
            for step in range(len(value)):
                stream.write(step, value[step])
        elif layout == "steps":
            writer.write(name, whole(value).detach().cpu(), stream_axis=0)
        else:
            writer.write(name, value.detach().cpu())
    described = {name: stream.description() for name, stream in streams.items()}
    writer.set_attrs(
        texts=texts,
        seconds=seconds,
        **{
            STREAMS_ATTR: {
                name: description  # maps; a tensor sequence is read as an array
                for name, description in described.items()
                if description is not None
            }
        },
    )


def whole(steps: Any) -> torch.Tensor:
    """A tensor step sequence as one tensor (a reader's steps stacked)."""
    if isinstance(steps, torch.Tensor):
        return steps
    return torch.stack([steps[index] for index in range(len(steps))])


def read_outputs(cache: Cache, entry: Entry, layouts: Mapping[str, str]) -> dict[str, Any]:
    """Every output of an entry: texts, maps as step-by-step readers, tensors as copies."""
    outputs: dict[str, Any] = {}
    for name, layout in layouts.items():
        if layout == "text":
            outputs[name] = entry.attrs["texts"][name]
        elif layout == "maps":
            outputs[name] = CachedSteps(cache, entry.key, name)
        elif layout == "tensors":
            prefix = f"{name}."
            outputs[name] = {
                array[len(prefix) :]: entry.tensor(array)
                for array in sorted(entry.arrays)
                if array.startswith(prefix)
            }
        else:
            outputs[name] = entry.tensor(name)
    return outputs


def finish_entry(
    entry: LazyEntry,
    outputs: Mapping[str, Any],
    layouts: Mapping[str, str],
    streams: dict[str, StepsWriter],
    seconds: float,
) -> None:
    """Write a stage's outputs into its entry and publish it; on failure nothing is published."""
    try:
        write_outputs(entry.writer(), outputs, layouts, streams, seconds)
    except BaseException as error:
        entry.abandon(error)
        raise
    entry.publish()


class WriteQueue:
    """Entries written on one background thread, so the next stage computes meanwhile.

    ``wait(key)`` blocks until that entry is published (a reader of its steps needs it);
    ``finish()`` waits for every write and raises the first failure. Writes leave the GIL
    for file I/O, so the stage thread keeps running (measured in ``bench/bench_core.py``).
    """

    def __init__(self) -> None:
        self._writes = BackgroundWrites("editflow-cache-writer")
        self._pending: dict[str, Future[None]] = {}

    def submit(self, key: str, function: Any, *args: Any) -> None:
        self._pending[key] = self._writes.submit(function, *args)

    def wait(self, key: str) -> None:
        if key in self._pending:
            self._pending[key].result()

    def finish(self, raise_errors: bool = True) -> None:
        self._writes.finish(raise_errors)
