"""What the benchmarks share besides quiet output: where the built-in models are kept, memory
warmed before measuring, and resident-memory peaks."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def models_dir() -> Path:
    """The folder ``editflow run`` keeps built-in models in ($EDITFLOW_MODELS, else the default
    cache's ``models/``), so a benchmark builds ``tiny`` once, not once per run."""
    from editflow.engine.api import models_dir_for, open_cache

    return models_dir_for(open_cache())


def warm_guest_memory(gibibytes: float) -> None:
    """Touch and free memory, so a benchmark's writes and reads do not pay for first-touched pages.

    In a VM whose host backs guest memory lazily, the first touch of a page costs about as much
    as writing it to disk (about 400 MiB/s on our CI machines), and fresh page-cache pages are
    such pages: without this, the figures measure the hypervisor, for numpy and editflow
    alike. On bare metal it changes nothing.
    """
    import numpy as np

    buffer = np.ones(int(gibibytes * 2**30) // 8)
    del buffer


class RssPeak:
    """The growth of this process's resident memory over a block, sampled every millisecond
    on a thread from ``/proc/self/statm`` (Linux)."""

    def __enter__(self) -> RssPeak:
        self.baseline = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
