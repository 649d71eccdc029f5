"""One event stream for a run (run start, stage pending, cached, loading a model, running
step i of n, done, failed, run end); rendered by :mod:`editflow.cli.progress`, or kept for
tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

# The JSON event lines' format (``--log-json``), written on each line. 2: run-start and
# run-end, 'loading', the stage on 'loaded', the sweep point.
EVENT_SCHEMA_VERSION = 2

EVENT_TYPES = (
    "run-start", "pending", "cached", "damaged", "running", "loading", "loaded", "step",
    "done", "failed", "written", "run-end", "point",
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    """Something that happened in a run.

    Attributes:
        type: One of EVENT_TYPES ('run-start' and 'run-end': a run of one recipe, or of a
            sweep's every point, begins and ends; 'damaged': a cache entry found damaged and
            recomputed; 'loading': a model component is about to load (imports and weights
            take seconds before a stage's first step); 'loaded': a model component load;
            'written': an output; 'point': a sweep point begins, step i of total, its
            values in message, and again with seconds when it is done).
        stage: The stage name ('' for run-level events, and for components loaded ahead of
            any stage).
        kind: The stage kind.
        key: The stage's cache key.
        step: Progress within the stage.
        total: Steps the stage will take.
        seconds: Wall time of the finished work.
        message: Free text (reason for a miss, error, path written, component loaded, the
            recipe on 'run-start', 'ok' or what went wrong on 'run-end').
        time: When it happened (seconds since the epoch).
        point: The sweep point the event belongs to ('' outside a sweep).
    """

    type: str
    stage: str = ""
    kind: str = ""
    key: str = ""
    step: int | None = None
    total: int | None = None
    seconds: float | None = None
    message: str = ""
    time: float = field(default_factory=time.time)
    point: str = ""


class EventSink(Protocol):
    def __call__(self, event: Event) -> None: ...


class CollectEvents:
    """Keeps every event (tests and programmatic use)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, type_: str) -> list[Event]:
        return [event for event in self.events if event.type == type_]
