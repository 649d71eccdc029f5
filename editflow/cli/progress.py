"""How a run's events are shown: progress bars on a terminal, or JSON lines (``--log-json``)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import IO, Any

from editflow.engine.events import Event


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
            self.tasks[_bar(event)] = self.progress.add_task(label, total=event.total or None)
        elif event.type == "step" and _bar(event) in self.tasks:
            self.progress.update(self.tasks[_bar(event)], completed=event.step, total=event.total)
        elif event.type == "done" and _bar(event) in self.tasks:
            task = self.tasks[_bar(event)]
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, total=total)
        elif event.type == "damaged":
            self.console.print(f"  [yellow]damaged[/yellow]  {label}: {event.message}")
        elif event.type == "written":
            self.console.print(f"  wrote {event.message}")

    def close(self) -> None:
        if self.started:
            self.progress.stop()


def _bar(event: Event) -> str:
    """A bar per stage run: sweep points on Ray run stages of one name at once."""
    return event.key or event.stage
