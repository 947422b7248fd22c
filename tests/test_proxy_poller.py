"""The TCP proxy's own epoll (mcsproxy/proxy/poller.py), on real socket pairs."""

from __future__ import annotations

import asyncio
import socket

from mcsproxy.proxy.poller import READABLE, WRITABLE, Poller
from tests.proxy_fixtures import until


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def polled_since(poller: Poller) -> None:
    """Returns once the poller has dispatched a batch taken after this call: a sentinel
    socket made readable now is seen then, and so is whatever was ready before it."""
    sentinel, peer = pair()
    seen: list[bool] = []
    poller.add_reader(sentinel.fileno(), lambda: seen.append(bool(sentinel.recv(1))))
    peer.send(b"!")
    try:
        await until(lambda: seen, "the sentinel's readiness")
    finally:
        poller.remove_reader(sentinel.fileno())
        sentinel.close()
        peer.close()


async def test_reader_and_writer_are_called_while_registered_and_not_after() -> None:
    poller = Poller(asyncio.get_running_loop())
    a, b = pair()
    reads: list[bytes] = []
    writable = 0

    def on_read() -> None:
        reads.append(a.recv(100))

    def on_write() -> None:
        nonlocal writable
        writable += 1
        poller.remove_writer(a.fileno())

    try:
        poller.add_reader(a.fileno(), on_read)
        poller.add_writer(a.fileno(), on_write)
        assert poller.masks[a.fileno()] == READABLE | WRITABLE
        b.send(b"one")
        await until(lambda: reads and writable, "the reader and the writer")
        assert reads == [b"one"] and writable == 1
        poller.remove_reader(a.fileno())
        assert a.fileno() not in poller.masks  # nothing waited for: out of the epoll
        b.send(b"two")
        await polled_since(poller)
        assert reads == [b"one"]  # not called once removed
        assert a.recv(100) == b"two"  # the data stayed for whoever reads next
    finally:
        poller.close()
        a.close()
        b.close()


async def test_a_hang_up_with_nothing_registered_does_not_wake_the_loop() -> None:
    """EPOLLHUP is reported whether asked for or not: a socket left in the epoll with an
    empty mask would be reported on every poll. Removing the last callback unregisters."""
    loop = asyncio.get_running_loop()
    poller = Poller(loop)
    polls = 0
    ready = poller.ready

    def counting_ready() -> None:
        nonlocal polls
        polls += 1
        ready()

    loop.remove_reader(poller.epoll.fileno())
    loop.add_reader(poller.epoll.fileno(), counting_ready)
    a, b = pair()
    try:
        poller.add_reader(a.fileno(), lambda: None)
        poller.remove_reader(a.fileno())
        b.close()  # a now hangs up
        await polled_since(poller)
        seen = polls
        for _ in range(3):  # loop passes: a level-triggered hang-up would be polled in each
            await asyncio.sleep(0)
        assert polls == seen
    finally:
        poller.close()
        a.close()


async def test_a_descriptor_dropped_mid_batch_is_skipped_even_if_its_number_is_reused() -> None:
    """Two sockets readable in one batch; the first callback closes the other and a new
    socket takes its descriptor number (as a retried connect does). The batch's event for
    the old socket must not reach the new socket's reader: it is not readable."""
    poller = Poller(asyncio.get_running_loop())
    a1, a2 = pair()
    b1, b2 = pair()
    called: list[str] = []
    made: list[socket.socket] = []
    reused: list[bool] = []

    def first(mine: socket.socket, other: socket.socket) -> None:
        called.append("first")
        mine.recv(100)
        poller.remove_reader(mine.fileno())
        number = other.fileno()
        poller.remove_reader(number)
        other.close()
        new, peer = pair()
        made.extend((new, peer))
        reused.append(new.fileno() == number)  # the kernel gives the lowest free number
        poller.add_reader(new.fileno(), lambda: called.append("new socket"))

    try:
        poller.add_reader(a1.fileno(), lambda: first(a1, b1) if not called else None)
        poller.add_reader(b1.fileno(), lambda: first(b1, a1) if not called else None)
        a2.send(b"x")  # both readable before the loop next polls: one batch
        b2.send(b"x")
        await until(lambda: called, "the first reader")
        await polled_since(poller)
        assert reused == [True], "the closed descriptor's number was not reused"
        assert called == ["first"]
        assert not poller.stale and not poller.dispatching
    finally:
        poller.close()
        for s in (a1, a2, b1, b2, *made):
            s.close()


async def test_a_failing_callback_leaves_the_poller_working() -> None:
    loop = asyncio.get_running_loop()
    errors: list[BaseException | None] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    poller = Poller(loop)
    a, b = pair()
    reads: list[bytes] = []
    fail = True

    def on_read() -> None:
        nonlocal fail
        data = a.recv(100)
        if fail:
            fail = False
            raise RuntimeError("boom")
        reads.append(data)

    try:
        poller.add_reader(a.fileno(), on_read)
        b.send(b"1")
        await until(lambda: errors, "the failing callback")
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        assert not poller.dispatching
        b.send(b"2")
        await until(lambda: reads, "the next read")
        assert reads == [b"2"]
    finally:
        loop.set_exception_handler(None)
        poller.close()
        a.close()
        b.close()


async def test_close_stops_watching_and_closes_the_epoll() -> None:
    loop = asyncio.get_running_loop()
    poller = Poller(loop)
    fd = poller.epoll.fileno()
    a, b = pair()
    try:
        poller.add_reader(a.fileno(), lambda: None)
        poller.close()
        assert poller.epoll.closed and not poller.masks
        assert not loop.remove_reader(fd)  # already removed
        poller.close()  # twice is harmless
    finally:
        a.close()
        b.close()

