"""What the Ray executor computes, and in what order: the graph of stages to compute, merged
by key across plans, and the scheduler that starts each stage on an idle worker once the
stages it reads are in (or, for step sequences it may follow, running).

Among the stages that are ready, one whose inputs are all in goes before one that would
follow a running stage, then the one with the most stages after it, so a sweep's shared
stages do not wait behind its points and the last to finish are short.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import networkx as nx

from editflow.errors import EditflowError

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from editflow.cache import Cache
    from editflow.engine.events import EventSink
    from editflow.engine.plan import Plan, PlannedStage
    from editflow.executors.ray_workers import Crew

MAX_ATTEMPTS = 3  # per stage: a worker may die twice


def stages_to_compute(plans: Sequence[Plan], cache: Cache) -> nx.DiGraph:
    """The stages of ``plans`` to compute, merged by key (a stage several sweep points share
    is one node), stages already in the cache left out.

    Returns:
        A graph whose nodes are stage keys, each with ``plan`` and ``name`` (of the first plan
        that has it), and an edge from each stage to each stage that reads it, with
        ``follow``: whether the reader may start while the stage still runs.
    """
    graph = nx.DiGraph()
    for plan in plans:
        for stage in plan.needed:
            if stage.key not in graph and not cache.has(stage.key):
                graph.add_node(stage.key, plan=plan, name=stage.name)
    for key, plan, name in _stages(graph):
        stage = plan.stages[name]
        for producer in plan.graph.predecessors(name):
            source = plan.stages[producer]
            if source.key not in graph:
                continue  # in the cache already
            reads = plan.graph.edges[producer, name]["reads"]
            # The reader may start while its producer runs when every read is step by step.
            followed = all(_follows(stage, port) and _streams(source, out) for port, out in reads)
            graph.add_edge(source.key, key, follow=followed)
    return graph


def _stages(graph: nx.DiGraph) -> list[tuple[str, Plan, str]]:
    return [(key, data["plan"], data["name"]) for key, data in graph.nodes(data=True)]


def _streams(stage: PlannedStage, output: str | None = None) -> bool:
    """Whether a stage writes ``output`` (without one: any output) step by step as it runs,
    so that others may follow it."""
    from editflow.engine.execute import written_live

    ports = stage.kind.outputs if output is None else [stage.kind.output_port(output)]
    return any(port is not None and written_live(port) for port in ports)


def _follows(stage: PlannedStage, port: str) -> bool:
    """Whether a stage may read its input ``port`` step by step while the producer runs.
    Only single ports are followed (the engine confirms those); a list waits for all."""
    from editflow.stages.base import is_step_sequence

    return any(is_step_sequence(p) and not p.many for p in stage.kind.inputs if p.name == port)


class Scheduler:
    """One run of a stage graph on a crew of workers: start a stage, pick the next ready one,
    record one that finished (a stage whose worker died runs again, up to ``MAX_ATTEMPTS``).

    Args:
        graph: The stages to compute (:func:`stages_to_compute`).
        cache: The cache the workers share.
        crew: The workers.
        events: Where the workers' events go, and each stage's ``pending`` before any runs.
    """

    def __init__(self, graph: nx.DiGraph, cache: Cache, crew: Crew, events: EventSink) -> None:
        self.graph, self.cache, self.crew, self.events = graph, cache, crew, events
        self.work_after = {key: len(nx.descendants(graph, key)) for key in graph}
        self.waiting: set[str] = set(graph)
        self.done: set[str] = set()
        self.attempts: Counter[str] = Counter()
        self.idle: list[ActorHandle] = []
        self.running: dict[ObjectRef, tuple[str, ActorHandle]] = {}
        self.live: dict[str, tuple[str, ObjectRef]] = {}  # stage -> its staging folder, task

    @property
    def warm_with(self) -> Plan:
        """The plan whose models new workers load (the first plan's: a sweep's points share
        their models)."""
        return self.graph.nodes[next(iter(self.graph))]["plan"]

    def run(self, size: int) -> set[str]:
        """Compute every stage on at most ``size`` workers; returns their keys. The workers
        go back to the crew, idle; on an error every worker of the crew is shut down."""
        from editflow.engine.events import Event

        for key, plan, name in _stages(self.graph):  # what will run, before it runs
            self.events(Event("pending", name, plan.stages[name].kind.kind, key))
        try:
            self.idle = self.crew.take(min(size, len(self.graph)), self.warm_with, self.cache.url)
            while self.waiting or self.running:
                while self.idle and (ready := self.next_ready()) is not None:
                    self.start(*ready)
                if not self.running:
                    raise RuntimeError(
                        f"stages wait on inputs no stage makes: {sorted(self.waiting)}"
                    )
                self.on_finished(self.next_finished())
        except BaseException:
            self.crew.shut_down([*self.idle, *(worker for _, worker in self.running.values())])
            raise
        self.crew.idle += self.idle
        return self.done

    def next_ready(self) -> tuple[str, set[str]] | None:
        """The stage to start next and the running stages it follows: each stage it reads is
        in, or runs and writes what it reads step by step (see the module's docstring)."""
        ready = []
        for key in self.waiting:
            missing = {
                producer
                for producer in self.graph.predecessors(key)
                if producer not in self.done and not self.cache.has(producer)
            }
            if all(p in self.live and self.graph.edges[p, key]["follow"] for p in missing):
                ready.append((bool(missing), -self.work_after[key], key, missing))
        return min(ready)[2:] if ready else None

    def start(self, key: str, followed: set[str]) -> None:
        """Start a stage on an idle worker, following ``followed`` (stages still running)."""
        plan, name = self.graph.nodes[key]["plan"], self.graph.nodes[key]["name"]
        self.waiting.remove(key)
        self.attempts[key] += 1
        worker = self.idle.pop()
        live_id = uuid.uuid4().hex if _streams(plan.stages[name]) else None
        # Each task in a list, so Ray hands the reference over unresolved.
        following = {dep: (self.live[dep][0], [self.live[dep][1]]) for dep in followed}
        task = worker.run.remote(plan, name, self.cache.url, live_id, following)
        self.running[task] = (key, worker)
        if live_id is not None:
            self.live[key] = (live_id, task)

    def next_finished(self) -> ObjectRef:
        """Wait for a stage to finish, relaying the workers' events meanwhile."""
        import ray

        finished: list[ObjectRef] = []
        while not finished:
            finished, _ = ray.wait(list(self.running), num_returns=1, timeout=0.1)
            self.crew.relay(self.events)
        return finished[0]

    def on_finished(self, task: ObjectRef) -> None:
        """Record a finished stage: done, to run again (its worker died, or the stage it
        followed failed), or the run's error."""
        import ray

        from editflow.cache import FollowLost

        key, worker = self.running.pop(task)
        self.live.pop(key, None)
        try:
            ray.get(task)
        except ray.exceptions.RayActorError:
            self.on_lost(key, worker)
            return
        except ray.exceptions.RayTaskError as error:
            if not isinstance(error.cause, FollowLost):
                raise error.as_instanceof_cause() from None
            # The stage it followed failed: it runs again, from what that one publishes.
            self.attempts[key] -= 1
            self.waiting.add(key)
            self.idle.append(worker)
            return
        self.crew.relay(self.events)
        self.done.add(key)
        self.idle.append(worker)

    def on_lost(self, key: str, worker: ActorHandle) -> None:
        """A worker died mid-stage: replace it and run the stage again (its entry was never
        published), unless it has lost ``MAX_ATTEMPTS`` workers already."""
        import ray

        ray.kill(worker)
        if self.attempts[key] >= MAX_ATTEMPTS:
            plan, name = self.graph.nodes[key]["plan"], self.graph.nodes[key]["name"]
            raise EditflowError(
                f"stage {name!r} lost its worker {MAX_ATTEMPTS} times",
                file=str(plan.loaded.path),
            ) from None
        self.idle.append(self.crew.start(self.warm_with, self.cache.url))
        self.waiting.add(key)
