"""No UDP queue grows when the kernel takes no more: a slow link (a token bucket on a
network namespace's veth, tests/netns.py) fills a socket's send buffer and the kernel
answers EAGAIN, after which uvloop's sendto would queue every later datagram without a
limit. The proxy drops what the kernel refuses, towards endpoints and clients, and counts
it. Root only; skipped with the reason otherwise."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import uvloop

from mcsproxy.proxy.udp import UdpFlow, UdpListener
from tests.netns import NetnsClusters, netns_skip_reason, run
from tests.proxy_fixtures import free_port, until
from tests.test_proxy_udp import dns_clusterset, dns_endpoint

skip = netns_skip_reason()
pytestmark = pytest.mark.skipif(skip is not None, reason=skip or "")

SINK_PORT = 9053
DATAGRAM = 1000
# Reads and drops datagrams, inside the namespace.
SINK = ("import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    s.recv(65536)\n")
# Sends COUNT small datagrams to HOST:PORT in bursts (so the gateway's receive buffer
# does not overflow first) and exits, from inside the namespace.
CLIENT = ("import socket, sys, time\n"
          "host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
          "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
          "for i in range(count):\n"
          "    s.sendto(b'q', (host, port))\n"
          "    if i % 50 == 49:\n"
          "        time.sleep(0.005)\n")


@pytest.fixture(scope="module")
def slow_cluster() -> Iterator[NetnsClusters]:
    """Cluster `a`, whose link from the host carries 1 Mbit/s: a queue of 20 s' worth
    (2.5 MB) in the token bucket, so the sender's socket buffer (~212 KB) fills first
    and the kernel answers EAGAIN rather than dropping in the qdisc."""
    cs = NetnsClusters(["a"])
    try:
        cs.setup()
        run("tc", "qdisc", "add", "dev", cs.veth("a"), "root", "tbf", "rate", "1mbit",
            "burst", "16k", "latency", "20s")
        yield cs
    finally:
        cs.teardown()


async def a_flow_to_an_endpoint_behind_a_slow_link(slow_cluster: NetnsClusters,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    sink = subprocess.Popen(["ip", "netns", "exec", slow_cluster.ns("a"), sys.executable,
                             "-c", SINK, str(SINK_PORT)], stdout=subprocess.PIPE)
    try:
        assert sink.stdout is not None and sink.stdout.readline() == b"ready\n"
        ip = "127.240.46.1"
        cs = dns_clusterset(ip, dns_endpoint(slow_cluster.address("a"), "a", SINK_PORT))
        proxy = await cs.proxy()
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.bind(("127.46.0.9", 0))
            # The flow open first, so that the flood meets its socket and nothing else.
            c.sendto(b"x" * DATAGRAM, (ip, 53))
            sent = 1
            await until(lambda: any(isinstance(f, UdpFlow) and f.transport is not None
                                    for f in proxy.conns), "the flow open")
            # Up to 4 MB offered, against ~125 KB/s drained.
            async with asyncio.timeout(20):
                while proxy.udp_drops.counts["endpoint_buffer_full"] < 500:
                    for _ in range(50):
                        c.sendto(b"x" * DATAGRAM, (ip, 53))
                        sent += 1
                    await asyncio.sleep(0.002)
                    assert sent < 4000, proxy.udp_drops.counts
            flows = [f for f in proxy.conns if isinstance(f, UdpFlow)]
            assert len(flows) == 1 and flows[0].transport is not None
            assert flows[0].transport.get_write_buffer_size() == 0  # nothing queued by the loop
            # What the kernel took went out (about its send buffer's worth), the rest was
            # counted (at most what was sent: the gateway's own receive buffer may
            # overflow on a slow machine).
            counts = proxy.udp_drops.counts
            assert flows[0].sent >= 50 * DATAGRAM
            assert flows[0].sent // DATAGRAM + counts["endpoint_buffer_full"] <= sent
            assert "UDP datagram dropped (the send buffer towards the endpoint is full)" \
                in caplog.text
            assert counts["client_buffer_full"] == counts["opening"] == 0
        finally:
            c.close()
            await proxy.stop()
    finally:
        sink.kill()
        sink.wait(10)
        assert sink.stdout is not None
        sink.stdout.close()


class Amplifier(asyncio.DatagramProtocol):
    """Answers every datagram with 1,400 bytes: replies outgrow what the slow link takes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(b"r" * 1400, addr)


async def replies_to_a_client_behind_a_slow_link(slow_cluster: NetnsClusters,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    backend_port = free_port("127.46.1.1", socket.SOCK_DGRAM)
    backend, _ = await loop.create_datagram_endpoint(Amplifier,
                                                     local_addr=("127.46.1.1", backend_port))
    # The ClusterSetIP is the host's address on the clusters' bridge, so replies to the
    # client in namespace `a` leave through the slow link.
    ip = slow_cluster.host_ip
    cs = dns_clusterset(ip, dns_endpoint("127.46.1.1", "east", backend_port))
    proxy = await cs.proxy()
    try:
        # 2,000 replies of 1,400 bytes: 2.8 MB, well past the socket's send buffer.
        client = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", slow_cluster.ns("a"), sys.executable, "-c", CLIENT, ip,
            "53", "2000")
        async with asyncio.timeout(20):
            assert await client.wait() == 0
        # About the socket's send buffer's worth of replies went out (~150 of them); most
        # of the rest was refused by the kernel and counted.
        counts = proxy.udp_drops.counts
        await until(lambda: counts["client_buffer_full"] >= 500, "replies dropped")
        listener: UdpListener = next(iter(proxy.listeners.values())).transport.get_protocol()  # type: ignore[attr-defined]
        flows = list(listener.flows.values())
        assert len(flows) == 1 and counts["client_buffer_full"] < flows[0].received // 1400
        assert listener.transport is not None
        assert listener.transport.get_write_buffer_size() == 0  # nothing queued by the loop
        assert "UDP datagram dropped (the send buffer towards the client is full)" \
            in caplog.text
        assert counts["endpoint_buffer_full"] == counts["opening"] == 0
    finally:
        await proxy.stop()
        backend.close()


# uvloop is what the gateway runs (its UDP queue is the one without a limit); asyncio's
# selector loop queues the same way.
LOOPS = pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])


@LOOPS
def test_a_flow_to_an_endpoint_behind_a_slow_link_queues_a_bounded_amount(
        run, slow_cluster: NetnsClusters, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    run(a_flow_to_an_endpoint_behind_a_slow_link(slow_cluster, caplog))


@LOOPS
def test_replies_to_a_client_behind_a_slow_link_queue_a_bounded_amount(
        run, slow_cluster: NetnsClusters, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    run(replies_to_a_client_behind_a_slow_link(slow_cluster, caplog))
