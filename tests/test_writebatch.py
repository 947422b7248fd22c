"""Short writes held until the end of the poll (mcsproxy/writebatch.py): they go out in
order, and every TCP path that half-closes or closes a transport writes what is held for
it first. The end-to-end proxy tests cannot pin this down: libuv reads a socket's EOF a
poll after its data, by which time the batch has run, so the orderings that need the
flushes (another connection's event closing this one within the same poll) are made here
with recording transports."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mcsproxy.config import ProxyConfig
from mcsproxy.proxy.context import ListenerContext
from mcsproxy.proxy.tcp import ClientSide, UpstreamSide
from mcsproxy.upstream import UpstreamSet
from mcsproxy.writebatch import WriteBatch


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


def connection() -> tuple[ClientSide, Recording, Recording]:
    """A client connection whose upstream is connected, on recording transports."""
    config = ProxyConfig()
    ctx = ListenerContext("test", UpstreamSet("ns/s:p", "east", config), config, set())
    client = ClientSide(ctx, asyncio.get_running_loop())
    down, up = Recording(), Recording()
    client.transport = down  # type: ignore[assignment]
    client.up = up  # type: ignore[assignment]
    return client, down, up


async def test_tcp_held_reply_goes_before_the_close_that_both_eofs_make() -> None:
    client, down, _ = connection()
    client.got_client_eof = True  # the client half-closed earlier
    UpstreamSide(client).data_received(b"reply")
    assert client.upstream_eof() is False  # both ways done: close_both, in this poll
    assert down.events == [("write", b"reply"), "close"]


async def test_tcp_held_request_goes_before_the_eof_forwarded_upstream() -> None:
    client, _, up = connection()
    client.data_received(b"request")
    client.eof_received()
    assert up.events == [("write", b"request"), "eof"]


async def test_tcp_held_reply_goes_before_the_close_when_the_endpoint_ends() -> None:
    client, down, _ = connection()
    UpstreamSide(client).data_received(b"last words")
    client.upstream_lost(None)
    assert down.events == [("write", b"last words"), "close"]


async def test_tcp_held_request_goes_before_the_close_when_the_client_ends() -> None:
    client, _, up = connection()
    client.data_received(b"final")
    client.connection_lost(None)
    assert up.events == [("write", b"final"), "close"]


async def test_tcp_held_reply_goes_before_a_forwarded_eof() -> None:
    client, down, _ = connection()
    UpstreamSide(client).data_received(b"tail")
    client.forward_upstream_eof()
    assert down.events == [("write", b"tail"), "eof"]


class Stalled(Recording):
    """A side whose peer reads nothing: what is written stays queued in the transport."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.queued += len(data)

    def get_write_buffer_size(self) -> int:
        return self.queued


async def test_tcp_idle_expiry_counts_held_bytes_as_queued() -> None:
    # A close would wait for a peer that reads nothing for ever (and keep the connection
    # and its limit slot): expiry aborts a side with bytes still queued, the held included.
    client, _, up = connection()
    stalled = Stalled()
    client.transport = stalled  # type: ignore[assignment]
    UpstreamSide(client).data_received(b"unread")
    client.expire()
    assert stalled.events == [("write", b"unread"), "abort"] and up.events == ["abort"]


async def test_tcp_idle_expiry_closes_when_nothing_is_queued() -> None:
    client, down, up = connection()
    UpstreamSide(client).data_received(b"tail")
    client.expire()
    assert down.events == [("write", b"tail"), "close"] and up.events == ["close"]


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
