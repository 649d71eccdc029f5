"""How a run's events are shown: progress bars on a terminal, or JSON lines (``--log-json``)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import IO, Any

from editflow.engine.events import EVENT_SCHEMA_VERSION, Event, EventSink


class JsonLines:
    """One JSON object per event (``--log-json``), each with the format's
    ``schema_version``; empty fields are left out."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        fields = {name: value for name, value in asdict(event).items() if value not in (None, "")}
        record = {"schema_version": EVENT_SCHEMA_VERSION, **fields}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


@contextlib.contextmanager
def reported_run(events: EventSink, recipe: str) -> Iterator[None]:
    """Bracket a run's events with 'run-start' (message: the recipe) and 'run-end' (message:
    'ok', 'interrupted' or 'failed: ' and the first line of the error; seconds: the run's)."""
    events(Event("run-start", message=recipe))
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except BaseException as error:
        outcome = "failed: " + (str(error).splitlines() or [type(error).__name__])[0]
        raise
    finally:
        events(Event("run-end", message=outcome, seconds=time.perf_counter() - started))


def _step_rate_column() -> Any:
    """A column of a bar's steps per second, blank until it has a rate (rich's own speed
    columns are for bytes, or show the rate only while the total is unknown). Built here
    because rich is imported only when a display is made."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class StepRate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            if not speed:
                return Text("", style="progress.data.speed")
            text = f"{speed:.1f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it"
            return Text(text, style="progress.data.speed")

    return StepRate()


class ProgressDisplay:
    """Progress bars per stage (with steps, elapsed time, ETA and it/s) on a terminal; a line
    per cache hit and per miss with its reason; 'loading ...' on a stage's bar while the
    models it needs import and load."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            _step_rate_column(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.labels: dict[str, str] = {}
        self.started = False

    def __call__(self, event: Event) -> None:
        from rich.markup import escape

        label = f"{event.point + ' ' if event.point else ''}{event.stage} [dim]{event.kind}[/dim]"
        bar = _bar(event)
        if event.type in ("running", "loading", "step") and not self.started:
            self.progress.start()
            self.started = True
        if event.type == "cached":
            self.console.print(f"  [green]hit[/green]  {label}")
        elif event.type == "running":
            why = f": {escape(event.message)}" if event.message else ""
            self.console.print(f"  [yellow]miss[/yellow] {label}{why}", no_wrap=True,
                               overflow="ellipsis", markup=True)  # fmt: skip
            self.labels[bar] = label
            self.tasks[bar] = self.progress.add_task(label, total=event.total or None)
        elif event.type == "loading" and bar in self.tasks:
            what = f"{self.labels[bar]}  [dim]loading model: {escape(event.message)} ...[/dim]"
            self.progress.update(self.tasks[bar], description=what)
        elif event.type in ("loaded", "step") and bar in self.tasks:
            task = self.tasks[bar]
            self.progress.update(task, description=self.labels[bar])
            if event.type == "step":
                self.progress.update(task, completed=event.step, total=event.total)
        elif event.type == "done" and bar in self.tasks:
            task = self.tasks[bar]
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, total=total, description=self.labels[bar])
        elif event.type == "damaged":
            self.console.print(f"  [yellow]damaged[/yellow]  {label}: {escape(event.message)}")
        elif event.type == "written":
            self.console.print(f"  wrote {escape(event.message)}")
        elif event.type == "point":
            self._point(event)

    def _point(self, event: Event) -> None:
        """A sweep point: a 'point i/n' line as it begins, and the sweep's overall bar."""
        from rich.markup import escape

        if not self.started:
            self.progress.start()
            self.started = True
        if SWEEP_BAR not in self.tasks:
            self.tasks[SWEEP_BAR] = self.progress.add_task("sweep", total=event.total)
        done = event.step if event.seconds is not None else (event.step or 1) - 1
        self.progress.update(self.tasks[SWEEP_BAR], completed=done, total=event.total)
        if event.seconds is None:
            self.console.print(f"point {event.step}/{event.total}  {escape(event.message)}")

    def close(self) -> None:
        if self.started:
            self.progress.stop()


SWEEP_BAR = "sweep points"  # the overall bar's name: no stage is called that (no spaces)


def _bar(event: Event) -> str:
    """A bar per stage run: sweep points on Ray run stages of one name at once."""
    return event.key or event.stage
