"""The Ray executor: stages as tasks on a pool of long-lived workers over a shared cache.

The driver plans every recipe (or sweep point), merges their stages by key (a stage shared
by several points is one task) and dispatches each stage whose inputs are ready to an idle
worker. Workers are Ray actors that keep their loaded models from one stage to the next;
each computes its stage from inputs it reads from the cache and publishes the stage's entry
there (atomically: a worker that dies mid-stage leaves nothing behind), so tasks pass keys,
never tensors. A worker that dies is replaced and its stage run again. When every stage is
in the cache, the ordinary in-process executor finishes each recipe (every stage a hit), so
the exported files are byte for byte those of an in-process run. Workers use the driver's
torch thread count: CPU results change with it while keys do not. ``RayExecutor`` is the
engine's ``Executor`` interface for one recipe (``run_recipe(..., executor=RayExecutor())``);
``run_jobs`` merges several recipes or sweep points into one dispatch.

Workers outlive a run: the driver keeps them, models loaded, for its next run on the same
cluster and models (a Python program's second sweep skips their start); they end with the
driver, and so does a local cluster the driver started, even when the driver is killed
(:mod:`editflow.ray_reaper`). Among the stages that are ready, the one with the most stages after it goes
first, so a sweep's shared stages do not wait behind its points.

A stage need not wait for the end of a stage it reads only streamed outputs of, through its
``follows`` ports: it starts once the producer runs and reads each step as the producer
writes it into its staging folder (``editflow.cache.live``), so a sweep's edits run
alongside the inversion they share. It publishes only after checking what it read against
the producer's published entry; when the producer fails it stops and runs again later.

No scheduler or RPC of our own: Ray places the workers (one machine or a cluster, given
``address``); the cache must be storage every worker sees (a local folder on one machine, an
object store URL such as ``s3://`` on many).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editflow.errors import EditflowError
from editflow.ray_reaper import reap_with_this_process

MAX_ATTEMPTS = 3  # per stage: a worker may die twice
STEP_INTERVAL = 0.2  # seconds between a worker's progress updates
# Tests: "MARKER:STAGE" kills the worker running STAGE once, as it starts; "MARKER:STAGE:N" at
# its step N; several, comma-separated.
FAIL_ONCE = "EDITFLOW_RAY_FAIL_ONCE"


@dataclass
class Job:
    """One recipe run: what ``run_recipe`` would take."""

    recipe: Path
    overrides: list[str]
    out_dir: Path | None
    document: dict[str, Any] | None = None
    targets: list[str] | None = None  # run only what these stages need (``--target``)


@dataclass
class _Pool:
    """Workers (idle, models loaded) and their event queue, kept for this driver's next run."""

    signature: tuple[str, ...]
    queue: Any
    workers: list[Any] = field(default_factory=list)


# One pool per driver process: the last run's, reused by a run with the same cluster, models
# folder, device and thread count (a sweep after a sweep skips the workers' start).
_POOL: _Pool | None = None
_REAPER_PIPE: Any = None  # open while this process lives (editflow.ray_reaper)
_POOL_LOCK = threading.Lock()


def _shut_down(pool: _Pool, cluster: tuple[str, ...]) -> None:
    import ray

    if pool.signature[:2] == cluster[:2]:  # on another cluster it went with that cluster
        for worker in pool.workers:
            ray.kill(worker)
        ray.kill(pool.queue.actor)


def _swap_pool(pool: _Pool | None) -> _Pool | None:
    """Keep ``pool`` (or none) for the next run; returns the one kept before."""
    global _POOL
    with _POOL_LOCK:
        kept, _POOL = _POOL, pool
    return kept


def _take_pool(signature: tuple[str, ...]) -> _Pool | None:
    """The kept pool if it fits this run; a pool that does not is shut down."""
    pool = _swap_pool(None)
    if pool is not None and pool.signature != signature:
        _shut_down(pool, signature)
        pool = None
    return pool


def _keep_pool(pool: _Pool) -> None:
    """Keep a finished run's pool for the next run (one pool: a concurrent run's is shut down)."""
    replaced = _swap_pool(pool)
    if replaced is not None:
        _shut_down(replaced, pool.signature)


def release_workers() -> None:
    """Shut down the workers kept from the last run (they hold their models' memory)."""
    pool = _swap_pool(None)
    if pool is not None:
        _shut_down(pool, pool.signature)


def _worker_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class StageWorker:
        """Computes stages; keeps its loaded models for the next stage."""

        def __init__(self, models_dir: str, device: str, threads: int, queue: Any) -> None:
            import torch

            torch.set_num_threads(threads)
            self.models_dir, self.device = Path(models_dir), device
            self.registry, self.queue = None, queue
            self.caches: dict[str, Any] = {}  # by URL: a kept worker serves later runs' caches

        def _session(self, cache_url: str) -> Any:
            from editflow.cache import Cache
            from editflow.engine.execute import Session

            if cache_url not in self.caches:
                self.caches[cache_url] = Cache(cache_url)

            last = [0.0]

            def send(event: Any) -> None:  # fire and forget: the stage never waits on it
                if event.type == "step":
                    _fail_once_for_tests(event.stage, event.step)
                now = time.monotonic()
                step = event.type == "step" and event.step not in (1, event.total)
                if step and now - last[0] < STEP_INTERVAL:
                    return  # progress bars need a few updates a second, not every step
                last[0] = now
                self.queue.actor.put_nowait.remote(event)

            cache = self.caches[cache_url]
            return Session(cache, None, self.device, send, self.models_dir, registry=self.registry)

        def warm(self, plan: Any, cache_url: str) -> None:
            """Load the models the plan's stages use, while other workers compute."""
            session = self._session(cache_url)
            models = session.models(plan)
            for stage in plan.needed:
                for spec in stage.components:
                    models.registry(spec.provider).get(spec.name)
            self.registry = session.registry

        def run(
            self,
            plan: Any,
            name: str,
            cache_url: str,
            live_id: str | None = None,
            following: Mapping[str, tuple[str, list[Any]]] | None = None,
        ) -> list[str]:
            """Compute a stage; ``live_id`` names its staging folder (others may follow its
            streamed outputs), ``following`` maps producers still running to their staging
            folder and task (in a list, so Ray hands the reference over unresolved)."""
            import ray

            from editflow.engine.execute import Follow, compute_stage

            _fail_once_for_tests(name)
            session = self._session(cache_url)
            follows = {key: Follow(object_id, _task_state(task))
                       for key, (object_id, [task]) in (following or {}).items()}  # fmt: skip
            result = compute_stage(plan, session, name, live_id=live_id, following=follows)
            self.registry = session.registry or self.registry
            # Calls from one caller run in order: once this returns, every event this stage
            # sent is in the queue, so the driver relays them before it records the stage.
            ray.get(self.queue.actor.qsize.remote())
            return result.computed

    return StageWorker


def _task_state(task: Any) -> Any:
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


def _fail_once_for_tests(stage: str, step: int = 0) -> None:
    for spec in filter(None, os.environ.get(FAIL_ONCE, "").split(",")):
        marker, _, target = spec.partition(":")
        target, _, at_step = target.partition(":")
        if target == stage and step == int(at_step or 0) and not Path(marker).exists():
            Path(marker).write_text("failed once")
            os._exit(1)  # the worker process dies mid-stage, as a lost machine would


class RayExecutor:
    """The engine's ``Executor`` on Ray: ``run_recipe(..., executor=RayExecutor())`` computes
    the plan's stages on the worker pool, then finishes in process (every stage a hit), so
    the files are those an in-process run writes."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        self.address, self.workers = address, workers

    def execute(self, plan: Any, session: Any) -> Any:
        _check_shared(session.cache)
        units, needs = merge_stages([plan], session.cache)
        computed: set[str] = set()
        if units:
            computed = _dispatch(units, needs, session.cache, session.models_dir,
                                 session.device_name, session.events, self.address,
                                 self.workers)  # fmt: skip
        return _Finish(units, computed).execute(plan, session)


class _Finish:
    """The in-process pass after the workers: every stage a hit, files written as in process;
    the stages the workers computed are reported as computed, each key once (the first stage
    that has it), and their hits are not reported (their own events told their story)."""

    def __init__(self, units: dict[str, tuple[Any, str]], computed: set[str]) -> None:
        self.units, self.computed = units, computed  # shared by the jobs of one dispatch

    def execute(self, plan: Any, session: Any) -> Any:
        from editflow.engine.execute import InProcessExecutor

        unclaimed = set(self.computed)
        events = session.events

        def relay(event: Any) -> None:
            if event.type not in ("pending", "cached") or event.key not in unclaimed:
                events(event)

        session.events = relay
        try:
            result = InProcessExecutor().execute(plan, session)
        finally:
            session.events = events
        owned = {name for name, key in result.keys.items()
                 if key in unclaimed and self.units[key][1] == name}  # fmt: skip
        result.computed = [name for name in result.keys if name in owned]
        result.hits = [name for name in result.keys if name not in owned]
        self.computed -= {result.keys[name] for name in owned}
        return result


def _check_shared(cache: Any) -> None:
    if cache.url.startswith("memory://"):
        raise EditflowError(
            "a memory:// cache lives in one process; Ray workers cannot see it",
            file="--cache",
            hint="use a folder (one machine) or an object store URL such as s3:// (a cluster)",
        )


def run_jobs(
    jobs: Sequence[Job],
    *,
    cache: Any,
    device: str = "auto",
    events: Any = None,
    address: str | None = None,
    workers: int | None = None,
) -> list[Any]:
    """Run recipes on Ray; returns one ``RunResult`` per job, as ``run_recipe`` would."""
    from editflow.engine.api import models_dir_for, plan_recipe, run_recipe
    from editflow.engine.events import CollectEvents

    _check_shared(cache)
    events = events if events is not None else CollectEvents()
    plans = [
        plan_recipe(job.recipe, job.overrides, cache=cache, document=job.document,
                    targets=job.targets)
        for job in jobs
    ]  # fmt: skip
    units, needs = merge_stages(plans, cache)
    computed: set[str] = set()
    if units:
        computed = _dispatch(units, needs, cache, models_dir_for(cache), device, events,
                             address, workers)  # fmt: skip
    finish = _Finish(units, computed)
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
        )  # fmt: skip
        for job in jobs
    ]


def merge_stages(
    plans: Sequence[Any], cache: Any
) -> tuple[dict[str, tuple[Any, str]], dict[str, set[str]]]:
    """The stages to compute, merged by key: ``key -> (plan, stage)`` and ``key -> the keys
    of the stages it reads``. Stages already in the cache are left out."""
    from editflow.engine.graph import producer_of

    units: dict[str, tuple[Any, str]] = {}
    needs: dict[str, set[str]] = {}
    for plan in plans:
        for stage in plan.needed:
            if stage.key in units or cache.has(stage.key):
                continue
            units[stage.key] = (plan, stage.name)
            refs = [r for value in stage.references.values()
                    for r in (value if isinstance(value, list) else [value])]  # fmt: skip
            producers = [producer_of(ref) for ref in refs]
            needs[stage.key] = {
                plan.stages[p].key for p in producers if not p.startswith("inputs.")
            }
    return units, needs


def _dispatch(
    units: dict[str, tuple[Any, str]],
    needs: dict[str, set[str]],
    cache: Any,
    models_dir: Path,
    device: str,
    events: Any,
    address: str | None,
    workers: int | None,
) -> set[str]:
    """Run every unit on the worker pool, each once its inputs are in; returns the keys."""
    import ray
    import torch
    from ray.util.queue import Queue

    from editflow.cache import FollowLost
    from editflow.engine.events import Event

    if not ray.is_initialized():
        count = workers or min(os.cpu_count() or 1, 2)
        init: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        }
        if address is None:  # our own cluster: it ends with this process, however it ends
            init["num_cpus"] = count
            global _REAPER_PIPE
            _REAPER_PIPE = reap_with_this_process()
        ray.init(address=address, **init)
    resources = ray.cluster_resources()
    size = pool_size(workers, device, resources)
    options = worker_options(size, device, resources)
    device = "cuda" if options.get("num_gpus") else device  # each worker sees only its GPUs
    worker_class = _worker_class()
    context = ray.get_runtime_context()
    threads = torch.get_num_threads()
    signature = (context.get_node_id(), context.get_job_id(), str(models_dir), device,
                 str(threads), str(sorted(options.items())))  # fmt: skip
    pool = _take_pool(signature)
    if pool is None:
        # Workers put their events (stage running, step i of n, done) here as they happen.
        pool = _Pool(signature, Queue(actor_options={"num_cpus": 0}))
    queue = pool.queue
    # Events sent after the last run ended (a spare worker still loading its models).
    queue.get_nowait_batch(queue.qsize())
    arguments = (str(models_dir), device, threads, queue)
    first_plan = next(iter(units.values()))[0]

    def new_worker() -> Any:
        worker = worker_class.options(**options).remote(*arguments)
        worker.warm.remote(first_plan, cache.url)  # runs before the worker's first stage
        return worker

    def relay() -> None:
        for event in queue.get_nowait_batch(queue.qsize()):
            events(event)

    wanted = min(size, len(units))
    idle, spare = pool.workers[:wanted], pool.workers[wanted:]
    for worker in idle:
        worker.warm.remote(first_plan, cache.url)  # loads only the models this run adds
    idle += [new_worker() for _ in range(wanted - len(idle))]
    priority = downstream_counts(needs)
    can_follow = follow_edges(units)
    for key, (plan, name) in units.items():  # what will run, before it runs, as in process
        events(Event("pending", name, plan.stages[name].kind.kind, key))
    waiting = dict(needs)
    done: set[str] = set()
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[str, Any]] = {}
    live: dict[str, tuple[str, Any]] = {}  # running stage -> its staging folder and task

    def next_stage() -> tuple[str, set[str]] | None:
        """The stage to start: its inputs are in, or are streams of stages still running
        that it may follow; whole inputs first, then the stage with the most work after it
        (a sweep's shared stages before its points), so the last to finish are short."""
        ready = []
        for key, deps in waiting.items():
            missing = deps - done - _cached(deps, cache)
            if missing <= can_follow[key] & live.keys():
                ready.append((bool(missing), -priority[key], key, missing))
        return min(ready)[2:] if ready else None

    finished_cleanly = False
    try:
        while waiting or running:
            while idle and (chosen := next_stage()) is not None:
                key, followed = chosen
                waiting.pop(key)
                worker = idle.pop()
                plan, name = units[key]
                attempts[key] = attempts.get(key, 0) + 1
                live_id = uuid.uuid4().hex if streams(plan.stages[name]) else None
                following = {dep: (live[dep][0], [live[dep][1]]) for dep in followed}
                task = worker.run.remote(plan, name, cache.url, live_id, following)
                running[task] = (key, worker)
                if live_id is not None:
                    live[key] = (live_id, task)
            if not running:
                raise RuntimeError(f"stages wait on inputs no stage makes: {sorted(waiting)}")
            finished: list[Any] = []
            while not finished:
                finished, _ = ray.wait(list(running), num_returns=1, timeout=0.1)
                relay()
            key, worker = running.pop(finished[0])
            live.pop(key, None)
            try:
                ray.get(finished[0])
            except ray.exceptions.RayActorError:
                ray.kill(worker)
                if attempts[key] >= MAX_ATTEMPTS:
                    raise EditflowError(
                        f"stage {units[key][1]!r} lost its worker {MAX_ATTEMPTS} times",
                        file=str(units[key][0].loaded.path),
                    ) from None
                idle.append(new_worker())
                waiting[key] = needs[key]  # the entry was never published: run it again
                continue
            except ray.exceptions.RayTaskError as error:
                if not isinstance(error.cause, FollowLost):
                    raise error.as_instanceof_cause() from None
                # The stage it followed failed: it runs again, from what that one publishes.
                attempts[key] -= 1
                waiting[key] = needs[key]
                idle.append(worker)
                continue
            relay()
            done.add(key)
            idle.append(worker)
        finished_cleanly = True
    finally:
        if finished_cleanly:
            pool.workers = idle + spare
            _keep_pool(pool)
        else:
            for worker in idle + spare + [worker for _, worker in running.values()]:
                ray.kill(worker)
            ray.kill(queue.actor)
    return done


def streams(stage: Any) -> bool:
    """Whether a stage writes outputs step by step that others may follow."""
    return any(port.streamed for port in stage.kind.outputs)


def follow_edges(units: Mapping[str, tuple[Any, str]]) -> dict[str, set[str]]:
    """For each stage, the stages it may follow while they run: those it reads only
    streamed outputs of, each into one of its ``follows`` ports."""
    from editflow.engine.graph import producer_of

    edges: dict[str, set[str]] = {}
    for key, (plan, name) in units.items():
        stage = plan.stages[name]
        followable, whole = set(), set()
        for port, refs in stage.references.items():
            # Only single ports are followed (the engine confirms those); a list waits for all.
            follows = any(p.follows and not p.many for p in stage.kind.inputs if p.name == port)
            for ref in refs if isinstance(refs, list) else [refs]:
                if (producer := producer_of(ref)).startswith("inputs."):
                    continue
                output = plan.stages[producer].kind.output_port(ref.split(".", 1)[1])
                streamed = follows and output is not None and output.streamed
                (followable if streamed else whole).add(plan.stages[producer].key)
        edges[key] = followable - whole
    return edges


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
    or an equal share (1/2, 1/3...) when there are more workers than GPUs, so Ray spreads them over
    the GPUs and shows each only its own. No CPU is reserved: the pool size bounds the run's
    concurrency, and several runs can share a cluster without waiting on each other's idle
    workers.
    """
    options: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
    if _uses_gpus(device, resources):
        per_gpu = math.ceil(size / int(resources["GPU"]))  # workers sharing one GPU
        options["num_gpus"] = 1 if per_gpu == 1 else 1 / per_gpu
    return options


def downstream_counts(needs: Mapping[str, set[str]]) -> dict[str, int]:
    """For each stage, how many stages of the run depend on it, directly or not."""
    return {key: len(stages) for key, stages in downstream_stages(needs).items()}


def downstream_stages(needs: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """For each stage, the stages of the run that depend on it, directly or not."""
    dependents: dict[str, set[str]] = {key: set() for key in needs}
    for key, deps in needs.items():
        for dep in deps:
            dependents.setdefault(dep, set()).add(key)
    below: dict[str, set[str]] = {}

    def downstream(key: str) -> set[str]:
        if key not in below:
            below[key] = set()
            for child in dependents.get(key, ()):
                below[key] |= {child} | downstream(child)
        return below[key]

    return {key: downstream(key) for key in needs}


def _cached(keys: set[str], cache: Any) -> set[str]:
    return {key for key in keys if cache.has(key)}
