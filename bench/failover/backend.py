"""One backend pod for the failover benchmark: HTTP and a TCP line echo on one address.

Every answer starts with the pod's cluster and address, so the load generator sees which
cluster served it. SIGUSR1 makes the HTTP side answer 503 to everything (health checks
included), SIGUSR2 makes it healthy again; SIGTERM stops it. Run by bench/failover/run.py
(inside the cluster's network namespace when it has one).

    python bench/failover/backend.py --cluster cluster-a --ip 127.0.1.10
"""

from __future__ import annotations

import argparse
import asyncio
import signal

MAX_HEAD = 16384  # requests here are small GETs; a bigger head is a client bug


class State:
    __slots__ = ("failing",)

    def __init__(self) -> None:
        self.failing = False


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive responder: bodiless requests, pipelining allowed."""

    __slots__ = ("_buf", "_ok", "_state", "_unavailable", "transport")

    def __init__(self, state: State, ok: bytes, unavailable: bytes) -> None:
        self._state = state
        self._ok = ok
        self._unavailable = unavailable
        self._buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self.transport.close()
                return
            head, self._buf = self._buf[:end], self._buf[end + 4:]
            self.transport.write(self._unavailable if self._state.failing else self._ok)
            if b"connection: close" in head.lower():
                self.transport.close()
                return


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("_prefix", "transport")

    def __init__(self, prefix: bytes) -> None:
        self._prefix = prefix
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self._prefix + data)


def response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode() + body


async def serve(cluster: str, ip: str, http_port: int, tcp_port: int) -> None:
    loop = asyncio.get_running_loop()
    state = State()
    who = f"{cluster} {ip}".encode()
    ok = response("200 OK", who + b"\n")
    unavailable = response("503 Service Unavailable", who + b" unavailable\n")
    http = await loop.create_server(lambda: HttpProtocol(state, ok, unavailable), ip, http_port,
                                    reuse_address=True, backlog=1024)
    echo = await loop.create_server(lambda: EchoProtocol(who + b" "), ip, tcp_port,
                                    reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(state, "failing", True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(state, "failing", False))
    await stop.wait()
    http.close()
    echo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--ip", required=True)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--tcp-port", type=int, default=9000)
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.cluster, args.ip, args.http_port, args.tcp_port))


if __name__ == "__main__":
    main()
