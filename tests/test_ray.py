"""The Ray executor on a local instance with 2 CPU workers: byte-identical outputs to the
in-process executor (also when a worker dies mid-stage), sweeps, two runs at once, workers
kept between an executor's runs, and the schedule's order."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from support import MANIFESTS

from editflow.cache import Cache
from editflow.engine.api import run_recipe
from editflow.engine.events import CollectEvents
from editflow.errors import EditflowError
from editflow.executors.ray import Job, RayExecutor
from editflow.executors.ray_workers import StageWorker

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.runs_long
QUICKSTART = MANIFESTS / "quickstart.toml"


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3 bucket on a local moto server (None without moto, which only the S3 test needs);
    the AWS_* variables point workers started after this at it, as a cluster's machines
    would be configured for their object store."""
    import importlib.util
    import logging
    import socket

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        yield None
        return
    import boto3
    from moto import server as server_module

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    boto3.client("s3").create_bucket(Bucket="editflow-test")
    yield "editflow-test"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def local_ray(s3_bucket: str | None):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a test opens a :func:`gated_worker` gate (a file ``gate``: producer, consumer)."""
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def on_ray(local_ray: None, gate: Path) -> Iterator[RayExecutor]:
    """One executor for the module's runs: the workers it keeps between runs are warm for the
    next test, as a long-lived driver's are for its next sweep."""
    executor = RayExecutor(workers=2, worker_class=gated_worker(gate))
    yield executor
    executor.release_workers()


def gated_worker(folder: Path) -> type[StageWorker]:
    """A worker class that, while ``folder/gate`` names a producer and a consumer, holds the
    producer at its step 2 until the consumer has started (at most two minutes): whether a
    consumer follows a running producer is then the scheduler's decision, not a race between
    the producer's speed and a worker's start. (Defined in a function: Ray sends it by value.)"""

    def opened() -> list[str]:
        gate = folder / "gate"
        return gate.read_text().split() if gate.exists() else []

    class GatedWorker(StageWorker):
        def run(self, plan: Any, name: str, cache_url: str, live_id: Any = None,
                following: Any = None) -> list[str]:  # fmt: skip
            if name in opened()[1:]:
                (folder / f"started-{name}").write_text("")
            return StageWorker.run(self, plan, name, cache_url, live_id, following)

        def send(self, event: Any) -> None:
            names = opened()
            if names and event.type == "step" and event.stage == names[0] and event.step == 2:
                waited = 0.0
                while not (folder / f"started-{names[1]}").exists() and waited < 120:
                    time.sleep(0.05)
                    waited += 0.05
            StageWorker.send(self, event)

    return GatedWorker


@contextlib.contextmanager
def gated(folder: Path, producer: str, consumer: str) -> Iterator[None]:
    """Open the gate of :func:`gated_worker` for one run."""
    (folder / "gate").write_text(f"{producer} {consumer}")
    try:
        yield
    finally:
        for path in folder.iterdir():
            path.unlink()


def dying_worker(marker: Path, stage: str, step: int = 0) -> type[StageWorker]:
    """A worker class whose process dies once, as a lost machine's would: in ``stage`` as it
    starts (``step`` 0) or at its step ``step``. ``marker`` records the death, so the worker
    that runs the stage again lives. (Defined in a function, Ray sends the class by value.)"""

    def die_once(name: str, at: int | None) -> None:
        if name == stage and at == step and not marker.exists():
            marker.write_text("died once")
            os._exit(1)

    class DyingWorker(StageWorker):
        def run(self, plan: Any, name: str, cache_url: str, live_id: Any = None,
                following: Any = None) -> list[str]:  # fmt: skip
            die_once(name, 0)
            return StageWorker.run(self, plan, name, cache_url, live_id, following)

        def send(self, event: Any) -> None:
            if event.type == "step":
                die_once(event.stage, event.step)
            StageWorker.send(self, event)

    return DyingWorker


def _digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*.png"))
    }


def test_the_quick_start_on_ray_is_byte_identical_even_when_a_worker_dies(
    local_ray: None, tmp_path: Path
) -> None:
    events, died = CollectEvents(), tmp_path / "edit-died"
    executor = RayExecutor(worker_class=dying_worker(died, "edit"))
    (result,) = executor.run_jobs(
        [Job(QUICKSTART, [], tmp_path / "ray")], cache=Cache(tmp_path / "c1"), device="cpu",
        events=events,
    )  # fmt: skip
    assert died.exists(), "the worker running 'edit' was to die once"
    # The workers' progress reaches the driver: every step of the inversion, then done.
    steps = [(e.step, e.total) for e in events.of("step") if e.stage == "invert"]
    assert steps[0] == (1, 20) and steps[-1] == (20, 20) and steps == sorted(steps)
    assert sorted(e.stage for e in events.of("done")) == sorted(result.keys)
    assert sorted(result.computed) == sorted(result.keys)
    assert events.of("cached") == [], "the final pass does not report computed stages as hits"
    assert sorted(e.stage for e in events.of("pending")) == sorted(result.keys)
    run_recipe(QUICKSTART, cache=Cache(tmp_path / "c2"), out_dir=tmp_path / "here", device="cpu")
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "here")
    assert len(_digests(tmp_path / "here")) == 3


def test_a_sweep_on_ray_is_byte_identical_and_computes_its_shared_stages_once(
    on_ray: RayExecutor, tmp_path: Path
) -> None:
    from editflow.cli.sweeps import parse_sweep, run_sweep

    axes = [parse_sweep("stages.edit.guidance_scale=3.0,5.0")]
    on_ray = run_sweep(QUICKSTART, axes, cache=Cache(tmp_path / "c1"), out_root=tmp_path / "ray",
                       device="cpu", ray=on_ray)  # fmt: skip
    here = run_sweep(QUICKSTART, axes, cache=Cache(tmp_path / "c2"), out_root=tmp_path / "here",
                     device="cpu")  # fmt: skip
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "here")
    assert sorted(on_ray.computed) == sorted(here.computed)
    assert [entry.split("/")[1] for entry in on_ray.computed].count("invert") == 1


def _edit_friendly_recipe(folder: Path, inversion: str = "invert") -> Path:
    """The edit-friendly text edit in 20 steps, its inversion stage named ``inversion``."""
    text = (MANIFESTS / "edit_friendly" / "text_edit.toml").read_text()
    text = text.replace("[stages.invert]", f"[stages.{inversion}]\nnum_inference_steps = 20")
    recipe = folder / "text_edit.toml"
    text = text.replace("[stages.edit]", "[stages.edit]\nskip = 5")
    for output in ("noise_maps", "auxiliary_path"):
        text = text.replace(f'"invert.{output}"', f'"{inversion}.{output}"')
    recipe.write_text(text)
    return recipe


def _follow_sweep(
    recipe: Path, cache: Cache, out: Path, events: Any, ray: RayExecutor | None
) -> Any:
    from editflow.cli.sweeps import parse_sweep, run_sweep

    axes = [parse_sweep("stages.edit.skip=5,10")]
    return run_sweep(recipe, axes, cache=cache, out_root=out, device="cpu", events=events,
                     ray=ray)  # fmt: skip


def test_edits_follow_the_inversion_they_share_and_match_in_process(
    on_ray: RayExecutor, gate: Path, tmp_path: Path
) -> None:
    recipe = _edit_friendly_recipe(tmp_path)
    events = CollectEvents()
    with gated(gate, "invert", "reconstruct"):
        _follow_sweep(recipe, Cache(tmp_path / "c1"), tmp_path / "ray", events, on_ray)
        assert (gate / "started-reconstruct").exists()
    _follow_sweep(recipe, Cache(tmp_path / "c2"), tmp_path / "here", None, None)
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "here")
    assert len(_digests(tmp_path / "here")) == 2 * 4 + 1  # 4 images a point, and the grid
    # The reconstruction (skip 0) steps along while the inversion is still running.
    order = [(e.type, e.stage, e.step) for e in events.events if e.type in ("step", "done")]
    inverted = order.index(("done", "invert", None))
    assert ("step", "reconstruct", 1) in order[:inverted]
    assert Cache(tmp_path / "c1").verify() == []


def test_a_stage_following_one_whose_worker_dies_runs_again(
    local_ray: None, tmp_path: Path
) -> None:
    recipe = _edit_friendly_recipe(tmp_path, inversion="inversion")
    events, died = CollectEvents(), tmp_path / "inversion-died"
    executor = RayExecutor(workers=2, worker_class=dying_worker(died, "inversion", step=5))
    _follow_sweep(recipe, Cache(tmp_path / "c1"), tmp_path / "ray", events, executor)
    assert died.exists(), "the inversion's worker was to die at its step 5"
    started = [e.stage for e in events.of("running")]
    # The reconstruction (skip 0) had followed the inversion from its start: it ran again.
    assert started.count("inversion") == 2 and started.count("reconstruct") >= 2
    assert not [e for e in events.of("failed")]
    _follow_sweep(recipe, Cache(tmp_path / "c2"), tmp_path / "here", None, None)
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "here") != {}
    assert Cache(tmp_path / "c1").verify() == []


def test_a_sweep_on_ray_over_an_object_store_cache_matches_in_process(
    on_ray: RayExecutor, gate: Path, s3_bucket: str | None, tmp_path: Path
) -> None:
    if s3_bucket is None:
        pytest.skip("needs moto[server] and s3fs (the test extra)")
    recipe = _edit_friendly_recipe(tmp_path)
    cache = Cache(f"s3://{s3_bucket}/{tmp_path.name}")
    assert not cache.is_local
    events = CollectEvents()
    with gated(gate, "invert", "reconstruct"):
        _follow_sweep(recipe, cache, tmp_path / "ray", events, on_ray)
        assert (gate / "started-reconstruct").exists()
    _follow_sweep(recipe, Cache(tmp_path / "here"), tmp_path / "here", None, None)
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "here") != {}
    order = [(e.type, e.stage, e.step) for e in events.events if e.type in ("step", "done")]
    assert ("step", "reconstruct", 1) in order[: order.index(("done", "invert", None))]
    assert cache.verify() == []


def test_two_ray_runs_at_once_on_one_cache_give_the_same_outputs(
    on_ray: RayExecutor, tmp_path: Path
) -> None:
    cache, errors = Cache(tmp_path / "c"), []

    def run(name: str) -> None:  # on one executor: one run takes its kept workers, one new
        try:
            on_ray.run_jobs([Job(QUICKSTART, [], tmp_path / name)], cache=cache, device="cpu")
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b") != {}
    assert cache.verify() == []
    assert len(on_ray.pool.kept) == 2, "one run's workers are kept, the other's shut down"


def test_a_memory_cache_with_ray_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EditflowError) as error:
        RayExecutor().run_jobs(
            [Job(QUICKSTART, [], None)], cache=Cache("memory://ray-test"), device="cpu"
        )
    assert error.value.render() == (
        "--cache: a memory:// cache lives in one process; Ray workers cannot see it (use a"
        " folder (one machine) or an object store URL such as s3:// (a cluster))"
    )


def test_a_later_run_reuses_the_workers_and_their_loaded_models(
    local_ray: None, tmp_path: Path
) -> None:
    cache, first_events, second_events = Cache(tmp_path / "c"), CollectEvents(), CollectEvents()
    executor = RayExecutor()
    executor.run_jobs([Job(QUICKSTART, [], tmp_path / "a")], cache=cache, device="cpu",
                      events=first_events)  # fmt: skip
    kept = {worker._actor_id for worker in executor.pool.kept}
    (result,) = executor.run_jobs(
        [Job(QUICKSTART, ["stages.edit.guidance_scale=4.0"], tmp_path / "b")], cache=cache,
        device="cpu", events=second_events,
    )  # fmt: skip
    assert "edit" in result.computed
    workers = executor.pool.kept
    assert {worker._actor_id for worker in workers} == kept
    assert len(kept) == 2 and first_events.of("loaded")
    assert second_events.of("loaded") == [], "the kept workers load no model again"
    executor.release_workers()
    assert executor.pool.kept == []
    # ray.kill returns before the actor is gone: a call made at once may still be served.
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(workers[0].__ray_ready__.remote())
            time.sleep(0.1)


def test_ready_stages_with_whole_inputs_and_more_work_after_them_go_first(tmp_path: Path) -> None:
    from editflow.executors.ray_schedule import Scheduler

    a, b, c, d, e, f = (f"key-{name}" for name in "abcdef")  # stage keys, none in the cache
    graph = nx.DiGraph()
    graph.add_edges_from([(a, b), (a, c), (b, d), (b, e), (c, e)], follow=False)
    graph.add_edge(a, f, follow=True)  # f reads step sequences of a only
    # Asking what is ready needs no worker (no crew).
    scheduler = Scheduler(graph, Cache(tmp_path / "c"), crew=None, events=CollectEvents())
    assert scheduler.work_after == {a: 5, b: 2, c: 1, d: 0, e: 0, f: 0}
    assert scheduler.next_ready() == (a, set())
    scheduler.waiting.remove(a)
    scheduler.live[a] = ("staging-folder", None)  # a runs: f may follow it, and only f
    assert scheduler.next_ready() == (f, {a})
    scheduler.live.clear()
    scheduler.done.add(a)
    assert scheduler.next_ready() == (b, set())  # more after b than after c or f


def test_target_on_ray_runs_only_what_the_target_needs(local_ray: None, tmp_path: Path) -> None:
    from editflow.cli import main

    recipe = str(QUICKSTART)
    for executor, cache in (("ray", "c1"), ("in-process", "c2")):
        extra = ["--executor", "ray", "--workers", "2"] if executor == "ray" else []
        code = main(["run", recipe, "--target", "decode_reconstruction", "--device", "cpu",
                     "--cache", str(tmp_path / cache), "--out", str(tmp_path / executor),
                     *extra])  # fmt: skip
        assert code == 0
    on_ray, here = Cache(tmp_path / "c1"), Cache(tmp_path / "c2")
    assert sorted(entry.key for entry in on_ray.ls()) == sorted(entry.key for entry in here.ls())
    assert len(on_ray.ls()) == 4  # encode, invert, reconstruct, decode_reconstruction
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "in-process")


def test_workers_reserve_gpus_where_the_cluster_has_them() -> None:
    from editflow.executors.ray_workers import pool_size, worker_options

    gpus, cpus = {"CPU": 64.0, "GPU": 8.0}, {"CPU": 2.0}
    assert pool_size(None, "auto", gpus) == 8 and pool_size(None, "auto", cpus) == 2
    assert pool_size(None, "cpu", gpus) == 64 and pool_size(3, "auto", gpus) == 3
    assert worker_options(8, "auto", gpus)["num_gpus"] == 1
    assert worker_options(4, "cuda:1", gpus)["num_gpus"] == 1
    assert worker_options(12, "auto", gpus)["num_gpus"] == 0.5  # two workers a GPU
    assert worker_options(17, "auto", gpus)["num_gpus"] == 1 / 3
    for device, resources in (("cpu", gpus), ("auto", cpus)):
        assert worker_options(2, device, resources) == {
            "num_cpus": 0,
            "scheduling_strategy": "SPREAD",
        }


def test_only_readers_of_step_sequences_follow(tmp_path: Path) -> None:
    from editflow.engine.api import plan_recipe
    from editflow.executors.ray_schedule import stages_to_compute

    cache = Cache(tmp_path / "c")
    graph = stages_to_compute([plan_recipe(_edit_friendly_recipe(tmp_path), cache=cache)], cache)
    names = dict(graph.nodes(data="name"))
    follows = {}
    for producer, consumer, follow in graph.edges(data="follow"):
        if follow:
            follows.setdefault(names[consumer], []).append(names[producer])
    # Readers of the inversion's step sequences (noise maps, auxiliary path) follow it; the
    # decoders read latents, which are not step sequences, and the figure a list of images.
    assert follows == {"edit": ["invert"], "reconstruct": ["invert"], "figure_noise": ["invert"]}
    # Attention maps are not written live (a follower could not tell their layers), so the
    # guided edit waits for the reference pass instead of holding a worker while it runs.
    plan = plan_recipe(MANIFESTS / "pix2pix_zero" / "cat2dog.toml", cache=cache)
    graph = stages_to_compute([plan], cache)
    names = dict(graph.nodes(data="name"))
    edges = {(names[a], names[b]): follow for a, b, follow in graph.edges(data="follow")}
    assert edges[("reference", "guided")] is False and not any(edges.values())


def _marked_processes(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if f"EDITFLOW_RAY_CLUSTER={token}".encode() in handle.read().split(b"\0"):
                    found.append(int(name))
        except (OSError, ValueError):
            pass
    return found


def _reaper_token(driver: int) -> str:
    """The token of the driver's cluster: the last but one argument of its reaper, the child
    of the driver that runs editflow.executors.ray_reaper's script."""
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                arguments = handle.read().decode().split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == driver and any("EDITFLOW_RAY_CLUSTER" in a for a in arguments):
            return arguments[-3]  # [..., script, token, grace, ""]
    raise AssertionError("the driver started no reaper")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_a_driver_killed_mid_run_takes_its_local_cluster_with_it(
    tmp_path: Path, signal_name: str
) -> None:
    """`editflow run --executor ray` starts a local cluster; kill -9 or Ctrl-C of the driver
    once its workers compute leaves none of the cluster's processes behind."""
    import signal
    import subprocess
    import sys
    import time

    steps = [f"stages.{n}.num_inference_steps=400" for n in ("invert", "reconstruct", "edit")]
    argv = [sys.executable, "-m", "editflow", "run", str(QUICKSTART), "--executor", "ray",
            "--workers", "1", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
            "--log-json", *[a for s in steps for a in ("--set", s)]]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**environment, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    for line in driver.stdout:  # the cluster is up and a worker computes
        if '"type": "step"' in line:
            break
    token = _reaper_token(driver.pid)
    assert len(_marked_processes(token)) >= 3  # the driver, the raylet, a worker, ...
    driver.send_signal(getattr(signal, signal_name))
    driver.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _marked_processes(token) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _marked_processes(token) == []
