"""The --http-listen front door: routes by Host to imported services, and nowhere else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mcsproxy.config import HttpConfig
from mcsproxy.http.frontdoor import FrontDoor
from mcsproxy.model import ServicePort
from mcsproxy.proxy import ProxyManager
from tests.http_support import HTTP_PORT, RawClient, start_backends
from tests.proxy_fixtures import Backend, Clusterset, endpoint, free_port


@contextlib.asynccontextmanager
async def front_door(cs: Clusterset, ip: str) -> AsyncIterator[tuple[ProxyManager,
                                                                      tuple[str, int]]]:
    """The gateway of `cs` with its front door on ip (a free port): (proxy, listen)."""
    listen = (ip, free_port(ip))
    proxy = await cs.proxy(http=HttpConfig(listen=listen))
    front = FrontDoor(proxy, "clusterset.local")
    try:
        await front.start()
        yield proxy, listen
    finally:
        await front.stop()
        await proxy.stop()


async def test_front_door_routes_by_host_only_to_imported_services() -> None:
    web, api = await start_backends({"east": 1, "west": 1}, 81)
    cs = Clusterset("east")
    cs.publish("web", "127.240.81.1", [HTTP_PORT], [endpoint(web.host, "east", web.port)])
    cs.publish("api", "127.240.81.2", [ServicePort("grpc", "TCP", 9090),
                                       ServicePort("http", "TCP", 8080, "http")],
               [endpoint(api.host, "west", api.port, name="http"),
                endpoint(api.host, "west", api.port, name="grpc")])
    try:
        async with front_door(cs, "127.0.0.81") as (proxy, listen):
            client = await RawClient.open(*listen)
            for host, status, body in [
                ("web.test.svc.clusterset.local", 200, b"east-1"),
                ("WEB.test.svc.clusterset.local.:80", 200, b"east-1"),
                ("api.test.svc.clusterset.local:8080", 200, b"west-1"),
                ("api.test.svc.clusterset.local", 404, b"no such service port\n"),  # two ports
                ("web.test.svc.clusterset.local:81", 404, b"no such service port\n"),
                ("nope.test.svc.clusterset.local", 404, b"no such service\n"),
                ("web.test.svc.cluster.local", 421, b"not a clusterset service name\n"),
                (f"127.81.1.1:{web.port}", 421, b"not a clusterset service name\n"),
                ("evil.example", 421, b"not a clusterset service name\n"),
            ]:
                r = await client.get("/", host=host)
                assert (r.status, r.body) == (status, body), host
            # The ClusterSetIP listeners and the front door share one upstream set per port.
            assert len(proxy.upstreams) == 3
            # An absolute-form target routes by its authority (RFC 9112 3.2.2), by the same
            # rules as Host: never to an address the client names (not an open proxy).
            client.send(b"GET http://127.81.1.1/ HTTP/1.1\r\nHost: web.test.svc.clusterset.local"
                        b"\r\n\r\n")
            assert (await client.response()).status == 421
            client.send(b"GET http://web.test.svc.clusterset.local/x HTTP/1.1\r\nHost: evil\r\n"
                        b"\r\n")
            assert ((r := await client.response()).status, r.body) == (200, b"east-1")
            await client.close()
        assert len(web.requests) == 3 and len(api.requests) == 1
        assert web.header(2, b"host") == [b"web.test.svc.clusterset.local"]
        assert web.requests[2][1] == b"/x"
    finally:
        await web.stop()
        await api.stop()


async def test_a_front_door_that_cannot_listen_says_which_address() -> None:
    import socket

    import pytest

    taken = socket.socket()
    taken.bind(("127.0.0.82", 0))
    taken.listen(1)
    listen = taken.getsockname()[:2]
    cs = Clusterset("east")
    proxy = await cs.proxy(http=HttpConfig(listen=listen))
    front = FrontDoor(proxy, "clusterset.local")
    try:
        with pytest.raises(OSError, match=rf"--http-listen 127\.0\.0\.82:{listen[1]}: "
                                          "Address already in use"):
            await front.start()
    finally:
        await front.stop()
        await proxy.stop()
        taken.close()


async def test_a_port_without_app_protocol_http_is_not_proxied_as_http() -> None:
    # Its ClusterSetIP listener relays TCP. The front door used to send HTTP to it: a
    # Redis endpoint answered garbage, every request was a 502 blamed on an endpoint,
    # and after 5 of them any client had ejected half the endpoints the TCP
    # clients of that port share (one upstream set per port) for 30 s.
    backends = [await Backend(f"r{i}", f"127.223.1.{i}", free_port(f"127.223.1.{i}"),
                              "east" if i == 1 else "west").start() for i in (1, 2)]
    cs = Clusterset("east")
    cs.publish("redis", "127.223.0.3", [ServicePort("redis", "TCP", 6379)],
               [endpoint(b.host, b.cluster, b.port, name="redis") for b in backends])
    try:
        async with front_door(cs, "127.223.0.100") as (proxy, listen):
            client = await RawClient.open(*listen)
            for host in ("redis.test.svc.clusterset.local:6379",
                         "redis.test.svc.clusterset.local"):  # its only TCP port
                for _ in range(6):
                    r = await client.get("/", host=host)
                    assert (r.status, r.body) == (404, b"service port is not appProtocol http\n")
            await client.close()
            assert [b.accepted for b in backends] == [0, 0]
            [upstream] = proxy.upstreams.values()
            assert all(h.healthy for h in upstream.hosts.values())
    finally:
        for b in backends:
            await b.stop()
