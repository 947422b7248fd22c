"""The proxy's own Python cost per request, without sockets: a repeatable profile.

One client connection and one pooled endpoint connection with stand-in transports (they
keep what is written); each round feeds a keep-alive GET into the client side and a
100-byte (or --body) nginx-like response into the endpoint side, as the event loop would.
What is left is the work of mcsproxy/http per request: parsing, routing, balancing,
header rewriting, accounting. Syscalls and the event loop are not in it (bench/http/
micro.py and run.py measure those).

    .venv/bin/python bench/http/inproc.py                 # µs per request (best of 5)
    .venv/bin/python bench/http/inproc.py --profile       # the Python functions
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
if "--profile" in sys.argv:
    # cProfile sees no function of a compiled module: profile the sources
    # (mcsproxy/compiled.py; read when mcsproxy is first imported, just below).
    os.environ["MCSPROXY_INTERPRETED"] = "1"

from mcsproxy.config import ProxyConfig  # noqa: E402
from mcsproxy.http.engine import HttpEngine  # noqa: E402
from mcsproxy.proxy.context import ListenerContext  # noqa: E402
from mcsproxy.upstream import UpstreamSet  # noqa: E402
from mcsproxy.upstream.balance import Target  # noqa: E402

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.240.251.9:18581\r\n\r\n"
RESPONSE_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
                 b"Date: Thu, 26 Nov 2026 16:20:41 GMT\r\n"
                 b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                 b"Connection: keep-alive\r\n\r\n")


class StandInTransport:
    """What the protocols call on a uvloop transport, recording only the bytes."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written += sum(map(len, data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the keep-alive connection was closed")

    abort = close


def setup(body: int) -> tuple[object, object, bytes]:
    config = ProxyConfig()
    config = replace(config, http=replace(config.http, cluster_header="x-mcs-cluster"))
    engine = HttpEngine(config)
    upstream = UpstreamSet("bench/one:80", "local", config)
    upstream.update([Target("127.0.0.1", 18581, "local", True)])
    ctx = ListenerContext("127.240.251.9:18581", upstream, config, set())
    client = engine.protocol_factory(ctx)()
    client.connection_made(StandInTransport(("127.0.0.1", 40000)))
    host = next(iter(upstream.hosts.values()))
    pool = engine.pool_for(host, upstream)
    up = pool._make()
    up.connection_made(StandInTransport(("127.0.0.1", 18581)))
    pool.put(up)
    response = RESPONSE_HEAD % body + b"x" * body
    return client, up, response


def rounds(client: object, up: object, response: bytes, n: int) -> None:
    feed_client = client.data_received  # type: ignore[attr-defined]
    feed_up = up.data_received  # type: ignore[attr-defined]
    for _ in range(n):
        feed_client(REQUEST)
        feed_up(response)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--body", type=int, default=100)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    async def run() -> None:
        client, up, response = setup(args.body)
        rounds(client, up, response, 1000)  # warm-up; also proves the round trip works
        assert client.transport.written > 1000 * args.body  # type: ignore[attr-defined]
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(rounds, client, up, response, args.requests)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            rounds(client, up, response, args.requests)
            best = min(best, time.perf_counter() - t0)
        print(f"{best / args.requests * 1e6:.2f} µs of Python per request "
              f"({args.body} B responses, best of 5 runs of {args.requests})")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
