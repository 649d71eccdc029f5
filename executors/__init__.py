"""Executors that run a plan elsewhere than this process: :mod:`.ray` on a Ray cluster (what
runs when: :mod:`.ray_schedule`; the workers and the pool that keeps them:
:mod:`.ray_workers`; a local cluster's end with its driver: :mod:`.ray_reaper`).

In-process execution is the engine's own (:class:`editflow.engine.execute.InProcessExecutor`):
it is the same per-stage run a Ray worker does (``compute_stage``), one stage after another.
"""
