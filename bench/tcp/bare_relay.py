"""The least a TCP relay on CPython + uvloop does: a reference peer for bench/tcp/run.py.

A pair of asyncio Protocols per connection, written the way the asyncio documentation
suggests (the upstream connect in a Task), with backpressure both ways and half-close,
and nothing else: no endpoint choice, retries, timeouts, health, limits or counters. What
it reaches next to HAProxy is what this interpreter and event loop give before any of
mcsproxy's work (issue 3 quoted such a prototype at 0.58x HAProxy's connection rate).
Not for use in front of anything: it buffers a client's early bytes without bound.

    python bench/tcp/bare_relay.py LISTEN_IP PORT:BACKEND_IP:BACKEND_PORT [...]
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class UpstreamSide(asyncio.Protocol):
    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        return self.client.upstream_eof()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.up: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.client_eof = self.upstream_eof_seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: UpstreamSide(self), *self.backend))
        task.add_done_callback(self.connected)

    def connected(self, task: asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.transport.abort()
            return
        up, _ = task.result()
        if self.transport.is_closing():
            up.close()
            return
        self.up = up
        for data in self.early:
            up.write(data)
        self.early.clear()
        if self.client_eof:
            up.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.up is None:
            return True
        if self.upstream_eof_seen:
            self.up.close()
            return False  # both directions done
        self.up.write_eof()
        return True

    def upstream_eof(self) -> bool:
        self.upstream_eof_seen = True
        if self.client_eof:
            self.transport.close()
            return False
        self.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def serve(listen_ip: str, routes: list[tuple[int, tuple[str, int]]]) -> None:
    loop = asyncio.get_running_loop()
    for port, backend in routes:
        await loop.create_server(lambda b=backend: ClientSide(b), listen_ip, port, backlog=4096)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    routes = []
    for spec in argv[1:]:
        port, ip, backend_port = spec.split(":")
        routes.append((int(port), (ip, int(backend_port))))
    uvloop.run(serve(argv[0], routes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
