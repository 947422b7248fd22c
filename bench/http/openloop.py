"""An open-loop HTTP/1.1 keep-alive load client: requests at a fixed rate, latency per request.

wrk is closed-loop: it keeps its connections busy, so its latency at saturation mostly
restates the proxy's maximum rate (Little's law). Here requests are due on a fixed
schedule over a set of keep-alive connections; a request due while every connection is
busy waits for the first one free, and its latency counts from when it was issued, so
a proxy that falls behind shows it instead of hiding it (no coordinated omission). Issued
is when the client's timer let it go: uvloop's timers tick in milliseconds, so requests
leave in small bursts, and that lateness is the client's, not the proxy's.

Runs in the calling process on uvloop; the caller pins it (bench.common.on_load_core).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from httptools import HttpResponseParser

CONNECT_TIMEOUT_S = 5.0
# A run's whole budget beyond its nominal length: a stalled proxy fails the run, never hangs it.
DRAIN_TIMEOUT_S = 10.0


class Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed by llhttp."""

    def __init__(self, client: OpenLoop) -> None:
        self.client = client
        self.parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.issued = 0.0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.client.answered(self, self.status)

    def send(self, issued: float) -> None:
        self.issued = issued  # earlier than now when it waited for a free connection
        assert self.transport is not None
        self.transport.write(self.client.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.broken(self)


class OpenLoop:
    def __init__(self, request: bytes, expected: int) -> None:
        self.request = request
        self.total = expected
        self.samples: list[float] = []
        self.errors = 0
        self.idle: deque[Conn] = deque()
        self.backlog: deque[float] = deque()  # issue times of requests waiting for a connection
        self.done = asyncio.get_running_loop().create_future()

    def issue(self, now: float) -> None:
        if self.idle:
            self.idle.popleft().send(now)
        else:
            self.backlog.append(now)

    def answered(self, conn: Conn, status: int) -> None:
        self.samples.append(time.perf_counter() - conn.issued)
        if status != 200:
            self.errors += 1
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)
        self.check_done()

    def broken(self, conn: Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        elif not self.done.done():
            self.errors += 1  # a request in flight on it is lost
            self.check_done()

    def check_done(self) -> None:
        if len(self.samples) + self.errors >= self.total and not self.done.done():
            self.done.set_result(None)


async def _run(ip: str, port: int, path: str, rate: float, seconds: float,
               conns: int) -> tuple[list[float], int]:
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    request = f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: openloop\r\n\r\n".encode()
    client = OpenLoop(request, n)
    opened: list[Conn] = []
    try:
        for _ in range(conns):
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(lambda: Conn(client), ip, port)
            opened.append(conn)
            client.idle.append(conn)
        start = time.perf_counter() + 0.01
        interval = 1 / rate
        for i in range(n):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            client.issue(time.perf_counter())
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await client.done
    finally:
        for conn in opened:
            if conn.transport is not None:
                conn.transport.close()
    return client.samples, client.errors


def fixed_rate(ip: str, port: int, path: str, rate: float, seconds: float,
               conns: int = 32) -> tuple[float, float]:
    """p50 and p99 in µs of `rate` requests per second for `seconds` over `conns`
    keep-alive connections; any failed request fails the run."""
    import uvloop

    samples, errors = uvloop.run(_run(ip, port, path, rate, seconds, conns))
    if errors:
        raise RuntimeError(f"{errors} failed requests at {rate:.0f}/s to {ip}:{port}")
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6
