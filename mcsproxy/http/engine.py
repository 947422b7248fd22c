"""What every HTTP connection of one proxy process shares: pools, the clock tick, bytes.

One `HttpEngine` per `ProxyManager`. Its tick (a named task) refreshes the coarse clock
and the Date header, and checks every client connection's timeouts: header read
(slowloris), keep-alive idle, connect, per try, overall and body idle. The data path
only stores numbers; no timer is armed per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from mcsproxy.config import ProxyConfig
from mcsproxy.http.pool import EndpointPool
from mcsproxy.http.server import ClientConnection
from mcsproxy.http.wire import ErrorResponses, RequestIds, http_date
from mcsproxy.loglimit import LogLimit
from mcsproxy.model import ServicePort
from mcsproxy.tasks import cancel_and_wait, spawn
from mcsproxy.writebatch import WriteBatch

if TYPE_CHECKING:  # the proxy package imports this module: no import back at run time
    from mcsproxy.observability.accesslog import AccessLog
    from mcsproxy.proxy.context import ListenerContext
    from mcsproxy.upstream import Host, UpstreamSet

log = logging.getLogger("mcsproxy.http")

MIN_TICK_S: Final = 0.01
MAX_TICK_S: Final = 0.5
# Client addresses whose header bytes are kept for sharing; past it, they start afresh.
MAX_CLIENT_ADDRESSES: Final = 4096


def serves_http(port: ServicePort) -> bool:
    """Ports proxied as HTTP/1.1 (h2c stays a TCP stream: we do not speak HTTP/2)."""
    return port.protocol == "TCP" and (port.app_protocol or "").lower() == "http"


class HttpSettings:
    """The settings the data path reads per request or per header: those of HttpConfig
    and the proxy's connect and idle timeouts. A compiled class, read with a load each:
    the config's dataclasses stay interpreted (see mcsproxy.compiled), and each read of
    one from compiled code is a generic attribute look-up (bench/http/micro.py: 13 a
    request, ~200 instructions each)."""

    __slots__ = ("cluster_header", "connect_timeout_s", "endpoint_options", "header_timeout_s",
                 "idle_timeout_s", "keepalive_timeout_s", "max_header_bytes", "max_headers",
                 "max_retries", "max_uri_bytes", "per_try_timeout_s", "pool_idle_timeout_s",
                 "pool_max_idle", "request_timeout_s", "retry_budget_percent",
                 "retry_buffer_bytes", "retry_min_concurrency", "via")

    def __init__(self, config: ProxyConfig) -> None:
        http = config.http
        self.connect_timeout_s: float = config.connect_timeout_s
        self.idle_timeout_s: float = config.idle_timeout_s  # 0: none
        self.header_timeout_s: float = http.header_timeout_s
        self.keepalive_timeout_s: float = http.keepalive_timeout_s
        self.per_try_timeout_s: float = http.per_try_timeout_s
        self.request_timeout_s: float = http.request_timeout_s
        self.max_retries: int = http.max_retries
        self.retry_budget_percent: int = http.retry_budget_percent
        self.retry_min_concurrency: int = http.retry_min_concurrency
        self.retry_buffer_bytes: int = http.retry_buffer_bytes
        self.max_header_bytes: int = http.max_header_bytes
        self.max_headers: int = http.max_headers
        self.max_uri_bytes: int = http.max_uri_bytes
        self.pool_max_idle: int = http.pool_max_idle
        self.pool_idle_timeout_s: float = http.pool_idle_timeout_s
        self.cluster_header: str | None = http.cluster_header
        self.via: str = http.via
        # setsockopt arguments of every endpoint connection (keepalive, TCP_USER_TIMEOUT).
        self.endpoint_options: tuple[tuple[int, int, int], ...] = \
            config.endpoint_socket_options()


class HttpRoute:
    """Where one listener (or one front-door service port) sends requests, and its
    retry budget: replays in flight stay below a share of the requests in flight. A
    replay over the budget waits in `waiting` for a replay in flight to end."""

    __slots__ = ("access_log", "active", "ctx", "failure_log", "name", "retries",
                 "retries_refused", "waiting")

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx  # ctx.upstream follows the manager's rebinds
        self.name = ctx.name
        # Fixed for the listener's life, read per request: here a load, on the
        # (interpreted) context a generic look-up.
        self.access_log: AccessLog | None = ctx.access_log
        self.active = 0
        self.retries = 0  # requests holding a slot of the retry budget
        self.retries_refused = 0
        self.waiting: deque[Any] = deque()  # Exchanges waiting for a slot
        self.failure_log = LogLimit()  # the 5xx the gateway answers itself

    def has_budget(self, http: HttpSettings) -> bool:
        """May one more replay take a slot of the retry budget?"""
        return self.retries < max(http.retry_min_concurrency,
                                  self.active * http.retry_budget_percent // 100)


def tick_for(config: ProxyConfig) -> float:
    """A quarter of the shortest timeout, so each fires within 25 % of its value."""
    http = config.http
    shortest = min(http.header_timeout_s, http.keepalive_timeout_s, http.per_try_timeout_s,
                   http.request_timeout_s, config.connect_timeout_s)
    return min(MAX_TICK_S, max(MIN_TICK_S, shortest / 4))


class HttpEngine:
    """Component-like (start/stop), owned by the proxy manager."""

    def __init__(self, config: ProxyConfig, writes: WriteBatch | None = None) -> None:
        self.http = HttpSettings(config)
        # Answers and complete requests are written once the poll's callbacks are done
        # (mcsproxy/writebatch.py), on the loop start() runs in; before it, at once.
        self.writes = writes if writes is not None else WriteBatch()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: set[ClientConnection] = set()
        # The Host value last found valid (wire.host_is_valid): a keep-alive client's
        # requests, and most clients of one service, repeat it. Compared first: a look-up
        # in VALID_HOSTS hashes each new value (~360 instructions a request). It starts
        # as a valid value, never as b"": an empty Host is invalid.
        self.valid_host = b"localhost"
        self.pools: dict[Host, EndpointPool] = {}
        self.tick_s = tick_for(config)
        self.now = time.monotonic()
        self._second = int(time.time())
        self.date = http_date(self._second)
        self.via = f"Via: 1.1 {self.http.via}\r\n".encode()
        self.via10 = f"Via: 1.0 {self.http.via}\r\n".encode()  # of HTTP/1.0 requests
        self._fwd_tail = b"X-Forwarded-Proto: http\r\n" + self.via
        self._clients_by_address: dict[str, tuple[bytes, bytes]] = {}
        self.errors = ErrorResponses(self.via)
        self.ids = RequestIds()
        self._task: asyncio.Task[Any] | None = None
        self.draining = False
        # Requests refused before a service was chosen, which http_requests_total (per
        # service) cannot count: (listener kind, status, reason) -> count. Only refusal
        # paths add to it.
        self.refused: dict[tuple[str, str, str], int] = {}
        # The log lines of refused requests and of 5xx answered with no route (the
        # routes' own: HttpRoute.failure_log).
        self.refusal_log = LogLimit()
        self.failure_log = LogLimit()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = spawn(self._ticker(), name="http tick")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        for client in list(self.clients):
            client.reset_all()
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def drain(self) -> None:
        """Responses from now on carry Connection: close; idle clients close on the next
        tick after DRAIN_IDLE_S (ClientConnection.check)."""
        self.draining = True

    def count_refused(self, kind: str, status: str, reason: str) -> None:
        key = (kind, status, reason)
        self.refused[key] = self.refused.get(key, 0) + 1

    def protocol_factory(self, ctx: ListenerContext) -> partial[ClientConnection]:
        """The Protocol factory of one ClusterSetIP:port listener."""
        return partial(ClientConnection, self, HttpRoute(ctx))

    def pool_for(self, host: Host, upstream: UpstreamSet) -> EndpointPool:
        pool = self.pools.get(host)
        if pool is None:
            pool = self.pools[host] = EndpointPool(self, host, upstream)
        return pool

    def forwarded_headers(self, client_chain: bytes) -> bytes:
        return b"X-Forwarded-For: " + client_chain + b"\r\n" + self._fwd_tail

    def client_headers(self, address: str) -> tuple[bytes, bytes]:
        """A client address as bytes and the X-Forwarded-* fields of its requests: one
        copy shared by every connection from that address, not one per connection."""
        known = self._clients_by_address.get(address)
        if known is None:
            if len(self._clients_by_address) >= MAX_CLIENT_ADDRESSES:
                self._clients_by_address.clear()
            ip = address.encode()
            known = self._clients_by_address[address] = (ip, self.forwarded_headers(ip))
        return known

    # -- the tick ---------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()

    def tick(self) -> None:
        now = self.now = time.monotonic()
        second = int(time.time())
        if second != self._second:
            self._second = second
            self.date = http_date(second)
        tick_s = self.tick_s
        for client in list(self.clients):
            try:
                client.check(now, tick_s)
            except Exception:  # one broken connection must not stop every timeout
                log.exception("http: timeout check failed; closing the connection")
                client.abort_all()
        for host, pool in list(self.pools.items()):
            pool.sweep(now)
            if host.removed and not pool.idle and not pool.tunnels:
                del self.pools[host]

    def state(self) -> dict[str, object]:
        return {
            "clients": len(self.clients),
            "pools": {str(h): len(p.idle) for h, p in self.pools.items()},
        }
