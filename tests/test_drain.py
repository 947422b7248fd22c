"""Graceful drain: SIGTERM to a real gateway under load, and snapshots that change every
100 ms under load. Clients must see no failed request."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.support import (
    GatewayProcess,
    Port,
    SlowHttp,
    Svc,
    Tally,
    http_load,
    wait_until,
    write_imports,
)
from tests.http_support import HTTP_PORT
from tests.proxy_fixtures import Backend, Clusterset, ask, endpoint

WEB = Port("web", 80, 8080, app_protocol="http")
ECHO = Port("echo", 7, 7007)


async def stream_echo(ip: str, port: int, gap_s: float, started: asyncio.Event,
                      finish: asyncio.Event) -> tuple[int, bytes]:
    """A TCP client mid-stream: chunk after chunk, each echoed, until `finish` is set,
    then EOF and 'bye'. Returns how many chunks it sent and all it received."""
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        await reader.readline()  # the backend's name
        started.set()
        got = b""
        chunks = 0
        while not finish.is_set():
            payload = b"%04d" % chunks * 256
            writer.write(payload)
            got += await asyncio.wait_for(reader.readexactly(len(payload)), 3)
            chunks += 1
            await asyncio.sleep(gap_s)
        writer.write_eof()
        got += await asyncio.wait_for(reader.read(), 3)
        return chunks, got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def refused(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(ip, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


async def test_sigterm_under_load_fails_readiness_and_finishes_in_flight_work(
        tmp_path: Path) -> None:
    backends = [await SlowHttp(f"b{i}", f"127.77.{i}.1", 8080).start() for i in (1, 2)]
    echo = await Backend("echo", "127.77.1.1", 7007, "east").start()
    imports = tmp_path / "imports.yaml"
    write_imports(imports, [
        Svc("web", "127.240.77.1", [WEB], {"east": [("127.77.1.1", True)],
                                           "west": [("127.77.2.1", True)]}),
        Svc("echo", "127.240.77.2", [ECHO], {"east": [("127.77.1.1", True)]}),
    ])
    # Ample: the drain lasts until this test's observations, which a loaded machine slows.
    gw = GatewayProcess(f"file:{imports}", "--drain-timeout", "10", "--health-interval", "0")
    tally = Tally()
    stop_load = asyncio.Event()
    try:
        await gw.start()
        await gw.wait_ready()
        await gw.wait_line("listener 127.240.77.2:7/TCP serving")
        load = asyncio.create_task(http_load("http://127.240.77.1/delay/150", tally,
                                             stop_load, users=8, refused_ends=True))
        streaming = asyncio.Event()
        # The stream lasts until this test has seen readiness fail and the listener
        # close: the drain waits for it, so the admin is still up to be asked. A stream
        # of fixed length could end first on a loaded machine (this test process slow to
        # get there), the drain then end, and /readyz refuse the connection.
        observed = asyncio.Event()
        stream = asyncio.create_task(stream_echo("127.240.77.2", 7, 0.05, streaming, observed))
        await asyncio.wait_for(streaming.wait(), 5)
        await wait_until(lambda: tally.ok >= 16, "16 answers before SIGTERM")

        ok_at_term = tally.ok
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        try:
            # The admin stays up while draining and says not ready once the signal is
            # handled (polled: the signal reaches the other process's loop when it does).
            async with asyncio.timeout(5):
                while (answer := await gw.admin_get("/readyz"))[0] != 503:
                    await asyncio.sleep(0.01)
            assert answer[1]["stopping"] is True, answer  # type: ignore[index]
            # Readiness fails first, the listeners close next: a 503 can reach this test
            # before the gateway's loop has run the drain that closes them.
            async with asyncio.timeout(5):
                while not await refused("127.240.77.1", 80):
                    await asyncio.sleep(0.01)
        finally:
            observed.set()
        await asyncio.wait_for(load, 5)  # every user ended on a refused connect
        chunks, echoed = await asyncio.wait_for(stream, 5)
        assert await gw.wait() == 0, gw.log
        elapsed = time.monotonic() - t0

        assert tally.failed == 0, tally.errors
        assert tally.ok > ok_at_term, "requests in flight at SIGTERM were answered"
        assert echoed == b"".join(b"%04d" % i * 256 for i in range(chunks)) + b"bye"
        assert elapsed < 10.0, "drained before the timeout: nothing was left to wait for"
        assert "drained; 0 connections left" in gw.log, gw.log
        assert "Traceback" not in gw.log
    finally:
        stop_load.set()
        await gw.stop()
        for b in backends:
            await b.stop()
        await echo.stop()


async def test_drain_timeout_bounds_a_connection_that_never_ends(tmp_path: Path) -> None:
    echo = await Backend("echo", "127.77.1.2", 7008, "east").start()
    imports = tmp_path / "imports.yaml"
    write_imports(imports, [Svc("echo", "127.240.77.3", [Port("echo", 7, 7008)],
                                {"east": [("127.77.1.2", True)]})])
    gw = GatewayProcess(f"file:{imports}", "--drain-timeout", "1", "--health-interval", "0")
    try:
        await gw.start()
        await gw.wait_line("listener 127.240.77.3:7/TCP serving")
        reader, writer = await asyncio.open_connection("127.240.77.3", 7)
        assert await reader.readline() == b"echo\n"
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert await gw.wait() == 0, gw.log
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 4.0, elapsed
        assert "1 connections still open after 1.0 s" in gw.log, gw.log
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the gateway
        writer.close()
    finally:
        await gw.stop()
        await echo.stop()


async def test_snapshot_changes_every_100ms_under_load_lose_nothing() -> None:
    """Endpoints rotate (each set keeps two live endpoints) and a second service comes and
    goes, every 100 ms for 2 s, while HTTP and TCP clients run: zero errors."""
    https = [await SlowHttp(f"h{i}", f"127.77.3.{i}", 8081).start() for i in (1, 2, 3)]
    echoes = [await Backend(f"e{i}", f"127.77.4.{i}", 7009, "east").start() for i in (1, 2, 3)]
    cs = Clusterset()
    tcp_port = [ECHO]
    http_port = [HTTP_PORT]

    def publish(step: int) -> None:
        live = [i for i in range(3) if i != step % 3]
        cs.publish("web", "127.240.77.10", http_port,
                   [endpoint(https[i].host, f"c{i}", 8081) for i in live])
        cs.publish("echo", "127.240.77.11", tcp_port,
                   [endpoint(echoes[i].host, f"c{i}", 7009, name="echo") for i in live])
        if step % 2:
            cs.publish("extra", "127.240.77.12", tcp_port,
                       [endpoint(echoes[0].host, "c0", 7009, name="echo")])
        else:
            cs.withdraw("extra")

    publish(0)
    manager = await cs.proxy()
    tally = Tally()
    tcp_ok = 0
    stop = asyncio.Event()

    async def tcp_user() -> None:
        nonlocal tcp_ok
        while not stop.is_set():
            try:
                assert (await ask("127.240.77.11", 7)).startswith("e")
                tcp_ok += 1
            except (OSError, TimeoutError, AssertionError) as exc:
                tally.fail(f"tcp: {exc!r}")

    try:
        await cs.served(manager)
        load = asyncio.gather(http_load("http://127.240.77.10/", tally, stop, users=4),
                              tcp_user(), tcp_user())
        for step in range(1, 21):
            publish(step)
            await asyncio.sleep(0.1)  # the churn's pace, not a wait for a result
        stop.set()
        await asyncio.wait_for(load, 10)
        assert manager.applied_version == cs.store.current.version
        assert tally.failed == 0, tally.errors
        assert tally.ok > 50 and tcp_ok > 50, (tally.ok, tcp_ok)
    finally:
        stop.set()
        await manager.stop()
        for h in https:
            await h.stop()
        for e in echoes:
            await e.stop()


async def stream_end(reader: asyncio.StreamReader) -> str:
    """How a stream the gateway holds ends for its client: 'eof' or 'reset'."""
    try:
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
        return "eof"
    except ConnectionResetError:
        return "reset"


@contextlib.asynccontextmanager
async def _gateway_holding_connections(
        tmp_path: Path, ip: str, echo_host: str, *args: str, preexec_fn: object = None,
        connections: int = 4,
) -> AsyncIterator[tuple[GatewayProcess,
                         list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]]:
    """An echo backend on `echo_host`, a gateway with --drain-timeout 20 and `connections`
    TCP connections through it that never end (with --workers 2, likely some on each
    process: all on one for 1 in 2^(connections - 1) runs). On leaving: connections
    closed, gateway and backend stopped."""
    backend = await Backend("echo", echo_host, 7095, "east").start()
    gw: GatewayProcess | None = None
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        imports = tmp_path / "imports.yaml"
        write_imports(imports, [Svc("echo", ip, [Port("echo", 7, backend.port)],
                                    {"east": [(backend.host, True)]})])
        gw = GatewayProcess(f"file:{imports}", "--drain-timeout", "20",
                            "--health-interval", "0", *args)
        await gw.start(preexec_fn)
        await gw.wait_line(f"listener {ip}:7/TCP serving")
        if "2" in args:  # --workers 2: the worker serves too
            await gw.wait_line("worker=1 mcsproxy.proxy listener")
        for _ in range(connections):
            reader, writer = await asyncio.open_connection(ip, 7)
            assert await reader.readline() == b"echo\n"
            conns.append((reader, writer))
        yield gw, conns
    finally:
        for _, writer in conns:
            writer.close()
        if gw is not None:
            await gw.stop()
        await backend.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_second_signal_ends_the_drain_at_once(tmp_path: Path, workers: str) -> None:
    """An operator's second Ctrl-C (or a second SIGTERM) while connections drain closes
    them now instead of waiting out --drain-timeout: it used to be ignored. They are cut
    with a RST, in the workers too: SIGKILLed by the supervisor, a worker left its
    connections to the kernel, which closed them with a FIN (4 of 8 ended as complete)."""
    ip = f"127.240.95.{workers}"
    async with _gateway_holding_connections(
            tmp_path, ip, f"127.95.1.{workers}", "--workers", workers,
            connections=12) as (gw, conns):
        gw.signal(signal.SIGTERM)
        await gw.wait_line("draining for at most 20.0 s")
        t0 = time.monotonic()
        gw.signal(signal.SIGINT)
        ends = await asyncio.gather(*(stream_end(reader) for reader, _ in conns))
        assert ends == ["reset"] * len(conns), ends
        assert await gw.wait() == 0, gw.log
        assert time.monotonic() - t0 < 5.0, gw.log
        assert "closing what is still open now" in gw.log, gw.log
        assert "gateway stopped" in gw.log, gw.log
        assert "Traceback" not in gw.log, gw.log


async def test_sighup_drains_like_sigterm(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal, a reload habit) killed the gateway outright: open
    connections reset, no drain, VIPs left on the interface. It now stops like SIGTERM."""
    async with _gateway_holding_connections(tmp_path, "127.240.95.3", "127.95.1.3") as (
            gw, conns):
        gw.signal(signal.SIGHUP)
        await gw.wait_line("draining for at most 20.0 s")
        assert "SIGHUP received" in gw.log, gw.log  # the log says why it stopped
        status, _ = await gw.admin_get("/readyz")
        assert status == 503
        for _, writer in conns:
            writer.close()
        assert await gw.wait() == 0, gw.log
        assert "drained; 0 connections left" in gw.log, gw.log


async def test_workers_drain_when_the_whole_process_group_is_signalled(
        tmp_path: Path) -> None:
    """Ctrl-C in a terminal (or systemd's SIGTERM to the cgroup) reaches the workers as
    well as the supervisor, which signals them too: that is not a second signal, and the
    workers' connections drain rather than being closed at once."""
    import os

    async with _gateway_holding_connections(
            tmp_path, "127.240.95.4", "127.95.1.4", "--workers", "2",
            preexec_fn=os.setsid) as (gw, conns):
        assert gw.proc is not None
        os.killpg(gw.proc.pid, signal.SIGINT)
        await gw.wait_line("worker=1 mcsproxy.gateway draining")
        await asyncio.sleep(1.0)  # the supervisor's SIGTERM has reached the worker
        for reader, writer in conns:  # every connection, on either process, still served
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 3) == b"ping"
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 3) == b"bye"
            writer.close()
        assert await gw.wait() == 0, gw.log
        assert "closing what is still open now" not in gw.log, gw.log
        assert "still open after" not in gw.log, gw.log


class FailingDrain:
    """A component whose drain raises: whatever goes wrong there, the gateway must still
    stop every component (listeners closed, addresses removed, workers ended)."""

    def __init__(self) -> None:
        self.stopped = False

    async def start(self) -> None:
        pass

    async def drain(self, timeout_s: float) -> int:
        raise RuntimeError("drain broke")

    async def stop(self) -> None:
        self.stopped = True


async def test_a_drain_that_fails_still_stops_the_gateway(tmp_path: Path) -> None:
    import socket

    from mcsproxy.config import AdminConfig, DnsConfig, GatewayConfig, ProxyConfig
    from mcsproxy.gateway import Gateway
    from tests.proxy_fixtures import free_port

    host = "127.161.0.1"
    dns = (host, free_port(host, socket.SOCK_DGRAM))
    gateway = Gateway(GatewayConfig(
        cluster_id="east", sources=(f"file:{tmp_path}",), dns=DnsConfig(listen=dns),
        admin=AdminConfig(listen=(host, free_port(host))),
        proxy=ProxyConfig(drain_timeout_s=1.0)))
    failing = FailingDrain()
    gateway.components.append(failing)
    runner = asyncio.create_task(gateway.run())
    async with asyncio.timeout(5):
        await gateway.store.loaded.wait()
    gateway.request_stop()
    async with asyncio.timeout(5):
        await runner
    assert failing.stopped
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(dns)  # the DNS listener was closed by stop()
