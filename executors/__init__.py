"""Executors that run a plan elsewhere than this process: :mod:`.ray` on a Ray cluster.

In-process execution is the engine's own (:class:`editflow.engine.execute.InProcessExecutor`):
it is the same per-stage run a Ray worker does (``compute_stage``), one stage after another.
"""
