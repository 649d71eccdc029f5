"""The Ray executor: stages as tasks on a pool of long-lived workers over a shared cache.

The driver plans every recipe (or sweep point), merges their stages by key (a stage shared
by several points is one task) and dispatches each stage whose inputs are ready to an idle
worker. Workers are Ray actors that keep their loaded models from one stage to the next;
each computes its stage from inputs it reads from the cache and publishes the stage's entry
there (atomically: a worker that dies mid-stage leaves nothing behind), so tasks pass keys,
never tensors. A worker that dies is replaced and its stage run again. When every stage is
in the cache, the ordinary in-process executor finishes each recipe (every stage a hit), so
the exported files are byte for byte those of an in-process run. Workers use the driver's
torch thread count: CPU results change with it while keys do not.

:class:`RayExecutor` is the engine's ``Executor`` interface for one recipe
(``run_recipe(..., executor=RayExecutor())``); :meth:`RayExecutor.run_jobs` merges several
recipes or sweep points into one dispatch. The executor owns its workers
(:class:`~editflow.executors.ray_workers.WorkerPool`): they outlive a run, models loaded,
for the same executor's next run on the same cluster and models (a Python program's second
sweep skips their start), until :meth:`RayExecutor.release_workers` or the executor is
dropped; a local cluster the driver started ends with the driver, even when the driver is
killed (:mod:`editflow.executors.ray_reaper`). What runs when is
:mod:`editflow.executors.ray_schedule`'s.

A stage need not wait for the end of a stage it reads only step sequences of (docs/steps.md):
it starts once the producer runs and reads each step as the producer writes it into its
staging folder (``editflow.cache.live``), so a sweep's edits run alongside the inversion
they share. It publishes only after checking what it read against
the producer's published entry; when the producer fails it stops and runs again later.

No scheduler or RPC of our own: Ray places the workers (one machine or a cluster, given
``address``); the cache must be storage every worker sees (a local folder on one machine, an
object store URL such as ``s3://`` on many).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.errors import EditflowError
from editflow.executors.ray_schedule import Scheduler, stages_to_compute
from editflow.executors.ray_workers import StageWorker, WorkerPool, WorkerSpec, connect

if TYPE_CHECKING:
    import networkx as nx

    from editflow.cache import Cache
    from editflow.engine.events import Event, EventSink
    from editflow.engine.execute import RunResult, Session
    from editflow.engine.plan import Plan


@dataclass
class Job:
    """One recipe run: what ``run_recipe`` would take."""

    recipe: Path
    overrides: list[str]
    out_dir: Path | None
    document: dict[str, Any] | None = None
    targets: list[str] | None = None  # run only what these stages need (``--target``)
    tables: bool = True  # its tables and plots (a sweep writes one of all its points)


class RayExecutor:
    """The engine's ``Executor`` on Ray: ``run_recipe(..., executor=RayExecutor())`` computes
    the plan's stages on the executor's workers, then finishes in process (every stage a
    hit), so the files are those an in-process run writes.

    Args:
        address: The Ray cluster to join; None starts a local one (if none is connected).
        workers: How many workers (default: one per GPU where the run may use GPUs, else
            one per CPU of the cluster).
        worker_class: What the workers are (a subclass of :class:`StageWorker`).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        worker_class: type[StageWorker] = StageWorker,
    ) -> None:
        self.address, self.workers = address, workers
        self.pool = WorkerPool(worker_class)

    def execute(self, plan: Plan, session: Session) -> RunResult:
        _check_shared(session.cache)
        graph = stages_to_compute([plan], session.cache)
        computed = self._compute(
            graph, session.cache, session.models_dir, session.device_name, session.events
        )
        return _Finish(graph, computed).execute(plan, session)

    def run_jobs(
        self,
        jobs: Sequence[Job],
        *,
        cache: Cache,
        device: str = "auto",
        events: EventSink | None = None,
    ) -> list[RunResult]:
        """Run recipes as one dispatch; returns one ``RunResult`` per job, as ``run_recipe``
        would."""
        from editflow.engine.api import models_dir_for, plan_recipe, run_recipe
        from editflow.engine.events import CollectEvents

        _check_shared(cache)
        events = events if events is not None else CollectEvents()
        plans = [
            plan_recipe(job.recipe, job.overrides, cache=cache, document=job.document,
                        targets=job.targets)
            for job in jobs
        ]  # fmt: skip
        graph = stages_to_compute(plans, cache)
        finish = _Finish(graph, self._compute(graph, cache, models_dir_for(cache), device, events))
        return [
            run_recipe(
                job.recipe,
                job.overrides,
                cache=cache,
                out_dir=job.out_dir,
                device=device,
                events=events,
                document=job.document,
                targets=job.targets,
                executor=finish,
                tables=job.tables,
            )  # fmt: skip
            for job in jobs
        ]

    def release_workers(self) -> None:
        """Shut down the workers kept from the last run (they hold their models' memory)."""
        self.pool.release()

    def _compute(
        self, graph: nx.DiGraph, cache: Cache, models_dir: Path, device: str, events: EventSink
    ) -> set[str]:
        """Compute the graph's stages on the pool's workers; returns their keys."""
        if not graph:
            return set()
        connect(self.address, self.workers)
        spec, size = WorkerSpec.on_cluster(self.workers, device, models_dir)
        crew = self.pool.take(spec)
        computed = Scheduler(graph, cache, crew, events).run(size)
        self.pool.keep(crew)
        return computed


class _Finish:
    """The in-process pass after the workers: every stage a hit, files written as in process;
    the stages the workers computed are reported as computed, each key once (the first stage
    that has it), and their hits are not reported (their own events told their story)."""

    def __init__(self, graph: nx.DiGraph, computed: set[str]) -> None:
        self.graph, self.computed = graph, computed  # shared by the jobs of one dispatch

    def execute(self, plan: Plan, session: Session) -> RunResult:
        from editflow.engine.execute import InProcessExecutor

        unclaimed = set(self.computed)
        events = session.events

        def relay(event: Event) -> None:
            if event.type not in ("pending", "cached") or event.key not in unclaimed:
                events(event)

        session.events = relay
        try:
            result = InProcessExecutor().execute(plan, session)
        finally:
            session.events = events
        owned = {name for name, key in result.keys.items()
                 if key in unclaimed and self.graph.nodes[key]["name"] == name}  # fmt: skip
        result.computed = [name for name in result.keys if name in owned]
        result.hits = [name for name in result.keys if name not in owned]
        self.computed -= {result.keys[name] for name in owned}
        return result


def _check_shared(cache: Cache) -> None:
    if cache.url.startswith("memory://"):
        raise EditflowError(
            "a memory:// cache lives in one process; Ray workers cannot see it",
            file="--cache",
            hint="use a folder (one machine) or an object store URL such as s3:// (a cluster)",
        )
