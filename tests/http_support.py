"""HTTP test peers on loopback: a controllable backend and a raw-socket client.

`HttpBackend` answers by path (see `BackendConn.respond`) and counts what it sees, so tests
can assert connection reuse, retries and streaming from the endpoint's side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from httptools import HttpRequestParser

from mcsproxy.model import ServicePort
from mcsproxy.proxy import ProxyManager
from tests.proxy_fixtures import Clusterset, LoopbackServer, endpoint, free_port

HTTP_PORT = ServicePort("web", "TCP", 80, "http")


class BackendConn(asyncio.Protocol):
    def __init__(self, backend: HttpBackend) -> None:
        self.backend = backend
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.connections += 1
        self.backend.transports.add(self.transport)
        self.held: list[bytes] | None = None
        if self.backend.hold_reading.is_set() is False:
            # asyncio's transport keeps a pause from connection_made; uvloop's starts
            # reading once it returns, whatever was asked (and so read everything). So
            # the pause is asked again right after, and a read that comes first anyway
            # pauses too and is kept: at most one read is taken in while held.
            self.held = []
            self.transport.pause_reading()
            loop = asyncio.get_running_loop()
            loop.call_soon(self._pause)
            self.resuming = loop.create_task(self._resume_later())

    def _pause(self) -> None:
        if self.held is not None and not self.transport.is_closing():
            # Resumed first: asyncio before 3.11.3 (Debian 12's 3.11.2) starts reading
            # after connection_made even when paused there, and then takes a second pause
            # for a no-op, so this endpoint would read everything while "held".
            self.transport.resume_reading()
            self.transport.pause_reading()

    async def _resume_later(self) -> None:
        await self.backend.hold_reading.wait()
        held, self.held = self.held or [], None
        if not self.transport.is_closing():
            for data in held:
                self.parser.feed_data(data)
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            self.transport.pause_reading()
            return
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.transports.discard(self.transport)
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()
        self.head_count = len(self.headers)  # fields after these are trailer fields
        self.backend.requests.append((self.method, self.url, list(self.headers)))
        if any(n.lower() == b"expect" for n, _ in self.headers) and \
                self.url.startswith(b"/continue"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if len(self.body) < 1 << 20:
            self.body += body

    def on_message_complete(self) -> None:
        self.backend.trailers.append(self.headers[self.head_count:])
        self.respond()

    def send(self, status: int, body: bytes, extra: bytes = b"") -> None:
        head = (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nX-Backend: %s\r\n%s\r\n"
                % (status, len(body), self.backend.name.encode(), extra))
        self.transport.write(head + (b"" if self.method == b"HEAD" else body))

    def respond(self) -> None:
        backend = self.backend
        path = self.url.split(b"?")[0]
        status = backend.status
        if status != 200:
            self.send(status, b"sick " + backend.name.encode())
        elif path == b"/slow":
            return  # never answers
        elif path == b"/count":
            self.send(200, str(self.body_len).encode())
        elif path == b"/echo":
            self.send(200, bytes(self.body))
        elif path == b"/headers":
            self.send(200, b"".join(n + b": " + v + b"\n" for n, v in self.headers))
        elif path == b"/chunked":
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        elif path == b"/fields-and-trailers":
            # Head fields that go on unchanged, then trailer fields: which are which.
            self.transport.write(b"HTTP/1.1 200 OK\r\nX-Head: h\r\nTransfer-Encoding: chunked\r\n"
                                 b"Cache-Control: no-store\r\n\r\n"
                                 b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n")
        elif path == b"/trailers":
            # What may follow a body, what must not (RFC 9110 6.5.1), and hop-by-hop (by
            # name, or named by the head's Connection header).
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: X-Secret\r\n\r\n"
                                 b"2\r\nok\r\n0\r\nX-Checksum: abc\r\nHost: evil\r\n"
                                 b"X-Secret: 1\r\n"
                                 b"Content-Type: text/evil\r\nSet-Cookie: s=1\r\n"
                                 b"Keep-Alive: 1\r\nX-Forwarded-For: 6.6.6.6\r\n"
                                 b"Server-Timing: db;dur=5\r\n\r\n")
        elif path == b"/trailer-length":
            # Content-Length in the trailer section (RFC 9110 6.5.1 keeps it out).
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\n0\r\nX-T: 1\r\nContent-Length: 5\r\n\r\n")
        elif path == b"/both-lengths":
            # Content-Length and chunked in one head: a smuggling shape.
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                 b"Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        elif path == b"/until-close":
            self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close")
            self.transport.close()
        elif path == b"/reset":
            self.transport.abort()
        elif path.startswith(b"/size/"):
            self.send(200, b"s" * int(path[6:]))  # head and body in one write
        elif path.startswith(b"/big/"):
            size = int(path[5:])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            asyncio.get_running_loop().create_task(self._stream(size))
        elif path.startswith(b"/sleep/"):
            # The answer after that many milliseconds: a request of known duration.
            asyncio.get_running_loop().call_later(int(path[7:]) / 1000, self._send_late,
                                                  backend.name.encode())
        elif path == b"/hop":
            self.send(200, b"ok", b"Connection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n")
        else:
            self.send(200, backend.name.encode())

    def _send_late(self, body: bytes) -> None:
        if not self.transport.is_closing():
            self.send(200, body)

    async def _stream(self, size: int) -> None:
        chunk = b"x" * 65536
        while size > 0 and not self.transport.is_closing():
            await self.can_write.wait()
            n = min(size, len(chunk))
            self.transport.write(chunk[:n])
            size -= n


@dataclass
class HttpBackend(LoopbackServer):
    name: str
    host: str
    cluster: str
    port: int = 0
    status: int = 200
    connections: int = 0
    requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    trailers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)  # per request
    server: asyncio.Server | None = None
    transports: set[asyncio.Transport] = field(default_factory=set)
    hold_reading: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> HttpBackend:
        self.hold_reading.set()
        if not self.port:
            self.port = free_port(self.host)
        await self.listen(lambda: BackendConn(self))
        return self

    def header(self, index: int, name: bytes) -> list[bytes]:
        return [v for n, v in self.requests[index][2] if n.lower() == name]


async def start_backends(spec: dict[str, int], net: int) -> list[HttpBackend]:
    """{'east': 2, 'west': 1} → east-1 on 127.<net>.1.1, east-2 on .1.2, west-1 on .2.1."""
    backends = []
    for ci, (cluster, n) in enumerate(spec.items(), start=1):
        for i in range(1, n + 1):
            backends.append(await HttpBackend(f"{cluster}-{i}", f"127.{net}.{ci}.{i}",
                                              cluster).start())
    return backends


@contextlib.asynccontextmanager
async def protocol_behind_proxy(factory: Callable[[], asyncio.Protocol], host: str,
                                ip: str, name: str) -> AsyncIterator[ProxyManager]:
    """A scripted endpoint (a bare Protocol on host) as the one endpoint of an HTTP
    service at ip:80 in cluster east, the gateway (yielded) serving it until the block
    ends."""
    server = await asyncio.get_running_loop().create_server(factory, host, 0)
    cs = Clusterset("east")
    cs.publish(name, ip, [HTTP_PORT],
               [endpoint(host, "east", server.sockets[0].getsockname()[1])])
    proxy = await cs.proxy()
    try:
        yield proxy
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()


def publish(cs: Clusterset, name: str, ip: str, backends: list[HttpBackend],
            traffic: str | None = None) -> None:
    cs.publish(name, ip, [HTTP_PORT], [endpoint(b.host, b.cluster, b.port) for b in backends],
               traffic=traffic)


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    raw_head: bytes
    trailers: dict[bytes, bytes] = field(default_factory=dict)


def fields(lines: list[bytes]) -> dict[bytes, bytes]:
    """Field lines as {lowercased name: value}."""
    found: dict[bytes, bytes] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(b":")
            found[name.strip().lower()] = value.strip()
    return found


class RawClient:
    """A keep-alive client on a raw socket: send bytes, read framed responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, ip: str, port: int, source: str | None = None) -> RawClient:
        """`source`: the client's address (another loopback address: another client)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            ip, port, local_addr=(source, 0) if source is not None else None), 3)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def get(self, path: str = "/", host: str = "svc", extra: str = "",
                  method: str = "GET") -> Response:
        self.send(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return await self.response(head=method == "HEAD")

    async def response(self, head: bool = False, timeout: float = 5.0) -> Response:
        async with asyncio.timeout(timeout):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = fields(lines[1:])
            trailers: dict[bytes, bytes] = {}
            if head or status in (204, 304) or 100 <= status < 200:
                body = b""
            elif b"content-length" in headers:
                body = await self.reader.readexactly(int(headers[b"content-length"]))
            elif headers.get(b"transfer-encoding") == b"chunked":
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    if size == 0:
                        lines = []
                        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                            lines.append(line[:-2])
                        trailers = fields(lines)
                        break
                    body += await self.reader.readexactly(size)
                    await self.reader.readexactly(2)
            else:
                body = await self.reader.read()
        return Response(status, headers, body, raw, trailers)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed (EOF) within the timeout."""
        async with asyncio.timeout(timeout):
            try:
                return await self.reader.read() == b""
            except ConnectionError:
                return True


async def read_to_the_end(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything the connection brings, and how it ended: FIN or RST."""
    got = b""
    async with asyncio.timeout(5):
        try:
            while data := await reader.read(65536):
                got += data
        except ConnectionResetError:
            return got, "RST"
    return got, "FIN"


async def head_then_get(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """A HEAD of `path`, then a GET on the same kept-alive connection: the HEAD's answer
    head, and what follows it (the GET's answer first, if the HEAD sent no body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"
                     "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, after = data.partition(b"\r\n\r\n")
    return head, after
