"""Metric names and labels after real traffic: DNS queries, TCP connections through a
ClusterSetIP to backends in two clusters, refused connects to a third, a service whose
only endpoint is dead and one with no endpoint at all."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout

from controlplane.metrics import ControllerMetrics
from mcsproxy.config import AdminConfig, DnsConfig, GatewayConfig, OutlierConfig
from mcsproxy.gateway import Gateway
from mcsproxy.proxy.udp import PENDING_DATAGRAMS_MAX, UdpListener
from tests.dns_support import make_query, udp_client
from tests.kube_emulator import KubeEmulator
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import parse_metrics, service_yaml, start_gateway, value

HOST = "127.57.9.1"
ALLOWED_LABELS = {"service", "port", "cluster", "outcome", "qtype", "rcode", "transport",
                  "path", "direction", "state", "priority", "source", "worker", "le",
                  "reason"}


def dead(cluster: str, host: str) -> Backend:
    """An endpoint nothing listens on: connects are refused."""
    return Backend(f"{cluster}-dead", host, free_port(host), cluster)


def udp_query(addr: tuple[str, int], name: str, qtype: str = "A") -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(make_query(name, qtype), addr)
        return sock.recv(4096)


async def test_metrics_after_dns_and_proxy_traffic(tmp_path: Path) -> None:
    east = await Backend("east-1", "127.57.1.1", free_port("127.57.1.1"), "east").start()
    west = await Backend("west-1", "127.57.2.1", free_port("127.57.2.1"), "west").start()
    south = dead("south", "127.57.3.1")
    files = {
        "web": service_yaml("web", "127.240.57.1", [east, west, south]),
        "dead": service_yaml("dead", "127.240.57.2", [dead("south", "127.57.3.2")]),
        "none": service_yaml("none", "127.240.57.3", []),
    }
    gw = await start_gateway(tmp_path, HOST, files=files)
    try:
        loop = asyncio.get_running_loop()
        for name, qtype in [("web", "A"), ("web", "A"), ("web", "AAAA"), ("nothing", "A")]:
            await loop.run_in_executor(None, udp_query, gw.dns,
                                       f"{name}.test.svc.clusterset.local.", qtype)
        answers = [await ask("127.240.57.1", 80) for _ in range(12)]
        assert set(answers) == {"east-1", "west-1"}
        for ip in ("127.240.57.2", "127.240.57.3"):
            with pytest.raises((ConnectionError, OSError)):
                await ask(ip, 80)

        # Connections close asynchronously; the active gauge settles at 0.
        deadline = time.monotonic() + 5
        while True:
            m = await gw.metrics()
            if value(m, "mcsproxy_upstream_active_connections") == 0 and \
                    value(m, "mcsproxy_proxy_connections_total", service="test/none") == 1:
                break
            assert time.monotonic() < deadline, m.get("mcsproxy_upstream_active_connections")
            await asyncio.sleep(0.05)

        # DNS: the repeated question is a memo hit and still counted with its labels.
        assert value(m, "mcsproxy_dns_queries_total", transport="udp", qtype="A",
                     rcode="NOERROR") == 2
        assert value(m, "mcsproxy_dns_queries_total", qtype="AAAA", rcode="NOERROR") == 1
        assert value(m, "mcsproxy_dns_queries_total", qtype="A", rcode="NXDOMAIN") == 1
        assert value(m, "mcsproxy_dns_query_duration_seconds_count", path="built") == 3
        # No --dns-upstream here: the forwarding failures are there, at zero.
        assert "mcsproxy_dns_forward_failures_total" in m
        assert value(m, "mcsproxy_dns_forward_failures_total", outcome="timeout") == 0
        assert value(m, "mcsproxy_dns_forward_mismatched_answers_total", outcome="case") == 0

        web = {"service": "test/web", "port": "web"}
        ok = {c: value(m, "mcsproxy_proxy_connections_total", **web, cluster=c, outcome="ok")
              for c in ("east", "west", "south")}
        assert ok["east"] + ok["west"] == 12 and ok["south"] == 0
        assert ok["east"] == answers.count("east-1")
        refused = value(m, "mcsproxy_upstream_connect_attempts_total", **web, cluster="south",
                        outcome="refused")
        assert refused >= 1
        # Every refused connect was retried on another endpoint; the client never saw it.
        assert value(m, "mcsproxy_proxy_retries_total", **web) == refused
        assert value(m, "mcsproxy_upstream_connect_attempts_total", **web, outcome="ok") == 12
        assert value(m, "mcsproxy_upstream_connect_duration_seconds_count", **web) == 12
        assert value(m, "mcsproxy_proxy_transferred_bytes_total", **web, cluster="east",
                     direction="to_client") >= ok["east"] * len("east-1\n")
        assert value(m, "mcsproxy_upstream_endpoints", **web) == 3
        # The refused endpoint is ejected after 5 consecutive failures (outlier detection).
        ejected = value(m, "mcsproxy_upstream_endpoints", **web, cluster="south", state="ejected")
        assert ejected == value(m, "mcsproxy_upstream_ejections_total", **web, cluster="south")
        assert ejected == (refused >= 5)
        assert value(m, "mcsproxy_upstream_expected_share_percent", **web,
                     cluster="south") == pytest.approx(0 if ejected else 33.3, abs=0.1)
        assert value(m, "mcsproxy_upstream_priority_load_percent", **web, priority="0") == 100

        assert value(m, "mcsproxy_proxy_connections_total", service="test/dead",
                     cluster="south", outcome="failed") == 1
        assert value(m, "mcsproxy_proxy_connections_total", service="test/none",
                     cluster="none", outcome="no_endpoint") == 1
        assert value(m, "mcsproxy_proxy_worker_connections_total", worker="0") == 12

        assert value(m, "mcsproxy_snapshot_version") == gw.gateway.store.current.version
        assert value(m, "mcsproxy_snapshot_services") == 3
        assert value(m, "mcsproxy_snapshot_apply_duration_seconds_count") >= 1
        assert value(m, "mcsproxy_source_synced") == 1
        assert value(m, "mcsproxy_gateway_ready") == 1
        assert value(m, "process_cpu_seconds_total") > 0

        for name, samples in m.items():
            if name.startswith("mcsproxy_"):
                assert "_" in name.removeprefix("mcsproxy_"), name
                for labels, _ in samples:
                    assert set(labels) <= ALLOWED_LABELS, (name, labels)
                    assert not any(v.startswith("127.") for v in labels.values()), (name, labels)
    finally:
        await gw.stop()
        await east.stop()
        await west.stop()


async def test_connections_turned_away_by_a_limit_are_counted(tmp_path: Path) -> None:
    east = await Backend("east-1", "127.57.4.1", free_port("127.57.4.1"), "east").start()
    gw = await start_gateway(tmp_path, "127.57.9.2",
                             files={"web": service_yaml("web", "127.240.57.9", [east])},
                             max_connections_per_client=1)
    held: asyncio.StreamWriter | None = None
    try:
        reader, held = await asyncio.open_connection("127.240.57.9", 80)
        assert await asyncio.wait_for(reader.readline(), 3) == b"east-1\n"
        with pytest.raises((ConnectionError, OSError, AssertionError)):
            assert await ask("127.240.57.9", 80) == "east-1"  # a second from 127.0.0.1
        m = await gw.metrics()
        assert value(m, "mcsproxy_proxy_refused_total", outcome="client_limit") == 1
        assert value(m, "mcsproxy_proxy_refused_total", outcome="listener_limit") == 0
    finally:
        if held is not None:
            held.close()
        await gw.stop()
        await east.stop()


async def test_counters_survive_a_service_removed_and_imported_again(tmp_path: Path) -> None:
    """Between two scrapes a service goes and comes back (a recreated ServiceImport): the
    series is there in both scrapes, so it must not start again from 0, and a connection
    open across it keeps counting its bytes; nor may the per-worker total drop when a
    service goes."""
    east = await Backend("east-1", "127.59.1.1", free_port("127.59.1.1"), "east").start()
    text = service_yaml("web", "127.240.59.1", [east])
    gw = await start_gateway(tmp_path, "127.59.9.1", files={"web": text})
    web = {"service": "test/web", "port": "web", "cluster": "east"}
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(3):
            assert await ask("127.240.59.1", 80) == "east-1"
        reader, writer = await asyncio.open_connection("127.240.59.1", 80)
        assert await asyncio.wait_for(reader.readline(), 3) == b"east-1\n"
        writer.write(b"x" * 1000 + b"\n")
        assert len(await asyncio.wait_for(reader.readexactly(1001), 3)) == 1001
        before = await gw.metrics()
        assert value(before, "mcsproxy_proxy_connections_total", **web, outcome="ok") == 4
        sent = value(before, "mcsproxy_proxy_transferred_bytes_total", **web,
                     direction="to_upstream")
        assert sent >= 1001

        await gw.publish("web", "---\n")
        m = await gw.metrics()
        assert value(m, "mcsproxy_proxy_connections_total", service="test/web") == 0
        assert value(m, "mcsproxy_proxy_worker_connections_total", worker="0") == 4
        await gw.publish("web", text)
        writer.write(b"y" * 500 + b"\n")  # the connection from before still flows
        assert len(await asyncio.wait_for(reader.readexactly(501), 3)) == 501
        assert await ask("127.240.59.1", 80) == "east-1"

        after = await gw.metrics()
        assert value(after, "mcsproxy_proxy_connections_total", **web, outcome="ok") == 5
        assert value(after, "mcsproxy_upstream_connect_attempts_total", **web,
                     outcome="ok") == 5
        assert value(after, "mcsproxy_upstream_connect_duration_seconds_count", **web) == 5
        assert value(after, "mcsproxy_proxy_worker_connections_total", worker="0") == 5
        assert value(after, "mcsproxy_proxy_transferred_bytes_total", **web,
                     direction="to_upstream") >= sent + 501
    finally:
        if writer is not None:
            writer.close()
        await gw.stop()
        await east.stop()


async def test_dns_is_answered_while_a_large_exposition_is_rendered(tmp_path: Path) -> None:
    """1,000 services x 3 clusters are ~100,000 series, about a second of prometheus-client
    rendering. It ran on the event loop, so DNS (and the proxy) stopped for the whole
    render; it runs in a thread now, and only collecting the counters holds the loop."""
    backends = [Backend(f"{c}-1", "127.57.12.1", 9, c) for c in ("east", "west", "north")]
    files = {f"s{i}": service_yaml(f"s{i}", f"127.241.{i // 250}.{i % 250 + 1}", backends,
                                   port=8080) for i in range(1000)}
    gw = await start_gateway(tmp_path, "127.57.12.2", files=files)
    try:
        query = make_query("s7.test.svc.clusterset.local")
        answered: list[float] = []

        async def ask_dns_until(done: asyncio.Event) -> None:
            async with udp_client(gw.dns) as (transport, client):
                while not done.is_set():
                    transport.sendto(query)
                    await asyncio.wait_for(client.answers.get(), 10)
                    answered.append(time.monotonic())
                    await asyncio.sleep(0.005)

        done = asyncio.Event()
        asker = asyncio.create_task(ask_dns_until(done))
        started = time.monotonic()
        async with gw.http.get(gw.admin + "/metrics") as resp:
            body = await resp.text()
        took = time.monotonic() - started  # parsing it (below) would hold this loop too
        done.set()
        await asker
        assert value(parse_metrics(body), "mcsproxy_snapshot_services") == 1000
        during = [started, *(t for t in answered if t > started), started + took]
        longest = max(b - a for a, b in pairwise(during))
        assert longest < took / 2, (longest, took)
    finally:
        await gw.stop()


@dataclass
class UdpSink:
    """A UDP endpoint for service_yaml (it reads host, port and cluster)."""

    host: str
    port: int
    cluster: str


async def test_dropped_udp_datagrams_are_exported_by_reason(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    sink = UdpSink("127.57.9.3", free_port("127.57.9.3", socket.SOCK_DGRAM), "east")
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                       local_addr=(sink.host, sink.port))
    gw = await start_gateway(tmp_path, HOST, files={"dns": service_yaml(
        "dns", "127.240.57.11", [sink], port_name="dns", protocol="UDP", port=53)})  # type: ignore[list-item]
    try:
        proxy = gw.gateway.proxy
        assert proxy is not None
        listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[union-attr,assignment]
        # In one loop pass: past what a flow holds while its socket opens.
        for i in range(PENDING_DATAGRAMS_MAX + 6):
            listener.datagram_received(b"%d" % i, ("127.57.9.4", 4000))
        m = await gw.metrics()
        assert value(m, "mcsproxy_proxy_udp_dropped_total", reason="opening") == 6
        assert value(m, "mcsproxy_proxy_udp_dropped_total", reason="endpoint_buffer_full") == 0
        assert value(m, "mcsproxy_proxy_udp_dropped_total", reason="client_buffer_full") == 0
    finally:
        await gw.stop()
        transport.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)


def udp_ask(src: str, dst: tuple[str, int], timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((src, 0))
        sock.settimeout(timeout)
        sock.sendto(b"q", dst)
        try:
            return sock.recv(100)
        except TimeoutError:
            return None


async def test_udp_flows_count_as_connections_once_with_their_outcome(tmp_path: Path) -> None:
    # A flow counted ok (connection and attempt) as its socket opened, before any packet:
    # 4 answered clients of `half` were 6 ok connections, 3 clients no endpoint answered
    # were 6 ok and 3 failed, and their 6 attempts 6 ok and 6 refused. As over TCP, a
    # refused attempt is no connection and each attempt counts once. With as many dead
    # endpoints as --connect-attempts, the last refusal did not count the flow failed.
    loop = asyncio.get_running_loop()
    live = UdpSink("127.57.10.1", free_port("127.57.10.1", socket.SOCK_DGRAM), "east")
    transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=(live.host, live.port))
    dead = [UdpSink(h, free_port(h, socket.SOCK_DGRAM), "east")
            for h in ("127.57.10.2", "127.57.10.3", "127.57.10.4", "127.57.10.5")]
    udp = {"port_name": "dns", "protocol": "UDP", "port": 53}
    gw = await start_gateway(tmp_path, "127.57.9.5", outlier=OutlierConfig(consecutive_failures=0),
                             files={"half": service_yaml("half", "127.240.57.12",
                                                         [live, dead[0]], **udp),  # type: ignore[list-item]
                                    "dead": service_yaml("dead", "127.240.57.13",
                                                         dead[1:], **udp)})  # type: ignore[list-item]
    try:
        for i in range(4):
            assert await loop.run_in_executor(None, udp_ask, f"127.57.11.{i + 1}",
                                              ("127.240.57.12", 53), 2) == b"q"
        for i in range(3):
            assert await loop.run_in_executor(None, udp_ask, f"127.57.12.{i + 1}",
                                              ("127.240.57.13", 53), 0.3) is None
        deadline = time.monotonic() + 5
        while True:
            m = await gw.metrics()
            if value(m, "mcsproxy_proxy_connections_total", service="test/dead") >= 3:
                break
            assert time.monotonic() < deadline, m.get("mcsproxy_proxy_connections_total")
            await asyncio.sleep(0.05)

        def count(name: str, service: str, outcome: str) -> float:
            return value(m, name, service=f"test/{service}", outcome=outcome)

        conns, attempts = "mcsproxy_proxy_connections_total", \
            "mcsproxy_upstream_connect_attempts_total"
        retries = value(m, "mcsproxy_proxy_retries_total", service="test/half")
        assert (count(conns, "half", "ok"), count(conns, "half", "failed")) == (4, 0)
        assert (count(attempts, "half", "ok"), count(attempts, "half", "refused")) == (4, retries)
        assert retries >= 1  # round robin sent some flows to the dead endpoint first
        assert (count(conns, "dead", "ok"), count(conns, "dead", "failed")) == (0, 3)
        assert (count(attempts, "dead", "ok"), count(attempts, "dead", "refused")) == (0, 9)
        # Each answered flow's attempt timed, until its first reply (it was never
        # recorded for UDP); refused attempts are not.
        duration = "mcsproxy_upstream_connect_duration_seconds"
        assert value(m, f"{duration}_count", service="test/half") == 4
        assert 0 < value(m, f"{duration}_sum", service="test/half") < 4 * 2
        assert value(m, f"{duration}_count", service="test/dead") == 0
    finally:
        await gw.stop()
        transport.close()


async def test_the_kube_sources_own_metrics_are_exported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's source_kube_* families lived in the source's own registry, which no
    /metrics ever rendered: a scrape had none of them."""
    async with KubeEmulator() as emu:
        emu.put_object({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": "bad", "namespace": "test"},
            "spec": {"type": "ClusterSetIP", "ips": ["127.240.57.20"],
                     "ports": [{"name": "web", "protocol": "TCP", "port": 0}]}})
        monkeypatch.setenv("KUBECONFIG", str(emu.kubeconfig(tmp_path / "kubeconfig")))
        config = GatewayConfig(cluster_id="east", sources=("kube",),
                               dns=DnsConfig(listen=("127.57.9.6", 0)),
                               admin=AdminConfig(listen=("127.57.9.6", 0)))
        gateway = Gateway(config)
        await gateway.start()
        try:
            async with asyncio.timeout(5):
                await gateway.store.loaded.wait()
            assert gateway.admin.bound is not None
            host, port = gateway.admin.bound
            async with ClientSession(timeout=ClientTimeout(total=5)) as http, \
                    http.get(f"http://{host}:{port}/metrics") as resp:
                text = await resp.text()
        finally:
            await gateway.stop()
    m = parse_metrics(text)
    assert value(m, "mcsproxy_source_kube_connected") == 1
    assert value(m, "mcsproxy_source_kube_rejected_objects_total") == 1
    assert "mcsproxy_source_kube_failed_objects_total" in m
    assert "mcsproxy_source_kube_relists_gone" in m
    assert not [name for name in m if name.endswith("_created")]


async def test_a_rejected_source_file_shows_in_the_metrics(tmp_path: Path) -> None:
    """A file source with a rejected file read connected 1 and synced 1 (its last good
    version serves): only /readyz named the error, no alert could see it."""
    gw = await start_gateway(tmp_path, "127.57.9.7", files={"web": service_yaml(
        "web", "127.240.57.21", [dead("east", "127.57.13.1")])})
    try:
        m = await gw.metrics()
        assert value(m, "mcsproxy_source_error") == 0
        (gw.source_dir / "bad.yaml").write_text("kind: [\n")
        deadline = time.monotonic() + 5
        while not value(m := await gw.metrics(), "mcsproxy_source_error"):
            assert time.monotonic() < deadline, "the rejected file never showed"
            await asyncio.sleep(0.05)
        assert value(m, "mcsproxy_source_connected") == value(m, "mcsproxy_source_synced") == 1
        (gw.source_dir / "bad.yaml").unlink()
        while value(await gw.metrics(), "mcsproxy_source_error"):
            assert time.monotonic() < deadline + 5, "the error never cleared"
            await asyncio.sleep(0.05)
    finally:
        await gw.stop()


README_METRICS = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_metric_names() -> set[str]:
    """Every `name` or `name{labels}` the README's Metrics section mentions."""
    section = README_METRICS[README_METRICS.index("### Metrics"):]
    section = section[:section.index("\n## ")]
    return set(re.findall(r"`([a-z_]+)(?:\{[^`]*\})?`", section))


def undocumented(families: set[str], documented: set[str]) -> list[str]:
    missing = []
    for name in sorted(families):
        if name.startswith("process_") and "process_*" in README_METRICS:
            continue
        short = name.removeprefix("mcsproxy_")
        if not {short, f"{short}_total", short.removesuffix("_total")} & documented:
            missing.append(name)
    return missing


async def test_every_family_of_a_scrape_is_in_the_readme(tmp_path: Path) -> None:
    """snapshot_services, source_objects and gateway_start_time_seconds were on every
    gateway's /metrics, and the controller's objects_written_total, objects_deleted_total,
    services_reconciled_total and write_errors_total ("write errors") on its own, with
    no word of them in the README's table."""
    gw = await start_gateway(tmp_path, "127.73.9.1", files={"web": service_yaml(
        "web", "127.240.73.1", [dead("east", "127.73.13.1")])})
    try:
        m = await gw.metrics()
    finally:
        await gw.stop()
    documented = readme_metric_names()
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in m}
    assert undocumented(families, documented) == []
    controller = {f.name for f in ControllerMetrics().registry.collect()}
    assert undocumented(controller, documented) == []
