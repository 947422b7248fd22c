"""UDP through ClusterSetIPs: echo, flows per client, bounded table, idle expiry."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import socket
import struct
import subprocess
import sys

import pytest
import uvloop

from mcsproxy.config import OutlierConfig, ProxyConfig
from mcsproxy.model import Endpoint, ServicePort
from mcsproxy.observability.accesslog import AccessLog
from mcsproxy.proxy import ProxyManager
from mcsproxy.proxy.manager import IDLE_SWEEPS, sweep_ticks
from mcsproxy.proxy.udp import (
    LISTENER_RCVBUF_BYTES,
    PENDING_DATAGRAMS_MAX,
    UdpFlow,
    UdpListener,
)
from tests.netns import ID as NETNS_ID
from tests.netns import PREFIX as NETNS_PREFIX
from tests.netns import ROOT as NETNS_ROOT
from tests.netns import netns_skip_reason, run
from tests.proxy_fixtures import NO_HEALTH, Clusterset, endpoint, free_port, until

DNS = ServicePort("dns", "UDP", 53)


def dns_endpoint(address: str, cluster: str, port: int) -> Endpoint:
    return endpoint(address, cluster, port, name="dns", protocol="UDP")


def dns_clusterset(ip: str, *endpoints: Endpoint, traffic: str | None = None,
                   port: ServicePort = DNS) -> Clusterset:
    """The east clusterset, serving the UDP `dns` service at `ip` on these endpoints."""
    cs = Clusterset("east")
    cs.publish("dns", ip, [port], endpoints, traffic=traffic)
    return cs


def dns_port(ip: str) -> ServicePort:
    """The `dns` service port on a free port of `ip` (not 53)."""
    return ServicePort("dns", "UDP", free_port(ip, socket.SOCK_DGRAM))


class NamedUdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(self.name + b":" + data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue(100)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.replies.put_nowait((data, addr))


async def udp_backend(name: str, host: str) -> tuple[asyncio.DatagramTransport, int]:
    port = free_port(host, socket.SOCK_DGRAM)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: NamedUdpEcho(name.encode()), local_addr=(host, port))
    return transport, port  # type: ignore[return-value]


async def client(local: str) -> tuple[asyncio.DatagramTransport, Client]:
    proto = Client()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: proto, local_addr=(local, 0))
    return transport, proto  # type: ignore[return-value]


async def test_udp_echo_through_a_clusterset_ip() -> None:
    east, east_port = await udp_backend("east-1", "127.42.1.1")
    ip = "127.240.42.1"
    cs = dns_clusterset(ip, dns_endpoint("127.42.1.1", "east", east_port))
    proxy = await cs.proxy()
    c, proto = await client("127.42.9.1")
    try:
        for i in range(5):
            c.sendto(b"q%d" % i, (ip, 53))
            data, addr = await asyncio.wait_for(proto.replies.get(), 3)
            assert data == b"east-1:q%d" % i
            assert addr == (ip, 53)  # replies come from the address the client wrote to
        flows = [f for f in proxy.conns if isinstance(f, UdpFlow)]
        assert len(flows) == 1  # one flow per client address
    finally:
        c.close()
        east.close()
        await proxy.stop()


async def test_udp_flow_table_is_bounded_and_flows_expire_when_idle(
        caplog: pytest.LogCaptureFixture) -> None:
    east, east_port = await udp_backend("east-1", "127.43.1.1")
    ip = "127.240.43.1"
    cs = dns_clusterset(ip, dns_endpoint("127.43.1.1", "east", east_port))
    proxy = await cs.proxy(udp_max_flows=2, udp_idle_timeout_s=0.2)
    clients = [await client(f"127.43.9.{i}") for i in range(1, 4)]
    try:
        for c, proto in clients[:2]:
            c.sendto(b"hi", (ip, 53))
            assert (await asyncio.wait_for(proto.replies.get(), 3))[0] == b"east-1:hi"
        listener = next(iter(proxy.listeners.values()))
        table: UdpListener = listener.transport.get_protocol()  # type: ignore[union-attr,assignment]
        c3, proto3 = clients[2]
        c3.sendto(b"hi", (ip, 53))
        async with asyncio.timeout(3):
            while table.dropped == 0:
                await asyncio.sleep(0.01)
        assert proto3.replies.empty() and len(table.flows) == 2
        # logged as the limit it is, not as a missing endpoint
        assert "new UDP flow refused by a limit (flow table full" in caplog.text
        assert "no endpoint" not in caplog.text
        assert proxy.refusals["udp_flow_limit"] == table.dropped
        # idle flows expire; then the third client gets a flow
        async with asyncio.timeout(3):
            while table.flows:
                await asyncio.sleep(0.02)
        c3.sendto(b"again", (ip, 53))
        assert (await asyncio.wait_for(proto3.replies.get(), 3))[0] == b"east-1:again"
    finally:
        for c, _ in clients:
            c.close()
        east.close()
        await proxy.stop()


async def test_one_client_address_holds_at_most_a_quarter_of_the_flow_table() -> None:
    # One address writing from many source ports took the whole table (64 of 64 flows
    # for 100 ports), and every other client was refused until those flows idled out.
    east, east_port = await udp_backend("east-1", "127.79.43.1")
    ip = "127.79.240.43"
    port = dns_port(ip)
    cs = dns_clusterset(ip, dns_endpoint("127.79.43.1", "east", east_port), port=port)
    proxy = await cs.proxy(udp_max_flows=8)  # a quarter: 2 flows per client address
    flooder = [await client("127.79.43.9") for _ in range(5)]
    other, other_proto = await client("127.79.43.10")
    try:
        for c, _ in flooder:
            c.sendto(b"hi", (ip, port.port))
        answered = 0
        for _, proto in flooder:
            try:
                async with asyncio.timeout(0.5):
                    await proto.replies.get()
                answered += 1
            except TimeoutError:
                pass
        assert answered == 2
        assert proxy.refusals["udp_flow_limit"] == 3
        other.sendto(b"me too", (ip, port.port))
        async with asyncio.timeout(3):
            assert (await other_proto.replies.get())[0] == b"east-1:me too"
        table: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[union-attr,assignment]
        assert table.by_client == {"127.79.43.9": 2, "127.79.43.10": 1}
        for flow in list(table.flows.values()):
            flow.expire()
        assert not table.by_client  # what the flows held is given back as they end
    finally:
        for c, _ in [*flooder, (other, other_proto)]:
            c.close()
        east.close()
        await proxy.stop()


async def test_udp_port_unreachable_moves_the_flow_elsewhere() -> None:
    live, live_port = await udp_backend("west-1", "127.44.2.1")
    ip = "127.240.44.1"
    dead_port = free_port("127.44.1.1", socket.SOCK_DGRAM)
    cs = dns_clusterset(ip, dns_endpoint("127.44.1.1", "east", dead_port),
                        dns_endpoint("127.44.2.1", "west", live_port))
    proxy = await cs.proxy()
    c, proto = await client("127.44.9.1")
    try:
        # Resend until answered: a flow to the dead endpoint ends on ICMP unreachable and
        # the next datagram opens a fresh flow, round-robin to the live one.
        async with asyncio.timeout(5):
            while proto.replies.empty():
                c.sendto(b"hi", (ip, 53))
                await asyncio.sleep(0.02)
        assert (await proto.replies.get())[0] == b"west-1:hi"
    finally:
        c.close()
        live.close()
        await proxy.stop()


def connected_udp_sockets(address: str, port: int) -> int:
    """UDP sockets of this machine whose remote end is address:port (/proc/net/udp)."""
    remote = f"{int.from_bytes(socket.inet_aton(address), 'little'):08X}:{port:04X}"
    with open("/proc/net/udp") as f:
        return sum(1 for line in f.readlines()[1:] if line.split()[2] == remote)


async def abort_a_flow_while_its_socket_is_set_up() -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    backend, port = await udp_backend("east-1", "127.42.4.1")
    ip = "127.240.42.4"
    cs = dns_clusterset(ip, dns_endpoint("127.42.4.1", "east", port))
    proxy = await cs.proxy()
    listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[attr-defined]
    host = next(iter(next(iter(proxy.upstreams.values())).hosts.values()))
    c, _ = await client("127.42.4.9")
    aborted: asyncio.Future[UdpFlow] = loop.create_future()

    def each_pass() -> None:
        # The flow's socket exists but connection_made has not run: the one loop pass in
        # which stop(), a closing listener or a drain timer may abort it.
        flows = list(listener.flows.values())
        if flows and flows[0].transport is None and connected_udp_sockets("127.42.4.1", port):
            flows[0].abort()
            aborted.set_result(flows[0])
        else:
            loop.call_soon(each_pass)

    try:
        c.sendto(b"q", (ip, 53))
        loop.call_soon(each_pass)
        await asyncio.wait_for(aborted, 3)
        await asyncio.sleep(0.1)
    finally:
        await asyncio.wait_for(proxy.stop(), 5)
        c.close()
        backend.close()
    await asyncio.sleep(0.1)
    return connected_udp_sockets("127.42.4.1", port), len(host.conns)


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_a_flow_aborted_while_its_socket_is_set_up_leaks_nothing(run) -> None:  # type: ignore[no-untyped-def]
    # uvloop hands the socket over (connection_made) even after the opening was cancelled.
    sockets, counted = run(abort_a_flow_while_its_socket_is_set_up())
    assert (sockets, counted) == (0, 0)


async def test_a_second_gateway_cannot_take_a_udp_clusterset_ip(
        caplog: pytest.LogCaptureFixture) -> None:
    # As for TCP: the second process to want the address says it cannot listen, instead
    # of binding beside the first and silently taking its datagrams.
    backend, port = await udp_backend("east-1", "127.42.5.1")
    cs = dns_clusterset("127.240.42.5", dns_endpoint("127.42.5.1", "east", port))
    first = await cs.proxy()
    second = await cs.proxy()
    try:
        await cs.served(second)
        assert len(first.listeners) == 1 and not second.listeners
        assert "cannot listen" in caplog.text
    finally:
        await second.stop()
        await first.stop()
        backend.close()


async def test_a_port_unreachable_endpoint_is_ejected_though_every_flow_opens() -> None:
    # Opening a flow (a connected UDP socket) sends nothing, so it is no sign of health:
    # it used to reset the failure count, and an endpoint answering port unreachable was
    # never ejected, taking every other new client's first datagrams forever.
    live, live_port = await udp_backend("west-1", "127.92.2.1")
    ip = "127.240.92.1"
    dead_port = free_port("127.92.1.1", socket.SOCK_DGRAM)
    cs = dns_clusterset(ip, dns_endpoint("127.92.1.1", "east", dead_port),
                        dns_endpoint("127.92.2.1", "west", live_port))
    proxy = await cs.proxy(outlier=OutlierConfig(consecutive_failures=3))
    dead = next(h for h in next(iter(proxy.upstreams.values())).hosts.values()
                if h.port == dead_port)
    try:
        for i in range(8):  # each a new client: a new flow
            c, proto = await client(f"127.92.9.{i + 1}")
            try:
                async with asyncio.timeout(5):
                    while proto.replies.empty():
                        c.sendto(b"hi", (ip, 53))
                        await asyncio.sleep(0.05)
            finally:
                c.close()
        assert dead.ejected and dead.consecutive_failures >= 3
    finally:
        live.close()
        await proxy.stop()


async def test_a_datagram_right_after_its_flow_expired_opens_a_new_flow() -> None:
    # The idle sweep and the listener's read can run in the same loop pass: a datagram
    # read just after its flow expired used to go to the closing socket and be lost.
    backend, port = await udp_backend("east-1", "127.92.3.1")
    ip = "127.240.92.3"
    cs = dns_clusterset(ip, dns_endpoint("127.92.3.1", "east", port))
    proxy = await cs.proxy()
    c, proto = await client("127.92.9.30")
    try:
        c.sendto(b"one", (ip, 53))
        assert (await asyncio.wait_for(proto.replies.get(), 3))[0] == b"east-1:one"
        listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[union-attr,assignment]
        flow = next(iter(listener.flows.values()))
        flow.expire()
        listener.datagram_received(b"two", c.get_extra_info("sockname"))
        assert (await asyncio.wait_for(proto.replies.get(), 3))[0] == b"east-1:two"
        assert flow not in proxy.conns and len(listener.flows) == 1
    finally:
        c.close()
        backend.close()
        await proxy.stop()


async def test_flows_of_a_removed_endpoint_end_and_the_client_moves_on() -> None:
    # A flow lasts while its client sends: drained like a TCP connection, it kept going
    # to the removed endpoint (a deleted pod) for as long as the client talked.
    a, a_port = await udp_backend("east-1", "127.92.4.1")
    b, b_port = await udp_backend("east-2", "127.92.4.2")
    ip = "127.240.92.4"
    cs = dns_clusterset(ip, dns_endpoint("127.92.4.1", "east", a_port))
    proxy = await cs.proxy()
    c, proto = await client("127.92.9.40")
    try:
        c.sendto(b"one", (ip, 53))
        assert (await asyncio.wait_for(proto.replies.get(), 3))[0] == b"east-1:one"
        cs.publish("dns", ip, [DNS], [dns_endpoint("127.92.4.2", "east", b_port)])
        await cs.served(proxy)
        c.sendto(b"two", (ip, 53))
        assert (await asyncio.wait_for(proto.replies.get(), 3))[0] == b"east-2:two"
        upstream = next(iter(proxy.upstreams.values()))
        assert not upstream.draining
    finally:
        c.close()
        a.close()
        b.close()
        await proxy.stop()


async def six_new_clients_hear(ip: str, name: str, first_client: str) -> None:
    """Six clients from first_client on each send one datagram to ip:53, once (no
    resending), and each hears the answer of the backend called `name`."""
    base, last = first_client.rsplit(".", 1)
    for i in range(6):
        c, proto = await client(f"{base}.{int(last) + i}")
        try:
            c.sendto(b"q%d" % i, (ip, 53))
            data, _ = await asyncio.wait_for(proto.replies.get(), 2)
            assert data == name.encode() + b":q%d" % i
        finally:
            c.close()


async def test_datagrams_refused_before_any_reply_go_to_another_endpoint() -> None:
    # Port unreachable used to end the flow and lose the datagram that met it: half of
    # the new clients waited out their own retry timeout (a resolver's 1-5 s). Like a
    # refused TCP connect, the flow now moves before the client sees anything.
    live, live_port = await udp_backend("west-1", "127.92.5.2")
    ip = "127.240.92.5"
    dead_port = free_port("127.92.5.1", socket.SOCK_DGRAM)
    cs = dns_clusterset(ip, dns_endpoint("127.92.5.1", "east", dead_port),
                        dns_endpoint("127.92.5.2", "west", live_port))
    proxy = await cs.proxy(outlier=OutlierConfig(consecutive_failures=0))
    try:
        await six_new_clients_hear(ip, "west-1", "127.92.9.50")
        upstream = next(iter(proxy.upstreams.values()))
        assert upstream.stats.retries >= 3  # round robin sent every other flow to the dead one
    finally:
        live.close()
        await proxy.stop()


async def test_local_first_keeps_its_last_try_for_another_cluster() -> None:
    # As over TCP: three local endpoints port unreachable, three tries per datagram. The
    # tries used to stay local and the client's datagram was lost though west was up.
    live, live_port = await udp_backend("west-1", "127.161.5.9")
    ip = "127.240.161.5"
    dead = [dns_endpoint(f"127.161.5.{i}", "east", free_port(f"127.161.5.{i}",
                                                              socket.SOCK_DGRAM))
            for i in (1, 2, 3)]
    cs = dns_clusterset(ip, *dead, dns_endpoint("127.161.5.9", "west", live_port),
                        traffic="PreferClose")
    proxy = await cs.proxy(connect_attempts=3, outlier=OutlierConfig(consecutive_failures=0))
    try:
        await six_new_clients_hear(ip, "west-1", "127.161.6.10")
        upstream = next(iter(proxy.upstreams.values()))
        assert upstream.stats.cluster("east").attempts["refused"] == 12  # two local each
    finally:
        live.close()
        await proxy.stop()


class EmptyAcks(asyncio.DatagramProtocol):
    """Answers its first datagram from each client with a greeting, the rest with
    zero-length datagrams (acknowledgements that carry nothing)."""

    def __init__(self) -> None:
        self.greeted: set[tuple] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The transport's sendto drops zero-length datagrams: a socket of our own.
        sock = transport.get_extra_info("socket")
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.sock.sendto(b"" if addr in self.greeted else b"hello", addr)
        self.greeted.add(addr)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sock.close()


async def test_an_endpoint_that_answers_with_empty_datagrams_is_not_taken_for_silent() -> None:
    # Whether the endpoint answered was read from the bytes received: after one reply
    # that carried bytes, empty ones counted as none, so the endpoint was ejected as a
    # silent one ("no reply and nothing in east has answered") and its flow cut, every
    # second connect timeout while the client kept sending.
    loop = asyncio.get_running_loop()
    ends = [await loop.create_datagram_endpoint(EmptyAcks, local_addr=(f"127.79.51.{i}", 0))
            for i in (1, 2)]
    ip = "127.79.240.51"
    port = dns_port(ip)
    cs = dns_clusterset(ip, *(dns_endpoint(f"127.79.51.{i + 1}", "east",
                                           t.get_extra_info("sockname")[1])
                              for i, (t, _) in enumerate(ends)), port=port)
    proxy = await cs.proxy(connect_timeout_s=0.2)
    c, proto = await client("127.79.51.9")
    try:
        replies = []
        for _ in range(16):  # 0.8 s: four connect timeouts
            c.sendto(b"q", (ip, port.port))
            async with asyncio.timeout(3):
                replies.append((await proto.replies.get())[0])
            await asyncio.sleep(0.05)
        assert replies == [b"hello"] + [b""] * 15  # one flow, to one endpoint, throughout
        hosts = next(iter(proxy.upstreams.values())).hosts.values()
        assert not any(h.ejected for h in hosts)
    finally:
        c.close()
        for t, _ in ends:
            t.close()
        await proxy.stop()


# Inside a namespace whose ephemeral range is 10 ports: 16 clients' flows to two
# endpoints; prints the endpoints' failure counts and the flows shed.
FEW_PORTS = """
import asyncio, json, socket, sys, uvloop
sys.path.insert(0, sys.argv[1])
from tests.test_proxy_udp import dns_clusterset, dns_endpoint, udp_backend
from mcsproxy.proxy.udp import UdpFlow

async def main():
    ends = [await udp_backend(f"east-{i}", f"127.0.0.{i}") for i in (1, 2)]
    proxy = await dns_clusterset("127.0.1.1", *(dns_endpoint(f"127.0.0.{i + 1}", "east", port)
                                                for i, (_, port) in enumerate(ends))).proxy()
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    for i, c in enumerate(clients):  # on a port of their own, outside the range
        c.bind((f"127.0.2.{i + 1}", 30000))
        c.sendto(b"q", ("127.0.1.1", 53))
    for _ in range(100):
        await asyncio.sleep(0.02)
        flows = [f for f in proxy.conns if isinstance(f, UdpFlow)]
        if all(f.transport for f in flows) and len(flows) + sum(proxy.refusals.values()) \
                + next(iter(proxy.upstreams.values())).stats.retries >= 16:
            break
    hosts = next(iter(proxy.upstreams.values())).hosts.values()
    print(json.dumps({"failures": sorted(h.consecutive_failures for h in hosts),
                      "shed": proxy.refusals["out_of_descriptors"], "flows": len(flows)}))
    await proxy.stop()

uvloop.run(main())  # asyncio's sock_connect takes a UDP connect's EAGAIN for "in progress"
"""


@pytest.mark.skipif(netns_skip_reason() is not None, reason=netns_skip_reason() or "")
def test_flows_past_the_local_port_range_are_shed_without_blaming_endpoints() -> None:
    # Each flow's socket takes an ephemeral port of its own; past the range, connect()
    # fails with EAGAIN, which was held against the endpoint picked (4 of the 5 failures
    # an ejection takes, on each of two endpoints, from 8 flows too many) and logged as
    # "2 endpoints port unreachable". Now those flows are shed, as for want of
    # descriptors, and counted as such.
    ns = f"{NETNS_PREFIX}{NETNS_ID}-ports"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009")
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", FEW_PORTS,
                              str(NETNS_ROOT)], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        # The two endpoints took two of the ten ports: about 8 flows open, the rest shed.
        seen = json.loads(out)
        assert seen["failures"] == [0, 0]
        assert seen["shed"] >= 6 and seen["flows"] + seen["shed"] == 16
    finally:
        run("ip", "netns", "del", ns, check=False)


def rmem_max() -> int:
    with open("/proc/sys/net/core/rmem_max") as f:
        return int(f.read())


@pytest.mark.skipif(rmem_max() < LISTENER_RCVBUF_BYTES, reason="net.core.rmem_max is lower")
async def test_a_burst_that_arrives_while_the_loop_is_busy_waits_for_it() -> None:
    # The listener kept Linux's default receive buffer (212,992 bytes): of 2,000 small
    # datagrams that came while the loop was busy elsewhere, 256 reached the endpoint.
    loop = asyncio.get_running_loop()
    sink = CountingSink()
    endpoint_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    endpoint_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF_BYTES)
    endpoint_sock.bind(("127.79.50.1", 0))
    endpoint, _ = await loop.create_datagram_endpoint(lambda: sink, sock=endpoint_sock)
    ip = "127.79.240.50"
    port = dns_port(ip)
    proxy = await dns_clusterset(
        ip, dns_endpoint("127.79.50.1", "east", endpoint_sock.getsockname()[1]),
        port=port).proxy()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.bind(("127.79.50.9", 0))
        c.sendto(b"x" * 100, (ip, port.port))
        await until(lambda: sink.received == 1, "the flow open")
        for _ in range(2000):  # the loop runs none of it meanwhile
            c.sendto(b"x" * 100, (ip, port.port))
        await until(lambda: sink.received == 2001, "the burst through", timeout=5)
    finally:
        c.close()
        endpoint.close()
        await proxy.stop()


async def test_a_flow_whose_socket_cannot_reach_its_endpoint_moves_elsewhere() -> None:
    # A connect that fails locally (no route to the endpoint's network: ENETUNREACH; here
    # the broadcast address, EACCES, which any host refuses the same way) sent nothing:
    # the client's datagram was lost (5 of 10 clients unanswered until the endpoint was
    # ejected), where a TCP connect failing so is retried on another endpoint.
    live, live_port = await udp_backend("east-1", "127.79.44.1")
    ip = "127.79.240.44"
    port = dns_port(ip)
    cs = dns_clusterset(ip, dns_endpoint("255.255.255.255", "west", 25353),
                        dns_endpoint("127.79.44.1", "east", live_port), port=port)
    proxy = await cs.proxy()
    clients = [await client(f"127.79.44.{10 + i}") for i in range(4)]
    try:
        for c, proto in clients:
            c.sendto(b"q", (ip, port.port))
            async with asyncio.timeout(3):
                assert (await proto.replies.get())[0] == b"east-1:q"
        stats = next(iter(proxy.upstreams.values())).stats
        assert stats.cluster("west").attempts["error"] == 2  # round-robin: every other flow
        assert stats.cluster("west").failed == 0 and stats.cluster("east").connections == 4
        assert stats.retries == 2
    finally:
        for c, _ in clients:
            c.close()
        live.close()
        await proxy.stop()


async def test_a_flow_that_ran_out_of_endpoints_is_logged_without_a_wrong_cause(
        caplog: pytest.LogCaptureFixture) -> None:
    # The sole endpoint cannot be reached (no route; here the broadcast address): the
    # flow failed, logged as "1 endpoints port unreachable", though nothing answered so.
    ip = "127.79.240.52"
    port = dns_port(ip)
    proxy = await dns_clusterset(ip, dns_endpoint("255.255.255.255", "west", 25353),
                                 port=port).proxy()
    c, _ = await client("127.79.52.9")
    try:
        c.sendto(b"q", (ip, port.port))
        await until(lambda: "no endpoint for a client" in caplog.text, "the flow given up")
        assert "no endpoint for a client (every endpoint failed (1 tried))" in caplog.text
        assert "port unreachable" not in caplog.text
    finally:
        c.close()
        await proxy.stop()


async def test_the_access_log_has_one_line_per_client_flow_with_its_attempts() -> None:
    # Each attempt of a moved flow was a line of its own (outcome=refused, then ok, no
    # attempts field), and a flow that failed or found no endpoint had none; TCP logs
    # one line per connection with its attempts.
    live, live_port = await udp_backend("east-1", "127.79.45.1")
    dead = [free_port(f"127.79.45.{i}", socket.SOCK_DGRAM) for i in (2, 3)]
    ports = {n: dns_port(f"127.79.240.{n}") for n in (45, 46, 47)}
    cs = Clusterset("east")
    cs.publish("dns", "127.79.240.45", [ports[45]],
               [dns_endpoint("127.79.45.2", "east", dead[0]),
                dns_endpoint("127.79.45.1", "east", live_port)])
    cs.publish("down", "127.79.240.46", [ports[46]],
               [dns_endpoint("127.79.45.2", "east", dead[0]),
                dns_endpoint("127.79.45.3", "east", dead[1])])
    cs.publish("none", "127.79.240.47", [ports[47]], [])
    proxy = ProxyManager(ProxyConfig(health=NO_HEALTH), cs.store)
    proxy.access_log = log = AccessLog("-")
    await proxy.start()
    clients = [await client(f"127.79.45.{10 + i}") for i in range(4)]
    try:
        for c, proto in clients[:2]:
            c.sendto(b"q", ("127.79.240.45", ports[45].port))
            async with asyncio.timeout(3):
                assert (await proto.replies.get())[0] == b"east-1:q"
        clients[2][0].sendto(b"q", ("127.79.240.46", ports[46].port))
        clients[3][0].sendto(b"q", ("127.79.240.47", ports[47].port))
        await until(lambda: len(log.pending) == 2, "the failed and the no-endpoint flow logged")
        for flow in [f for f in proxy.conns if isinstance(f, UdpFlow)]:
            flow.expire()
        await until(lambda: len(log.pending) == 4, "the answered flows logged as they end")
        lines = {r["client"].split(":")[0]: r for r in log.pending}
        assert len(lines) == 4 and all(r["kind"] == "udp" for r in lines.values())
        answered = [lines[f"127.79.45.{10 + i}"] for i in range(2)]
        assert {r["outcome"] for r in answered} == {"ok"}
        assert sorted(r["attempts"] for r in answered) == [1, 2]  # one met the dead port
        assert all(r["endpoint"] == f"127.79.45.1:{live_port}" for r in answered)
        failed = lines["127.79.45.12"]
        assert failed["outcome"] == "failed" and failed["attempts"] == 2
        assert failed["endpoint"] in {f"127.79.45.2:{dead[0]}", f"127.79.45.3:{dead[1]}"}
        none = lines["127.79.45.13"]
        assert none["outcome"] == "no_endpoint" and none["attempts"] == 0
    finally:
        for c, _ in clients:
            c.close()
        live.close()
        await proxy.stop()


def icmp_unreachable(flow_addr: tuple, endpoint_addr: tuple, code: int, mtu: int = 0) -> bytes:
    """ICMP destination unreachable (`code`) about a datagram `flow_addr` sent to
    `endpoint_addr`: 4, "fragmentation needed", as a router on the way sends it for one
    larger than its next hop's MTU; 10, "host prohibited", as a firewall's reject."""
    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF
    dropped = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1428, 0, 0x4000, 64, socket.IPPROTO_UDP,
                          0, socket.inet_aton(flow_addr[0]), socket.inet_aton(endpoint_addr[0]))
    dropped = dropped[:10] + struct.pack("!H", checksum(dropped)) + dropped[12:]
    dropped += struct.pack("!HHHH", flow_addr[1], endpoint_addr[1], 1408, 0)
    message = struct.pack("!BBHHH", 3, code, 0, 0, mtu) + dropped
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


@pytest.mark.skipif(os.geteuid() != 0, reason="sends ICMP from a raw socket (root)")
@pytest.mark.skipif(os.geteuid() != 0, reason="sends ICMP from a raw socket (root)")
async def test_a_flow_whose_endpoint_a_firewall_rejects_moves_elsewhere() -> None:
    # A firewall's reject (iptables --reject-with icmp-host-prohibited, firewalld's
    # default) reaches the flow's socket as EHOSTUNREACH, which was ignored: only port
    # unreachable moved a flow, so the client's datagrams went on into the firewall (5 of
    # 10 clients unanswered over 3 tries each, the endpoint never ejected).
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes datagrams, never answers
    sink.bind(("127.79.49.1", 0))
    live, live_port = await udp_backend("east-2", "127.79.49.2")
    ip = "127.79.240.49"
    port = dns_port(ip)
    sink_addr = sink.getsockname()
    proxy = await dns_clusterset(ip, dns_endpoint("127.79.49.1", "east", sink_addr[1]),
                                 dns_endpoint("127.79.49.2", "east", live_port),
                                 port=port).proxy(connect_timeout_s=10)  # not moved by that
    clients = [await client(f"127.79.49.{10 + i}") for i in range(2)]
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp.bind(("127.79.49.1", 0))
    try:
        table: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[union-attr,assignment]
        for c, proto in clients:  # round-robin: one of the two flows goes to the sink
            c.sendto(b"q", (ip, port.port))
            addr = c.get_extra_info("sockname")
            await until(lambda a=addr: a in table.flows and table.flows[a].transport,
                        "the flow's socket open")
            flow = table.flows[addr]
            assert flow.host is not None and flow.transport is not None
            if flow.host.port == sink_addr[1]:
                flow_addr = flow.transport.get_extra_info("sockname")
                icmp.sendto(icmp_unreachable(flow_addr, sink_addr, 10), flow_addr)
            async with asyncio.timeout(3):
                assert (await proto.replies.get())[0] == b"east-2:q"
        stats = next(iter(proxy.upstreams.values())).stats
        assert stats.cluster("east").attempts["error"] == 1 and stats.retries == 1
    finally:
        icmp.close()
        for c, _ in clients:
            c.close()
        live.close()
        sink.close()
        await proxy.stop()


async def test_a_datagram_that_meets_a_path_mtu_error_is_sent_all_the_same() -> None:
    # A router's "fragmentation needed" for an earlier datagram leaves EMSGSIZE on the
    # flow's connected socket, and the next write reports it instead of sending: that
    # datagram was lost, uncounted (1 of 1 here). The MTU told is the loopback's own
    # (65,535), so no datagram of this or any other test is fragmented for it.
    east, east_port = await udp_backend("east-1", "127.79.46.1")
    ip = "127.79.240.48"
    port = dns_port(ip)
    proxy = await dns_clusterset(ip, dns_endpoint("127.79.46.1", "east", east_port),
                                 port=port).proxy()
    c, proto = await client("127.79.46.9")
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        c.sendto(b"first", (ip, port.port))
        async with asyncio.timeout(3):
            assert (await proto.replies.get())[0] == b"east-1:first"
        flow = next(f for f in proxy.conns if isinstance(f, UdpFlow))
        assert flow.transport is not None
        flow_addr = flow.transport.get_extra_info("sockname")
        # Read in the same poll: the client's datagram first, then the router's error.
        c.sendto(b"next", (ip, port.port))
        icmp.bind(("127.79.46.1", 0))
        icmp.sendto(icmp_unreachable(flow_addr, ("127.79.46.1", east_port), 4, 65535), flow_addr)
        async with asyncio.timeout(3):
            assert (await proto.replies.get())[0] == b"east-1:next"
        assert proxy.udp_drops.counts["too_big"] == 0
    finally:
        icmp.close()
        c.close()
        east.close()
        await proxy.stop()


async def test_running_out_of_descriptors_does_not_eject_udp_endpoints() -> None:
    # A flow whose socket cannot be made (EMFILE) was charged to its endpoint: under
    # descriptor exhaustion healthy endpoints were ejected, as the TCP proxy avoids.
    a, a_port = await udp_backend("east-1", "127.92.6.1")
    b, b_port = await udp_backend("west-1", "127.92.6.2")
    ip = "127.240.92.6"
    cs = dns_clusterset(ip, dns_endpoint("127.92.6.1", "east", a_port),
                        dns_endpoint("127.92.6.2", "west", b_port))
    proxy = await cs.proxy(outlier=OutlierConfig(consecutive_failures=2))
    clients = [await client(f"127.92.9.{60 + i}") for i in range(8)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
        try:
            for c, _ in clients:
                c.sendto(b"q", (ip, 53))
            await asyncio.sleep(0.3)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        hosts = next(iter(proxy.upstreams.values())).hosts.values()
        assert [(h.consecutive_failures, h.ejected) for h in hosts] == [(0, False)] * 2
        c, proto = await client("127.92.9.70")  # and the gateway serves again
        clients.append((c, proto))
        c.sendto(b"again", (ip, 53))
        assert (await asyncio.wait_for(proto.replies.get(), 3))[0].endswith(b":again")
    finally:
        for c, _ in clients:
            c.close()
        a.close()
        b.close()
        await proxy.stop()


async def test_zero_length_datagrams_are_forwarded_both_ways() -> None:
    # An empty datagram is valid UDP (keepalives, liveness probes): asyncio's and uvloop's
    # sendto drop it silently, so it never reached the endpoint, nor a reply the client.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ep, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        ep.bind(("127.92.7.1", 0))
        c.bind(("127.92.9.71", 0))
        ep.setblocking(False)
        c.setblocking(False)
        ip = "127.240.92.7"
        cs = dns_clusterset(ip, dns_endpoint("127.92.7.1", "east", ep.getsockname()[1]))
        proxy = await cs.proxy()
        try:
            c.sendto(b"", (ip, 53))
            data, flow = await asyncio.wait_for(loop.sock_recvfrom(ep, 100), 2)
            assert data == b""
            ep.sendto(b"", flow)
            assert await asyncio.wait_for(loop.sock_recvfrom(c, 100), 2) == (b"", (ip, 53))
        finally:
            await proxy.stop()


async def test_client_ip_affinity_holds_across_workers() -> None:
    # With --workers the kernel spreads a listener's datagrams by addresses and ports, so
    # one client's flows from different source ports reached different workers, each
    # with its own affinity table (and round-robin position): in a 2-worker gateway 6 of
    # 10 client addresses reached both endpoints.
    a, a_port = await udp_backend("east-1", "127.92.8.1")
    b, b_port = await udp_backend("east-2", "127.92.8.2")
    ip = "127.240.92.8"
    cs = Clusterset("east")
    cs.publish("dns", ip, [DNS], [dns_endpoint("127.92.8.1", "east", a_port),
                                   dns_endpoint("127.92.8.2", "east", b_port)],
               affinity="ClientIP")
    workers = [await cs.proxy(workers=2), await cs.proxy(workers=2)]  # one reuseport group
    # 21 one-flow clients first: whatever their split, the two workers' round-robin
    # positions end up of different parity, as workers serving different clients do.
    clients = [await client(f"127.92.10.{i + 1}") for i in range(21)]
    clients += [await client(f"127.92.9.{80 + i // 6}") for i in range(60)]
    try:
        served: dict[str, set[bytes]] = {}
        for c, proto in clients:
            c.sendto(b"q", (ip, 53))
            data, _ = await asyncio.wait_for(proto.replies.get(), 3)
            served.setdefault(c.get_extra_info("sockname")[0], set()).add(data.split(b":")[0])
        assert all(len(names) == 1 for names in served.values()), served
        # and the client addresses are still spread over both workers
        assert all(any(isinstance(f, UdpFlow) for f in w.conns) for w in workers)
    finally:
        for c, _ in clients:
            c.close()
        a.close()
        b.close()
        for w in workers:
            await w.stop()


class CountingSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.received += 1


async def test_datagrams_past_what_an_opening_flow_holds_are_dropped_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    port = free_port("127.42.6.1", socket.SOCK_DGRAM)
    sink = CountingSink()
    backend, _ = await loop.create_datagram_endpoint(lambda: sink,
                                                     local_addr=("127.42.6.1", port))
    ip = "127.240.42.6"
    cs = dns_clusterset(ip, dns_endpoint("127.42.6.1", "east", port))
    proxy = await cs.proxy()
    listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[attr-defined]
    try:
        # In one loop pass, so all of them arrive before the flow's socket is open: as a
        # burst read in one go would.
        for i in range(PENDING_DATAGRAMS_MAX + 36):
            listener.datagram_received(b"%d" % i, ("127.42.6.9", 4000))
        assert proxy.udp_drops.counts["opening"] == 36
        await until(lambda: sink.received == PENDING_DATAGRAMS_MAX, "the held datagrams sent")
        assert "UDP datagram dropped (over 64 datagrams held while a flow's socket opens)" \
            in caplog.text
        listener.datagram_received(b"more", ("127.42.6.9", 4000))  # the flow is open now
        await until(lambda: sink.received == PENDING_DATAGRAMS_MAX + 1, "a later datagram")
        assert proxy.udp_drops.counts == {"opening": 36, "endpoint_buffer_full": 0,
                                          "client_buffer_full": 0, "too_big": 0}
    finally:
        await proxy.stop()
        backend.close()


class Recorder(asyncio.DatagramProtocol):
    """An endpoint that answers nothing and keeps what it got, in order."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.got.append(data)


async def recorder(host: str) -> tuple[asyncio.DatagramTransport, Recorder, int]:
    port = free_port(host, socket.SOCK_DGRAM)
    proto = Recorder()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: proto, local_addr=(host, port))
    return transport, proto, port  # type: ignore[return-value]


def port_unreachable_pending(fd: int) -> bool:
    """Whether an ICMP error waits on this connected UDP socket (its next write fails).
    Blocks the loop on purpose: the flow must not read the error before its next write."""
    poller = select.poll()
    poller.register(fd, select.POLLERR)
    return bool(poller.poll(200))


async def test_a_datagram_whose_write_meets_port_unreachable_moves_with_the_flow() -> None:
    # The port unreachable an earlier datagram brought back can surface as the next
    # write's ECONNREFUSED, before the loop reads it. The flow moved then, from inside that
    # write, with what it had kept, and only then kept the datagram being written: that
    # one stayed behind on the dead flow (5 of 1,500 datagrams lost, none counted).
    loop = asyncio.get_running_loop()
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # closed at once, when told
    gone.bind(("127.92.11.1", 0))
    gone.setblocking(False)
    gone_port = gone.getsockname()[1]
    live, live_proto, live_port = await recorder("127.92.11.2")
    ip = "127.240.92.11"
    cs = dns_clusterset(ip, dns_endpoint("127.92.11.1", "east", gone_port),
                        dns_endpoint("127.92.11.2", "east", live_port))
    proxy = await cs.proxy(outlier=OutlierConfig(consecutive_failures=0))
    listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[attr-defined]
    try:
        # Round robin: of two new clients, one flow goes to the endpoint about to go.
        for port in (4001, 4002):
            listener.datagram_received(b"%d:0" % port, ("127.92.11.9", port))
        addr, flow = next((a, f) for a, f in listener.flows.items()
                          if f.host is not None and f.host.port == gone_port)
        first = await asyncio.wait_for(loop.sock_recv(gone, 100), 3)
        assert first == b"%d:0" % addr[1]
        gone.close()
        sent = [first]
        for i in range(1, 6):  # the ICMP answer can be rate-limited: send until one comes
            sent.append(b"%d:%d" % (addr[1], i))
            listener.datagram_received(sent[-1], addr)
            if port_unreachable_pending(flow.fd):
                break
        else:
            pytest.fail("no port unreachable came back")
        sent.append(b"%d:last" % addr[1])
        listener.datagram_received(sent[-1], addr)  # this write meets ECONNREFUSED
        assert flow.closed and listener.flows[addr] is not flow
        await until(lambda: [d for d in live_proto.got if d.startswith(b"%d:" % addr[1])]
                    == sent, "every datagram at the live endpoint", timeout=3)
        assert proxy.udp_drops.counts == dict.fromkeys(proxy.udp_drops.counts, 0)
    finally:
        await proxy.stop()
        live.close()
        gone.close()


async def test_a_udp_attempt_counts_once_when_its_outcome_is_known() -> None:
    # A flow counted as an ok connection (and attempt) when its socket opened, which sends
    # nothing, and a port unreachable then added a refused attempt on top. Now the attempt
    # waits for a reply, a port unreachable or the connect timeout (a one-way protocol
    # never replies); a port unreachable after that ends the flow but is no second attempt.
    loop = asyncio.get_running_loop()
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind(("127.92.12.1", 0))
    quiet.setblocking(False)
    ip = "127.240.92.12"
    cs = dns_clusterset(ip, dns_endpoint("127.92.12.1", "east", quiet.getsockname()[1]))
    proxy = await cs.proxy(connect_timeout_s=0.2, outlier=OutlierConfig(consecutive_failures=0))
    listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[attr-defined]
    host = next(iter(next(iter(proxy.upstreams.values())).hosts.values()))
    stats = host.stats
    addr = ("127.92.12.9", 4000)
    try:
        listener.datagram_received(b"one", addr)
        assert await asyncio.wait_for(loop.sock_recv(quiet, 100), 3) == b"one"
        assert (stats.connections, stats.attempts["ok"]) == (0, 0)  # not known yet
        await until(lambda: stats.connections == 1, "counted ok after the connect timeout",
                    timeout=3)
        flow = listener.flows[addr]
        quiet.close()
        listener.datagram_received(b"two", addr)
        await until(lambda: flow.closed, "the flow ended by port unreachable", timeout=3)
        assert (stats.connections, stats.failed) == (1, 0)
        assert (stats.attempts["ok"], stats.attempts["refused"]) == (1, 0)
        assert host.consecutive_failures == 1  # still a failure toward ejection
    finally:
        await proxy.stop()
        quiet.close()


def test_the_idle_sweep_never_expires_a_flow_before_its_timeout() -> None:
    # With a 30 s TCP and a 100 s UDP timeout the sweep runs every 7.5 s: rounded to the
    # nearest, 13 sweeps closed UDP flows idle 97.5 s.
    assert sweep_ticks(100.0, 30.0 / IDLE_SWEEPS) == 14
    assert sweep_ticks(30.0, 30.0 / IDLE_SWEEPS) == IDLE_SWEEPS
    assert sweep_ticks(0.3, 0.1) == 3  # not 4 from float error
    assert sweep_ticks(0.0, 7.5) == 0  # no timeout: never


async def test_flows_to_a_silent_cluster_move_when_the_other_clusters_answer() -> None:
    # A blackholed cluster sends no port unreachable: its flows counted ok after the
    # connect timeout, stayed, and its share of new flows was lost for good (1 in 3
    # queries over 36 s with 3 clusters) while the same cluster's TCP services failed
    # over within 1 s. Another cluster of this service answers, so this one's silence
    # is a partition: the flow moves with its datagrams, the endpoint is ejected.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.79.10.1", 0))  # takes datagrams, never answers, never refuses
    live, live_port = await udp_backend("west-1", "127.79.10.2")
    ip = "127.240.79.10"
    cs = dns_clusterset(ip, dns_endpoint("127.79.10.1", "east", silent.getsockname()[1]),
                        dns_endpoint("127.79.10.2", "west", live_port))
    proxy = await cs.proxy(connect_timeout_s=0.2)
    clients = [await client("127.79.10.9") for _ in range(6)]
    east = next(h for h in next(iter(proxy.upstreams.values())).hosts.values()
                if h.cluster == "east")
    try:
        for i, (c, _) in enumerate(clients):
            c.sendto(b"q%d" % i, (ip, 53))
        for i, (_, proto) in enumerate(clients):
            data, _ = await asyncio.wait_for(proto.replies.get(), 1.5)
            assert data == b"west-1:q%d" % i
        assert east.ejected and east.stats.attempts["timeout"] >= 1
        assert east.stats.attempts["ok"] == 0
    finally:
        for c, _ in clients:
            c.close()
        live.close()
        silent.close()
        await proxy.stop()


async def test_a_one_way_udp_service_is_not_ejected_for_its_silence() -> None:
    # No endpoint of the service ever answers (a one-way protocol, statsd or syslog):
    # silence says nothing there, and every attempt counts ok after the connect timeout.
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for i, s in enumerate(sinks):
        s.bind((f"127.79.11.{i + 1}", 0))
    ip = "127.240.79.11"
    cs = dns_clusterset(ip, *(dns_endpoint(f"127.79.11.{i + 1}", cluster, s.getsockname()[1])
                              for i, (s, cluster) in enumerate(zip(sinks, ("east", "west"),
                                                                   strict=True))))
    proxy = await cs.proxy(connect_timeout_s=0.1)
    hosts = list(next(iter(proxy.upstreams.values())).hosts.values())
    clients = [await client("127.79.11.9") for _ in range(4)]
    try:
        for c, _ in clients:
            c.sendto(b"metric", (ip, 53))
        await until(lambda: sum(h.stats.attempts["ok"] for h in hosts) == 4,
                    "every attempt counted ok", timeout=2)
        assert not any(h.ejected for h in hosts)
        assert sum(h.stats.attempts["timeout"] for h in hosts) == 0
    finally:
        for c, _ in clients:
            c.close()
        for s in sinks:
            s.close()
        await proxy.stop()


class MutableUdpEcho(NamedUdpEcho):
    """Echoes until `silent`: then takes datagrams and answers nothing, as a blackhole."""

    silent = False

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not self.silent:
            super().datagram_received(data, addr)


async def test_a_long_flow_whose_endpoint_goes_silent_moves_elsewhere() -> None:
    # One long flow (a forwarder's pooled socket) to an endpoint then blackholed: counted
    # ok long ago, it took every datagram into the silence for as long as the client sent
    # (all 26 queries lost over 9 s), and nothing was ejected.
    loop = asyncio.get_running_loop()
    port = free_port("127.79.12.1", socket.SOCK_DGRAM)
    east_echo = MutableUdpEcho(b"east-1")
    east, _ = await loop.create_datagram_endpoint(lambda: east_echo,
                                                  local_addr=("127.79.12.1", port))
    live, live_port = await udp_backend("west-1", "127.79.12.2")
    ip = "127.240.79.12"
    cs = dns_clusterset(ip, dns_endpoint("127.79.12.1", "east", port),
                        dns_endpoint("127.79.12.2", "west", live_port))
    proxy = await cs.proxy(connect_timeout_s=0.2)
    clients = [await client("127.79.12.9") for _ in range(2)]
    try:
        served = {}
        for c, proto in clients:
            c.sendto(b"q", (ip, 53))
            data, _ = await asyncio.wait_for(proto.replies.get(), 1)
            served[data.split(b":")[0]] = (c, proto)
        assert set(served) == {b"east-1", b"west-1"}  # round robin; west has answered
        c, proto = served[b"east-1"]
        east_echo.silent = True
        async with asyncio.timeout(1.5):
            while True:
                c.sendto(b"again", (ip, 53))
                try:
                    data, _ = await asyncio.wait_for(proto.replies.get(), 0.05)
                except TimeoutError:
                    continue
                if data == b"west-1:again":
                    break
        host = next(h for h in next(iter(proxy.upstreams.values())).hosts.values()
                    if h.cluster == "east")
        assert host.ejected and host.stats.attempts["timeout"] == 0  # no second attempt
    finally:
        for c, _ in clients:
            c.close()
        east.close()
        live.close()
        await proxy.stop()


async def test_local_first_flows_leave_a_local_cluster_gone_silent() -> None:
    # Local-first: only the local cluster had ever answered, which the partition rule
    # asked of another cluster, so a blackholed local cluster kept every new flow (and a
    # `--workers` process whose flows all went there, likewise: 16 queries lost over 7 s).
    loop = asyncio.get_running_loop()
    port = free_port("127.79.13.1", socket.SOCK_DGRAM)
    east_echo = MutableUdpEcho(b"east-1")
    east, _ = await loop.create_datagram_endpoint(lambda: east_echo,
                                                  local_addr=("127.79.13.1", port))
    live, live_port = await udp_backend("west-1", "127.79.13.2")
    ip = "127.240.79.13"
    cs = dns_clusterset(ip, dns_endpoint("127.79.13.1", "east", port),
                        dns_endpoint("127.79.13.2", "west", live_port), traffic="PreferClose")
    proxy = await cs.proxy(connect_timeout_s=0.2)
    clients = [await client("127.79.13.9") for _ in range(2)]
    try:
        (c1, p1), (c2, p2) = clients
        c1.sendto(b"one", (ip, 53))
        assert (await asyncio.wait_for(p1.replies.get(), 1))[0] == b"east-1:one"
        east_echo.silent = True
        c2.sendto(b"two", (ip, 53))  # a new flow, to east: moved once east is silent
        assert (await asyncio.wait_for(p2.replies.get(), 1.5))[0] == b"west-1:two"
    finally:
        for c, _ in clients:
            c.close()
        east.close()
        live.close()
        await proxy.stop()
