"""The proxy component: listeners on every ClusterSetIP x port, following the snapshots.

Subscribed to the store, it keeps one `UpstreamSet` per (service, port) and one listener
per (ClusterSetIP, port, protocol). A new snapshot updates only the upstream sets of the
services it changed, opens listeners that appeared and closes those that went away;
unchanged listeners keep their sockets, and established connections of a closed listener
carry on (closing a listening socket does not touch accepted ones). A ClusterSetIP:port
taken over by another service is rebound in place. A listener that cannot bind (the
address held by another process for now) is tried again with backoff, also when no new
snapshot comes.

SCTP ports are logged once as unsupported; appProtocol http ports are served by the
HTTP/1.1 proxy (mcsproxy.http) and health-checked with HTTP GET. Every other TCP port,
h2c included (we do not speak HTTP/2), is a stream checked by TCP connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple

from mcsproxy.backoff import Backoff
from mcsproxy.config import ProxyConfig
from mcsproxy.http import HttpEngine, serves_http
from mcsproxy.model import ImportedService, ServiceKey, ServicePort, Snapshot
from mcsproxy.observability.accesslog import AccessLog
from mcsproxy.observability.events import EventRing
from mcsproxy.proxy.context import ListenerContext, Tracked, new_refusals
from mcsproxy.proxy.poller import Poller
from mcsproxy.proxy.tcp import LISTEN_BACKLOG, StreamListener, TcpConnection
from mcsproxy.proxy.udp import LISTENER_RCVBUF_BYTES, UdpDrops, UdpListener
from mcsproxy.proxy.workers import steer_by_client_ip
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from mcsproxy.upstream import HealthChecker, UpstreamSet, eligible_targets
from mcsproxy.writebatch import WriteBatch

log = logging.getLogger("mcsproxy.proxy")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
# The idle sweep runs this many times per idle timeout; a connection is closed after
# between 1 and 1 + 1/IDLE_SWEEPS idle timeouts without a byte.
IDLE_SWEEPS = 4

# While draining, how often the count of open connections is looked at again.
DRAIN_POLL_S = 0.05
# A listener that could not bind (its address taken for now) is tried again after this
# backoff, also when no new snapshot comes; its error is logged once, not per retry.
LISTEN_RETRY_INITIAL_S = 0.5
LISTEN_RETRY_MAX_S = 30.0



def sweep_ticks(timeout_s: float, period_s: float) -> int:
    """Idle sweeps a connection may sit through before it expires (0: never): at least its
    timeout's worth. Rounded to the nearest, a 100 s UDP timeout swept every 7.5 s (a 30 s
    TCP one) closed flows idle 97.5 s."""
    return math.ceil(timeout_s / period_s - 1e-9) if timeout_s > 0 else 0

class ListenerKey(NamedTuple):
    ip: str
    port: int
    protocol: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


class UpstreamKey(NamedTuple):
    service: ServiceKey
    port_name: str
    protocol: str

    def __str__(self) -> str:
        return f"{self.service}:{self.port_name or '-'}/{self.protocol}"


class Listener:
    __slots__ = ("ctx", "key", "steered", "stream", "transport", "upstream_key")

    def __init__(self, key: ListenerKey, upstream_key: UpstreamKey, ctx: ListenerContext) -> None:
        self.key = key
        self.upstream_key = upstream_key
        self.ctx = ctx
        self.stream: StreamListener | None = None  # TCP ports
        self.transport: asyncio.DatagramTransport | None = None  # UDP ports
        self.steered = False  # workers chosen by client address (see workers.py)

    def socket(self) -> Any:
        """The listening socket."""
        if self.stream is not None:
            return self.stream.sock
        assert self.transport is not None
        return self.transport.get_extra_info("socket")

    def close(self) -> None:
        self.ctx.closed = True
        if self.stream is not None:
            self.stream.close()
        if self.transport is not None:
            self.transport.close()


def wanted_listeners(
    services: Iterator[ImportedService],
) -> Iterator[tuple[ListenerKey, UpstreamKey, ImportedService, ServicePort]]:
    """Every (ClusterSetIP, port, protocol) the snapshot asks for, SCTP included."""
    for service in services:
        if service.headless:
            continue
        for port in service.ports:
            ukey = UpstreamKey(service.key, port.name, port.protocol)
            for ip in service.ips:
                yield ListenerKey(ip, port.port, port.protocol), ukey, service, port


Claim = tuple[ListenerKey, UpstreamKey, ServicePort]


def settle_claims(claims: Iterable[Claim]) -> dict[ListenerKey, tuple[UpstreamKey, ServicePort]]:
    """Each listener's service port; of two claiming one ClusterSetIP:port (a
    misconfiguration, logged), the smaller key. It was the first met, in the snapshot's
    hash order, which Python salts per process: with --workers 2 the processes disagreed
    (17 connections to one service and 23 to the other through one address) and a
    restart could change the winner."""
    wanted: dict[ListenerKey, tuple[UpstreamKey, ServicePort]] = {}
    for lkey, ukey, port in claims:
        claimed = wanted.get(lkey)
        if claimed is None:
            wanted[lkey] = (ukey, port)
            continue
        keep, other = sorted((claimed[0], ukey))
        log.warning("listener %s claimed by %s and %s; keeping %s", lkey, keep, other, keep)
        if keep == ukey:
            wanted[lkey] = (ukey, port)
    return wanted


def listener_shape(service: ImportedService | None) -> object:
    """What of a service decides its listeners (None: not imported)."""
    if service is None:
        return None
    # Affinity too: with --workers it decides how the kernel spreads a listener's packets.
    return (service.headless, tuple(service.ips), tuple(service.ports),
            service.session_affinity)


class ProxyManager:
    """Component (start/stop) that serves the store's snapshots on ClusterSetIPs."""

    def __init__(self, config: ProxyConfig, store: SnapshotStore) -> None:
        self.config = config
        self.store = store
        self.listeners: dict[ListenerKey, Listener] = {}
        self.upstreams: dict[UpstreamKey, UpstreamSet] = {}
        # Per service, so dropping a service's stale ports does not scan every upstream;
        # with each one's port number, which tells a renamed port (see _keep_renamed).
        self._upstream_keys: dict[ServiceKey, dict[UpstreamKey, int]] = {}
        self.conns: set[Tracked] = set()
        self.refusals = new_refusals()  # every listener's, by reason
        self.udp_drops = UdpDrops()  # every UDP listener's dropped datagrams, by reason
        self.writes = WriteBatch()  # short writes of every listener, made once per poll
        self.http = HttpEngine(config, self.writes)
        self.poller: Poller | None = None  # the TCP proxy's sockets; made by start()
        self._pending: set[ServiceKey] | None = None  # None: apply everything
        self._latest: Snapshot = store.current
        self._wake = asyncio.Event()
        self._applied = asyncio.Event()
        self._sctp_logged: set[UpstreamKey] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self.applied_version = -1
        # The listener set depends only on each service's IPs and ports: a change that
        # leaves those alone (an endpoint change) skips the walk over every service.
        self._applied_services: Mapping[ServiceKey, ImportedService] | None = None
        self._listeners_complete = False  # every wanted listener open at the last walk
        # Wanted listeners that could not bind at their last try: service port, error.
        self._bind_errors: dict[ListenerKey, tuple[UpstreamKey, str]] = {}
        self.listener_walks = 0
        self.draining = False  # set by drain(): no listener opens any more
        self.access_log: AccessLog | None = None  # set by the gateway before start()
        self.events: EventRing | None = None

    # -- component --------------------------------------------------------------------
    async def start(self) -> None:
        self.poller = Poller(asyncio.get_running_loop())
        self.store.subscribe(self._on_snapshot)
        await self.http.start()
        await self._apply()
        self._tasks.append(spawn(self._apply_loop(), name="proxy listeners"))
        if self.config.idle_timeout_s or self.config.udp_idle_timeout_s:
            self._tasks.append(spawn(self._idle_sweep(), name="proxy idle sweep"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for listener in self.listeners.values():
            listener.close()
        for conn in list(self.conns):
            conn.abort()
        if self.poller is not None:
            self.poller.close()
        await self.http.stop()
        # Together: one after the other, each set with a probe in flight waited a turn
        # of the loop for its cancellation while the others went on probing (6,000
        # blackholed services: 2 s of a SIGTERM).
        await asyncio.gather(*(upstream.stop() for upstream in self.upstreams.values()))
        streams = [lst.stream for lst in self.listeners.values() if lst.stream is not None]
        self.listeners.clear()
        self.upstreams.clear()
        self._upstream_keys.clear()
        for stream in streams:
            try:
                async with asyncio.timeout(1.0):
                    await stream.wait_closed()
            except TimeoutError:
                log.warning("listener did not close within 1 s")

    async def drain(self, timeout_s: float) -> int:
        """Graceful stop, first half: stream listeners close (UDP keeps answering its
        flows), HTTP responses say Connection: close and idle keep-alive connections
        close; then wait until every TCP connection and HTTP client has ended, at most
        `timeout_s`. Returns how many were still open (stop() aborts them)."""
        self.draining = True
        for listener in self.listeners.values():
            if listener.stream is not None:
                listener.stream.close()
        self.http.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Polled: connections end in Protocol callbacks, which have no one to notify.
        while self.open_streams() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = self.open_streams()
        if left:
            log.warning("drain: %d connections still open after %.1f s; closing them",
                        left, timeout_s)
        return left

    def open_streams(self) -> int:
        tcp = sum(1 for c in self.conns if isinstance(c, TcpConnection))
        return tcp + len(self.http.clients)

    async def wait_applied(self, version: int) -> None:
        """Until a snapshot of at least `version` is being served (for tests and admin)."""
        while self.applied_version < version:
            self._applied.clear()
            await self._applied.wait()

    # -- snapshots --------------------------------------------------------------------
    def _on_snapshot(self, snapshot: Snapshot) -> None:
        self._latest = snapshot
        if self._pending is not None:
            self._pending |= snapshot.changed
        self._wake.set()

    async def _apply_loop(self) -> None:
        retry = Backoff(LISTEN_RETRY_INITIAL_S, LISTEN_RETRY_MAX_S)
        while True:
            if self._listeners_complete or self.draining:
                retry.reset()
                await self._wake.wait()
            else:
                # Some listener could not bind: walk again when the backoff says, not
                # only when a snapshot happens to come (a static one never does).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retry.next()):
                        await self._wake.wait()
            self._wake.clear()
            await self._apply()

    def _servable(self, claims: Iterable[tuple[ListenerKey, UpstreamKey, ImportedService,
                                                ServicePort]]) -> Iterator[Claim]:
        for lkey, ukey, _service, port in claims:
            if port.protocol == "SCTP":
                if ukey not in self._sctp_logged:
                    self._sctp_logged.add(ukey)
                    log.warning("service port %s: SCTP is not supported, not served", ukey)
                continue
            yield lkey, ukey, port

    async def _apply(self) -> None:
        snapshot = self._latest
        changed, self._pending = self._pending, set()
        self._update_upstreams(snapshot, changed)
        previous, self._applied_services = self._applied_services, snapshot.services
        if changed is not None and previous is not None and self._listeners_complete and all(
                listener_shape(previous.get(k)) == listener_shape(snapshot.services.get(k))
                for k in changed):
            self.applied_version = snapshot.version
            self._applied.set()
            return
        self.listener_walks += 1
        wanted = settle_claims(self._servable(wanted_listeners(iter(snapshot.services.values()))))
        for lkey in [k for k in self.listeners if k not in wanted]:
            log.info("listener %s closed", lkey)
            self.listeners.pop(lkey).close()
        for lkey in [k for k in self._bind_errors if k not in wanted]:
            del self._bind_errors[lkey]
        for lkey, (ukey, port) in wanted.items():
            upstream = self.upstreams[ukey]
            listener = self.listeners.get(lkey)
            if listener is None:
                if self.draining:
                    continue
                await self._open(lkey, ukey, upstream, serves_http(port))
                continue
            if listener.upstream_key != ukey:
                log.info("listener %s moves from %s to %s", lkey, listener.upstream_key, ukey)
                listener.upstream_key = ukey
                listener.ctx.upstream = upstream
            self._steer(listener, upstream)
            http = serves_http(port)
            if listener.stream is not None and listener.stream.http != http:
                log.info("listener %s now proxies %s", lkey, "HTTP" if http else "TCP streams")
                await listener.stream.set_http(http)
        self._listeners_complete = all(lkey in self.listeners for lkey in wanted)
        self.applied_version = snapshot.version
        self._applied.set()

    def _update_upstreams(self, snapshot: Snapshot, changed: set[ServiceKey] | None) -> None:
        keys = set(snapshot.services) | {k.service for k in self.upstreams} \
            if changed is None else changed
        for skey in keys:
            service = snapshot.services.get(skey)
            live: dict[UpstreamKey, int] = {}
            if service is not None and not service.headless:
                for port in service.ports:
                    if port.protocol != "SCTP":
                        live[UpstreamKey(skey, port.name, port.protocol)] = port.port
            had = self._upstream_keys.pop(skey, {})
            self._keep_renamed(had, live)
            if live:
                assert service is not None
                self._upstream_keys[skey] = live
                for port in service.ports:
                    ukey = UpstreamKey(skey, port.name, port.protocol)
                    if ukey in live:
                        self._update_upstream(ukey, service, port)
            for ukey in had.keys() - live.keys():
                upstream = self.upstreams.pop(ukey)
                upstream.close()
                spawn(upstream.stop(), name=f"stop upstream {ukey}")

    def _keep_renamed(self, had: dict[UpstreamKey, int], live: dict[UpstreamKey, int]) -> None:
        """A service port renamed, its number and protocol unchanged, keeps its upstream
        set under the new name: its listener stays, and closing the old set retired every
        endpoint, so --drain-grace cut the port's established connections (and UDP flows
        at once) though nothing they use changed. The endpoints, matched by the new name,
        then keep their connections and health when their address and port are the same."""
        gone = [k for k in had if k not in live]
        if not gone:
            return
        new = {(port, k.protocol): k for k, port in live.items() if k not in had}
        for old in gone:
            ukey = new.pop((had[old], old.protocol), None)
            if ukey is None:
                continue
            log.info("service port %s renamed to %s", old, ukey.port_name or "-")
            upstream = self.upstreams.pop(old)
            upstream.name = str(ukey)
            self.upstreams[ukey] = upstream
            had[ukey] = had.pop(old)

    def _update_upstream(self, ukey: UpstreamKey, service: ImportedService,
                         port: ServicePort) -> None:
        affinity = service.affinity_timeout_s if service.session_affinity == "ClientIP" else None
        targets = eligible_targets(service, port)
        upstream = self.upstreams.get(ukey)
        if upstream is None:
            upstream = UpstreamSet(str(ukey), self.store.cluster_id, self.config,
                                   locality=service.locality, affinity_timeout_s=affinity,
                                   datagram=port.protocol == "UDP")
            upstream.events = self.events
            self.upstreams[ukey] = upstream
            upstream.update(targets, service.locality, affinity)
            health = self.config.health
            if health.interval_s > 0 and port.protocol == "TCP":
                upstream.attach_health_checker(HealthChecker(upstream, health, serves_http(port)))
        else:
            upstream.update(targets, service.locality, affinity)
            if isinstance(upstream.health_checker, HealthChecker):
                upstream.health_checker.http = serves_http(port)  # appProtocol may change

    async def _open(self, lkey: ListenerKey, ukey: UpstreamKey, upstream: UpstreamSet,
                    http: bool = False) -> None:
        ctx = ListenerContext(str(lkey), upstream, self.config, self.conns, self.access_log,
                              self.refusals, self.writes, self.poller)
        listener = Listener(lkey, ukey, ctx)
        loop = asyncio.get_running_loop()
        try:
            sock = self._bind(lkey)
            try:
                if lkey.protocol == "UDP":
                    transport, _ = await loop.create_datagram_endpoint(
                        partial(UdpListener, ctx, self.udp_drops), sock=sock)
                    listener.transport = transport
                else:
                    sock.listen(LISTEN_BACKLOG)
                    stream = StreamListener(ctx, loop, sock, self.http.protocol_factory(ctx), http)
                    await stream.start()
                    listener.stream = stream
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            error = str(exc.strerror or exc)
            if self._bind_errors.get(lkey) != (ukey, error):
                log.error("listener %s for %s: cannot listen: %s", lkey, ukey, error)
            self._bind_errors[lkey] = (ukey, error)
            return
        self._bind_errors.pop(lkey, None)
        self.listeners[lkey] = listener
        log.info("listener %s serving %s", lkey, ukey)
        self._steer(listener, upstream)

    def _steer(self, listener: Listener, upstream: UpstreamSet) -> None:
        """With --workers, a ClientIP affinity service's listener hands each client address
        to one worker, whose affinity table then holds for all of that client's
        connections and flows (the kernel's default spreads them by source port)."""
        steer = self.config.workers > 1 and upstream.affinity is not None
        if steer == listener.steered:
            return
        try:
            steer_by_client_ip(listener.socket(), self.config.workers, steer)
        except OSError as exc:
            log.warning("listener %s: cannot steer clients to workers by address (%s): "
                        "sessionAffinity ClientIP holds per worker only", listener.key, exc)
            return
        listener.steered = steer

    def _bind(self, lkey: ListenerKey) -> socket.socket:
        family = socket.AF_INET6 if ":" in lkey.ip else socket.AF_INET
        kind, proto = ((socket.SOCK_DGRAM, socket.IPPROTO_UDP) if lkey.protocol == "UDP"
                       else (socket.SOCK_STREAM, socket.IPPROTO_TCP))
        # The protocol number is named, not left 0: asyncio's loop turns Nagle off on
        # accepted sockets only when it reads IPPROTO_TCP there (uvloop always does).
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if kind == socket.SOCK_STREAM:
                # TCP: rebinding while old connections linger in TIME_WAIT. Not for UDP,
                # where it lets a second process bind the same address and take its
                # datagrams without an error.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # Keepalive, which accepted connections inherit (no call per connection):
                # a client gone silent (its node dead, a cut link) held its stream and
                # the endpoint connection for the whole idle timeout.
                for level, option, value in self.config.keepalive_options():
                    sock.setsockopt(level, option, value)
            else:
                # UDP: a burst read late (the loop busy elsewhere) waits here, not dropped.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF_BYTES)
            if self.config.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # A ClusterSetIP need not be on an interface yet (in a cluster the VIP is
            # routed to the node); FREEBIND lets the bind succeed regardless. Linux takes
            # the IP-level option on IPv6 sockets too.
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((lkey.ip, lkey.port))
        except BaseException:
            sock.close()
            raise
        return sock

    # -- idle expiry ------------------------------------------------------------------
    async def _idle_sweep(self) -> None:
        tcp_s = self.config.idle_timeout_s
        udp_s = self.config.udp_idle_timeout_s
        period = min(t for t in (tcp_s, udp_s) if t > 0) / IDLE_SWEEPS
        tcp_ticks = sweep_ticks(tcp_s, period)
        udp_ticks = sweep_ticks(udp_s, period)
        while True:
            await asyncio.sleep(period)
            for conn in list(self.conns):
                conn.idle += 1
                limit = tcp_ticks if isinstance(conn, TcpConnection) else udp_ticks
                if limit and conn.idle > limit:
                    conn.expire()

    def failing_listeners(self) -> list[dict[str, object]]:
        """Listeners the snapshot wants that could not bind at their last try (tried
        again with backoff): /readyz's detail and the listeners_failing gauge."""
        return [{"address": lkey.ip, "port": lkey.port, "protocol": lkey.protocol,
                 "service": str(ukey), "error": error}
                for lkey, (ukey, error) in sorted(self._bind_errors.items())]

    def state(self) -> dict[str, object]:
        """Plain data for the admin page: listeners and upstream health."""
        return {
            "listeners": {str(k): str(v.upstream_key) for k, v in self.listeners.items()},
            "upstreams": {str(k): u.snapshot_state() for k, u in self.upstreams.items()},
            "connections": len(self.conns),
        }
