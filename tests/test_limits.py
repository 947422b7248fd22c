"""Limits: connections per listener and per client address (TCP and HTTP listeners), and
running out of file descriptors (EMFILE) pauses accepting instead of crashing."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from pathlib import Path

from mcsproxy.model import ServicePort
from mcsproxy.proxy.manager import ListenerKey
from tests.chaos.support import GatewayProcess, Port, SlowHttp, Svc, write_imports
from tests.http_support import HTTP_PORT
from tests.proxy_fixtures import Backend, Clusterset, ask, endpoint


async def refused_at_accept(ip: str, port: int, source: str = "127.0.0.1") -> bool:
    """True when the gateway accepted and closed at once (no byte, EOF or reset)."""
    reader, writer = await asyncio.open_connection(ip, port, local_addr=(source, 0))
    try:
        data = await asyncio.wait_for(reader.read(100), 3)
        return data == b""
    except ConnectionError:
        return True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def hold(ip: str, port: int, n: int, source: str = "127.0.0.1",
               ) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(ip, port, local_addr=(source, 0))
        assert await asyncio.wait_for(reader.readline(), 3) == b"lim\n"
        writers.append(writer)
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()


async def test_max_connections_per_listener_and_per_client() -> None:
    backend = await Backend("lim", "127.77.8.1", 7020, "east").start()
    cs = Clusterset()
    cs.publish("lim", "127.240.77.50", [ServicePort("echo", "TCP", 7)],
               [endpoint("127.77.8.1", "east", 7020, name="echo")])
    manager = await cs.proxy(max_connections_per_listener=4, max_connections_per_client=2)
    try:
        await cs.served(manager)
        ctx = manager.listeners[ListenerKey("127.240.77.50", 7, "TCP")].ctx
        first = await hold("127.240.77.50", 7, 2)
        assert await refused_at_accept("127.240.77.50", 7)  # a third from 127.0.0.1
        second = await hold("127.240.77.50", 7, 2, source="127.0.0.2")  # its own budget
        assert await refused_at_accept("127.240.77.50", 7, source="127.0.0.3")  # listener full
        assert ctx.refused == 2 and ctx.active == 4
        # Exported by reason, from counters that outlive the listener.
        assert manager.refusals["client_limit"] == 1
        assert manager.refusals["listener_limit"] == 1
        await close_all(first)
        await asyncio.wait_for(_until(lambda: ctx.active == 2), 3)
        assert await ask("127.240.77.50", 7) == "lim"  # room again
        await close_all(second)
        await asyncio.wait_for(_until(lambda: ctx.active == 0 and not ctx.by_client), 3)
    finally:
        await manager.stop()
        await backend.stop()


async def test_idle_connections_whose_client_does_not_read_give_their_slots_back() -> None:
    async def spew(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # far more than the buffers between it and the client
                writer.write(b"x" * 65536)
                await writer.drain()

    server = await asyncio.start_server(spew, "127.77.8.2", 0)
    port = server.sockets[0].getsockname()[1]
    cs = Clusterset()
    cs.publish("spew", "127.240.77.51", [ServicePort("echo", "TCP", 7)],
               [endpoint("127.77.8.2", "east", port, name="echo")])
    manager = await cs.proxy(max_connections_per_listener=2, idle_timeout_s=0.5)
    hogs = []
    try:
        await cs.served(manager)
        ctx = manager.listeners[ListenerKey("127.240.77.51", 7, "TCP")].ctx
        for _ in range(2):  # connect and never read: every buffer on the way fills up
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.240.77.51", 7))
            hogs.append(s)
        await asyncio.wait_for(_until(lambda: ctx.active == 2), 3)
        # Nothing moves once the buffers are full: the idle sweep ends both. A close would
        # wait forever to flush towards a client that does not read.
        await asyncio.wait_for(_until(lambda: ctx.active == 0), 5)
        reader, writer = await asyncio.open_connection("127.240.77.51", 7)
        assert len(await asyncio.wait_for(reader.read(100), 3)) > 0  # a slot for it again
        writer.close()
    finally:
        for s in hogs:
            s.close()
        await manager.stop()
        server.close()


async def _until(cond: object) -> None:
    while not cond():  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def test_http_listener_connection_limit() -> None:
    backend = await SlowHttp("h", "127.77.8.2", 8095).start()
    cs = Clusterset()
    cs.publish("web", "127.240.77.51", [HTTP_PORT], [endpoint("127.77.8.2", "east", 8095)])
    manager = await cs.proxy(max_connections_per_listener=2)
    try:
        await cs.served(manager)
        conns = [await asyncio.open_connection("127.240.77.51", 80) for _ in range(2)]
        for reader, writer in conns:
            writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert b" 200 " in await asyncio.wait_for(reader.readline(), 3)
        reader, writer = await asyncio.open_connection("127.240.77.51", 80)
        writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(100), 3) == b""
        writer.close()
        ctx = manager.listeners[ListenerKey("127.240.77.51", 80, "TCP")].ctx
        assert ctx.refused == 1
        for _, w in conns:
            w.close()
    finally:
        await manager.stop()
        await backend.stop()


async def test_emfile_pauses_accepting_and_the_gateway_survives(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend("lim", "127.77.8.3", 7021, "east").start()
    path = tmp_path / "imports.yaml"
    write_imports(path, [Svc("fd", "127.240.77.52", [Port("echo", 7, 7021)],
                             {"east": [("127.77.8.3", True)]})])
    limit = 64

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    gw = GatewayProcess(f"file:{path}", "--health-interval", "0", "--drain-timeout", "0")
    socks: list[socket.socket] = []
    try:
        await gw.start(preexec_fn=low_nofile)
        await gw.wait_line("listener 127.240.77.52:7/TCP serving")
        # Far more connections than descriptors: each accepted one costs two (client and
        # endpoint side). The kernel queues the rest in the backlog.
        for _ in range(limit * 2):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.240.77.52", 7))
            socks.append(s)
        await asyncio.sleep(1.0)  # let the gateway hit the ceiling (nothing to wait on)
        assert gw.proc is not None and gw.proc.returncode is None, gw.log
        # The ceiling was hit: at accept, or at the endpoint's socket when one descriptor
        # was left (which, depends on how many the gateway holds for itself).
        assert "out of file descriptors" in gw.log or \
            "cannot accept (Too many open files)" in gw.log, gw.log
        for s in socks:
            s.close()
        socks.clear()
        # Descriptors free again: served as before, the process never died.
        async with asyncio.timeout(10):
            while True:
                try:
                    assert await ask("127.240.77.52", 7, timeout=2) == "lim"
                    break
                except (OSError, TimeoutError):
                    await asyncio.sleep(0.2)
        status, _ = await gw.admin_get("/healthz")
        assert status == 200
        _, body = await gw.admin_get("/endpoints")
        (row,) = body["endpoints"]  # type: ignore[index]
        assert not row["ejected"] and row["times_ejected"] == 0, row  # not blamed
        assert gw.proc.returncode is None
    finally:
        for s in socks:
            s.close()
        await gw.stop()
        await backend.stop()


async def test_gateway_raises_its_open_files_soft_limit_to_the_hard_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Started with a soft limit of 64 and a hard one of 1024, the gateway holds 100
    proxied connections (200+ descriptors): it raised the soft limit itself."""
    backend = await Backend("lim", "127.77.8.4", 7022, "east").start()
    path = tmp_path / "imports.yaml"
    write_imports(path, [Svc("fd", "127.240.77.53", [Port("echo", 7, 7022)],
                             {"east": [("127.77.8.4", True)]})])

    def low_soft_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 1024))

    gw = GatewayProcess(f"file:{path}", "--health-interval", "0", "--drain-timeout", "0")
    writers: list[asyncio.StreamWriter] = []
    try:
        await gw.start(preexec_fn=low_soft_nofile)
        await gw.wait_line("listener 127.240.77.53:7/TCP serving")
        assert gw.proc is not None
        limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3:5] == ["1024", "1024"], row
        assert "open files limit 1024 (raised from 64)" in gw.log, gw.log
        writers = await hold("127.240.77.53", 7, 100)
        assert "out of file descriptors" not in gw.log, gw.log
        assert gw.proc.returncode is None
    finally:
        await close_all(writers)
        await gw.stop()
        await backend.stop()
