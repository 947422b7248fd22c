"""The aiohttp listeners (the gateway's admin API, the controller's --serve) under a
client that sends its request head a byte at a time (slowloris), too many connections
from one address or in all, and idle keep-alive connections: each is closed, counted,
and nobody else notices."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, TCPConnector
from prometheus_client import generate_latest

from controlplane.metrics import ControllerMetrics
from controlplane.server import ControllerServer
from controlplane.stream import StreamHub
from mcsproxy.config import WebLimits
from tests.test_metrics_support import parse_metrics, start_gateway, value

NET = "127.119"
ADMIN_HOST = f"{NET}.0.1"
CONTROLLER_HOST = f"{NET}.0.2"
HEAD_TIMEOUT_S = 1.0
# Starts with an empty line, which must not count as the end of the head.
SLOW_HEAD = b"\r\nGET /healthz HTTP/1.1\r\nHost: admin\r\nUser-Agent: slowloris\r\n\r\n"
TRICKLE_S = 0.2  # one byte this often: the head would take 12 s


async def connect(listen: tuple[str, int], source: str,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*listen, local_addr=(source, 0))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the server closes (EOF or reset) before `within_s`, having sent nothing."""
    try:
        return await asyncio.wait_for(reader.read(100), within_s) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def refused(listen: tuple[str, int], source: str) -> bool:
    """True when the server closes a new connection at once, before any request."""
    reader, writer = await connect(listen, source)
    try:
        return await closed_by_server(reader, 3)
    finally:
        await close(writer)


async def trickle(listen: tuple[str, int], source: str, head: bytes = SLOW_HEAD,
                  ) -> tuple[float, int]:
    """Sends `head` a byte every TRICKLE_S on a new connection until the server hangs up;
    returns how long the connection lived and how many bytes went out. Fails if the whole
    head went out."""
    reader, writer = await connect(listen, source)
    started = time.monotonic()
    try:
        return await trickle_on(reader, writer, started, head)
    finally:
        await close(writer)


async def trickle_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     started: float, head: bytes = SLOW_HEAD) -> tuple[float, int]:
    """`trickle` on an open connection; how long it lived is counted from `started`."""
    for sent in range(1, len(head) + 1):
        writer.write(head[sent - 1:sent])
        if await closed_by_server(reader, TRICKLE_S):
            return time.monotonic() - started, sent
    raise AssertionError(f"the server waited {time.monotonic() - started:.1f} s for "
                         "a head sent a byte at a time")


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              path: str = "/healthz") -> bytes:
    """One keep-alive request on a raw connection; the status line (the body is read)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
    return await response(reader)


async def response(reader: asyncio.StreamReader) -> bytes:
    """The status line of the next response (its body is read)."""
    async with asyncio.timeout(3):
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, field = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(field)
        await reader.readexactly(length)
    return status.rstrip()


def client(source: str) -> ClientSession:
    return ClientSession(connector=TCPConnector(local_addr=(source, 0)),
                         timeout=ClientTimeout(total=5))


async def test_admin_cuts_a_slowloris_head_and_serves_everyone_else(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path, ADMIN_HOST,
                             admin_limits=WebLimits(head_timeout_s=HEAD_TIMEOUT_S))
    assert gw.gateway.admin.bound is not None
    listen = gw.gateway.admin.bound
    try:
        slow = asyncio.create_task(trickle(listen, f"{NET}.1.2"))
        async with client(f"{NET}.1.3") as http, http.get(gw.admin + "/healthz") as resp:
            assert resp.status == 200 and await resp.text() == "ok\n"
        assert not slow.done()  # served while the slow head was still open
        lived, sent = await slow
        assert HEAD_TIMEOUT_S <= lived < HEAD_TIMEOUT_S + 1.0
        assert sent < len(SLOW_HEAD)
        guard = gw.gateway.admin.guard
        assert guard.closed["head_timeout"] == 1
        samples = await gw.metrics()
        assert value(samples, "mcsproxy_admin_connections_closed_total",
                     outcome="head_timeout") == 1
        async with asyncio.timeout(3):  # only the scrape's kept-alive connection is left
            while guard.active != 1:
                await asyncio.sleep(0.01)
    finally:
        await gw.stop()


async def test_admin_cuts_a_slowloris_head_on_a_kept_alive_connection(
        tmp_path: Path) -> None:
    """A later request's head gets head_timeout_s from its first byte as well, not
    aiohttp's keep-alive timeout counted from the response before (which bytes of the next
    head do not reset). Neither idle time between requests nor a request body sent slowly
    counts as a head."""
    gw = await start_gateway(tmp_path, ADMIN_HOST, admin_limits=WebLimits(
        head_timeout_s=HEAD_TIMEOUT_S, keepalive_timeout_s=4 * HEAD_TIMEOUT_S))
    assert gw.gateway.admin.bound is not None
    reader, writer = conn = await connect(gw.gateway.admin.bound, f"{NET}.5.2")
    try:
        assert await get(*conn) == b"HTTP/1.1 200 OK"
        await asyncio.sleep(1.5 * HEAD_TIMEOUT_S)
        assert await get(*conn) == b"HTTP/1.1 200 OK"
        # A body of 8 bytes, one every TRICKLE_S: 1.6 s, more than the head timeout. The
        # 405 comes first; aiohttp reads the rest of the body before the next request.
        writer.write(b"POST /healthz HTTP/1.1\r\nHost: admin\r\nContent-Length: 8\r\n\r\n")
        for byte in b"slowbody":
            writer.write(bytes([byte]))
            await asyncio.sleep(TRICKLE_S)
        assert await response(reader) == b"HTTP/1.1 405 Method Not Allowed"
        assert await get(*conn) == b"HTTP/1.1 200 OK"
        guard = gw.gateway.admin.guard
        assert guard.closed["head_timeout"] == 0

        await asyncio.sleep(0.5 * HEAD_TIMEOUT_S)  # the deadline counts from the head
        lived, sent = await trickle_on(reader, writer, time.monotonic())
        assert HEAD_TIMEOUT_S <= lived < HEAD_TIMEOUT_S + 0.5
        assert sent < len(SLOW_HEAD)
        assert guard.closed["head_timeout"] == 1
    finally:
        await close(writer)
        await gw.stop()


async def test_admin_caps_connections_in_all_and_per_client_address(tmp_path: Path) -> None:
    gw = await start_gateway(tmp_path, ADMIN_HOST, admin_limits=WebLimits(
        max_connections=4, max_connections_per_client=2))
    assert gw.gateway.admin.bound is not None
    listen = gw.gateway.admin.bound
    held = []
    try:
        for source in (f"{NET}.2.2", f"{NET}.2.2"):
            held.append(conn := await connect(listen, source))
            assert await get(*conn) == b"HTTP/1.1 200 OK"
        assert await refused(listen, f"{NET}.2.2")  # a third from one address
        for source in (f"{NET}.2.3", f"{NET}.2.3"):  # another address is not limited by it
            held.append(conn := await connect(listen, source))
            assert await get(*conn) == b"HTTP/1.1 200 OK"
        assert await refused(listen, f"{NET}.2.4")  # a fifth in all
        for conn in held:  # the established ones never noticed
            assert await get(*conn, "/readyz") == b"HTTP/1.1 200 OK"
        guard = gw.gateway.admin.guard
        assert guard.closed == {"connection_limit": 1, "client_limit": 1, "head_timeout": 0,
                                "answer_timeout": 0}
        for _, writer in held:
            await close(writer)
        held.clear()
        async with asyncio.timeout(3):  # the slots come back
            while guard.active:
                await asyncio.sleep(0.01)
        samples = await gw.metrics()
        assert value(samples, "mcsproxy_admin_connections_closed_total",
                     outcome="client_limit") == 1
        assert value(samples, "mcsproxy_admin_connections_closed_total",
                     outcome="connection_limit") == 1
    finally:
        for _, writer in held:
            await close(writer)
        await gw.stop()


async def test_admin_closes_idle_keepalive_connections(tmp_path: Path) -> None:
    """Idle after a response: closed after the keep-alive timeout; a next head sent a byte
    at a time gets no longer than that either."""
    keepalive_s = 0.6
    gw = await start_gateway(tmp_path, ADMIN_HOST,
                             admin_limits=WebLimits(keepalive_timeout_s=keepalive_s))
    assert gw.gateway.admin.bound is not None
    listen = gw.gateway.admin.bound
    try:
        idle = await connect(listen, f"{NET}.3.2")
        slow = await connect(listen, f"{NET}.3.3")
        for conn in (idle, slow):
            assert await get(*conn) == b"HTTP/1.1 200 OK"
        answered = time.monotonic()
        reader, writer = slow
        writer.write(b"G")
        assert await closed_by_server(idle[0], keepalive_s + 1.0)
        assert time.monotonic() - answered >= keepalive_s - 0.1
        assert await closed_by_server(reader, 1.0)
        for _, writer in (idle, slow):
            await close(writer)
    finally:
        await gw.stop()


async def test_controller_server_cuts_slow_heads_caps_connections_keeps_streams(
        ) -> None:
    metrics = ControllerMetrics()
    hub = StreamHub(heartbeat_s=0.1)
    hub.attach("east", {})
    server = ControllerServer(None, hub, (CONTROLLER_HOST, 0), metrics=metrics,
                              limits=WebLimits(head_timeout_s=HEAD_TIMEOUT_S,
                                               max_connections=4,
                                               max_connections_per_client=2))
    await server.start()
    assert server.bound is not None
    listen = server.bound
    url = f"http://{listen[0]}:{listen[1]}"
    held = []
    try:
        async with client(f"{NET}.4.2") as gateway, \
                gateway.get(url + "/v1/stream?cluster=east") as stream:
            assert stream.status == 200
            slow = asyncio.create_task(trickle(listen, f"{NET}.4.3"))
            async with client(f"{NET}.4.4") as http, http.get(url + "/healthz") as resp:
                assert resp.status == 200
            assert not slow.done()
            lived, _ = await slow
            assert HEAD_TIMEOUT_S <= lived < HEAD_TIMEOUT_S + 1.0
            # The stream's head came at once: it outlives the head timeout.
            async with asyncio.timeout(3):
                while b'"heartbeat"' not in await stream.content.readline():
                    pass
            assert hub.feeds["east"].subscribers

            # With the stream open: two more from one address, a third refused...
            for source in (f"{NET}.4.5", f"{NET}.4.5"):
                held.append(conn := await connect(listen, source))
                assert await get(*conn) == b"HTTP/1.1 200 OK"
            assert await refused(listen, f"{NET}.4.5")
            # ... one from elsewhere fills the cap, the next is refused.
            held.append(conn := await connect(listen, f"{NET}.4.6"))
            assert await get(*conn) == b"HTTP/1.1 200 OK"
            assert await refused(listen, f"{NET}.4.7")
            assert b'"heartbeat"' in await asyncio.wait_for(stream.content.readline(), 3)

        text = generate_latest(metrics.registry).decode()
        samples = parse_metrics(text)
        for reason in ("head_timeout", "client_limit", "connection_limit"):
            assert value(samples, "mcsproxy_controller_http_connections_closed_total",
                         outcome=reason) == 1, text
    finally:
        for _, writer in held:
            await close(writer)
        hub.close()
        await server.stop()
