"""How many CPU threads torch computes with: ``--threads``, else ``EDITFLOW_THREADS``, else
one.

One is the default because it was measured (``bench/bench_threads.py``, the closing figures
in docs/figures.md): on the 2-core machines CI runs on, a cold quick start at 2 threads is no
faster than at 1 in wall time while it costs more CPU, and beside a busy neighbour torch's
spinning OpenMP threads make 2 threads several times slower. The thread count is part of the
platform fingerprint (it changes how reductions split, so the last bits of every float),
and a lock made at one thread checks exactly on any runner. Real models on a many-core
machine want more: ``--threads 8`` or ``EDITFLOW_THREADS=8``.
"""

from __future__ import annotations

import os

from editflow.errors import EditflowError

THREADS_VARIABLE = "EDITFLOW_THREADS"
DEFAULT_THREADS = 1


def available_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_threads(flag: int | None) -> tuple[int, bool]:
    """(thread count, whether the user chose it) from ``--threads``, ``EDITFLOW_THREADS`` or
    the default.

    Raises:
        EditflowError: The flag or the variable is not a whole number >= 1.
    """
    if flag is not None:
        if flag < 1:
            raise EditflowError(f"must be >= 1, got {flag}", file="--threads")
        return flag, True
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_THREADS, False
    if not text.isdigit() or int(text) < 1:
        raise EditflowError(f"must be a whole number >= 1, got {text!r}", file=THREADS_VARIABLE)
    return int(text), True


def threads_for_check(chosen: int, by_user: bool, locked: int | None) -> int:
    """The thread count to check a lock with: the lock's, so bytes can match exactly, when
    the user chose none and this machine has the cores; else the chosen count."""
    if by_user or locked is None or locked > available_cores():
        return chosen
    return locked
