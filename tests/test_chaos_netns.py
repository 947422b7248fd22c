"""Faults between the gateway and three clusters built as network namespaces (tests/netns.py):
a cluster's link goes down, a cluster is blackholed, a cluster loses 30 % of its packets,
a cluster's pod is SIGKILLed mid-stream. For each, under steady HTTP and TCP load:
client-visible failures within the stated budget, no request sent after the gateway
detected the fault is served by the faulty cluster, and full recovery once it heals.

Figures are printed (`pytest -s tests/test_chaos_netns.py`) as one `chaos:` line per fault.
Root only; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from mcsproxy.config import HttpConfig, OutlierConfig
from mcsproxy.model import ServicePort
from tests.chaos.backend import HTTP_PORT, TCP_PORT
from tests.chaos.support import GatewayProcess, Port, Svc, wait_until, write_imports
from tests.http_support import HTTP_PORT as WEB_PORT
from tests.http_support import RawClient, start_backends
from tests.netns import NetnsClusters, netns_skip_reason
from tests.proxy_fixtures import Backend, Clusterset, ask, endpoint, free_port

CLUSTERS = ["a", "b", "c"]
WEB_IP, ECHO_IP = "127.240.77.20", "127.240.77.21"
# Quick health checks so a fault is seen in about a second (the defaults are 5 s).
FAST = ["--health-interval", "0.2", "--health-timeout", "0.2",
        "--health-unhealthy-threshold", "2", "--health-healthy-threshold", "1",
        "--connect-timeout", "0.25", "--http-per-try-timeout", "0.5",
        "--http-request-timeout", "3", "--outlier-consecutive-failures", "2",
        "--outlier-base-ejection", "1", "--drain-timeout", "0"]
CLIENT_TIMEOUT_S = 3.0

skip = netns_skip_reason()
pytestmark = pytest.mark.skipif(skip is not None, reason=skip or "")


@pytest.fixture(scope="module")
def clusters() -> Iterator[NetnsClusters]:
    cs = NetnsClusters(CLUSTERS)
    try:
        cs.setup()
        for name in CLUSTERS:
            cs.start_pod(name)
        yield cs
    finally:
        cs.teardown()


@dataclass
class Record:
    kind: str
    sent: float
    done: float
    cluster: str | None  # None: failed
    error: str = ""


@dataclass
class Load:
    records: list[Record] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def since(self, t: float) -> list[Record]:
        return [r for r in self.records if r.sent >= t]

    async def http_user(self, http: ClientSession) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                async with http.get(f"http://{WEB_IP}/") as resp:
                    body = (await resp.read()).decode()
                ok = resp.status == 200
                self.records.append(Record("http", sent, time.monotonic(),
                                           body if ok else None, f"HTTP {resp.status}"))
            except (ClientError, TimeoutError, OSError) as exc:
                self.records.append(Record("http", sent, time.monotonic(), None, repr(exc)))

    async def tcp_user(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                async with asyncio.timeout(CLIENT_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(ECHO_IP, 9000)
                    try:
                        writer.write(b"ping")
                        name = (await reader.readline()).decode().strip()
                        assert await reader.readexactly(4) == b"ping"
                    finally:
                        writer.close()
                        with contextlib.suppress(ConnectionError):
                            await writer.wait_closed()
                self.records.append(Record("tcp", sent, time.monotonic(), name))
            except (OSError, TimeoutError, AssertionError, asyncio.IncompleteReadError) as exc:
                self.records.append(Record("tcp", sent, time.monotonic(), None, repr(exc)))
                await asyncio.sleep(0.05)  # a refused client backs off a little, as real ones do

    async def run(self) -> None:
        connector = TCPConnector(limit=3)
        async with ClientSession(connector=connector,
                                 timeout=ClientTimeout(total=CLIENT_TIMEOUT_S)) as http:
            await asyncio.gather(*(self.http_user(http) for _ in range(3)),
                                 self.tcp_user(), self.tcp_user())


def imports(cs: NetnsClusters) -> list[Svc]:
    eps = {name: [(cs.address(name), True)] for name in CLUSTERS}
    return [Svc("web", WEB_IP, [Port("web", 80, HTTP_PORT, app_protocol="http")], eps),
            Svc("echo", ECHO_IP, [Port("echo", 9000, TCP_PORT)], eps)]


async def victim_state(gw: GatewayProcess, victim: str) -> list[bool]:
    """Per endpoint of the victim cluster (both services): is it out of rotation?"""
    _, body = await gw.admin_get("/endpoints")
    return [not row["healthy"] or row["ejected"] for row in body["endpoints"]  # type: ignore[index]
            if row["cluster"] == victim]


async def until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Poll an async condition with a deadline; returns when it held (monotonic)."""
    deadline = time.monotonic() + timeout
    while not await cond():  # type: ignore[misc]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def scenario(tmp_path: Path, cs: NetnsClusters, name: str, victim: str,
                   inject: Callable[[], None], heal: Callable[[], None], budget: int,
                   dead: bool = True) -> None:
    path = tmp_path / "imports.yaml"
    write_imports(path, imports(cs))
    gw = GatewayProcess(f"file:{path}", *FAST, cluster_id="a")
    load = Load()
    runner: asyncio.Task[None] | None = None
    try:
        await gw.start()
        await gw.wait_ready()
        await gw.wait_line(f"listener {ECHO_IP}:9000/TCP serving")
        runner = asyncio.create_task(load.run())
        await wait_until(lambda: {r.cluster for r in load.records} >= set(CLUSTERS),
                         "every cluster serving before the fault")
        t_fault = time.monotonic()
        inject()
        t_detect = None
        if dead:
            t_detect = await until(lambda: _all_down(gw, victim), f"{victim} detected down")
            await wait_until(lambda: len(load.since(t_detect)) >= 40, "load after detection")
        else:
            await wait_until(lambda: len(load.since(t_fault)) >= 60, "load under the fault",
                             timeout=20)
        t_heal = time.monotonic()
        heal()
        await until(lambda: _all_up(gw, victim), f"{victim} healthy again")
        t_back = time.monotonic()
        await wait_until(lambda: any(r.cluster == victim for r in load.since(t_back)),
                         f"traffic to {victim} again")
        t_recovered = time.monotonic()
        load.stop.set()
        await asyncio.wait_for(runner, CLIENT_TIMEOUT_S + 2)

        window = [r for r in load.records if t_fault <= r.sent <= t_heal]
        failures = [r for r in load.records if r.cluster is None]
        served_dead = [r for r in load.records if t_detect is not None
                       and r.sent > t_detect and r.done < t_heal and r.cluster == victim]
        print(f"\nchaos: fault={name} requests={len(load.records)} "
              f"in_fault_window={len(window)} failures={len(failures)} budget={budget} "
              f"detect_s={(t_detect - t_fault) if t_detect else float('nan'):.2f} "
              f"served_by_dead_after_detection={len(served_dead)} "
              f"recover_s={t_recovered - t_heal:.2f}")
        assert len(failures) <= budget, [r.error for r in failures]
        assert not served_dead, served_dead[:3]
        assert {r.cluster for r in load.since(t_back)} >= {victim}
    finally:
        load.stop.set()
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await gw.stop()


async def _all_down(gw: GatewayProcess, victim: str) -> bool:
    state = await victim_state(gw, victim)
    return bool(state) and all(state)


async def _all_up(gw: GatewayProcess, victim: str) -> bool:
    state = await victim_state(gw, victim)
    return bool(state) and not any(state)


# Budgets: HTTP GETs are retried on another cluster (connect failures always; a per-try
# timeout for idempotent requests), new TCP connections are retried when the connect
# fails; what cannot be hidden is a TCP connection already established to the cluster
# when it goes (each of the two TCP users may have one in flight).
async def test_cluster_link_down(tmp_path: Path, clusters: NetnsClusters) -> None:
    await scenario(tmp_path, clusters, "link-down", "c", lambda: clusters.link("c", False),
                   lambda: clusters.link("c", True), budget=2)


async def test_cluster_blackholed(tmp_path: Path, clusters: NetnsClusters) -> None:
    await scenario(tmp_path, clusters, "blackhole", "b", lambda: clusters.blackhole("b", True),
                   lambda: clusters.blackhole("b", False), budget=2)


@pytest.mark.skipif(netns_skip_reason(need_nft=True) is not None,
                    reason=netns_skip_reason(need_nft=True) or "")
async def test_cluster_with_30_percent_packet_loss(tmp_path: Path,
                                                   clusters: NetnsClusters) -> None:
    # Lossy, not dead: the cluster may flap in and out; clients must barely notice.
    await scenario(tmp_path, clusters, "loss-30%", "c", lambda: clusters.loss("c", 30),
                   lambda: clusters.loss("c", None), budget=3, dead=False)


async def test_pod_sigkilled_mid_stream(tmp_path: Path, clusters: NetnsClusters) -> None:
    await scenario(tmp_path, clusters, "pod-sigkill", "b", lambda: clusters.kill_pod("b"),
                   lambda: clusters.start_pod("b"), budget=2)


async def test_requests_on_every_endpoint_of_a_silent_cluster_are_retried_at_once(
        clusters: NetnsClusters) -> None:
    # A connect timeout into a silent cluster ejected that endpoint and retried the
    # requests waiting on it; those waiting as long on the cluster's other endpoint (kept
    # alive, no connect to time out) waited out their per-try timeout (2 s with
    # local-first and two local endpoints blackholed, 15 s by default). Unacknowledged
    # for a connect timeout (a blackhole cannot acknowledge), they are retried at once.
    [live] = await start_backends({"west": 1}, 78)
    cs = Clusterset("east")
    cs.publish("silent2", "127.240.79.21", [WEB_PORT],
               [endpoint(clusters.address("a"), "east", HTTP_PORT),
                endpoint(clusters.address("b"), "east", HTTP_PORT),
                endpoint(live.host, "west", live.port)], traffic="PreferClose")
    proxy = await cs.proxy(connect_timeout_s=0.3,
                           http=HttpConfig(per_try_timeout_s=10, request_timeout_s=20),
                           outlier=OutlierConfig(max_ejection_percent=100))
    clients: list[RawClient] = []
    try:
        for _ in range(2):  # round robin: a pooled connection to each east endpoint
            c = await RawClient.open("127.240.79.21", 80)
            clients.append(c)
            assert (await c.get("/")).status == 200
        clusters.blackhole("a", True)
        clusters.blackhole("b", True)
        for n, c in enumerate(clients):  # one request waiting on each, unacknowledged
            c.send(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        await asyncio.sleep(0.35)  # the waiting requests have waited a connect timeout
        started = time.monotonic()
        third = await RawClient.open("127.240.79.21", 80)
        clients.append(third)
        r3 = await third.get("/3")  # a fresh connect into the silence: it times out
        r1, r2 = [await c.response(timeout=5) for c in clients[:2]]
        took = time.monotonic() - started
        assert [(r.status, r.body) for r in (r1, r2, r3)] == [(200, b"west-1")] * 3
        assert took < 2.0, took  # one 0.3 s connect timeout, not the 10 s per-try one
        upstream = next(iter(proxy.upstreams.values()))
        assert all(h.ejected for h in upstream.hosts.values() if h.cluster == "east")
    finally:
        clusters.blackhole("a", False)
        clusters.blackhole("b", False)
        for c in clients:
            await c.close()
        await proxy.stop()
        await live.stop()


async def test_keepalive_request_into_a_blackholed_local_cluster_is_retried_early(
        clusters: NetnsClusters) -> None:
    # A GET sent on a pooled keep-alive connection has no connect to time out: into a
    # blackholed cluster it waited out the per-try timeout (15 s by default), and every
    # keep-alive client of a local-first service stalled until its own timeout (14 of 14
    # requests in flight). The endpoint not acknowledging the request for a connect
    # timeout, with nothing in its cluster answering, now fails it as a timeout.
    [live] = await start_backends({"west": 1}, 79)
    cs = Clusterset("east")
    cs.publish("lf", "127.240.79.20", [WEB_PORT],
               [endpoint(clusters.address("a"), "east", HTTP_PORT),
                endpoint(live.host, "west", live.port)], traffic="PreferClose")
    proxy = await cs.proxy(connect_timeout_s=0.3,
                           http=HttpConfig(per_try_timeout_s=10, request_timeout_s=20))
    client = None
    try:
        client = await RawClient.open("127.240.79.20", 80)
        first = await client.get("/")
        assert (first.status, first.body) == (200, b"a")  # local, kept alive both ways
        clusters.blackhole("a", True)
        started = time.monotonic()
        second = await client.get("/")
        took = time.monotonic() - started
        assert (second.status, second.body) == (200, b"west-1")
        assert took < 2.0, took  # about a connect timeout, not the 10 s per-try one
        upstream = next(iter(proxy.upstreams.values()))
        assert all(h.ejected for h in upstream.hosts.values() if h.cluster == "east")
    finally:
        clusters.blackhole("a", False)
        if client is not None:
            await client.close()
        await proxy.stop()
        await live.stop()


async def test_an_unacknowledged_request_on_an_endpoint_kept_in_waits_for_its_answer(
        clusters: NetnsClusters) -> None:
    # A sole endpoint, which --outlier-max-ejection-percent keeps in: its request, cut
    # off for a moment, is still answered once the path heals (TCP retransmits it), so
    # the silence of its cluster does not fail it early, as it does not fail a slow one.
    cs = Clusterset("east")
    cs.publish("sole", "127.240.79.22", [WEB_PORT],
               [endpoint(clusters.address("c"), "east", HTTP_PORT)])
    proxy = await cs.proxy(connect_timeout_s=0.3,
                           http=HttpConfig(per_try_timeout_s=5, request_timeout_s=10))
    client = None
    holed = False
    try:
        client = await RawClient.open("127.240.79.22", 80)
        first = await client.get("/")
        assert (first.status, first.body) == (200, b"c")
        clusters.blackhole("c", True)
        holed = True
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(1.0)  # past the 0.3-0.9 s in which a silent wait is judged
        clusters.blackhole("c", False)
        holed = False
        second = await client.response(timeout=5)
        assert (second.status, second.body) == (200, b"c")
        [host] = next(iter(proxy.upstreams.values())).hosts.values()
        assert not host.ejected
    finally:
        if holed:
            clusters.blackhole("c", False)
        if client is not None:
            await client.close()
        await proxy.stop()


async def broken_off(reader: asyncio.StreamReader, timeout: float) -> str:
    """How a proxied stream ends for its client: 'reset', 'eof' or 'open' (still held)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"


async def test_a_stream_to_a_cluster_cut_off_silently_ends_in_bounded_time(
        clusters: NetnsClusters) -> None:
    # A cut link sends no RST. With neither keepalive nor TCP_USER_TIMEOUT on the endpoint
    # socket, a stream to the cut cluster was held for the whole idle timeout (3600 s):
    # idle, nothing is ever sent; with data in flight, Linux retransmits for ~15 min.
    # Now each ends within the user timeout (data or a FIN in flight) or keepalive
    # (idle), and the client gets a RST, as for a reset endpoint: it reconnects to a
    # live endpoint.
    # The same for an HTTP response under way (the HTTP proxy's pooled connections).
    live = await Backend("west-1", "127.71.1.11", free_port("127.71.1.11"), "west").start()
    cs = Clusterset("east")
    tcp_ip, web_ip = "127.71.1.1", "127.71.1.2"
    cs.publish("cut", tcp_ip, [ServicePort("echo", "TCP", 9000)],
               [endpoint(clusters.address("c"), "east", TCP_PORT, name="echo"),
                endpoint(live.host, "west", live.port, name="echo")], traffic="PreferClose")
    cs.publish("cutweb", web_ip, [WEB_PORT],
               [endpoint(clusters.address("c"), "east", HTTP_PORT)])
    proxy = await cs.proxy(tcp_keepalive=(1, 1, 2), tcp_user_timeout_s=1.5,
                           connect_timeout_s=0.3)
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    cut = False
    try:
        for _ in range(3):
            reader, writer = await asyncio.open_connection(tcp_ip, 9000)
            assert await asyncio.wait_for(reader.readline(), 3) == b"c\n"
            streams.append((reader, writer))
        reader, writer = await asyncio.open_connection(web_ip, 80)
        streams.append((reader, writer))
        writer.write(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readuntil(b"c\n"), 3)  # the first chunk
        clusters.link("c", False)
        cut = True
        (idle, _), (busy, busy_writer), (half, half_writer), (web, _) = streams
        busy_writer.write(b"unacknowledged\n")
        half_writer.write_eof()  # half-closed: the FIN passed on waits for its ACK
        started = time.monotonic()
        ends = await asyncio.gather(broken_off(idle, 8), broken_off(busy, 8),
                                    broken_off(half, 8), broken_off(web, 8))
        took = time.monotonic() - started
        print(f"\nsilent cut: {ends} after {took:.2f} s")
        assert ends == ["reset"] * 4, ends
        assert took < 6, took  # keepalive: 1 s idle, probes 1 s apart; data: 1.5 s
        assert not proxy.conns and not proxy.http.clients
        # Reconnecting, the client gets a live endpoint (its connect into the cut times
        # out and is retried in another cluster).
        assert await ask(tcp_ip, 9000) == "west-1"
    finally:
        if cut:
            clusters.link("c", True)
        for _, writer in streams:
            writer.close()
        await proxy.stop()
        await live.stop()


async def test_a_client_gone_silent_frees_its_stream_in_bounded_time(
        clusters: NetnsClusters) -> None:
    # A client whose node dies (or whose link is cut) sends no RST: its stream, and the
    # endpoint connection behind it, were held for the whole idle timeout (3600 s).
    # Keepalive on the listening socket, inherited by every accepted connection, ends
    # it; the endpoint gets the client's end passed on.
    backend = await Backend("west-1", "127.71.4.1", free_port("127.71.4.1"), "west").start()
    cs = Clusterset("east")
    ip, port = clusters.host_ip, free_port(clusters.host_ip)
    cs.publish("silentclient", ip, [ServicePort("echo", "TCP", port)],
               [endpoint(backend.host, "west", backend.port, name="echo")])
    proxy = await cs.proxy(tcp_keepalive=(1, 1, 2))
    client = subprocess.Popen(
        ["ip", "netns", "exec", clusters.ns("a"), sys.executable, "-c",
         "import socket, sys, time\n"
         f"s = socket.create_connection(({ip!r}, {port}), timeout=5)\n"
         "sys.stdout.buffer.write(s.recv(100)); sys.stdout.flush(); time.sleep(30)"],
        stdout=subprocess.PIPE)
    cut = False
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(client.stdout.readline), 5)
        assert line == b"west-1\n"
        assert len(proxy.conns) == 1 and len(backend.transports) == 1
        clusters.link("a", False)
        cut = True
        started = time.monotonic()

        async def ended() -> bool:
            return not proxy.conns and not backend.transports

        took = await until(ended, "the silent client's stream ended", timeout=8) - started
        print(f"\nsilent client: stream ended after {took:.2f} s")
        assert took < 6, took  # keepalive: 1 s idle, 2 probes 1 s apart
    finally:
        if cut:
            clusters.link("a", True)
        client.kill()
        client.communicate()
        await proxy.stop()
        await backend.stop()
