"""Background tasks an object owns: kept alive until they end, failures logged, cancelled at close.

asyncio keeps only weak references to tasks, so a task nobody holds can vanish mid-flight, and a failure
nobody retrieves is reported late and far from its cause ("Task exception was never retrieved"). Every
object of the stack that starts work of its own (the proxy's lookups, the transport's connects, the user
agent's refreshes and keep-alives, the events agent, the presence agent) holds it in one of these.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Background"]


class Background:
    """The running tasks of one owner. ``what`` names them in the log line of a failure."""

    def __init__(self, log: logging.Logger, what: str = "background task") -> None:
        self._log = log
        self._what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``work`` as a task held until it ends; an exception it ends with is logged (a warning)."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self.add(task)
        return task

    def add(self, task: asyncio.Task[Any]) -> None:
        """Hold a task started elsewhere (e.g. the one serving a connection) the same way."""
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.warning("%s failed: %r", self._what, task.exception())

    def cancel(self) -> None:
        """Cancel every task still running: on close."""
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))
