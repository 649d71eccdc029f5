"""The terminal progress display: one bar per stage run, even when stages of one name run at
once (sweep points on Ray)."""

from __future__ import annotations

import io

from editflow.cli.progress import ProgressDisplay
from editflow.engine.events import Event


def test_two_runs_of_one_stage_name_at_once_each_finish_their_own_bar() -> None:
    display = ProgressDisplay(io.StringIO())
    for key in ("a" * 64, "b" * 64):
        display(Event("running", "edit", "sample.ddim", key))
    display(Event("step", "edit", "sample.ddim", "a" * 64, step=12, total=20))
    display(Event("step", "edit", "sample.ddim", "b" * 64, step=20, total=20))
    display(Event("done", "edit", "sample.ddim", "b" * 64, seconds=1.0))
    display(Event("step", "edit", "sample.ddim", "a" * 64, step=20, total=20))
    display(Event("done", "edit", "sample.ddim", "a" * 64, seconds=1.0))
    display.close()
    bars = display.progress.tasks
    assert len(bars) == 2
    assert [(bar.completed, bar.total) for bar in bars] == [(20, 20), (20, 20)]


def test_a_stage_still_running_shows_its_last_step() -> None:
    display = ProgressDisplay(io.StringIO())
    display(Event("running", "invert", "invert.ddim", "c" * 64))
    display(Event("step", "invert", "invert.ddim", "c" * 64, step=7, total=20))
    display.close()
    assert [(bar.completed, bar.total) for bar in display.progress.tasks] == [(7, 20)]
