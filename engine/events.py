"""One event stream for a run, rendered as progress bars, JSON lines, or kept for tests."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Protocol

EVENT_TYPES = ("pending", "cached", "running", "step", "done", "failed", "loaded", "written")


@dataclass(frozen=True)
class Event:
    """Something that happened in a run.

    Attributes:
        type: One of EVENT_TYPES ('loaded' is a model component load, 'written' an output).
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


class JsonLines:
    """One JSON object per event (``--log-json``)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        record = {name: value for name, value in asdict(event).items() if value not in (None, "")}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class ProgressDisplay:
    """Progress bars per stage (with steps) on a terminal, plain lines otherwise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.started = False

    def __call__(self, event: Event) -> None:
        label = f"{event.stage} [dim]{event.kind}[/dim]"
        if event.type in ("running", "step") and not self.started:
            self.progress.start()
            self.started = True
        if event.type == "cached":
            self.console.print(f"  [green]hit[/green]  {label}")
        elif event.type == "running":
            self.tasks[event.stage] = self.progress.add_task(label, total=event.total or None)
        elif event.type == "step" and event.stage in self.tasks:
            self.progress.update(self.tasks[event.stage], completed=event.step, total=event.total)
        elif event.type == "done" and event.stage in self.tasks:
            task = self.tasks[event.stage]
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, total=total)
        elif event.type == "written":
            self.console.print(f"  wrote {event.message}")

    def close(self) -> None:
        if self.started:
            self.progress.stop()


class Fanout:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def __call__(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)
