"""Retries and request bodies, with real sockets: a body that was streamed (too large to
keep, or chunked) is never sent again, not even in part; a small body that was kept is
replayed whole; a failed connect sends nothing, so any body goes on to the next endpoint.

The first try goes to the local cluster's scripted endpoint (east); a retry can only go
to west, an `HttpBackend` that records every request and byte it gets."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

from mcsproxy.config import OutlierConfig
from tests.http_support import HTTP_PORT, HttpBackend, RawClient, start_backends
from tests.proxy_fixtures import Clusterset, endpoint, free_port

EAST = "127.211.9.1"  # the scripted endpoint; west-1 is on 127.211.1.1
BIG = 1 << 20  # over retry_buffer_bytes (64 KiB): streamed, never kept


class Scripted(asyncio.Protocol):
    """East's endpoint: reads until it has `after` bytes (head included), then resets
    (`answer` None) or writes `answer` and goes on reading."""

    def __init__(self, after: int, answer: bytes | None, seen: list[int]) -> None:
        self.after = after
        self.answer = answer
        self.seen = seen  # bytes received, per connection
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.seen.append(0)

    def data_received(self, data: bytes) -> None:
        self.seen[-1] += len(data)
        if self.done or self.seen[-1] < self.after:
            return
        self.done = True
        if self.answer is None:
            self.transport.abort()
        else:
            self.transport.write(self.answer)


SICK = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nsick"


@contextlib.asynccontextmanager
async def east_then_west(east: Callable[[], asyncio.Protocol] | None,
                         vip: str) -> AsyncIterator[HttpBackend]:
    """An HTTP service at vip:80 with east's endpoint (None: a port nobody listens on)
    and west-1; yields west-1."""
    loop = asyncio.get_running_loop()
    server = None
    if east is None:
        port = free_port(EAST)
    else:
        server = await loop.create_server(east, EAST, 0)
        port = server.sockets[0].getsockname()[1]
    [west] = await start_backends({"west": 1}, 211)
    cs = Clusterset("east")
    cs.publish("bodies", vip, [HTTP_PORT],
               [endpoint(EAST, "east", port), endpoint(west.host, "west", west.port)],
               traffic="PreferClose")  # east, the local cluster, first
    proxy = await cs.proxy(outlier=OutlierConfig(consecutive_failures=0))
    try:
        yield west
    finally:
        await proxy.stop()
        await west.stop()
        if server is not None:
            server.close()
            await server.wait_closed()


async def upload(client: RawClient, pieces: list[bytes], pause: float = 0.0) -> None:
    """Sends the pieces, `pause` seconds apart; a proxy that answered and closed early
    may reset the connection under it."""
    with contextlib.suppress(ConnectionError):
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)
            client.send(piece)
            await client.writer.drain()


def split(body: bytes, n: int) -> list[bytes]:
    step = -(-len(body) // n)
    return [body[i:i + step] for i in range(0, len(body), step)]


async def test_a_streamed_put_reset_mid_body_is_not_sent_anywhere_else() -> None:
    seen: list[int] = []
    async with east_then_west(lambda: Scripted(200_000, None, seen), "127.211.0.1") as west:
        client = await RawClient.open("127.211.0.1", 80)
        body = os.urandom(BIG)
        sending = asyncio.create_task(upload(client, [
            b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BIG,
            *split(body, 16)]))
        r = await client.response()
        assert r.status == 502 and b"upstream" in r.body, (r.status, r.body)
        await sending
        await client.close()
        await asyncio.sleep(0.1)
        assert len(seen) == 1 and 200_000 <= seen[0] < BIG  # east had part of it
        assert (west.connections, west.requests) == (0, [])  # and no one else any


async def test_a_streamed_put_answered_503_mid_body_gets_that_answer_not_a_retry() -> None:
    seen: list[int] = []
    async with east_then_west(lambda: Scripted(200_000, SICK, seen), "127.211.0.2") as west:
        client = await RawClient.open("127.211.0.2", 80)
        sending = asyncio.create_task(upload(client, [
            b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BIG,
            *split(os.urandom(BIG), 16)]))
        r = await client.response()
        assert (r.status, r.body) == (503, b"sick")
        await sending
        await client.close()
        assert (west.connections, west.requests) == (0, [])


async def test_a_small_put_answered_503_is_replayed_whole_elsewhere() -> None:
    body = os.urandom(60_000)  # under retry_buffer_bytes: kept for a replay
    head = b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    # East answers 503 once the whole request is in, or at the head with the body still
    # arriving (the replay then goes on with the rest as it comes).
    for vip, after, pause in (("127.211.0.3", len(head) + len(body), 0.0),
                              ("127.211.0.4", 1, 0.2)):
        seen: list[int] = []
        async with east_then_west(lambda a=after, s=seen: Scripted(a, SICK, s), vip) as west:
            client = await RawClient.open(vip, 80)
            sending = asyncio.create_task(upload(client, [head, *split(body, 4)], pause))
            r = await client.response()
            await sending
            assert (r.status, r.body == body) == (200, True), (vip, r.status, len(r.body))
            assert [(m, u) for m, u, _ in west.requests] == [(b"PUT", b"/echo")]
            assert len(seen) == 1
            await client.close()


async def test_a_small_put_reset_before_the_answer_is_replayed_whole_elsewhere() -> None:
    body = os.urandom(60_000)
    seen: list[int] = []
    async with east_then_west(lambda: Scripted(30_000, None, seen), "127.211.0.5") as west:
        client = await RawClient.open("127.211.0.5", 80)
        sending = asyncio.create_task(upload(client, [
            b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body),
            *split(body, 4)], 0.1))
        r = await client.response()
        await sending
        assert (r.status, r.body == body) == (200, True)
        assert len(west.requests) == 1 and len(seen) == 1
        await client.close()


def chunked(body: bytes, n: int) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in split(body, n)] + [b"0\r\n\r\n"]


async def test_a_chunked_put_whose_endpoint_resets_while_it_arrives_is_not_retried() -> None:
    seen: list[int] = []
    async with east_then_west(lambda: Scripted(20_000, None, seen), "127.211.0.6") as west:
        client = await RawClient.open("127.211.0.6", 80)
        sending = asyncio.create_task(upload(client, [
            b"PUT /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            *chunked(os.urandom(40_000), 4)], 0.1))
        r = await client.response()
        assert r.status == 502, (r.status, r.body)
        await sending
        await client.close()
        assert (west.connections, west.requests) == (0, [])


async def test_after_a_failed_connect_any_body_goes_whole_to_the_next_endpoint() -> None:
    # Nothing was sent: the body still arriving (chunked, or too large to keep) is held
    # until the next endpoint's connection is up, then streamed to it, whole.
    async with east_then_west(None, "127.211.0.7") as west:
        client = await RawClient.open("127.211.0.7", 80)
        small = os.urandom(40_000)
        sending = asyncio.create_task(upload(client, [
            b"PUT /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            *chunked(small, 4)], 0.05))
        r = await client.response()
        await sending
        assert (r.status, r.body == small) == (200, True)
        big = os.urandom(4 * BIG)  # beyond every buffer: the client is paused meanwhile
        sending = asyncio.create_task(upload(client, [
            b"PUT /count HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(big),
            *split(big, 64)]))
        r = await client.response()
        await sending
        assert (r.status, r.body) == (200, str(len(big)).encode())
        assert [u for _, u, _ in west.requests] == [b"/echo", b"/count"]
        await client.close()


async def test_a_head_with_a_body_answered_503_at_its_head_leaves_no_pooled_connection() -> None:
    # Retried while its body is still on the way: the endpoint connection waits for
    # the rest of that body and must be closed, not pooled for the next request.
    seen: list[int] = []
    bodiless = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\n"
    async with east_then_west(lambda: Scripted(1, bodiless, seen), "127.211.0.8") as west:
        client = await RawClient.open("127.211.0.8", 80)
        try:
            for _ in range(2):
                sending = asyncio.create_task(upload(client, [
                    b"HEAD /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n",
                    b"ab", b"cd"], 0.2))
                r = await client.response(head=True)
                await sending
                assert (r.status, r.headers[b"x-backend"]) == (200, b"west-1")
            assert len(seen) == 2  # a new connection to east each time
            assert [m for m, _, _ in west.requests] == [b"HEAD", b"HEAD"]
        finally:
            await client.close()
