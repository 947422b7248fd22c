"""Large Content-Length response bodies: whole and the endpoint connection in step
however the endpoint's reads fall (with the head, alone, split inside, after a 100
Continue), and an endpoint that sends too much or too little, or announces a length for
an answer without a body, is caught."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.http_support import RawClient, protocol_behind_proxy, read_to_the_end

BODY = bytes(range(256)) * 400  # 100 KiB, every offset distinguishable mod 256
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Big: 1\r\n\r\n" % len(BODY)
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall"


class Scripted(asyncio.Protocol):
    """Answers each request with the next script of `answers`: byte pieces written 15 ms
    apart (so each is likely a read of its own at the gateway), then closes if the
    script says so. Counts its connections."""

    answers: list[tuple[list[bytes], bool]] = []
    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        type(self).connections += 1

    def data_received(self, data: bytes) -> None:
        pieces, close = type(self).answers.pop(0)
        loop = asyncio.get_running_loop()
        for i, piece in enumerate(pieces):
            loop.call_later(0.015 * i, self.transport.write, piece)
        if close:
            loop.call_later(0.015 * len(pieces), self.transport.close)


@contextlib.asynccontextmanager
async def client_of(answers: list[tuple[list[bytes], bool]], n: int) -> AsyncIterator[RawClient]:
    """A client of a service at 127.240.97.n whose one endpoint (127.97.1.n) is Scripted
    with these answers, through a gateway."""
    Scripted.connections = 0
    Scripted.answers = answers
    async with protocol_behind_proxy(Scripted, f"127.97.1.{n}", f"127.240.97.{n}", f"big{n}"):
        client = await RawClient.open(f"127.240.97.{n}", 80)
        try:
            yield client
        finally:
            await client.close()


SPLITS = {
    "head and body in one write": [HEAD + BODY],
    "head alone, then the body in three": [HEAD, BODY[:30000], BODY[30000:30001], BODY[30001:]],
    "head with the body's first bytes, then the rest": [HEAD + BODY[:10], BODY[10:]],
    "head split inside, then the body": [HEAD[:20], HEAD[20:] + BODY[:5000], BODY[5000:]],
    "after a 100 Continue in the same write": [b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD
                                               + BODY[:40000], BODY[40000:]],
}


@pytest.mark.parametrize("split", list(SPLITS))
async def test_a_large_body_arrives_whole_and_the_connection_stays_in_step(split: str) -> None:
    answers = [(SPLITS[split], False), ([SMALL], False), ([HEAD + BODY], False)]
    async with client_of(answers, 1) as client:
        first = await client.get("/big")
        if first.status == 100:  # forwarded to an HTTP/1.1 client, then the answer
            first = await client.response()
        assert (first.status, first.headers[b"x-big"]) == (200, b"1")
        assert first.body == BODY
        assert (await client.get("/small")).body == b"small"  # the next answer, in step
        assert (await client.get("/big")).body == BODY
        assert Scripted.connections == 1  # reused after each body


@pytest.mark.parametrize("status", [b"304 Not Modified", b"204 No Content"])
async def test_a_large_length_on_an_answer_without_a_body_waits_for_none(status: bytes) -> None:
    # A 304 announces the length of what it did not send (RFC 9110 8.6); a 204 with one
    # is wrong but has no body either. Nothing follows their heads.
    head = b"HTTP/1.1 %b\r\nContent-Length: %d\r\n\r\n" % (status, len(BODY))
    async with client_of([([head], False), ([SMALL], False)], 4) as client:
        assert (await client.get("/cached")).status == int(status[:3])
        assert (await client.get("/small")).body == b"small"
        assert Scripted.connections == 1


async def test_bytes_after_a_large_body_end_that_endpoint_connection() -> None:
    # An endpoint that sends more than it announced is out of step: the answer goes
    # out whole (as when llhttp read it), the connection to it is not used again.
    answers = [([HEAD + BODY + b"HTTP/1.1 200 OK\r\n"], False), ([SMALL], False)]
    async with client_of(answers, 2) as client:
        assert (await client.get("/big")).body == BODY
        assert (await client.get("/small")).body == b"small"
        assert Scripted.connections == 2


async def test_an_endpoint_closing_inside_a_large_body_cuts_the_answer() -> None:
    # Fewer bytes than announced, then the close: the client must not take the answer
    # for a whole one, so its connection ends before the announced length, with RST
    # after the bytes that came.
    async with client_of([([HEAD + BODY[:50000]], True)], 3) as client:
        client.send(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await read_to_the_end(client.reader) == (BODY[:50000], "RST")
