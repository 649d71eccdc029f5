"""Writes handed to one background thread, in order, and waited for together."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BackgroundWrites:
    """Runs the calls given to ``submit`` one after another on a thread of its own.

    ``finish`` waits for every call and shuts the thread down; it raises the first failure
    unless told not to (when the caller is already handling an error of its own).
    """

    def __init__(self, thread_name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._calls: list[Future[Any]] = []

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        call = self._pool.submit(function, *args)
        self._calls.append(call)
        return call

    def finish(self, raise_errors: bool = True) -> None:
        try:
            for call in self._calls:
                if raise_errors:
                    call.result()
                else:
                    call.exception()
        finally:
            self._pool.shutdown(wait=True)
