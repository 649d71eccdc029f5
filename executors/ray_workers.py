"""Ray's side of the Ray executor: the cluster, the stage workers and the pool that keeps them.

A :class:`StageWorker` is a Ray actor that computes stages and keeps its loaded models from
one stage to the next. A :class:`Crew` is the workers of one kind (cluster, models folder,
device, thread count, Ray options) with the queue their events come through. The executor's
:class:`WorkerPool` keeps its last run's crew, models loaded, for its next run: a sweep after
a sweep skips the workers' start. Ray ends the workers when the pool that holds their only
handles is dropped or released, and a local cluster ends with the driver
(:mod:`editflow.executors.ray_reaper`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editflow.executors.ray_reaper import reap_with_this_process

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.queue import Queue

    from editflow.cache import Cache
    from editflow.cache.live import ProducerState
    from editflow.engine.events import Event, EventSink
    from editflow.engine.execute import Session
    from editflow.engine.plan import Plan
    from editflow.models import RunModels

STEP_INTERVAL = 0.2  # seconds between a worker's progress updates


def connect(address: str | None, workers: int | None) -> None:
    """Join the Ray cluster at ``address``, or start a local one with ``workers`` CPUs
    (default: one per CPU, at most 2) that ends with this process, however it ends. Nothing
    when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    init: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if address is None:
        init["num_cpus"] = workers or min(os.cpu_count() or 1, 2)
        reap_with_this_process()
    ray.init(address=address, **init)


def _uses_gpus(device: str, resources: Mapping[str, float]) -> bool:
    return device != "cpu" and not device.startswith("mps") and resources.get("GPU", 0) >= 1


def pool_size(workers: int | None, device: str, resources: Mapping[str, float]) -> int:
    """Workers for a run: ``--workers``, else one per GPU of the cluster when the run may use
    GPUs, else one per CPU."""
    if workers:
        return workers
    if _uses_gpus(device, resources):
        return int(resources["GPU"])
    return max(int(resources.get("CPU", 1)), 1)


def worker_options(size: int, device: str, resources: Mapping[str, float]) -> dict[str, Any]:
    """Ray options of each worker of a pool of ``size``.

    On a cluster with GPUs (and a device other than the CPU) each worker reserves a whole GPU,
    or an equal share (1/2, 1/3...) when there are more workers than GPUs, so Ray spreads them
    over the GPUs and shows each only its own. No CPU is reserved: the pool size bounds the
    run's concurrency, and several runs can share a cluster without waiting on each other's
    idle workers.
    """
    options: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
    if _uses_gpus(device, resources):
        per_gpu = math.ceil(size / int(resources["GPU"]))  # workers sharing one GPU
        options["num_gpus"] = 1 if per_gpu == 1 else 1 / per_gpu
    return options


def _cluster() -> tuple[str, str]:
    """The connected cluster and driver job: actor handles are valid in these only."""
    import ray

    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()


@dataclass(frozen=True)
class WorkerSpec:
    """What workers are started with; kept workers serve a run whose spec is equal.

    Attributes:
        cluster: Ray node and job ids of the driver (see :func:`_cluster`).
        models_dir: Where the workers find built-in models.
        device: The torch device the workers compute on.
        threads: Torch's CPU threads in each worker (CPU results change with it, keys do not).
        options: Ray actor options, as sorted items.
    """

    cluster: tuple[str, str]
    models_dir: str
    device: str
    threads: int
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def on_cluster(
        cls, workers: int | None, device: str, models_dir: Path
    ) -> tuple[WorkerSpec, int]:
        """The spec of a run's workers on the connected cluster, and how many it wants."""
        import ray
        import torch

        resources = ray.cluster_resources()
        size = pool_size(workers, device, resources)
        options = worker_options(size, device, resources)
        spec = cls(
            cluster=_cluster(),
            models_dir=str(models_dir),
            device="cuda" if options.get("num_gpus") else device,  # each sees only its GPUs
            threads=torch.get_num_threads(),  # the driver's: results match an in-process run
            options=tuple(sorted(options.items())),
        )
        return spec, size


class StageWorker:
    """Computes stages and keeps its loaded models for the next one.

    A plain class: the pool makes it a Ray actor (``ray.remote``), so a subclass can be
    passed to :class:`WorkerPool` (the tests' makes its worker die mid-stage).

    Args:
        models_dir: Where built-in models are found.
        device: The torch device to compute on.
        threads: Torch's CPU threads.
        queue: Where to put the stages' events for the driver.
    """

    def __init__(self, models_dir: str, device: str, threads: int, queue: Queue) -> None:
        import torch

        torch.set_num_threads(threads)
        self.models_dir, self.device = Path(models_dir), device
        self.queue = queue
        self.registry: RunModels | None = None
        self.caches: dict[str, Cache] = {}  # by URL: a kept worker serves later runs' caches
        self.last_sent = 0.0

    def send(self, event: Event) -> None:
        """Put a stage's event in the driver's queue without waiting (the stage never waits
        on it); steps a few times a second, which is all progress bars need."""
        now = time.monotonic()
        step = event.type == "step" and event.step not in (1, event.total)
        if step and now - self.last_sent < STEP_INTERVAL:
            return
        self.last_sent = now
        self.queue.actor.put_nowait.remote(event)

    def session(self, cache_url: str) -> Session:
        """A session on the cache at ``cache_url`` with this worker's models."""
        from editflow.cache import Cache
        from editflow.engine.execute import Session

        if cache_url not in self.caches:
            self.caches[cache_url] = Cache(cache_url)
        cache = self.caches[cache_url]
        return Session(cache, None, self.device, self.send, self.models_dir, registry=self.registry)

    def warm(self, plan: Plan, cache_url: str) -> None:
        """Load the models the plan's stages use, while other workers compute."""
        session = self.session(cache_url)
        models = session.models(plan)
        for stage in plan.needed:
            for spec in stage.components:
                models.registry(spec.provider).get(spec.name)
        self.registry = session.registry

    def run(
        self,
        plan: Plan,
        name: str,
        cache_url: str,
        live_id: str | None = None,
        following: Mapping[str, tuple[str, list[ObjectRef]]] | None = None,
    ) -> list[str]:
        """Compute a stage and publish its entry; returns the names of the stages computed.

        Args:
            plan: The stage's plan.
            name: The stage.
            cache_url: The cache every worker sees.
            live_id: Names the stage's staging folder: others may follow its streamed outputs.
            following: Producer key -> its staging folder and task, for producers still
                running (the task in a list, so Ray hands the reference over unresolved).
        """
        import ray

        from editflow.engine.execute import Follow, compute_stage

        session = self.session(cache_url)
        follows = {key: Follow(object_id, _task_state(task))
                   for key, (object_id, [task]) in (following or {}).items()}  # fmt: skip
        result = compute_stage(plan, session, name, live_id=live_id, following=follows)
        self.registry = session.registry or self.registry
        # Calls from one caller run in order: once this returns, every event this stage sent
        # is in the queue, so the driver relays them before it records the stage.
        ray.get(self.queue.actor.qsize.remote())
        return result.computed


def _task_state(task: ObjectRef) -> ProducerState:
    """Whether a Ray task still runs (None), returned (True) or failed (False)."""
    import ray

    def state() -> bool | None:
        if not ray.wait([task], timeout=0)[0]:
            return None
        try:
            ray.get(task)
        except Exception:
            return False
        return True

    return state


class Crew:
    """Workers of one spec, idle between stages, and the queue their events come through
    (stage running, step i of n, done) as they happen.

    Args:
        spec: What the workers are started with.
        worker_class: The class Ray makes the workers from.
    """

    def __init__(self, spec: WorkerSpec, worker_class: type[StageWorker]) -> None:
        import ray
        from ray.util.queue import Queue

        self.spec = spec
        self.actor_class = ray.remote(max_restarts=0)(worker_class)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.idle: list[ActorHandle] = []

    def start(self, plan: Plan, cache_url: str) -> ActorHandle:
        """A new worker, loading the plan's models before its first stage."""
        spec = self.spec
        worker = self.actor_class.options(**dict(spec.options)).remote(
            spec.models_dir, spec.device, spec.threads, self.queue
        )
        worker.warm.remote(plan, cache_url)  # runs before the worker's first stage
        return worker

    def take(self, count: int, plan: Plan, cache_url: str) -> list[ActorHandle]:
        """``count`` workers for a run of ``plan``'s stages: idle ones (which load only the
        models this run adds), then new ones. The rest stay idle."""
        self.queue.get_nowait_batch(self.queue.qsize())  # sent after the last run ended
        taken, self.idle = self.idle[:count], self.idle[count:]
        for worker in taken:
            worker.warm.remote(plan, cache_url)
        return taken + [self.start(plan, cache_url) for _ in range(count - len(taken))]

    def relay(self, events: EventSink) -> None:
        """Pass the events the workers sent so far on to the run's sink."""
        for event in self.queue.get_nowait_batch(self.queue.qsize()):
            events(event)

    def shut_down(self, busy: Iterable[ActorHandle] = ()) -> None:
        """End the idle workers, ``busy`` ones and the queue (on the cluster they were
        started on: elsewhere they went with their cluster)."""
        import ray

        if ray.is_initialized() and _cluster() == self.spec.cluster:
            for worker in [*self.idle, *busy]:
                ray.kill(worker)
            ray.kill(self.queue.actor)
        self.idle = []


class WorkerPool:
    """The workers an executor keeps between its runs, models loaded: one crew, reused by a
    run whose :class:`WorkerSpec` is equal.

    Args:
        worker_class: What the workers are (:class:`StageWorker` or a subclass).
    """

    def __init__(self, worker_class: type[StageWorker] = StageWorker) -> None:
        self.worker_class = worker_class
        self._kept: Crew | None = None
        self._lock = threading.Lock()  # two runs at once on one executor: each its own crew

    @property
    def kept(self) -> list[ActorHandle]:
        """The idle workers kept for the next run."""
        return list(self._kept.idle) if self._kept is not None else []

    def take(self, spec: WorkerSpec) -> Crew:
        """The kept crew if it has this spec (shut down if not), else a new crew."""
        with self._lock:
            crew, self._kept = self._kept, None
        if crew is not None and crew.spec == spec:
            return crew
        if crew is not None:
            crew.shut_down()
        return Crew(spec, self.worker_class)

    def keep(self, crew: Crew) -> None:
        """Keep a finished run's crew for the next run; one crew is kept, so one a concurrent
        run kept before is shut down."""
        with self._lock:
            replaced, self._kept = self._kept, crew
        if replaced is not None:
            replaced.shut_down()

    def release(self) -> None:
        """Shut down the kept workers (they hold their models' memory)."""
        with self._lock:
            crew, self._kept = self._kept, None
        if crew is not None:
            crew.shut_down()
