"""The --http-listen front door: routes by Host to imported services, and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from mcsproxy.config import HttpConfig
from mcsproxy.http.frontdoor import FrontDoor
from mcsproxy.model import ServicePort
from mcsproxy.proxy import ProxyManager
from tests.http_support import HTTP_PORT, RawClient, start_backends
from tests.proxy_fixtures import Backend, Clusterset, endpoint, free_port, until


@contextlib.asynccontextmanager
async def front_door(cs: Clusterset, ip: str, **config: Any,
                     ) -> AsyncIterator[tuple[ProxyManager, tuple[str, int]]]:
    """The gateway of `cs` with its front door on ip (a free port): (proxy, listen)."""
    listen = (ip, free_port(ip))
    proxy = await cs.proxy(http=HttpConfig(listen=listen), **config)
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
                # Not a name (an empty label): they were routed as web.test.
                ("web.test.svc.clusterset.local..", 421, b"not a clusterset service name\n"),
                ("web.test.svc.clusterset.local...:80", 421, b"not a clusterset service name\n"),
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
            # An Upgrade answered by us (no endpoint took it) leaves the connection HTTP:
            # the request after it is parsed and answered.
            client.send(b"GET / HTTP/1.1\r\nHost: nope.test.svc.clusterset.local\r\n"
                        b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                        b"GET /y HTTP/1.1\r\nHost: web.test.svc.clusterset.local\r\n\r\n")
            assert [(await client.response()).status for _ in range(2)] == [404, 200]
            await client.close()
        assert len(web.requests) == 4 and len(api.requests) == 1
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


# RFC 9112 3.2: a request whose Host is not uri-host [":" port] gets 400. They used to be
# forwarded unchanged by the ClusterSetIP listeners (the front door answered 421 or 404).
INVALID_HOSTS = [b"a b", b"x/y", b"a:b:c", b"exa mple.com:80", b"u@h", b"", b"h:80x",
                 b"[::1", b"::1", b"[::1]x", b"[zz::1]", b"[fe80::1%eth0]", b"a\\b", b"h#f",
                 b"h?q", b"\x80", b"u@web.test.svc.clusterset.local",
                 b"web.test.svc.clusterset.local:80:80", b"web.test.svc.clusterset.local :80",
                 # no TCP port is above 65535 (these were forwarded as they came)
                 b"h:65536", b"h:99999999999", b"[::1]:70000", b"h:" + b"9" * 5000,
                 b"web.test.svc.clusterset.local:99999999999"]
# (Host, the front door's answer): ours are proxied, any other valid one is not ours.
VALID_HOSTS = [(b"web.test.svc.clusterset.local", 200), (b"web.test.svc.clusterset.local:80", 200),
               (b"WEB.test.svc.clusterset.local.", 200), (b"svc.ns.svc.clusterset.local:8080", 404),
               (b"10.0.0.1:80", 421), (b"[::1]:80", 421), (b"[::ffff:10.0.0.1]", 421),
               (b"EXAMPLE.com.", 421), (b"xn--bcher-kva.example", 421), (b"a%2Db.example", 421),
               (b"h:", 421), (b"h:65535", 421),
               # any number of leading zeros: int() of over 4,300 digits raises
               (b"web.test.svc.clusterset.local:" + b"0" * 5000 + b"80", 200)]


async def test_an_invalid_host_gets_400_from_listener_and_front_door() -> None:
    [web] = await start_backends({"east": 1}, 147)
    cs = Clusterset("east")
    cs.publish("web", "127.240.147.1", [HTTP_PORT], [endpoint(web.host, "east", web.port)])
    try:
        async with front_door(cs, "127.0.0.147") as (_, listen):
            for where in (("127.240.147.1", 80), listen):
                before = len(web.requests)
                for host in INVALID_HOSTS:
                    client = await RawClient.open(*where)
                    client.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                    r = await client.response()
                    assert (r.status, r.body) == (400, b"invalid Host header\n"), (where, host)
                    # Like every other 400 of a request head: the connection closes.
                    assert r.headers.get(b"connection") == b"close", host
                    assert await client.closed(), host
                    await client.close()
                assert len(web.requests) == before, where  # none of them reached it
                for host, status in VALID_HOSTS:
                    client = await RawClient.open(*where)
                    client.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                    r = await client.response()
                    assert r.status == (200 if where != listen else status), (where, host)
                    if r.status == 200:
                        assert web.header(-1, b"host") == [host], host  # unchanged
                    await client.close()
            # An absolute-form target's authority is held to the same rule.
            client = await RawClient.open(*listen)
            client.send(b"GET http://web.test.svc.clusterset.local:x/ HTTP/1.1\r\n"
                        b"Host: web.test.svc.clusterset.local\r\n\r\n")
            r = await client.response()
            assert (r.status, r.body) == (400, b"invalid authority in the request target\n")
            await client.close()
    finally:
        await web.stop()


async def test_the_front_door_is_held_to_the_connection_limits() -> None:
    # --max-connections-per-client and -per-listener applied to the ClusterSetIP
    # listeners only: the front door, the one listener outside clients reach, took any
    # number (10 of 10 from one client with a limit of 2).
    [web] = await start_backends({"east": 1}, 76)
    cs = Clusterset("east")
    cs.publish("web", "127.76.240.6", [HTTP_PORT], [endpoint(web.host, "east", web.port)])
    host = "web.test.svc.clusterset.local"
    try:
        async with front_door(cs, "127.76.0.6", max_connections_per_client=2,
                              max_connections_per_listener=3) as (proxy, listen):
            held = [await RawClient.open(*listen, source=src)
                    for src in ("127.0.0.1", "127.0.0.1", "127.0.0.2")]
            for client in held:
                assert (await client.get("/", host=host)).status == 200
            for src in ("127.0.0.1", "127.0.0.3"):  # over the client's, the listener's limit
                refused = await RawClient.open(*listen, source=src)
                assert await refused.closed(), src
                await refused.close()
            assert (proxy.refusals["client_limit"], proxy.refusals["listener_limit"]) == (1, 1)
            await held.pop(0).close()
            await until(lambda: proxy.http.clients and len(proxy.http.clients) == 2,
                        "the closed connection gone")
            again = await RawClient.open(*listen)  # room again
            assert (await again.get("/", host=host)).status == 200
            for client in [*held, again]:
                await client.close()
    finally:
        await web.stop()


async def test_front_door_clients_inherit_keepalive_from_its_socket() -> None:
    # A client gone silent (its node dead, a cut link) held its connection, and the
    # endpoint connection of a request or tunnel under way, for the idle timeout.
    cs = Clusterset("east")
    async with front_door(cs, "127.71.11.1", tcp_keepalive=(7, 3, 2)) as (proxy, listen):
        _, writer = await asyncio.open_connection(*listen)
        try:
            await until(lambda: len(proxy.http.clients) == 1, "the client accepted")
            [client] = proxy.http.clients
            sock = client.transport.get_extra_info("socket")
            tcp = socket.IPPROTO_TCP
            assert (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
                    sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
                    sock.getsockopt(tcp, socket.TCP_KEEPCNT)) == (1, 7, 3, 2)
        finally:
            writer.close()
