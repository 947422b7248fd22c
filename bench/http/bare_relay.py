"""The least a per-request HTTP/1.1 proxy on CPython + uvloop + httptools does: a
reference peer for bench/http/run.py.

Each request is parsed (httptools, no header callbacks) to find where it ends, sent on a
pooled keep-alive connection to the one backend, and the response parsed the same way to
know when that connection is free again; bytes pass unchanged both ways. No header
rewriting, health, retries, timeouts, limits or counters, and no pipelining: what it
reaches next to HAProxy is what these libraries give before any of mcsproxy's work
(issue 4 quoted such a prototype at 0.86x HAProxy's requests per second). Not for use in
front of anything: it buffers without bound and never times out.

    python bench/http/bare_relay.py LISTEN_IP:PORT BACKEND_IP:PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # nobody asked: out of step, or its client left
            self.transport.close()
            return
        client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if self.parser.should_keep_alive():
            self.pool.append(self)
        else:
            self.transport.close()
        if client is not None:
            client.up = None
            client.response_done()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int], pool: list[Upstream]) -> None:
        self.backend = backend
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.request: list[bytes] = []
        self.up: Upstream | None = None  # serving the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.request.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        data, self.request = b"".join(self.request), []
        if self.pool:
            up = self.up = self.pool.pop()
            up.client = self
            up.transport.write(data)
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: Upstream(self.pool),
                                                       *self.backend))
        task.add_done_callback(lambda t: self.connected(t, data))

    def connected(self, task: asyncio.Task[tuple[asyncio.Transport, Upstream]],
                  data: bytes) -> None:
        if task.cancelled() or task.exception() is not None:
            self.transport.close()
            return
        _, up = task.result()
        if self.transport.is_closing():
            up.transport.close()
            return
        self.up = up
        up.client = self
        up.transport.write(data)

    def response_done(self) -> None:
        if not self.parser.should_keep_alive():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        up, self.up = self.up, None
        if up is not None:  # a response still on its way: that connection cannot be reused
            up.client = None
            up.transport.close()


async def serve(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    pool: list[Upstream] = []
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(backend, pool), *listen, backlog=4096)
    await asyncio.Event().wait()


def address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    uvloop.run(serve(address(argv[0]), address(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
