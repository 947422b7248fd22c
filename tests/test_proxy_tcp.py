"""TCP through ClusterSetIPs with real sockets: spread, failover, retries, drain, mapping."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
import uvloop

from mcsproxy.config import HealthConfig, OutlierConfig
from mcsproxy.model import LOCALITY_ANNOTATION, ServiceKey, ServicePort
from mcsproxy.proxy import tcp
from mcsproxy.proxy.manager import ListenerKey, ProxyManager, UpstreamKey, settle_claims
from tests.proxy_fixtures import (
    Backend,
    Clusterset,
    ask,
    endpoint,
    free_port,
    patches_data_path,
    until,
)

WEB = ServicePort("web", "TCP", 80)


async def start_backends(spec: dict[str, int], net: int) -> list[Backend]:
    """{'east': 2, 'west': 1} → east-1 on 127.<net>.1.1, east-2 on .1.2, west-1 on .2.1."""
    backends = []
    for ci, (cluster, n) in enumerate(spec.items(), start=1):
        for i in range(1, n + 1):
            host = f"127.{net}.{ci}.{i}"
            backends.append(await Backend(f"{cluster}-{i}", host, free_port(host),
                                          cluster).start())
    return backends


def endpoints_of(backends: list[Backend]) -> list:
    return [endpoint(b.host, b.cluster, b.port) for b in backends]


async def stop_all(*things: object) -> None:
    for thing in things:
        await thing.stop()  # type: ignore[attr-defined]


async def test_spread_reaches_every_cluster() -> None:
    backends = await start_backends({"east": 1, "west": 2, "north": 1}, 31)
    cs = Clusterset("east")
    ip = "127.240.31.1"
    cs.publish("spread", ip, [WEB], endpoints_of(backends))
    proxy = await cs.proxy()
    try:
        names = [await ask(ip, 80) for _ in range(100)]
        assert {n.split("-")[0] for n in names} == {"east", "west", "north"}
        assert Counter(names) == {"east-1": 25, "west-1": 25, "west-2": 25, "north-1": 25}
    finally:
        await stop_all(proxy, *backends)


async def test_local_first_fails_over_without_client_errors_and_returns() -> None:
    backends = await start_backends({"east": 2, "west": 2}, 32)
    east = [b for b in backends if b.cluster == "east"]
    cs = Clusterset("east")
    ip = "127.240.32.1"
    cs.publish("local", ip, [WEB], endpoints_of(backends), traffic="PreferClose")
    health = HealthConfig(interval_s=0.05, timeout_s=0.5, healthy_threshold=1,
                          unhealthy_threshold=1, jitter=0.1)
    proxy = await cs.proxy(health=health, outlier=OutlierConfig(consecutive_failures=0))
    try:
        assert {(await ask(ip, 80)).split("-")[0] for _ in range(40)} == {"east"}
        for b in east:
            await b.stop()
        # Before and after the health checks notice: every connection succeeds, remotely.
        assert {(await ask(ip, 80)).split("-")[0] for _ in range(60)} == {"west"}
        upstream = next(iter(proxy.upstreams.values()))
        async with asyncio.timeout(5):
            while upstream.plan.loads != (0, 100):
                await asyncio.sleep(0.02)
        assert {(await ask(ip, 80)).split("-")[0] for _ in range(20)} == {"west"}
        for b in east:
            await b.start()
        async with asyncio.timeout(5):
            while upstream.plan.loads != (100, 0):
                await asyncio.sleep(0.02)
        assert {(await ask(ip, 80)).split("-")[0] for _ in range(20)} == {"east"}
    finally:
        await stop_all(proxy, *backends)


async def test_refused_endpoints_are_retried_and_ejected() -> None:
    backends = await start_backends({"east": 1}, 33)
    dead = "127.33.9.9"
    cs = Clusterset("east")
    ip = "127.240.33.1"
    cs.publish("retry", ip, [WEB], [*endpoints_of(backends),
                                    endpoint(dead, "west", free_port(dead))])
    proxy = await cs.proxy(outlier=OutlierConfig(consecutive_failures=3, base_ejection_s=60))
    try:
        assert [await ask(ip, 80) for _ in range(30)] == ["east-1"] * 30
        host = next(h for h in proxy.upstreams[next(iter(proxy.upstreams))].hosts.values()
                    if h.address == dead)
        assert host.ejected
    finally:
        await stop_all(proxy, *backends)


async def test_local_first_keeps_its_last_connect_attempt_for_another_cluster() -> None:
    # More local endpoints refuse than there are connect attempts, before health checks
    # or ejection notice: the tries used to stay local, and every client saw a reset
    # though west was up. The local cluster gets the tries but the last, which goes to
    # another cluster (architecture.md: the client never sees the failed connects).
    west = (await start_backends({"west": 1}, 161))[0]
    dead = [endpoint(f"127.161.9.{i}", "east", free_port(f"127.161.9.{i}")) for i in (1, 2, 3)]
    cs = Clusterset("east")
    ip = "127.240.161.1"
    cs.publish("lastcall", ip, [WEB], [*dead, *endpoints_of([west])], traffic="PreferClose")
    proxy = await cs.proxy(connect_attempts=3, outlier=OutlierConfig(consecutive_failures=0))
    try:
        assert [await ask(ip, 80) for _ in range(12)] == ["west-1"] * 12
        upstream = next(iter(proxy.upstreams.values()))
        assert upstream.plan.loads == (100, 0)  # nothing marked east down: still local-first
        # two local tries per client, then west
        assert upstream.stats.cluster("east").attempts["refused"] == 24
    finally:
        await stop_all(proxy, west)


def blackhole(address: str) -> list[socket.socket]:
    """A listening socket on `address` whose SYNs are dropped (connects to it hang), and
    the sockets that keep it so: close them all after use."""
    hole = socket.socket()
    hole.bind((address, 0))
    hole.listen(0)  # never accepted: once the queue is full, SYNs are dropped
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hole.getsockname())
        fillers.append(f)
    return [hole, *fillers]


async def test_blackholed_endpoint_costs_at_most_the_connect_timeout() -> None:
    backends = await start_backends({"east": 1}, 34)
    hole, *fillers = blackhole("127.34.9.9")
    cs = Clusterset("east")
    ip = "127.240.34.1"
    cs.publish("hole", ip, [WEB], [endpoint("127.34.9.9", "west", hole.getsockname()[1]),
                                   *endpoints_of(backends)])
    proxy = await cs.proxy(connect_timeout_s=0.2, outlier=OutlierConfig(consecutive_failures=0))
    try:
        for _ in range(6):
            started = time.monotonic()
            assert await ask(ip, 80) == "east-1"
            assert time.monotonic() - started < 0.2 + 0.5
        upstream = next(iter(proxy.upstreams.values()))
        assert sum(h.consecutive_failures for h in upstream.hosts.values()) >= 3
    finally:
        await stop_all(proxy, *backends)
        for s in (hole, *fillers):
            s.close()


async def test_a_connect_under_way_at_removal_gets_the_drain_grace_too() -> None:
    # An endpoint removed with no connection open got no drain timer; a connect to it
    # still under way then completed and the stream escaped --drain-grace for good.
    hole, *fillers = blackhole("127.71.10.1")
    cs = Clusterset("east")
    ip = "127.71.10.20"
    cs.publish("late", ip, [WEB], [endpoint("127.71.10.1", "east", hole.getsockname()[1])])
    # SYNs are sent again 1, 3 and 7 s after the first: a loaded machine that frees
    # the backlog after the second must still see the third within the timeout.
    proxy = await cs.proxy(connect_timeout_s=10.0, drain_grace_s=0.2)
    writer = None
    accepted: list[socket.socket] = []
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        await until(lambda: len(client_sides(proxy)) == 1, "the connect under way")
        [conn] = client_sides(proxy)
        cs.publish("late", ip, [WEB], [])
        await cs.served(proxy)
        hole.setblocking(False)

        def accept_all() -> bool:
            # Room in the backlog for the next SYN sent again; the fillers' SYNs are sent
            # again too and may take the room first, so it is made until ours got in.
            # Accepted ones stay open: a close would end the stream with a FIN first.
            with contextlib.suppress(BlockingIOError):
                while True:
                    accepted.append(hole.accept()[0])
            return conn.connected

        await until(accept_all, "the connect completed", timeout=9)
        try:
            ended = f"eof after {len(await asyncio.wait_for(reader.read(), 2))}"
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            ended = "open"
        assert ended == "reset"
    finally:
        if writer is not None:
            writer.close()
        await proxy.stop()
        for s in (hole, *fillers, *accepted):
            s.close()


async def test_overlapping_connects_each_time_out_on_their_own_deadline() -> None:
    # The connect timeouts of a listener share one timer (ConnectDeadlines): a
    # connect started while another waits must still get its whole timeout, and the
    # timer must come back for it after the first one expired.
    sockets = blackhole("127.84.9.9")
    cs = Clusterset("east")
    ip = "127.240.84.1"
    cs.publish("hole", ip, [WEB], [endpoint("127.84.9.9", "east", sockets[0].getsockname()[1])])
    timeout = 0.4
    proxy = await cs.proxy(connect_timeout_s=timeout, connect_attempts=1)

    async def time_to_close(delay: float) -> float:
        await asyncio.sleep(delay)
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(ip, 80)
        async with asyncio.timeout(timeout + 2):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.close()
        return time.monotonic() - started

    try:
        waited = await asyncio.gather(time_to_close(0), time_to_close(0.2), time_to_close(0.25))
        for w in waited:
            assert timeout - 0.01 <= w < timeout + 0.15, waited
    finally:
        await stop_all(proxy)
        for s in sockets:
            s.close()


async def served_through_a_stall() -> tuple[str, list[tuple[int, int, int]]]:
    backends = await start_backends({"east": 2}, 36)
    cs = Clusterset("east")
    ip = "127.240.36.1"
    cs.publish("stall", ip, [WEB], endpoints_of(backends))
    proxy = await cs.proxy(connect_timeout_s=0.3)
    try:
        answer = await ask(ip, 80)
        await asyncio.sleep(0.1)
        upstream = next(iter(proxy.upstreams.values()))
        hosts = [(h.stats.attempts["timeout"], int(h.ejected), len(h.conns))
                 for h in upstream.hosts.values()]
    finally:
        await stop_all(proxy, *backends)
    return answer, hosts


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
@patches_data_path
def test_a_connect_done_during_a_loop_stall_is_not_a_timeout(
        run, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The loop stalls (a GC pause, a burst of work) right after the first connect starts,
    # past the connect timeout: the timer and the finished connect are due together. The
    # timer used to win: a live endpoint was charged a timeout (and ejected as a silent
    # cluster), and the finished connect was adopted under the retry's endpoint, then
    # closed with the client's connection. Over loopback the connect is done when it is
    # asked again, so the proxy is told it is not: it waits for writability as it would
    # for an endpoint on another node.
    connect_ex = socket.socket.connect_ex

    def still_in_progress(self: socket.socket, address: object) -> int:
        err = connect_ex(self, address)  # type: ignore[arg-type]
        return errno.EALREADY if err == 0 else err

    connect_next = tcp.TcpConnection.connect_next
    stalled: list[bool] = []

    def connect_then_stall(self: tcp.TcpConnection) -> None:
        connect_next(self)
        if not stalled:
            stalled.append(True)
            assert self.up is not None and self.up.writing  # waiting for the connect
            time.sleep(0.5)

    monkeypatch.setattr(socket.socket, "connect_ex", still_in_progress)
    monkeypatch.setattr(tcp.TcpConnection, "connect_next", connect_then_stall)
    answer, hosts = run(served_through_a_stall())
    assert answer.startswith("east-")
    assert hosts == [(0, 0, 0), (0, 0, 0)]  # (timeouts, ejected, connections counted)


async def test_not_ready_and_removed_endpoints_get_nothing_new() -> None:
    backends = await start_backends({"east": 2, "west": 1}, 35)
    a1, a2, w1 = backends
    cs = Clusterset("east")
    ip = "127.240.35.1"
    eps = endpoints_of(backends)
    eps[2] = endpoint(w1.host, "west", w1.port, ready=False)
    cs.publish("ready", ip, [WEB], eps)
    proxy = await cs.proxy()
    try:
        assert {await ask(ip, 80) for _ in range(20)} == {"east-1", "east-2"}
        assert w1.accepted == 0
        # An established connection to east-1 survives east-1's removal (drain, no grace).
        reader, writer = await asyncio.open_connection(ip, 80)
        first = (await reader.readline()).decode().strip()
        kept = a1 if first == "east-1" else a2
        other = a2 if kept is a1 else a1
        cs.publish("ready", ip, [WEB], [endpoint(other.host, "east", other.port),
                                        endpoint(w1.host, "west", w1.port, ready=False)])
        await cs.served(proxy)
        before = kept.accepted
        assert {await ask(ip, 80) for _ in range(10)} == {other.name}
        assert kept.accepted == before
        writer.write(b"still here\n")
        assert await asyncio.wait_for(reader.readline(), 3) == b"still here\n"
        writer.close()
        await writer.wait_closed()
        # Nothing ready anywhere: kube-proxy's fallback takes the serving-and-terminating
        # endpoint, here in another cluster, and never the local one that is serving but
        # not terminating (it is starting or failing its readiness probe).
        cs.publish("ready", ip, [WEB], [
            endpoint(other.host, "east", other.port, ready=False, serving=True),
            endpoint(w1.host, "west", w1.port, ready=False, serving=True, terminating=True)])
        await cs.served(proxy)
        before = other.accepted
        assert {await ask(ip, 80) for _ in range(10)} == {"west-1"}
        assert other.accepted == before
    finally:
        await stop_all(proxy, *backends)


async def test_port_name_mapping_when_numbers_differ() -> None:
    east = await Backend("east-1", "127.36.1.1", free_port("127.36.1.1"), "east").start()
    west = await Backend("west-1", "127.36.2.1", free_port("127.36.2.1"), "west").start()
    cs = Clusterset("east")
    ip = "127.240.36.1"
    metrics = ServicePort("metrics", "TCP", 9100)
    cs.publish("named", ip, [WEB, metrics], [
        endpoint(east.host, "east", east.port, name="web"),
        endpoint(west.host, "west", west.port, name="web"),
    ])
    proxy = await cs.proxy()
    try:
        assert {await ask(ip, 80) for _ in range(10)} == {"east-1", "west-1"}
        # metrics has no endpoint port of that name anywhere: connections close, nothing sent
        reader, writer = await asyncio.open_connection(ip, 9100)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        await writer.wait_closed()
    finally:
        await stop_all(proxy, east, west)


async def test_half_close_and_bulk_echo() -> None:
    backend = await Backend("east-1", "127.37.1.1", free_port("127.37.1.1"), "east").start()
    cs = Clusterset("east")
    ip = "127.240.37.1"
    cs.publish("echo", ip, [WEB], [endpoint(backend.host, "east", backend.port)])
    proxy = await cs.proxy()
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        payload = bytes(range(256)) * 16384  # 4 MiB
        writer.write(payload)
        writer.write_eof()  # half-close: the backend still answers after our EOF
        data = await asyncio.wait_for(reader.read(), 10)
        assert data == b"east-1\n" + payload + b"bye"
        writer.close()
        await writer.wait_closed()
    finally:
        await stop_all(proxy, backend)



async def test_endpoint_half_close_reaches_the_client_which_may_still_send() -> None:
    """The endpoint answers and shuts its side first: the client sees EOF (forwarded a
    loop pass later), keeps its own direction open and still gets bytes through."""
    host = "127.37.2.1"
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def speak_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    server = await asyncio.start_server(speak_first, host, 0)
    port = server.sockets[0].getsockname()[1]
    cs = Clusterset("east")
    ip = "127.240.37.2"
    cs.publish("first", ip, [WEB], [endpoint(host, "east", port)])
    proxy = await cs.proxy()
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        assert await asyncio.wait_for(reader.read(), 3) == b"greeting"
        writer.write(b"after your EOF")
        writer.write_eof()
        assert await asyncio.wait_for(received, 3) == b"after your EOF"
        writer.close()
        await writer.wait_closed()
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()

class Flood(asyncio.Protocol):
    """Writes until its transport pauses, then reports."""

    def __init__(self, paused: asyncio.Event) -> None:
        self.paused = paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(64 * 1024)
        self.write_more()

    def write_more(self) -> None:
        chunk = b"x" * 65536
        while not self.paused.is_set():
            self.transport.write(chunk)
            if self.transport.get_write_buffer_size() > 64 * 1024:
                break

    def pause_writing(self) -> None:
        self.paused.set()


def client_sides(proxy: ProxyManager) -> list[tcp.TcpConnection]:
    return [c for c in proxy.conns if isinstance(c, tcp.TcpConnection)]


@contextlib.asynccontextmanager
async def client_that_never_reads(
        endpoint_protocol: Callable[[], asyncio.Protocol], host: str,
        ip: str) -> AsyncIterator[tuple[ProxyManager, socket.socket]]:
    """A proxy in front of an endpoint served by `endpoint_protocol` on `host`, and a
    client connected through it (ClusterSetIP `ip`) that reads nothing until told."""
    loop = asyncio.get_running_loop()
    port = free_port(host)
    server = await loop.create_server(endpoint_protocol, host, port)
    cs = Clusterset("east")
    cs.publish("slow-reader", ip, [WEB], [endpoint(host, "east", port)])
    proxy = await cs.proxy()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (ip, 80))
        yield proxy, sock
    finally:
        sock.close()
        server.close()
        await proxy.stop()


def paused_upstream(proxy: ProxyManager) -> bool:
    conns = client_sides(proxy)
    return bool(conns) and conns[0].up is not None and not conns[0].up.reading


async def test_backpressure_bounds_what_the_proxy_buffers() -> None:
    paused = asyncio.Event()
    async with client_that_never_reads(lambda: Flood(paused), "127.38.1.1",
                                       "127.240.38.1") as (proxy, _):
        await asyncio.wait_for(paused.wait(), 10)
        conn = client_sides(proxy)[0]
        assert conn.client.queued <= tcp.WRITE_HIGH_WATER + tcp.READ_BUFFER_BYTES


class Burst(asyncio.Protocol):
    """Writes 16 MiB at once (more than the kernel buffers between the proxy and its
    client take) and keeps the connection open."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BURST)  # type: ignore[attr-defined]


BURST = bytes(range(251)) * (16 * 4096)  # 16 MiB (a period that no buffer size divides)


async def test_a_paused_side_resumes_once_its_reader_catches_up() -> None:
    """16 MiB towards a client that reads nothing: the proxy queues at most its high-water
    mark plus a read, stops reading the endpoint, and once the client reads, resumes under
    the low-water mark and delivers every byte in order."""
    loop = asyncio.get_running_loop()
    async with client_that_never_reads(Burst, "127.38.1.2", "127.240.38.2") as (proxy, sock):
        await until(lambda: paused_upstream(proxy), "the endpoint's reading to pause")
        conn = client_sides(proxy)[0]
        assert conn.client.queued <= tcp.WRITE_HIGH_WATER + tcp.READ_BUFFER_BYTES
        got = bytearray()
        async with asyncio.timeout(10):
            while len(got) < len(BURST):
                got += await loop.sock_recv(sock, 65536)
        assert bytes(got) == BURST
        assert conn.up is not None and conn.up.reading and conn.client.queued == 0


async def test_an_endpoint_that_reads_nothing_pauses_the_client() -> None:
    loop = asyncio.get_running_loop()
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # accepted ones too
    listening.bind(("127.164.1.1", 0))
    listening.listen()
    listening.setblocking(False)
    cs = Clusterset("east")
    ip = "127.240.164.1"
    cs.publish("sink", ip, [WEB], [endpoint("127.164.1.1", "east", listening.getsockname()[1])])
    proxy = await cs.proxy()
    try:
        transport, _ = await loop.create_connection(Burst, ip, 80)
        accepted, _ = await loop.sock_accept(listening)  # and never read
        await until(lambda: client_sides(proxy) and not client_sides(proxy)[0].client.reading,
                    "the client's reading to pause")
        conn = client_sides(proxy)[0]
        assert conn.up is not None
        assert conn.up.queued <= tcp.WRITE_HIGH_WATER + tcp.READ_BUFFER_BYTES
        transport.close()
        accepted.close()
    finally:
        await proxy.stop()
        listening.close()


@patches_data_path
async def test_early_data_past_its_limit_pauses_the_client_until_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the client sends while the connect is in progress is held up to
    EARLY_DATA_LIMIT, then its reading pauses; connected, all of it goes through and the
    client is read again."""
    connect_next = tcp.TcpConnection.connect_next
    monkeypatch.setattr(tcp.TcpConnection, "connect_next", lambda self: None)  # by hand
    backends = await start_backends({"east": 1}, 166)
    cs = Clusterset("east")
    ip = "127.240.166.1"
    cs.publish("early", ip, [WEB], endpoints_of(backends))
    proxy = await cs.proxy()
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        early = os.urandom(200 * 1024)
        writer.write(early)
        await until(lambda: client_sides(proxy) and
                    client_sides(proxy)[0].early_size >= tcp.EARLY_DATA_LIMIT,
                    "early data up to its limit")
        conn = client_sides(proxy)[0]
        assert not conn.client.reading
        assert conn.early_size < tcp.EARLY_DATA_LIMIT + tcp.READ_BUFFER_BYTES
        connect_next(conn)
        assert conn.connected
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), 10)
        assert echoed == b"east-1\n" + early + b"bye"
        writer.close()
    finally:
        await stop_all(proxy, *backends)


async def test_affinity_keeps_a_client_on_one_endpoint() -> None:
    backends = await start_backends({"east": 2, "west": 2}, 39)
    cs = Clusterset("east")
    ip = "127.240.39.1"
    cs.publish("sticky", ip, [WEB], endpoints_of(backends), affinity="ClientIP")
    proxy = await cs.proxy()
    try:
        assert len({await ask(ip, 80) for _ in range(20)}) == 1
    finally:
        await stop_all(proxy, *backends)


async def test_affinity_lasts_the_imports_timeout_seconds() -> None:
    # mcs-spec "Data plane": ClientIP keeps a client on one endpoint for timeoutSeconds,
    # taken from the import (kube-proxy's 10800 when unset); affinity None is no table.
    backends = await start_backends({"east": 2, "west": 2}, 162)
    cs = Clusterset("east")
    ip = "127.240.162.1"
    cs.publish("sticky", ip, [WEB], endpoints_of(backends), affinity="ClientIP",
               affinity_timeout_s=30)
    proxy = await cs.proxy()
    try:
        upstream = next(iter(proxy.upstreams.values()))
        assert upstream.affinity is not None and upstream.affinity.timeout_s == 30
        assert len({await ask(ip, 80) for _ in range(12)}) == 1
        cs.publish("sticky", ip, [WEB], endpoints_of(backends), affinity="ClientIP",
                   affinity_timeout_s=600)
        await cs.served(proxy)
        assert upstream.affinity is not None and upstream.affinity.timeout_s == 600
        cs.publish("sticky", ip, [WEB], endpoints_of(backends))
        await cs.served(proxy)
        assert upstream.affinity is None
        assert len({await ask(ip, 80) for _ in range(12)}) == 4
    finally:
        await stop_all(proxy, *backends)


@pytest.mark.parametrize(("traffic", "annotation", "clusters"), [
    (None, None, {"east", "west"}),  # spread by default, the local cluster included
    ("PreferClose", None, {"east"}),
    ("PreferClose", "spread", {"east", "west"}),  # the annotation wins
    (None, "local-first", {"east"}),
    ("PreferClose", "nearest", {"east"}),  # an unknown annotation value is ignored
])
async def test_locality_follows_traffic_distribution_and_the_annotation(
        traffic: str | None, annotation: str | None, clusters: set[str]) -> None:
    backends = await start_backends({"east": 1, "west": 1}, 163)
    cs = Clusterset("east")
    ip = "127.240.163.1"
    cs.publish("where", ip, [WEB], endpoints_of(backends), traffic=traffic,
               annotations={LOCALITY_ANNOTATION: annotation} if annotation else {})
    proxy = await cs.proxy()
    try:
        assert {(await ask(ip, 80)).split("-")[0] for _ in range(10)} == clusters
    finally:
        await stop_all(proxy, *backends)


async def test_listeners_follow_snapshots_without_disturbing_connections() -> None:
    backend = await Backend("east-1", "127.40.1.1", free_port("127.40.1.1"), "east").start()
    cs = Clusterset("east")
    ip, ip2 = "127.240.40.1", "127.240.40.2"
    cs.publish("one", ip, [WEB], [endpoint(backend.host, "east", backend.port)])
    proxy = await cs.proxy()
    try:
        listener = next(iter(proxy.listeners.values()))
        reader, writer = await asyncio.open_connection(ip, 80)
        assert await reader.readline() == b"east-1\n"
        cs.publish("two", ip2, [WEB], [endpoint(backend.host, "east", backend.port)])
        await cs.served(proxy)
        assert next(iter(proxy.listeners.values())) is listener  # untouched
        assert await ask(ip2, 80) == "east-1"
        cs.withdraw("one")
        await cs.served(proxy)
        with pytest.raises(ConnectionRefusedError):
            await ask(ip, 80)
        writer.write(b"ping\n")  # the established connection carries on
        assert await asyncio.wait_for(reader.readline(), 3) == b"ping\n"
        writer.close()
        await writer.wait_closed()
    finally:
        await stop_all(proxy, backend)


async def test_a_renamed_port_keeps_its_connections_and_endpoint_state() -> None:
    """Renaming a service port (and its endpoints' port) changes nothing a connection
    uses: the listener stayed, but the old name's upstream set was closed, so every
    endpoint retired and --drain-grace cut the established connections."""
    backend = await Backend("east-1", "127.40.2.1", free_port("127.40.2.1"), "east").start()
    cs = Clusterset("east")
    ip = "127.240.40.3"
    cs.publish("renamed", ip, [WEB], [endpoint(backend.host, "east", backend.port)])
    proxy = await cs.proxy(drain_grace_s=0.0)
    try:
        upstream = proxy.upstreams[UpstreamKey(ServiceKey("test", "renamed"), "web", "TCP")]
        reader, writer = await asyncio.open_connection(ip, 80)
        assert await reader.readline() == b"east-1\n"
        cs.publish("renamed", ip, [ServicePort("www", "TCP", 80)],
                   [endpoint(backend.host, "east", backend.port, name="www")])
        await cs.served(proxy)
        writer.write(b"ping\n")  # a grace of 0 s aborted it on the next loop turn
        assert await asyncio.wait_for(reader.readline(), 3) == b"ping\n"
        ukey = UpstreamKey(ServiceKey("test", "renamed"), "www", "TCP")
        assert set(proxy.upstreams) == {ukey}
        assert proxy.upstreams[ukey] is upstream and not upstream.draining
        assert await ask(ip, 80) == "east-1"
        writer.close()
        await writer.wait_closed()
    finally:
        await stop_all(proxy, backend)


async def echo_head_backend(host: str) -> tuple[asyncio.Server, int]:
    """An HTTP endpoint that answers with the request head it received (one per connection)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(head) + head)
        await writer.drain()
        writer.close()

    port = free_port(host)
    return await asyncio.start_server(handle, host, port), port


async def proxied_as(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """'http' when the gateway parsed the request (it adds X-Forwarded-For), else 'tcp'."""
    writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return "http" if b"x-forwarded-for" in answer.lower() else "tcp"


async def test_a_port_gaining_or_losing_app_protocol_http_changes_how_it_is_proxied() -> None:
    server, port = await echo_head_backend("127.38.1.1")
    cs = Clusterset("east")
    ip = "127.240.38.1"
    http = ServicePort("web", "TCP", 80, "http")
    cs.publish("web", ip, [WEB], [endpoint("127.38.1.1", "east", port)])
    proxy = await cs.proxy()
    try:
        assert await proxied_as(*await asyncio.open_connection(ip, 80)) == "tcp"
        established = await asyncio.open_connection(ip, 80)
        cs.publish("web", ip, [http], [endpoint("127.38.1.1", "east", port)])
        await cs.served(proxy)
        assert await proxied_as(*await asyncio.open_connection(ip, 80)) == "http"
        assert await proxied_as(*established) == "tcp"  # kept as it was accepted
        # Moved in one snapshot to another service whose port is plain TCP: back to streams.
        cs.withdraw("web")
        cs.publish("other", ip, [WEB], [endpoint("127.38.1.1", "east", port)])
        await cs.served(proxy)
        assert await proxied_as(*await asyncio.open_connection(ip, 80)) == "tcp"
    finally:
        await proxy.stop()
        server.close()


async def test_sctp_is_logged_once_and_not_served(caplog: pytest.LogCaptureFixture) -> None:
    cs = Clusterset("east")
    sctp = ServicePort("sig", "SCTP", 3868)
    cs.publish("sctp", "127.240.41.1", [sctp], [endpoint("127.41.1.1", "east", 3868,
                                                         name="sig", protocol="SCTP")])
    proxy = await cs.proxy()
    try:
        cs.publish("sctp", "127.240.41.1", [sctp], [])
        await cs.served(proxy)
        assert sum("SCTP is not supported" in r.getMessage() for r in caplog.records) == 1
        assert proxy.listeners == {}
    finally:
        await proxy.stop()


async def test_endpoint_change_keeps_listeners_without_walking_every_service() -> None:
    backends = await start_backends({"east": 1, "west": 1}, 91)
    east, west = backends
    cs = Clusterset("east")
    ip = "127.240.91.1"
    cs.publish("walk", ip, [WEB], [endpoint(east.host, "east", east.port)])
    proxy = await cs.proxy()
    try:
        assert await ask(ip, 80) == "east-1"
        walks = proxy.listener_walks
        listener = proxy.listeners[next(iter(proxy.listeners))]
        # endpoints only: served at once, same listener object, no walk over the services
        cs.publish("walk", ip, [WEB], [endpoint(west.host, "west", west.port)])
        await cs.served(proxy)
        assert proxy.listener_walks == walks
        assert await ask(ip, 80) == "west-1"
        assert proxy.listeners[next(iter(proxy.listeners))] is listener
        # a new port changes the listener set: walked, and the new listener serves
        cs.publish("walk", ip, [WEB, ServicePort("alt", "TCP", 81, None)],
                   [endpoint(west.host, "west", west.port),
                    endpoint(west.host, "west", west.port, name="alt")])
        await cs.served(proxy)
        assert proxy.listener_walks == walks + 1
        assert await ask(ip, 81) == "west-1"
        cs.withdraw("walk")
        await cs.served(proxy)
        assert proxy.listeners == {}
    finally:
        await stop_all(proxy, *backends)


async def test_a_listener_that_could_not_bind_is_tried_again_without_a_new_snapshot(
        caplog: pytest.LogCaptureFixture) -> None:
    """The ClusterSetIP:port is held by another socket when the snapshot comes (an old
    gateway process still closing, another daemon): once it is free the listener opens,
    though no snapshot follows (a static file source sends none). The failure is logged
    once, not at every retry."""
    (backend,) = await start_backends({"east": 1}, 94)
    ip = "127.240.94.1"
    blocker = socket.socket()
    blocker.bind((ip, 80))
    blocker.listen()
    cs = Clusterset("east")
    cs.publish("web", ip, [WEB], endpoints_of([backend]))
    proxy = await cs.proxy()
    try:
        await cs.served(proxy)
        assert proxy.listeners == {}
        await asyncio.sleep(1.0)  # a retry or two, still taken
        assert caplog.text.count("cannot listen") == 1
        blocker.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await ask(ip, 80, timeout=1) == "east-1"
                break
            except OSError:
                assert time.monotonic() < deadline, "the listener never opened"
                await asyncio.sleep(0.05)
    finally:
        blocker.close()
        await stop_all(proxy, backend)


def set_reset_on_close(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))


async def resets_through_the_proxy() -> tuple[str, str]:
    """(what the client sees of the endpoint's RST, what the endpoint sees of the client's)."""
    endpoint_saw: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 1000)
        command = await reader.readexactly(5)
        if command == b"reset":
            set_reset_on_close(writer)
            writer.transport.abort()
            return
        try:
            rest = await reader.read()
            endpoint_saw.set_result(f"EOF after {len(rest)}")
        except ConnectionResetError:
            endpoint_saw.set_result("reset")
        writer.close()

    host = "127.92.20.1"
    server = await asyncio.start_server(serve, host, port := free_port(host))
    cs = Clusterset("east")
    ip = "127.240.92.20"
    cs.publish("rst", ip, [WEB], [endpoint(host, "east", port)])
    proxy = await cs.proxy()
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        await reader.readexactly(1000)
        writer.write(b"reset")
        try:
            client_saw = f"EOF after {len(await asyncio.wait_for(reader.read(), 3))}"
        except ConnectionResetError:
            client_saw = "reset"
        writer.close()
        reader, writer = await asyncio.open_connection(ip, 80)
        await reader.readexactly(1000)
        writer.write(b"data-")
        await writer.drain()
        await asyncio.sleep(0.1)
        set_reset_on_close(writer)
        writer.transport.abort()
        return client_saw, await asyncio.wait_for(endpoint_saw, 3)
    finally:
        await proxy.stop()
        server.close()


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_a_reset_reaches_the_other_side_as_a_reset(run) -> None:  # type: ignore[no-untyped-def]
    # transport.abort() closes with a FIN: a connection reset mid-stream by either peer
    # reached the other as an orderly end, so a cut response or upload looked complete.
    assert run(resets_through_the_proxy()) == ("reset", "reset")


async def cut_by_the_gateway(cut_by: str) -> tuple[str, str]:
    """(what the client sees, what the endpoint sees) of a stream the gateway cuts
    mid-transfer both ways: 'drain grace' (its endpoint removed, --drain-grace over) or
    'stop' (the gateway's, past --drain-timeout)."""
    endpoint_saw: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 1000)
        try:
            while await reader.read(65536):
                pass
            endpoint_saw.set_result("eof")
        except ConnectionResetError:
            endpoint_saw.set_result("reset")
        writer.close()

    host = "127.71.2.1"
    server = await asyncio.start_server(serve, host, port := free_port(host))
    cs = Clusterset("east")
    ip = "127.71.2.20"
    cs.publish("grace", ip, [WEB], [endpoint(host, "east", port)])
    proxy = await cs.proxy(drain_grace_s=0.1)
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        await reader.readexactly(1000)  # a download half done
        writer.write(b"an upload half done")
        await writer.drain()
        if cut_by == "stop":
            await proxy.stop()
        else:
            cs.publish("grace", ip, [WEB], [])
        try:
            client_saw = f"eof after {len(await asyncio.wait_for(reader.read(), 3))}"
        except ConnectionResetError:
            client_saw = "reset"
        writer.close()
        return client_saw, await asyncio.wait_for(endpoint_saw, 3)
    finally:
        await proxy.stop()
        server.close()


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("cut_by", ["drain grace", "stop"])
def test_a_stream_the_gateway_cuts_is_reset_both_ways(run, cut_by: str) -> None:  # type: ignore[no-untyped-def]
    # When --drain-grace ran out, or --drain-timeout on a stop, both sides were closed
    # with a FIN: the client took the cut download, and the endpoint the cut upload, for
    # a complete one.
    assert run(cut_by_the_gateway(cut_by)) == ("reset", "reset")


def keepalive_of(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT ms)."""
    tcp = socket.IPPROTO_TCP
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(tcp, socket.TCP_KEEPIDLE), sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
            sock.getsockopt(tcp, socket.TCP_KEEPCNT), sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT))


async def test_both_sockets_of_a_stream_carry_keepalive() -> None:
    # Without keepalive (and, towards the endpoint, TCP_USER_TIMEOUT) a peer gone silent
    # held a stream for the whole idle timeout (tests/test_chaos_netns.py cuts a link).
    # The client's socket inherits it from the listening socket; the endpoint's gets it
    # at connect, its probe count left out (the user timeout ends unanswered probes).
    backend = await Backend("east-1", "127.71.9.1", free_port("127.71.9.1"), "east").start()
    cs = Clusterset("east")
    ip = "127.71.9.20"
    cs.publish("ka", ip, [WEB], [endpoint(backend.host, "east", backend.port)])
    proxy = await cs.proxy(tcp_keepalive=(7, 3, 2), tcp_user_timeout_s=20.0)
    try:
        reader, writer = await asyncio.open_connection(ip, 80)
        assert await reader.readline() == b"east-1\n"
        [conn] = client_sides(proxy)
        assert conn.up is not None
        with socket.socket() as fresh:
            default_probes = fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
        assert keepalive_of(conn.client.sock) == (1, 7, 3, 2, 0)
        assert keepalive_of(conn.up.sock) == (1, 7, 3, default_probes, 20_000)
        writer.close()
        await writer.wait_closed()
    finally:
        await stop_all(proxy, backend)


class Http2Only(asyncio.Protocol):
    """An h2c server with prior knowledge only (as a gRPC server): whatever it reads, it
    answers with HTTP/2 SETTINGS and GOAWAY frames and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        goaway = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + b"\x00" * 4 + b"\x00\x00\x00\x01"
        self.transport.write(settings + goaway)
        self.transport.close()


async def test_an_h2c_port_is_health_checked_by_tcp_connect() -> None:
    # h2c stays a TCP stream (the proxy does not speak HTTP/2), yet it was probed with
    # an HTTP/1.1 GET: an HTTP/2-only endpoint (a gRPC server) never answers with an
    # HTTP/1.1 status line, so every endpoint of every h2c service went unhealthy.
    loop = asyncio.get_running_loop()
    host = "127.92.21.1"
    server = await loop.create_server(Http2Only, host, port := free_port(host))
    cs = Clusterset("east")
    ip = "127.240.92.21"
    grpc = ServicePort("grpc", "TCP", 80, app_protocol="kubernetes.io/h2c")
    cs.publish("grpc", ip, [grpc], [endpoint(host, "east", port, name="grpc")])
    proxy = await cs.proxy(health=HealthConfig(interval_s=0.05, timeout_s=0.5,
                                               healthy_threshold=1, unhealthy_threshold=1))
    try:
        upstream = next(iter(proxy.upstreams.values()))
        assert upstream.health_checker is not None
        await asyncio.sleep(0.3)  # several probe rounds
        assert all(h.healthy for h in upstream.hosts.values())
    finally:
        await proxy.stop()
        server.close()


# appProtocol → HTTP/1.1 proxy and HTTP health checks, or a TCP relay and TCP connect
# checks. Only `http`, compared case-insensitively as RFC 6335 service names are. h2c is
# HTTP/2; ws/wss endpoints may answer a plain GET with 400/426 (an HTTP check would mark
# them all down), https is TLS end to end: all stay TCP streams, like any other value.
APP_PROTOCOLS = [
    ("http", True), ("HTTP", True), ("Http", True),
    (None, False), ("https", False), ("kubernetes.io/h2c", False), ("kubernetes.io/ws", False),
    ("kubernetes.io/wss", False), ("http2", False), ("grpc", False), ("example.com/http", False),
]


@pytest.mark.parametrize(("app_protocol", "http"), APP_PROTOCOLS)
async def test_which_app_protocols_get_the_http_proxy(app_protocol: str | None,
                                                      http: bool) -> None:
    cs = Clusterset("east")
    ip = f"127.240.93.{APP_PROTOCOLS.index((app_protocol, http)) + 1}"
    port = ServicePort("web", "TCP", 80, app_protocol=app_protocol)
    cs.publish("web", ip, [port], [endpoint("127.93.0.1", "east", 8080, name="web")])
    proxy = await cs.proxy(health=HealthConfig(interval_s=60))
    try:
        [listener] = proxy.listeners.values()
        [upstream] = proxy.upstreams.values()
        assert listener.stream is not None and listener.stream.http is http
        assert upstream.health_checker is not None and upstream.health_checker.http is http
    finally:
        await proxy.stop()


class ShortOfDescriptors(socket.socket):
    """A listening socket whose accept fails with EMFILE while `short` is set."""

    short = True

    def _accept(self) -> tuple[int, object]:
        if self.short:
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()  # type: ignore[misc]


def listener_on(sock: socket.socket, ip: str) -> tcp.StreamListener:
    """A TCP stream listener on `sock` (bound to `ip`, listening) whose service has no
    endpoint: what it accepts is closed at once."""
    from mcsproxy.config import ProxyConfig
    from mcsproxy.proxy.context import ListenerContext
    from mcsproxy.upstream import UpstreamSet

    config = ProxyConfig()
    ctx = ListenerContext("test", UpstreamSet("ns/s:p", "east", config), config, set())
    sock.bind((ip, 0))
    sock.listen(64)
    sock.setblocking(False)
    return tcp.StreamListener(ctx, asyncio.get_running_loop(), sock,
                              lambda: asyncio.Protocol(), False)


async def test_one_readiness_event_accepts_every_waiting_connection() -> None:
    listener = listener_on(socket.socket(), "127.94.1.1")
    clients = [socket.create_connection(listener.sock.getsockname()) for _ in range(5)]
    try:
        assert tcp.accept_queue_length(listener.sock) == 5
        listener.accept_ready()
        assert tcp.accept_queue_length(listener.sock) == 0
        assert listener.ctx.gave_up == 5  # each was taken, found no endpoint, was closed
    finally:
        listener.close()
        for c in clients:
            c.close()


async def test_a_listener_short_of_descriptors_pauses_and_then_accepts() -> None:
    listener = listener_on(ShortOfDescriptors(), "127.94.1.2")
    listener.accept_here()
    client = socket.create_connection(listener.sock.getsockname())
    try:
        await until(lambda: not listener.accepting, "accepting to pause")
        waiting = partial(tcp.accept_queue_length, listener.sock)
        assert listener.resume_timer is not None and waiting() == 1
        ShortOfDescriptors.short = False
        await until(lambda: waiting() == 0, "the waiting client to be accepted")
        assert listener.accepting and listener.ctx.gave_up == 1
    finally:
        ShortOfDescriptors.short = True
        listener.close()
        client.close()


@pytest.mark.parametrize("order", [1, -1])
def test_a_clustersetip_port_two_services_claim_goes_to_the_smaller_key(
        order: int, caplog: pytest.LogCaptureFixture) -> None:
    """In either order: the snapshot's order is a hash order Python salts per process, and
    with --workers 2 one address served both services (17 and 23 of 40 connections)."""
    lkey = ListenerKey("127.240.9.1", 80, "TCP")
    port = ServicePort("http", "TCP", 80)
    a, b = (UpstreamKey(ServiceKey("demo", n), "http", "TCP") for n in ("a", "b"))
    claims = [(lkey, a, port), (lkey, b, port)][::order]
    with caplog.at_level(logging.WARNING, "mcsproxy.proxy.manager"):
        assert settle_claims(claims) == {lkey: (a, port)}
    assert "claimed by demo/a:http/TCP and demo/b:http/TCP; keeping demo/a:http/TCP" in caplog.text
