"""Execution: run what misses, reuse what hits, write the exported outputs.

One :class:`Executor` interface; :class:`InProcessExecutor` is the default and what tests
use. A stage's inputs are read from this run's results or from the cache, and only when a
stage that actually runs (or an export) needs them, so an all-hit rerun loads no model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import editflow
from editflow.cache import (
    Cache,
    CachedSteps,
    DamagedEntryError,
    FollowLost,
    LiveSteps,
    StepsWriter,
)
from editflow.cache.artifacts import LazyEntry, WriteQueue, finish_entry, read_outputs
from editflow.cache.live import ProducerState
from editflow.documents import document_identity
from editflow.engine.events import Event, EventSink
from editflow.engine.graph import producer_of
from editflow.engine.keys import canonical_json, describe_change, key_of
from editflow.engine.plan import Plan, PlannedStage
from editflow.errors import EditflowError, StageFailedError
from editflow.files.inputs import load_input
from editflow.files.outputs import current_exports, export_images, remove_stale_exports
from editflow.fingerprint import fingerprint
from editflow.lazy import lazy
from editflow.models import RunModels, resolve_device
from editflow.stages import ArtifactType, StageContext
from editflow.stages.base import MemorySteps, Port, is_step_sequence

torch = lazy("torch")

# The stage (name, kind, key) whose first use of a model component loads it, for the
# 'loaded' event; context-local, as stages may run on threads.
_LOADING_FOR: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar(
    "editflow_loading_for", default=None
)

# How the cache stores each artifact type (the rest: one array). Sequences are stored one
# step per chunk, so a consumer can read a single step.
LAYOUTS = {
    ArtifactType.TEXT: "text",
    ArtifactType.ATTENTION_MAPS: "maps",
    ArtifactType.NOISE_SEQUENCE: "steps",
    ArtifactType.LATENT_TRAJECTORY: "steps",
    ArtifactType.WEIGHTS: "tensors",
}


def written_live(port: Port) -> bool:
    """Whether a worker writes this output's steps live to its staging folder for readers
    elsewhere to follow: tensor sequences, not maps (their layers are named on publication)."""
    return is_step_sequence(port) and LAYOUTS.get(port.type) == "steps"


def last_run_record(plan: Plan, stage: str) -> str:
    """Name of the cache record holding the preimage of a stage's last run in this recipe."""
    return _record_name(plan.runs_as or document_identity(plan.loaded.path), stage)


def _record_name(recipe: str, stage: str | None) -> str:
    # stage None: the recipe's index of its stages' last keys
    return "last-run/" + key_of(
        {"recipe": recipe} if stage is None else {"recipe": recipe, "stage": stage}
    )


@dataclass
class Session:
    """What a run needs besides its plan. The models may be shared between runs."""

    cache: Cache
    out_dir: Path | None
    device_name: str  # resolved when a stage first computes: an all-hit run imports no torch
    events: EventSink
    models_dir: Path
    registry: RunModels | None = None
    threads: int | None = None  # CPU threads for torch, set when a stage first computes

    @functools.cached_property
    def device(self) -> torch.device:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device_name)

    def models(self, plan: Plan) -> RunModels:
        """The run's models, reusing the session's when they are the same models."""
        dtype = plan.loaded.recipe.model.torch_dtype
        if self.registry is not None and self.registry.serves(plan.models, dtype):
            self.registry.add(plan.models)
            return self.registry

        def on_load(component: str, seconds: float) -> None:
            stage, kind, key = _LOADING_FOR.get() or ("", "", "")  # "": loaded ahead (Ray)
            self.events(Event("loaded", stage, kind, key, message=component, seconds=seconds))

        self.registry = RunModels(
            plan.models,
            device=self.device,
            dtype=dtype,
            models_dir=self.models_dir,
            on_load=on_load,
        )
        return self.registry


@dataclass
class RunResult:
    """What a run did."""

    keys: dict[str, str]
    hits: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    registry: RunModels | None = None  # the models this run used (shareable with the next)
    plan: Plan | None = None  # what was run (for locks: its keys and preimages)


class Executor(Protocol):
    def execute(self, plan: Plan, session: Session) -> RunResult: ...


class InProcessExecutor:
    """Runs the needed stages one after another in this process; a computed stage's entry is
    written on a background thread while the next stage runs, and all are published (or the
    first failure raised) before ``execute`` returns."""

    def execute(self, plan: Plan, session: Session) -> RunResult:
        run = _Run(plan, session)
        try:
            run.all()
        except BaseException:
            run.writes.finish(raise_errors=False)  # the stage's error is the one to show
            raise
        run.writes.finish()
        return run.result


@dataclass(frozen=True)
class Follow:
    """A stage still running elsewhere whose step sequences a stage reads as they are
    written: its staging folder and whether it still runs (see ``editflow.cache.live``)."""

    object_id: str
    state: ProducerState


def compute_stage(
    plan: Plan,
    session: Session,
    name: str,
    *,
    live_id: str | None = None,
    following: Mapping[str, Follow] | None = None,
) -> RunResult:
    """Compute one stage whose inputs are in the cache (or inputs of the recipe), and publish
    its entry before returning: what a distributed executor's worker runs per task.

    Args:
        plan: The stage's plan.
        session: Cache, device, events and models.
        name: The stage.
        live_id: Stage the entry in this folder and write its step sequences step by step
            as they are made, so other workers can follow them.
        following: Producer key -> :class:`Follow`, for inputs to read from producers still
            running (their step sequences, read as :class:`~editflow.cache.LiveSteps`). The
            stage publishes only once each producer has published what was read.
    """
    run = _Run(plan, session, live_id, following)
    try:
        if not session.cache.has(plan.stages[name].key):
            run.materialize(name)
    except BaseException:
        run.writes.finish(raise_errors=False)
        raise
    run.writes.finish()
    return run.result


class _Run:
    """The state of one execution: values computed so far and the result."""

    def __init__(
        self,
        plan: Plan,
        session: Session,
        live_id: str | None = None,
        following: Mapping[str, Follow] | None = None,
    ) -> None:
        self.plan, self.session = plan, session
        self.live_id, self.following = live_id, following or {}
        self.cache = session.cache
        self.values: dict[str, dict[str, Any]] = {}
        self.followed: dict[str, list[LiveSteps]] = {}  # stage -> inputs read from producers
        self.producers = {stage.key: stage.name for stage in plan.stages.values()}
        self.writes = WriteQueue()
        self.result = RunResult(keys={stage.name: stage.key for stage in plan.needed})

    def all(self) -> None:
        plan, session = self.plan, self.session
        for stage in plan.needed:
            session.events(Event("pending", stage.name, stage.kind.kind, stage.key))
        last_runs = _LastRuns(plan, self.cache)
        for stage in plan.needed:
            if self.cache.has(stage.key):
                self.result.hits.append(stage.name)
                session.events(Event("cached", stage.name, stage.kind.kind, stage.key))
            else:
                self.materialize(stage.name)
            last_runs.remember(stage)
        last_runs.save()
        if session.out_dir is None:
            return
        for stage in plan.needed:
            ports = [
                port
                for port in stage.kind.outputs
                if port.export and port.type == ArtifactType.IMAGE
            ]
            if not ports:
                continue
            chunks = provenance(plan, stage)
            # Files an identical run wrote are left be, unless this run computed the stage
            # anew: its entry, not the old files, is what the run has to show.
            current = (
                current_exports(stage.name, ports, chunks, session.out_dir)
                if stage.name not in self.result.computed
                else None
            )
            if current is not None:
                self.result.written += current
                continue
            outputs = self.materialize(stage.name)
            written = export_images(stage.name, ports, outputs, chunks, session.out_dir)
            for path in written:
                self.result.written.append(path)
                session.events(Event("written", stage.name, stage.kind.kind, message=str(path)))
            remove_stale_exports(stage.name, ports, chunks, session.out_dir, written)

    def materialize(self, name: str) -> dict[str, Any]:
        """The outputs of a stage: from this run, else from the cache, else computed.

        A damaged entry is discarded and recomputed (once), and the run says so.
        """
        if name in self.values:
            return self.values[name]
        stage = self.plan.stages[name]
        try:
            entry = self.cache.get(stage.key)
            if entry is not None:
                self.values[name] = read_outputs(self.cache, entry, layouts(stage))
                return self.values[name]
        except DamagedEntryError as error:
            self.discard_damaged(name, error)
        self.values[name] = self.compute(stage, self.gather_inputs(stage))
        return self.values[name]

    def discard_damaged(self, name: str, error: DamagedEntryError) -> None:
        stage = self.plan.stages[name]
        self.cache.discard(stage.key)
        self.values.pop(name, None)
        if name in self.result.hits:
            self.result.hits.remove(name)
        message = f"cache entry damaged ({error.reason}); recomputing it"
        self.session.events(Event("damaged", name, stage.kind.kind, stage.key, message=message))

    def gather_inputs(self, stage: PlannedStage) -> dict[str, Any]:
        """The values of the connected input ports."""

        def value_of(ref: str) -> Any:
            producer = producer_of(ref)
            if producer.startswith("inputs."):
                if producer not in self.values:  # decoded once per run, whoever reads it
                    item = self.plan.inputs[producer.split(".", 1)[1]]
                    self.values[producer] = {"": load_input(item)}
                value = self.values[producer][""]
            elif (key := self.plan.stages[producer].key) in self.following:
                follow = self.following[key]
                output = ref.split(".", 1)[1]
                live = LiveSteps(self.cache, key, follow.object_id, output, follow.state)
                self.followed.setdefault(stage.name, []).append(live)
                return live
            else:
                value = self.materialize(producer)[ref.split(".", 1)[1]]
            # Consumers get their own copy: a stage must never mutate another's result.
            return value.clone() if isinstance(value, torch.Tensor) else value

        self.followed.pop(stage.name, None)
        return {
            port: [value_of(ref) for ref in refs] if isinstance(refs, list) else value_of(refs)
            for port, refs in stage.references.items()
        }

    def compute(
        self, stage: PlannedStage, inputs: dict[str, Any], retry: bool = True
    ) -> dict[str, Any]:
        plan, session, kind = self.plan, self.session, stage.kind.kind
        record = self.cache.get_record(last_run_record(plan, stage.name))
        reason = describe_change(record.get("preimage") if record else None, stage.preimage)
        session.events(Event("running", stage.name, kind, stage.key, message=reason))
        attrs = _entry_attrs(plan, stage, session)
        entry = LazyEntry(self.cache, stage.key, attrs, object_id=self.live_id)
        streams: dict[str, StepsWriter] = {}
        started = time.perf_counter()
        try:
            outputs = stage.kind().run_planned(
                self.context(stage, entry, streams), stage.params, inputs
            )
            missing = {port.name for port in stage.kind.outputs} - set(outputs)
            if missing:
                raise RuntimeError(f"{kind} returned no {sorted(missing)}")  # a bug in the stage
            for live in self.followed.pop(stage.name, []):  # read from a producer still running
                live.confirm()
            seconds = time.perf_counter() - started
        except BaseException as error:
            for stream in streams.values():
                stream.finish(raise_errors=False)  # no step is written after the discard
            entry.abandon(error)  # discards anything already written
            if isinstance(error, FollowLost):
                raise  # not this stage's failure: it runs again from the published input
            producer = self.producers.get(getattr(error, "key", None))
            if isinstance(error, DamagedEntryError) and producer and retry:
                # An input read step by step (from the cache) was damaged: heal it, retry once.
                self.discard_damaged(producer, error)
                return self.compute(stage, self.gather_inputs(stage), retry=False)
            session.events(Event("failed", stage.name, kind, stage.key, message=str(error)))
            if isinstance(error, EditflowError):
                raise StageFailedError(
                    f"stage {stage.name!r} ({kind}) failed: {error.render()}",
                    file=str(plan.loaded.path),
                    key=f"stages.{stage.name}",
                ) from None
            raise
        self.writes.submit(
            stage.key, finish_entry, entry, outputs, layouts(stage), streams, seconds
        )
        self.result.computed.append(stage.name)
        self.result.seconds[stage.name] = seconds
        session.events(Event("done", stage.name, kind, stage.key, seconds=seconds))
        return outputs

    def context(
        self, stage: PlannedStage, entry: LazyEntry, streams: dict[str, StepsWriter]
    ) -> StageContext:
        kind, key = stage.kind.kind, stage.key

        def progress(step: int, total: int) -> None:
            self.session.events(Event("step", stage.name, kind, key, step=step, total=total))

        def write_steps(output: str, length: int) -> MemorySteps | StepsWriter:
            """Where a step sequence goes (docs/steps.md): live into the staging folder when
            other workers may follow it; else maps into the entry as they come (too big to
            hold) and tensor steps into memory, written whole on the writer thread (a GPU
            loop never waits to copy a step out; the entry's bytes are a whole write's)."""
            port = stage.kind.output_port(output)
            if port is None or not is_step_sequence(port):
                raise RuntimeError(f"{kind} cannot write steps of {output!r}")  # a stage bug
            maps = LAYOUTS[port.type] == "maps"
            live = self.live_id is not None and written_live(port)
            if not live and not maps:
                return MemorySteps(length)
            reader = CachedSteps(self.cache, key, output, ready=lambda: self.writes.wait(key))
            dtype = torch.float16 if maps else None
            streams[output] = StepsWriter(
                entry.writer, output, length, reader, dtype=dtype, live=live
            )
            return streams[output]

        models = self.session.models(self.plan) if stage.components else None
        return StageContext(
            name=stage.name,
            seed=self.plan.loaded.recipe.seed,
            device=self.session.device,
            dtype=self.plan.loaded.recipe.model.torch_dtype,
            models=models.for_stage(stage.components, functools.partial(self._loading, stage))
            if models is not None
            else None,
            progress=progress,
            write_steps=write_steps,
            references=stage.references,
        )

    @contextlib.contextmanager
    def _loading(self, stage: PlannedStage, component: str) -> Iterator[None]:
        """Say 'loading' before a stage's first use of a component loads it, and let the
        registry's 'loaded' after it name the stage."""
        name, kind = stage.name, stage.kind.kind
        self.session.events(Event("loading", name, kind, stage.key, message=component))
        token = _LOADING_FOR.set((name, kind, stage.key))
        try:
            yield
        finally:
            _LOADING_FOR.reset(token)


def provenance(plan: Plan, stage: PlannedStage) -> dict[str, str]:
    """The text chunks every exported PNG carries."""
    return {
        "editflow:version": editflow.__version__,
        "editflow:recipe": plan.loaded.path.name,
        "editflow:recipe_sha256": plan.recipe_hash,
        # The recipe as run (after overrides) and where it lives, so the figure reruns it.
        "editflow:recipe_json": canonical_json(plan.loaded.raw),
        "editflow:recipe_path": document_identity(plan.loaded.path),
        "editflow:stage": stage.name,
        "editflow:kind": stage.kind.kind,
        "editflow:stage_key": stage.key,
    }


def _entry_attrs(plan: Plan, stage: PlannedStage, session: Session) -> dict[str, Any]:
    return {
        "preimage": stage.preimage,
        "recipe": str(plan.loaded.path),
        "stage": stage.name,
        "kind": stage.kind.kind,
        "outputs": {port.name: port.type.value for port in stage.kind.outputs},
        "device": str(session.device),
        # What besides the key decided the bytes: a lock compares them only where it matches.
        "platform": fingerprint(session.device),
    }


class _LastRuns:
    """Each stage's preimage as last run in this recipe, so `plan` can say what changed next
    time. One small index of the stages' last keys is read per run, and a stage's record is
    written only when its key changed: an all-hit rerun reads one record and writes none."""

    def __init__(self, plan: Plan, cache: Cache) -> None:
        self.cache, self.recipe = cache, plan.runs_as or document_identity(plan.loaded.path)
        index = cache.get_record(_record_name(self.recipe, None)) or {}
        self.keys: dict[str, str] = dict(index.get("keys", {}))
        self.changed = False

    def remember(self, stage: PlannedStage) -> None:
        if self.keys.get(stage.name) != stage.key:
            record = {"key": stage.key, "preimage": stage.preimage}
            self.cache.put_record(_record_name(self.recipe, stage.name), record)
            self.keys[stage.name], self.changed = stage.key, True

    def save(self) -> None:
        if self.changed:
            self.cache.put_record(_record_name(self.recipe, None), {"keys": self.keys})


def layouts(stage: PlannedStage) -> dict[str, str]:
    """How the cache stores each of a stage's outputs."""
    return {port.name: LAYOUTS.get(port.type, "whole") for port in stage.kind.outputs}
