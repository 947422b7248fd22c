"""Named, guarded background tasks: nothing runs fire-and-forget."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mcsproxy.logsetup import exception_line

log = logging.getLogger("mcsproxy.tasks")

T = TypeVar("T")


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


def in_daemon_thread(func: Callable[[], T], name: str) -> asyncio.Future[T]:
    """func() on a thread of its own, its result or exception in the future returned.

    For file system calls that may never return (a stat or read on an NFS volume whose
    server is gone, a stuck FUSE mount): asyncio.to_thread's executor threads are joined
    when the loop shuts down and again at interpreter exit, so one such call kept the
    gateway from ever exiting after "gateway stopped" (SIGTERM again did nothing; only
    SIGKILL). A daemon thread left behind does not hold the exit. Cancelling the future
    abandons the call."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def work() -> None:
        result: Any = None
        exc: BaseException | None = None
        try:
            result = func()
        except BaseException as e:
            exc = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
