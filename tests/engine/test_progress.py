"""The terminal progress display (one bar per stage run, even when stages of one name run at
once (sweep points on Ray); the reason for a miss; 'loading model'; ETA and it/s) and the
JSON event lines (schema version, run start and end, the sweep point)."""

from __future__ import annotations

import io
import json
import re
import time

import pytest

from editflow.cli.progress import JsonLines, ProgressDisplay, reported_run
from editflow.engine.events import EVENT_SCHEMA_VERSION, EVENT_TYPES, CollectEvents, Event


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


KEY = "e" * 64


def test_a_miss_says_why_in_one_line_and_a_hit_says_hit() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream)
    display(Event("cached", "encode", "encode.vae", "d" * 64))
    display(Event("running", "edit", "sample.ddim", KEY, message="params.eta: 0.0 -> [0.5]"))
    long_reason = "params.prompt: 'a photo of a dog' -> '" + "a fox " * 40 + "'"
    display(Event("running", "again", "sample.ddim", "f" * 64, message=long_reason))
    display.close()
    lines = stream.getvalue().splitlines()
    assert lines[:2] == [
        "  hit  encode encode.vae",
        "  miss edit sample.ddim: params.eta: 0.0 -> [0.5]",  # brackets are text, not markup
    ]
    assert lines[2].startswith("  miss again sample.ddim: params.prompt: 'a photo of a dog'")
    assert lines[2].endswith("…") and len(lines[2]) == display.console.width


def test_a_bar_says_loading_model_until_the_model_is_loaded() -> None:
    display = ProgressDisplay(io.StringIO())
    display(Event("running", "edit", "sample.ddim", KEY, message="never run"))
    [bar] = display.progress.tasks
    display(Event("loading", "edit", "sample.ddim", KEY, message="unet"))
    assert bar.description == "edit [dim]sample.ddim[/dim]  [dim]loading model: unet ...[/dim]"
    display(Event("loaded", "edit", "sample.ddim", KEY, message="unet", seconds=2.0))
    assert bar.description == "edit [dim]sample.ddim[/dim]"
    display(Event("loading", "edit", "sample.ddim", KEY, message="text_encoder"))
    display(Event("step", "edit", "sample.ddim", KEY, step=1, total=4))
    assert (bar.description, bar.completed, bar.total) == ("edit [dim]sample.ddim[/dim]", 1, 4)
    display.close()


def test_a_step_bar_shows_its_eta_and_steps_per_second() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream)
    display(Event("running", "edit", "sample.ddim", KEY))
    for step in range(1, 5):
        time.sleep(0.02)  # about 50 steps a second
        display(Event("step", "edit", "sample.ddim", KEY, step=step, total=8))
    [bar] = display.progress.tasks
    rate = bar.speed
    assert 0.5 < rate < 60  # at most 50 (the sleeps), far less only on a stalled machine
    display.close()
    [line] = [line for line in stream.getvalue().splitlines() if line.startswith("edit")]
    assert re.search(r" 4/8 0:00:0\d eta 0:00:0\d +\d+\.\d it/s$", line.rstrip()), line


def test_json_lines_carry_the_schema_version_and_the_sweep_point() -> None:
    stream = io.StringIO()
    lines = JsonLines(stream)
    lines(Event("loaded", "edit", "sample.ddim", KEY, message="unet", seconds=1.5, time=7.0))
    lines(Event("done", "edit", "sample.ddim", KEY, seconds=2.0, time=8.0, point="skip=10"))
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {
        "schema_version": EVENT_SCHEMA_VERSION, "type": "loaded", "stage": "edit",
        "kind": "sample.ddim", "key": KEY, "seconds": 1.5, "message": "unet", "time": 7.0,
    }  # fmt: skip
    assert second["point"] == "skip=10" and EVENT_SCHEMA_VERSION == 2
    assert set(EVENT_TYPES) >= {"run-start", "loading", "loaded", "run-end"}


def test_a_run_is_bracketed_by_start_and_end_events_that_say_how_it_ended() -> None:
    events = CollectEvents()
    with reported_run(events, "manifests/quickstart.toml"):
        time.sleep(0.01)
    with pytest.raises(ValueError, match="bad"), reported_run(events, "r.toml"):
        raise ValueError("bad value\nmore detail")
    with pytest.raises(KeyboardInterrupt), reported_run(events, "r.toml"):
        raise KeyboardInterrupt
    said = [(event.type, event.message) for event in events.events]
    assert said == [
        ("run-start", "manifests/quickstart.toml"), ("run-end", "ok"),
        ("run-start", "r.toml"), ("run-end", "failed: bad value"),
        ("run-start", "r.toml"), ("run-end", "interrupted"),
    ]  # fmt: skip
    assert events.events[1].seconds >= 0.01
