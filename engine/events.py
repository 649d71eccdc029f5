"""One event stream for a run (stage pending, cached, running step i of n, done, failed);
rendered by :mod:`editflow.cli.progress`, or kept for tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

EVENT_TYPES = (
    "pending", "cached", "damaged", "running", "step", "done", "failed", "loaded", "written",
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    """Something that happened in a run.

    Attributes:
        type: One of EVENT_TYPES ('damaged': a cache entry found damaged and recomputed,
            'loaded': a model component load, 'written': an output).
        stage: The stage name ('' for run-level events).
        kind: The stage kind.
        key: The stage's cache key.
        step: Progress within the stage.
        total: Steps the stage will take.
        seconds: Wall time of the finished work.
        message: Free text (reason for a miss, error, path written).
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
