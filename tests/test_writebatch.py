"""Short writes held until the end of the poll (mcsproxy/writebatch.py): they go out in
order, and every TCP path that half-closes or closes a transport writes what is held for
it first. The end-to-end proxy tests cannot pin this down: libuv reads a socket's EOF a
poll after its data, by which time the batch has run, so the orderings that need the
flushes (another connection's event closing this one within the same poll) are made here
with recording transports, and for the TCP proxy's own sockets with socket pairs whose
events are handed to it one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from mcsproxy.config import ProxyConfig
from mcsproxy.proxy.context import ListenerContext
from mcsproxy.proxy.tcp import Side, TcpConnection
from mcsproxy.upstream import UpstreamSet
from mcsproxy.writebatch import HOLD_BELOW, WriteBatch


class Recording:
    """What a proxy did to one side, in order."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, bytes] | str] = []
        self.closing = False
        self.fail = fail

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("write refused")
        self.events.append(("write", data))

    def write_eof(self) -> None:
        self.events.append("eof")

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def get_write_buffer_size(self) -> int:
        return 0


async def test_writes_wait_for_the_loop_and_keep_their_order() -> None:
    batch, loop = WriteBatch(), asyncio.get_running_loop()
    a, b = Recording(), Recording()
    batch.write(loop, a, b"1")  # type: ignore[arg-type]
    batch.write(loop, b, b"x")  # type: ignore[arg-type]
    batch.write(loop, a, b"2")  # type: ignore[arg-type]
    assert a.events == [] and b.events == []
    await asyncio.sleep(0)
    assert a.events == [("write", b"1"), ("write", b"2")] and b.events == [("write", b"x")]
    batch.write(loop, a, b"3")  # type: ignore[arg-type]
    batch.flush()  # at once, as a close path does; the scheduled flush then finds nothing
    assert a.events[-1] == ("write", b"3")
    await asyncio.sleep(0)
    assert len(a.events) == 3


async def test_a_closed_transport_gets_nothing_and_a_failing_one_is_aborted(
        caplog: pytest.LogCaptureFixture) -> None:
    batch, loop = WriteBatch(), asyncio.get_running_loop()
    gone, failing, fine = Recording(), Recording(fail=True), Recording()
    for t in (gone, failing, fine):
        batch.write(loop, t, b"data")  # type: ignore[arg-type]
    gone.close()
    with caplog.at_level(logging.ERROR, logger="mcsproxy.writebatch"):
        await asyncio.sleep(0)
    assert gone.events == ["close"]
    assert failing.events == ["abort"]  # cut: its peer must not take it for whole
    assert fine.events == [("write", b"data")]  # after the failure, the rest still goes
    assert "held write" in caplog.text and "write refused" in caplog.text


async def test_deferred_flushers_run_and_a_failing_one_is_aborted() -> None:
    batch, loop = WriteBatch(), asyncio.get_running_loop()
    ran: list[str] = []

    class Flusher:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def flush_deferred(self) -> None:
            if self.fail:
                raise RuntimeError("boom")
            ran.append(self.name)

        def abort(self) -> None:
            ran.append(f"abort {self.name}")

    batch.later(loop, Flusher("a"))
    batch.later(loop, Flusher("b", fail=True))
    batch.later(loop, Flusher("c"))
    assert ran == []
    await asyncio.sleep(0)
    assert ran == ["a", "abort b", "c"]


def test_a_batch_left_pending_by_an_ended_loop_serves_the_next() -> None:
    batch = WriteBatch()
    first, second = Recording(), Recording()

    async def hold_and_end() -> None:
        batch.write(asyncio.get_running_loop(), first, b"never run")  # type: ignore[arg-type]

    async def write_and_wait() -> None:
        batch.write(asyncio.get_running_loop(), second, b"2")  # type: ignore[arg-type]
        await asyncio.sleep(0)

    asyncio.run(hold_and_end())  # its loop closes with the flush still scheduled
    asyncio.run(write_and_wait())
    assert second.events == [("write", b"2")]


@contextlib.contextmanager
def connection() -> Iterator[tuple[TcpConnection, socket.socket, socket.socket]]:
    """A connected TCP connection on socket pairs, and its client's and endpoint's ends."""
    config = ProxyConfig()
    ctx = ListenerContext("test", UpstreamSet("ns/s:p", "east", config), config, set())
    ours_c, client = socket.socketpair()
    ours_u, endpoint = socket.socketpair()
    for sock in (ours_c, ours_u, client, endpoint):
        sock.setblocking(False)
    conn = TcpConnection(ctx, asyncio.get_running_loop(), ours_c, None)
    conn.up = Side(ours_u)
    conn.connected = True
    try:
        yield conn, client, endpoint
    finally:
        conn.abort()
        client.close()
        endpoint.close()


def received(sock: socket.socket) -> list[bytes]:
    """What is readable now, then b"" if the stream ended, or nothing if it is open."""
    got = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return got
        got.append(data)
        if not data:
            return got


async def test_tcp_held_reply_goes_before_the_close_that_both_eofs_make() -> None:
    with connection() as (conn, client, endpoint):
        assert conn.up is not None
        client.shutdown(socket.SHUT_WR)  # the client half-closed earlier
        conn.client_readable()
        assert received(endpoint) == [b""]
        endpoint.send(b"reply")
        conn.upstream_readable()
        assert received(client) == []  # held for the end of the poll
        endpoint.shutdown(socket.SHUT_WR)
        conn.upstream_readable()  # both ways done: closed, in this poll, the reply first
        assert received(client) == [b"reply", b""] and conn.closed


@pytest.mark.parametrize("towards_endpoint", [True, False], ids=["request", "reply"])
async def test_tcp_held_bytes_go_before_the_eof_passed_on(towards_endpoint: bool) -> None:
    with connection() as (conn, client, endpoint):
        sender, receiver = (client, endpoint) if towards_endpoint else (endpoint, client)
        read, read_back = ((conn.client_readable, conn.upstream_readable) if towards_endpoint
                           else (conn.upstream_readable, conn.client_readable))
        sender.send(b"last")
        read()
        sender.shutdown(socket.SHUT_WR)
        read()
        assert received(receiver) == [b"last", b""]
        assert not conn.closed  # the other direction stays open
        receiver.send(b"answer")
        read_back()
        conn.flush_deferred()  # as the batch does at the end of the poll
        assert received(sender) == [b"answer"]


async def test_tcp_held_bytes_wait_for_the_batch() -> None:
    with connection() as (conn, client, endpoint):
        batch = conn.ctx.writes
        client.send(b"one")
        conn.client_readable()
        endpoint.send(b"two")
        conn.upstream_readable()
        assert received(endpoint) == [] and received(client) == []
        batch.flush()
        assert received(endpoint) == [b"one"] and received(client) == [b"two"]


async def test_tcp_a_direction_that_carried_bulk_data_is_never_held() -> None:
    # A busy stream brings many reads under HOLD_BELOW between its bulk ones: copying and
    # holding each cost 8 iperf3 streams 14 % of their throughput.
    with connection() as (conn, client, endpoint):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        bulk = os.urandom(HOLD_BELOW)
        endpoint.sendall(bulk)
        conn.upstream_readable()
        assert b"".join(received(client)) == bulk  # written at once
        endpoint.send(b"short")
        conn.upstream_readable()
        assert received(client) == [b"short"]  # and so is what follows
        client.send(b"short")
        conn.client_readable()
        assert received(endpoint) == []  # the other direction is still held


async def test_tcp_a_bulk_read_that_fills_the_buffer_is_followed_by_another() -> None:
    # As libuv reads a stream: fewer trips through the loop's poll per MiB.
    from mcsproxy.proxy.tcp import READ_BUFFER_BYTES

    with connection() as (conn, client, endpoint):
        assert conn.up is not None
        for sock in (client, endpoint, conn.client.sock, conn.up.sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        data = os.urandom(3 * READ_BUFFER_BYTES)
        endpoint.sendall(data)
        conn.upstream_readable()  # one readiness event
        assert b"".join(received(client)) == data


async def test_tcp_idle_expiry_writes_what_is_held_then_closes() -> None:
    with connection() as (conn, client, endpoint):
        endpoint.send(b"last")
        conn.upstream_readable()
        conn.expire()
        assert received(client) == [b"last", b""] and received(endpoint) == [b""]
        assert conn.closed


async def test_http_held_answer_goes_before_the_close_a_client_eof_makes() -> None:
    from mcsproxy.http.engine import HttpEngine
    from mcsproxy.http.server import ClientConnection

    engine = HttpEngine(ProxyConfig())
    engine.loop = asyncio.get_running_loop()  # as start() sets it
    conn = ClientConnection(engine, None)
    down = Recording()
    conn.transport = down  # type: ignore[assignment]
    conn.out.append(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.flush_soon()
    assert down.events == []  # held for the end of the poll
    assert conn.eof_received() is False  # nothing in flight: the transport closes now
    assert down.events == [("write", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]
