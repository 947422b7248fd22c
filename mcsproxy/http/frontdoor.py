"""`--http-listen HOST:PORT`: one HTTP listener routing by Host to imported services.

`Host: <svc>.<ns>.svc.<domain>[:port]` selects the service port with that number (without
a port: port 80, or the service's only TCP port), if it has `appProtocol: http`. The
endpoint sets, their health and ejection are the proxy manager's own, shared with the
ClusterSetIP listeners. Anything else is refused: a Host outside the clusterset domain
gets 421, an unknown service or port, or one without `appProtocol: http` (a TCP relay),
404. An absolute-form request target routes by its authority instead of Host, with the
same rules, so the front door never proxies to an address a client names: it is not an
open proxy.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial

from mcsproxy.http.engine import HttpRoute, serves_http
from mcsproxy.http.server import ClientConnection
from mcsproxy.http.wire import NOT_CLUSTERSET, NOT_HTTP, NOT_SERVED, UNKNOWN_SERVICE
from mcsproxy.model import ImportedService, ServiceKey, ServicePort
from mcsproxy.proxy.context import ListenerContext
from mcsproxy.proxy.manager import LISTEN_BACKLOG, ProxyManager, UpstreamKey
from mcsproxy.upstream import UpstreamSet

log = logging.getLogger("mcsproxy.http.frontdoor")

# An error is (status, text, reason label of mcsproxy_http_refused_total).
Resolved = tuple[HttpRoute | None, tuple[int, str, str] | None]
MAX_CACHED_HOSTS = 4096


def default_port(service: ImportedService) -> ServicePort | None:
    tcp = [p for p in service.ports if p.protocol == "TCP"]
    for port in tcp:
        if port.port == 80:
            return port
    return tcp[0] if len(tcp) == 1 else None


class FrontDoor:
    """Component: the listener, and the Host → route table rebuilt per applied snapshot."""

    def __init__(self, proxy: ProxyManager, domain: str) -> None:
        self.proxy = proxy
        self.config = proxy.config
        listen = self.config.http.listen
        assert listen is not None
        self.listen = listen
        self.suffix = b".svc." + domain.strip(".").lower().encode()
        self.routes: dict[UpstreamKey, HttpRoute] = {}
        self.cache: dict[bytes, Resolved] = {}
        self.version = -1
        self.server: asyncio.Server | None = None
        self.bound: tuple[str, int] | None = None  # the address bound (port 0: which one)
        # Its connections' admission (--max-connections-per-listener / -per-client): the
        # front door is one listener, as a ClusterSetIP:port is; it used to take any
        # number of connections, from one client too. Its upstream set stays empty (each
        # request's route has its own): the compiled context holds a set, never None.
        name = f"front door {listen[0]}:{listen[1]}"
        self.ctx = ListenerContext(name, UpstreamSet(name, proxy.store.cluster_id, self.config),
                                   self.config, set(), refusals=proxy.refusals)

    async def start(self) -> None:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named for asyncio's loop, as in the proxy's listeners (manager._bind).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Keepalive for every client, inherited at accept (see ProxyManager._bind).
            for level, option, value in self.config.keepalive_options():
                sock.setsockopt(level, option, value)
            if self.config.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            # The bare errno text ("Permission denied") would not say which listener.
            raise OSError(exc.errno, f"--http-listen {host}:{port}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            partial(ClientConnection, self.proxy.http, None, self), sock=sock,
            backlog=LISTEN_BACKLOG)
        self.bound = (host, sock.getsockname()[1])
        # The port bound, as the DNS and admin listeners say theirs: with port 0 the log
        # said ":0", leaving the front door's real port unknown.
        log.info("HTTP front door on %s:%d", host, self.bound[1])

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; the proxy manager's drain waits for the connections (its engine
        holds them)."""
        if self.server is not None:
            self.server.close()
        return 0

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                async with asyncio.timeout(1.0):
                    await self.server.wait_closed()
            except TimeoutError:
                log.warning("front door listener did not close within 1 s")
            self.server = None

    def resolve(self, host: bytes) -> Resolved:
        if self.proxy.applied_version != self.version:
            self.version = self.proxy.applied_version
            self.cache.clear()
            for ukey in [k for k in self.routes if k not in self.proxy.upstreams]:
                del self.routes[ukey]
        found = self.cache.get(host)
        if found is None:
            found = self._lookup(host)
            if len(self.cache) < MAX_CACHED_HOSTS:
                self.cache[host] = found
        return found

    def _lookup(self, raw: bytes) -> Resolved:
        # Service names hold no colon; an IPv6 literal fails the suffix test below.
        name, _, port_text = raw.strip().lower().partition(b":")
        # One trailing dot (a fully qualified name); `local..` has an empty label, no name.
        if name.endswith(b"."):
            name = name[:-1]
        if not name.endswith(self.suffix):
            return None, (421, "not a clusterset service name", NOT_CLUSTERSET)
        labels = name[: -len(self.suffix)].split(b".")
        if len(labels) != 2:
            return None, (404, "no such service", UNKNOWN_SERVICE)
        service = self.proxy.store.current.services.get(
            ServiceKey(labels[1].decode("ascii", "replace"), labels[0].decode("ascii", "replace")))
        if service is None or service.headless:
            return None, (404, "no such service", UNKNOWN_SERVICE)
        if port_text:  # digits only: the request head's Host check (ClientConnection)
            # ... and at most 65535 once its leading zeros are gone (any number of them
            # is valid, and int() raises past 4,300 digits).
            number = int(port_text.lstrip(b"0") or b"0")
            port = next((p for p in service.ports
                         if p.port == number and p.protocol == "TCP"), None)
        else:
            port = default_port(service)
        if port is None:
            return None, (404, "no such service port", UNKNOWN_SERVICE)
        if not serves_http(port):
            # Its ClusterSetIP listener relays TCP, and it shares its endpoints' health
            # with us: HTTP sent to a port that may not speak it would be a 502 blamed on
            # healthy endpoints, and any client could get them ejected.
            return None, (404, "service port is not appProtocol http", NOT_HTTP)
        ukey = UpstreamKey(service.key, port.name, "TCP")
        upstream = self.proxy.upstreams.get(ukey)
        if upstream is None:
            return None, (503, "service not served yet", NOT_SERVED)
        route = self.routes.get(ukey)
        if route is None:
            ctx = ListenerContext(f"front door {ukey}", upstream, self.config, set(),
                                  self.proxy.access_log, self.proxy.refusals, self.proxy.writes)
            route = self.routes[ukey] = HttpRoute(ctx)
        else:
            route.ctx.upstream = upstream
        return route, None
