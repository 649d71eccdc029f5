"""Execution: run what misses, reuse what hits, write the exported outputs.

One :class:`Executor` interface; :class:`InProcessExecutor` is the default and what tests
use. A stage's inputs are read from this run's results or from the cache, and only when a
stage that actually runs (or an export) needs them, so an all-hit rerun loads no model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from editflow.cache import Cache, DamagedEntryError
from editflow.engine.events import Event, EventSink
from editflow.engine.inputs import load_input
from editflow.engine.keys import key_of
from editflow.engine.models import ModelRegistry
from editflow.engine.outputs import export_images
from editflow.engine.plan import Plan, PlannedStage, describe_change, producer_of
from editflow.engine.streams import STREAMS_ATTR, StreamedMaps, StreamWriter
from editflow.errors import EditflowError, StageFailedError
from editflow.stages import ArtifactType, StageContext

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STREAMED = (ArtifactType.NOISE_SEQUENCE, ArtifactType.ATTENTION_MAPS)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EditflowError(f"unknown device {name!r}", file="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EditflowError("CUDA is not available on this machine", file="--device")
    return device


def last_run_record(plan: Plan, stage: str) -> str:
    """Name of the cache record holding the preimage of a stage's last run in this recipe."""
    return "last-run/" + key_of({"recipe": str(plan.loaded.path.resolve()), "stage": stage})


@dataclass
class Session:
    """What a run needs besides its plan. The model registry may be shared between runs."""

    cache: Cache
    out_dir: Path | None
    device: torch.device
    events: EventSink
    models_dir: Path
    registry: ModelRegistry | None = None

    def models(self, plan: Plan) -> ModelRegistry:
        if self.registry is None or self.registry.resolved.identity != plan.model.identity:
            dtype = DTYPES[plan.loaded.recipe.model.dtype]

            def on_load(component: str, seconds: float) -> None:
                self.events(Event("loaded", message=component, seconds=seconds))

            self.registry = ModelRegistry(
                plan.model,
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
    registry: ModelRegistry | None = None  # the models this run used (shareable with the next)


class Executor(Protocol):
    def execute(self, plan: Plan, session: Session) -> RunResult: ...


class InProcessExecutor:
    """Runs the needed stages one after another in this process."""

    def execute(self, plan: Plan, session: Session) -> RunResult:
        result = RunResult(keys={stage.name: stage.key for stage in plan.needed})
        values: dict[str, dict[str, Any]] = {}
        for stage in plan.needed:
            session.events(Event("pending", stage.name, stage.kind.kind, stage.key))
        for stage in plan.needed:
            if session.cache.has(stage.key):
                result.hits.append(stage.name)
                session.events(Event("cached", stage.name, stage.kind.kind, stage.key))
            else:
                self._materialize(stage.name, plan, session, values, result)
            _remember_last_run(plan, stage, session.cache)
        exports = [
            stage for stage in plan.needed if any(port.export for port in stage.kind.outputs)
        ]
        if session.out_dir is not None:
            for stage in exports:
                outputs = self._materialize(stage.name, plan, session, values, result)
                for path in export_images(plan, stage, outputs, session.out_dir):
                    result.written.append(path)
                    session.events(Event("written", stage.name, stage.kind.kind, message=str(path)))
        return result

    def _materialize(
        self,
        name: str,
        plan: Plan,
        session: Session,
        values: dict[str, dict[str, Any]],
        result: RunResult,
    ) -> dict[str, Any]:
        """The outputs of a stage: from this run, else from the cache, else computed."""
        if name in values:
            return values[name]
        stage = plan.stages[name]
        entry = session.cache.get(stage.key)
        if entry is not None:
            try:
                values[name] = _read_outputs(stage, entry, session.cache)
                return values[name]
            except DamagedEntryError as error:
                session.cache.discard(stage.key)
                session.events(
                    Event("failed", name, stage.kind.kind, stage.key, message=str(error))
                )
                if name in result.hits:
                    result.hits.remove(name)
        inputs = self._gather_inputs(stage, plan, session, values, result)
        values[name] = self._compute(stage, inputs, plan, session, result)
        return values[name]

    def _gather_inputs(
        self,
        stage: PlannedStage,
        plan: Plan,
        session: Session,
        values: dict[str, dict[str, Any]],
        result: RunResult,
    ) -> dict[str, Any]:
        def value_of(ref: str) -> Any:
            producer = producer_of(ref)
            if producer.startswith("inputs."):
                return load_input(plan.inputs[producer.split(".", 1)[1]])
            outputs = self._materialize(producer, plan, session, values, result)
            value = outputs[ref.split(".", 1)[1]]
            # Consumers get their own copy: a stage must never mutate another's result.
            return value.clone() if isinstance(value, torch.Tensor) else value

        return {
            port: [value_of(ref) for ref in refs] if isinstance(refs, list) else value_of(refs)
            for port, refs in stage.references.items()
        }

    def _compute(
        self,
        stage: PlannedStage,
        inputs: dict[str, Any],
        plan: Plan,
        session: Session,
        result: RunResult,
    ) -> dict[str, Any]:
        kind = stage.kind.kind
        record = session.cache.get_record(last_run_record(plan, stage.name))
        reason = describe_change(record.get("preimage") if record else None, stage.preimage)
        session.events(Event("running", stage.name, kind, stage.key, message=reason))

        def progress(step: int, total: int) -> None:
            session.events(Event("step", stage.name, kind, stage.key, step=step, total=total))

        attrs = {
            "preimage": stage.preimage,
            "recipe": str(plan.loaded.path),
            "stage": stage.name,
            "kind": kind,
            "outputs": {port.name: port.type.value for port in stage.kind.outputs},
            "device": str(session.device),
        }
        streams: dict[str, StreamWriter] = {}
        started = time.perf_counter()
        with session.cache.writer(stage.key, attrs) as entry_writer:

            def open_stream(output: str, *, layers: Any, dtype: torch.dtype) -> StreamWriter:
                port = stage.kind.output_port(output)
                if port is None or port.type not in STREAMED:
                    raise RuntimeError(f"{kind} cannot stream output {output!r}")  # stage bug
                reader = StreamedMaps(session.cache, stage.key, output)
                streams[output] = StreamWriter(entry_writer, output, layers, dtype, reader)
                return streams[output]

            ctx = StageContext(
                name=stage.name,
                seed=plan.loaded.recipe.seed,
                device=session.device,
                dtype=DTYPES[plan.loaded.recipe.model.dtype],
                models=session.models(plan) if stage.kind.components else None,
                progress=progress,
                stream_writer=open_stream,
            )
            try:
                outputs = stage.kind().run(ctx, stage.spec, inputs)
            except EditflowError as error:
                session.events(Event("failed", stage.name, kind, stage.key, message=str(error)))
                raise StageFailedError(
                    f"stage {stage.name!r} ({kind}) failed: {error.render()}",
                    file=str(plan.loaded.path),
                    key=f"stages.{stage.name}",
                ) from None
            except BaseException as error:
                session.events(Event("failed", stage.name, kind, stage.key, message=repr(error)))
                raise
            seconds = time.perf_counter() - started
            missing = {port.name for port in stage.kind.outputs} - set(outputs)
            if missing:
                raise RuntimeError(f"{kind} returned no {sorted(missing)}")  # a bug in the stage
            _write_outputs(stage, outputs, entry_writer, streams, seconds)
        result.computed.append(stage.name)
        result.seconds[stage.name] = seconds
        session.events(Event("done", stage.name, kind, stage.key, seconds=seconds))
        return outputs


def _remember_last_run(plan: Plan, stage: PlannedStage, cache: Cache) -> None:
    """Record this stage's preimage so `plan` can say what changed next time."""
    name = last_run_record(plan, stage.name)
    record = cache.get_record(name)
    if record is None or record.get("key") != stage.key:
        cache.put_record(name, {"key": stage.key, "preimage": stage.preimage})


def _write_outputs(
    stage: PlannedStage,
    outputs: dict[str, Any],
    entry_writer: Any,
    streams: dict[str, StreamWriter],
    seconds: float,
) -> None:
    """Put a stage's outputs into its open cache entry (streamed ones are already there)."""
    texts = {}
    for port in stage.kind.outputs:
        value = outputs[port.name]
        if port.type == ArtifactType.TEXT:
            texts[port.name] = value
        elif port.name in streams:
            continue
        elif port.type == ArtifactType.ATTENTION_MAPS:
            # A stage that kept its maps in memory: store them whole, one chunk per step.
            layers = {layer: (value.num_steps, *shape) for layer, shape in value.layers.items()}
            streams[port.name] = writer = StreamWriter(
                entry_writer, port.name, layers, torch.float16, reader=None
            )
            for step in range(value.num_steps):
                writer.write(step, value.step(step))
        else:
            stream_axis = 0 if port.type in STREAMED else None
            entry_writer.write(port.name, value.detach().cpu(), stream_axis=stream_axis)
    entry_writer.set_attrs(
        texts=texts,
        seconds=seconds,
        **{STREAMS_ATTR: {name: writer.description() for name, writer in streams.items()}},
    )


def _read_outputs(stage: PlannedStage, entry: Any, cache: Cache) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for port in stage.kind.outputs:
        if port.type == ArtifactType.TEXT:
            outputs[port.name] = entry.attrs["texts"][port.name]
        elif port.type == ArtifactType.ATTENTION_MAPS:
            outputs[port.name] = StreamedMaps(cache, stage.key, port.name)
        else:
            outputs[port.name] = entry.tensor(port.name)
    return outputs
