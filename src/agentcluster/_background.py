"""Background tasks a node service owns.

Theory of operation: a service that starts work nobody awaits (publishing an event, running a
proposal, answering a stream) keeps each task in a set -- so it is not collected mid-flight and
``close`` can cancel and await it -- and must retrieve each task's failure, or asyncio reports
"Task exception was never retrieved" when the task is collected, long after the cause.
:func:`spawn_owned` does both: the finished task leaves the set and its failure, if any, is
logged once, under the service's logger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["spawn_owned"]


def spawn_owned(
    tasks: set[asyncio.Task[Any]],
    coro: Coroutine[Any, Any, Any],
    log: logging.Logger,
    *,
    name: str | None = None,
) -> asyncio.Task[Any]:
    """Start ``coro`` as a task held in ``tasks`` until it ends; a failure is logged."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)

    def finished(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and (exc := t.exception()) is not None:
            # Info, not error: the work reports its own outcome where it matters (a decision
            # that never comes, a reply that times out); this only keeps the loop quiet.
            log.info("background task %s failed: %r", t.get_name(), exc)

    task.add_done_callback(finished)
    return task
