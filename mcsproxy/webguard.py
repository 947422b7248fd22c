"""Limits for the aiohttp listeners (the admin API, the controller's `--serve`): a deadline
for every request head, a cap on open connections and a smaller one per client address
(`WebLimits`).

aiohttp has no connection cap, and bounds a request head only with its keep-alive timer
(3630 s by default; before 3.10 not even armed until the first request ended), counted
from the previous response and not reset by bytes of the next head: a kept-alive
connection's next head sent a byte at a time was held the whole keep-alive timeout (15 s
here), longer than the head timeout. Rather than patching aiohttp, each accepted
connection meets a small protocol first: it refuses the connection outright when a cap is
reached (aiohttp never sees it), and otherwise hands every byte to aiohttp's own protocol,
watching only for where a head starts and ends. The first head has `head_timeout_s` from
accept; a later one from its first byte that arrives while aiohttp waits for the next
request. Bytes that arrive while a request is in progress (its body, a response streamed
for ever, pipelined requests) arm nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit

from aiohttp import web

from mcsproxy.clientcounts import ClientCounts, client_share
from mcsproxy.config import WebLimits, listen_error
from mcsproxy.loglimit import LogLimit
from mcsproxy.tokenfile import TokenFile

log = logging.getLogger("mcsproxy.webguard")

# answer_timeout: an answer not read within its deadline (the admin's /metrics).
CLOSE_REASONS = ("connection_limit", "client_limit", "head_timeout", "answer_timeout")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request a page of this very origin (or the user) made.
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})
# Headers only browsers send: the request came from a page (or the user's address bar).
BROWSER_MARKERS = ("Sec-Fetch-Site", "Sec-Fetch-Mode", "Origin")
LOG_INTERVAL_S = 1.0
REFUSAL_LOG = LogLimit()  # the cross-site refusals of every listener in the process
# Sent with every answer of these listeners, errors too. Their pages hold buttons that act
# (the demo's kill/restore) and show the whole configuration: another site's page must not
# frame them (clickjacking: the buttons' requests are same-origin, so refuse_cross_site
# lets them pass), nor may a browser read an answer as a type other than the one sent.
BROWSER_HARDENING = {
    "X-Frame-Options": "DENY",  # browsers older than CSP's frame-ancestors
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ConnectionGuard:
    """One listener's open connections and what its limits closed, by reason."""

    __slots__ = ("_last_log", "active", "by_client", "closed", "limits", "name", "on_close",
                 "per_client")

    def __init__(self, name: str, limits: WebLimits,
                 on_close: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.limits = limits
        self.per_client = (client_share(limits.max_connections)
                           if limits.max_connections_per_client is None
                           else limits.max_connections_per_client)
        self.active = 0
        self.by_client = ClientCounts()
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.on_close = on_close  # e.g. a prometheus_client counter's inc, per reason
        self._last_log = -LOG_INTERVAL_S

    def admit(self, client: str) -> bool:
        if self.active >= self.limits.max_connections:
            self.count("connection_limit", f"{self.active} connections open")
            return False
        if not self.by_client.take(client, self.per_client):
            self.count("client_limit", f"client {client} holds {self.per_client} connections")
            return False
        self.active += 1
        return True

    def leave(self, client: str) -> None:
        self.active -= 1
        self.by_client.give(client)

    def count(self, reason: str, why: str) -> None:
        """A connection closed by a limit: counted always, logged at most once a second
        (a flood of them must not become a flood of log lines)."""
        self.closed[reason] += 1
        if self.on_close is not None:
            self.on_close(reason)
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            log.warning("%s: connection closed by a limit (%s); %d so far", self.name, why,
                        sum(self.closed.values()))


class GuardedConnection(asyncio.Protocol):
    """Stands between the transport and aiohttp's RequestHandler for one connection."""

    __slots__ = ("_client", "_guard", "_head_timer", "_http", "_make_http", "_tail")

    def __init__(self, guard: ConnectionGuard,
                 make_http: Callable[[], web.RequestHandler]) -> None:
        self._guard = guard
        self._make_http = make_http
        self._http: web.RequestHandler | None = None  # None: refused (or already lost)
        self._client = ""
        self._head_timer: asyncio.TimerHandle | None = None
        # The last two bytes of the head being timed: its blank line may straddle reads.
        # Empty until a byte other than CR/LF arrived, and again once the head ended.
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if peer else ""
        if not self._guard.admit(self._client):
            # Reset rather than FIN: nothing was read, and nothing waits to be sent.
            cast(asyncio.Transport, transport).abort()
            return
        self._head_timer = asyncio.get_running_loop().call_later(
            self._guard.limits.head_timeout_s, self._head_expired)
        self._http = self._make_http()
        self._http.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        http = self._http
        if http is None:
            return
        if self._head_timer is not None:
            if self._head_ended(data):
                self._head_timer.cancel()
                self._head_timer = None
        elif _awaits_request(http) and not self._head_ended(data):
            # The first bytes of the next request on a kept-alive connection, not all of
            # its head. (A request's own body cannot get here: aiohttp waits for the next
            # request only once the previous one is answered and its body read.)
            self._head_timer = asyncio.get_running_loop().call_later(
                self._guard.limits.head_timeout_s, self._head_expired)
        http.data_received(data)

    def _head_ended(self, data: bytes) -> bool:
        if not self._tail:
            # Empty lines before the request line are allowed (RFC 9112 §2.2): they do
            # not end a head, or a client could disarm the timer with one CRLF.
            data = data.lstrip(b"\r\n")
            if not data:
                return False
        seen = self._tail + data
        # CRLF CRLF, or bare LFs, which aiohttp's parsers accept as well.
        if b"\n\r\n" in seen or b"\n\n" in seen:
            self._tail = b""  # the next head may again start with empty lines
            return True
        self._tail = seen[-2:]
        return False

    def _head_expired(self) -> None:
        self._head_timer = None
        self._guard.count("head_timeout", f"client {self._client} sent no complete request "
                                          f"head in {self._guard.limits.head_timeout_s:g} s")
        if self._http is not None:
            self._http.force_close()  # the transport reports connection_lost in turn

    def eof_received(self) -> bool | None:
        return self._http.eof_received() if self._http is not None else None

    def pause_writing(self) -> None:
        if self._http is not None:
            self._http.pause_writing()

    def resume_writing(self) -> None:
        if self._http is not None:
            self._http.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        http, self._http = self._http, None
        if http is None:
            return  # refused at accept: never counted in
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._guard.leave(self._client)
        http.connection_lost(exc)


def _awaits_request(http: web.RequestHandler) -> bool:
    """True while aiohttp waits for the next request on `http`'s connection: none in
    progress or queued, the previous one answered and its body read. aiohttp's own test
    for an idle connection (RequestHandler._process_keepalive); were the attribute gone
    in some later aiohttp, later heads would be left to its keep-alive timer, as before
    (tests/test_admin_limits.py would notice)."""
    waiter = getattr(http, "_waiter", None)
    return waiter is not None and not waiter.done()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with every accepted connection passing `guard` first."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 guard: ConnectionGuard) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def bound(self) -> tuple[str, int]:
        sockets = getattr(self._server, "sockets", None) or []
        return sockets[0].getsockname()[:2] if sockets else (self._host, self._port)

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: GuardedConnection(guard, server), self._host, self._port,
            backlog=self._backlog, reuse_address=True)


async def serve(app: web.Application, listen: tuple[str, int], guard: ConnectionGuard,
                flag: str, **runner_options: float) -> tuple[web.AppRunner, tuple[str, int]]:
    """Start `app` on `listen` behind `guard`, idle keep-alive connections closed after
    the guard's keep-alive timeout. Returns the runner (its cleanup() stops it all) and
    the bound address. A bind failure is an OSError naming `flag` and the address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=guard.limits.keepalive_timeout_s,
                           **runner_options)
    await runner.setup()
    site = GuardedSite(runner, *listen, guard)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        host, port = listen
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise listen_error(exc, flag, where) from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site.bound


def refuse_without_token(token: TokenFile, request: web.Request, flag: str) -> None:
    """401 naming `flag` unless the request carries `token` as its bearer token."""
    if not token.admits(request.headers.get("Authorization")):
        raise web.HTTPUnauthorized(text=f"a bearer token is required ({flag})\n",
                                   headers={"WWW-Authenticate": "Bearer"})


def harden_for_browsers(app: web.Application) -> web.Application:
    """`app` with BROWSER_HARDENING on every response it sends: a signal, not a
    middleware, so that aiohttp's own answers (404, 405, a raised HTTPException) and
    streamed responses carry the headers as well."""
    app.on_response_prepare.append(_add_browser_hardening)
    return app


async def _add_browser_hardening(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(BROWSER_HARDENING)


def cross_site_refusal(request: web.Request) -> str | None:
    """Why a state-changing request may come from another site's page, or None.

    A page on any site can make the browser POST to a loopback address (a form, or
    fetch() in no-cors mode, which needs no preflight): it cannot read the answer, but the
    action is done. Browsers name the page's origin in `Origin` (and newer ones say
    `Sec-Fetch-Site`), so a request from another origin is refused. A page of a domain
    rebound to 127.0.0.1 is same-origin to itself, so the Host must also be an IP address
    or localhost. Clients that are not browsers (the CLI, the admin's relay) send neither
    header and pass."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in SAME_SITE_FETCHES:
        return f"Sec-Fetch-Site: {fetch_site}"
    host = request.headers.get("Host", "")
    if not _is_address_host(host):
        return f"Host {host!r} is not an IP address or localhost"
    origin = request.headers.get("Origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower()
                               != host.lower()):
        return f"Origin {origin} is not http://{host}"
    return None


def rebinding_refusal(request: web.Request) -> str | None:
    """Why a read a browser sent may come from another site's page, or None.

    A domain rebound to 127.0.0.1 is same-origin to its own page, which can then read
    every answer here (the configuration, the status of every service): the browser sends
    the page's Host, a name. Only requests a browser marks as its own (Fetch Metadata or
    Origin) are held to an IP address or localhost as Host: Prometheus, probes, the CLI
    and gateways reach these listeners by any name."""
    if not any(name in request.headers for name in BROWSER_MARKERS):
        return None
    host = request.headers.get("Host", "")
    if _is_address_host(host):
        return None
    return f"Host {host!r} is not an IP address or localhost"


def _is_address_host(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@web.middleware
async def refuse_cross_site(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Middleware: a state-changing request another site's page may have sent, or a read
    a rebound domain's page may have sent, gets 403. Only for routes that take the method:
    a 404 or 405 stays what it is."""
    if request.match_info.http_exception is None and (
            why := cross_site_refusal(request) if request.method not in SAFE_METHODS
            else rebinding_refusal(request)):
        # A page can send these in a loop: one line a second, with the count held back.
        held = REFUSAL_LOG.take(time.monotonic())
        if held >= 0:
            log.warning("refused %s %s from %s: cross-site (%s)%s", request.method,
                        request.path, request.remote, why,
                        f" ({held} more refused since the last line)" if held else "")
        raise web.HTTPForbidden(text=f"cross-site request refused: {why}\n")
    return await handler(request)
