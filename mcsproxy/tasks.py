"""Named, guarded background tasks: nothing runs fire-and-forget."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from mcsproxy.logsetup import exception_line

log = logging.getLogger("mcsproxy.tasks")


def _guard(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        # One line, like every other event; the traceback is for whoever turned debug on.
        if log.isEnabledFor(logging.DEBUG):
            log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)
        else:
            log.error("task %s failed: %s", task.get_name(), exception_line(exc))
    else:
        log.debug("task %s finished", task.get_name())


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Start `coro` as a named task whose unexpected end is logged, never lost."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_guard)
    return task


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
