"""IPv6 through the proxy (dual-stack clustersets give each service an IPv6 ClusterSetIP):
TCP, HTTP and UDP from a client on ::1 through a ClusterSetIP on ::1 to an endpoint on
::1, on real sockets. Skipped where the machine has no IPv6 loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mcsproxy.model import Endpoint, EndpointPort, ServicePort
from tests.http_support import HttpBackend, RawClient
from tests.proxy_fixtures import Backend, Clusterset, ask
from tests.test_proxy_udp import Client, NamedUdpEcho, dns_clusterset, dns_endpoint, udp_backend


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1)")


def free_port6(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET6, kind) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def endpoint6(port: int, name: str, protocol: str = "TCP") -> Endpoint:
    return Endpoint(address="::1", addresses=("::1",), family=6, cluster="east",
                    ports=(EndpointPort(name, protocol, port),),  # type: ignore[arg-type]
                    ready=True, serving=True, terminating=False)


async def test_tcp_through_an_ipv6_clusterset_ip() -> None:
    backend = await Backend("east-6", "::1", free_port6(), "east").start()
    cs = Clusterset("east")
    port = free_port6()
    cs.publish("echo", "::1", [ServicePort("echo", "TCP", port)],
               [endpoint6(backend.port, "echo")])
    proxy = await cs.proxy()
    try:
        for _ in range(3):
            assert await ask("::1", port) == "east-6"
    finally:
        await proxy.stop()
        await backend.stop()


async def test_http_through_an_ipv6_clusterset_ip() -> None:
    backend = await HttpBackend("east-6", "::1", "east", free_port6()).start()
    cs = Clusterset("east")
    port = free_port6()
    cs.publish("web", "::1", [ServicePort("web", "TCP", port, "http")],
               [endpoint6(backend.port, "web")])
    proxy = await cs.proxy()
    client = await RawClient.open("::1", port)
    try:
        response = await client.get("/")
        assert response.status == 200 and response.headers[b"x-backend"] == b"east-6"
        assert backend.header(0, b"x-forwarded-for") == [b"::1"]
        # HTTP/1.0 without Host: the ClusterSetIP:port it reached stands in, bracketed.
        client.send(b"GET /old HTTP/1.0\r\n\r\n")
        assert (await client.response()).status == 200
        assert backend.header(1, b"host") == [f"[::1]:{port}".encode()]
    finally:
        await client.close()
        await proxy.stop()
        await backend.stop()


async def test_udp_through_an_ipv6_clusterset_ip() -> None:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(lambda: NamedUdpEcho(b"east-6"),
                                                  local_addr=("::1", free_port6(socket.SOCK_DGRAM)))
    cs = Clusterset("east")
    port = free_port6(socket.SOCK_DGRAM)
    cs.publish("dns", "::1", [ServicePort("dns", "UDP", port)],
               [endpoint6(echo.get_extra_info("sockname")[1], "dns", "UDP")])
    proxy = await cs.proxy()
    proto = Client()
    client, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("::1", 0))
    try:
        for i in range(3):
            client.sendto(b"q%d" % i, ("::1", port))
            data, addr = await asyncio.wait_for(proto.replies.get(), 3)
            assert data == b"east-6:q%d" % i and addr[:2] == ("::1", port)
    finally:
        client.close()
        echo.close()
        await proxy.stop()


async def test_a_datagram_too_big_for_the_other_address_family_is_counted_dropped() -> None:
    # An IPv6 client's 65,527 bytes cannot go to an IPv4 endpoint (65,507 at most): the
    # write fails with EMSGSIZE, and the datagram was dropped without a count or a word.
    east, east_port = await udp_backend("east-1", "127.79.47.1")
    port = free_port6(socket.SOCK_DGRAM)
    proxy = await dns_clusterset("::1", dns_endpoint("127.79.47.1", "east", east_port),
                                 port=ServicePort("dns", "UDP", port)).proxy()
    c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        c.bind(("::1", 0))
        c.setblocking(False)
        c.sendto(b"x" * 65527, ("::1", port))
        c.sendto(b"small", ("::1", port))
        async with asyncio.timeout(3):
            assert await asyncio.get_running_loop().sock_recv(c, 100) == b"east-1:small"
        assert proxy.udp_drops.counts["too_big"] == 1
    finally:
        c.close()
        east.close()
        await proxy.stop()
