"""Readiness of the TCP proxy's sockets through an epoll of our own, nested in the loop's.

The loop watches one descriptor, this epoll's; when it is readable, `ready` takes its
events (an epoll_wait that does not wait) and calls each socket's reader or writer.

Why not the loop's own add_reader/add_writer, per socket: uvloop looks every descriptor
up in its registry of transports on each add and remove, a KeyError raised and caught in
interpreted code (~2.4k instructions a call), and libuv's poll handles check a new
descriptor with an epoll ADD and DEL, set it non-blocking again (an ioctl) and drop it
from the epoll when reading stops. A proxied short connection cost 12 epoll_ctl and
4 ioctl and ~20k instructions in add_reader/remove_reader; here one epoll ADD per
socket, a MOD when what it waits for changes, a DEL before it is closed.

Level-triggered, like the loop: a socket whose callback left data unread is reported
again next poll. Every socket is removed (its reader and writer) before it is closed:
`masks` is what the kernel holds, and a closed socket leaves the epoll on its own. A
descriptor dropped while a batch of events is dispatched is skipped for the rest of that
batch: its number may already belong to a new socket (a retried connect), which must not
be told it is ready when it is not.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Final

READABLE: Final = select.EPOLLIN
WRITABLE: Final = select.EPOLLOUT
# Reported whether asked for or not: the reader and the writer are both called, and the
# call on the socket tells them what happened.
TROUBLE: Final = select.EPOLLERR | select.EPOLLHUP
# Events taken per poll; more wait for the next (level-triggered, nothing is lost).
MAX_EVENTS: Final = 256


class Poller:
    """One per loop (ProxyManager owns it): every proxied socket's reader and writer."""

    __slots__ = ("dispatching", "epoll", "loop", "masks", "readers", "stale", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.masks: dict[int, int] = {}  # what each registered descriptor waits for
        self.dispatching = False
        self.stale: set[int] = set()  # dropped during the batch being dispatched
        loop.add_reader(self.epoll.fileno(), self.ready)

    def close(self) -> None:
        """Stop watching (the sockets registered are their connections' to close)."""
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
        self.readers.clear()
        self.writers.clear()
        self.masks.clear()

    # Each change computes the new mask from the one held in `masks` (not from membership
    # of `readers` and `writers`): compiled, every dict look-up boxes the descriptor and
    # costs ~110 instructions, and four changes a short connection did three each.
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback
        self.change(fd, self.masks.get(fd, 0), READABLE, 0)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback
        self.change(fd, self.masks.get(fd, 0), WRITABLE, 0)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self.change(fd, self.masks.get(fd, 0), 0, READABLE)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self.change(fd, self.masks.get(fd, 0), 0, WRITABLE)

    def change(self, fd: int, old: int, add: int, drop: int) -> None:
        """`old` (what the kernel holds for `fd`) with `add` set and `drop` cleared."""
        mask = (old | add) & ~drop
        if mask == old:
            return
        if not mask:
            # Unregistered rather than left with an empty mask: EPOLLHUP is reported
            # regardless, and level-triggered it would wake the loop on every poll.
            del self.masks[fd]
            self.epoll.unregister(fd)
            if self.dispatching:
                self.stale.add(fd)
        elif not old:
            self.epoll.register(fd, mask)
            self.masks[fd] = mask
        else:
            self.epoll.modify(fd, mask)
            self.masks[fd] = mask

    def ready(self) -> None:
        """The loop's reader of the epoll: dispatch what it reports."""
        try:
            events = self.epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        stale = self.stale
        self.dispatching = True
        try:
            for fd, ev in events:
                if ev & (READABLE | TROUBLE):
                    if stale and fd in stale:
                        continue
                    reader = self.readers.get(fd)
                    if reader is not None:
                        reader()
                if ev & (WRITABLE | TROUBLE):
                    if stale and fd in stale:
                        continue
                    writer = self.writers.get(fd)
                    if writer is not None:
                        writer()
        finally:
            self.dispatching = False
            if stale:
                stale.clear()
