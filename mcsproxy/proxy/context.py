"""What every connection of one listener shares: its upstream set, config and bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final, Protocol

from mcsproxy.clientcounts import ClientCounts
from mcsproxy.config import ProxyConfig
from mcsproxy.loglimit import LogLimit
from mcsproxy.observability.accesslog import AccessLog
from mcsproxy.proxy.poller import Poller
from mcsproxy.upstream import UpstreamSet
from mcsproxy.writebatch import WriteBatch

log = logging.getLogger("mcsproxy.proxy")

# Why a client connection or UDP flow was turned away before reaching any endpoint, for
# mcsproxy_proxy_refused_total: the per-listener limits, the flow table, and running out
# of our own file descriptors (the endpoint is not blamed, the client is shed).
REFUSAL_REASONS: Final = ("listener_limit", "client_limit", "udp_flow_limit", "out_of_descriptors")


def new_refusals() -> dict[str, int]:
    return dict.fromkeys(REFUSAL_REASONS, 0)


class Tracked(Protocol):
    """A TCP connection or UDP flow, as the idle sweep and shutdown see it."""

    idle: int

    def expire(self) -> None: ...
    def abort(self) -> None: ...


class Connecting(Protocol):
    def connect_timeout(self) -> None: ...


# A loop timer can fire a little before its time (libuv counts whole milliseconds from
# the time cached at the start of the loop iteration): a deadline this close counts as
# reached rather than re-arming the timer for a sliver; a farther one re-arms it.
DEADLINE_SLACK_S: Final = 0.001


class ConnectDeadlines:
    """The connect timeouts of one listener's connections, on one loop timer.

    A timer per connect costs a TimerHandle and a libuv timer started and then cancelled
    (callgrind, bench/tcp/callgrind.py conn: ~5k of ~165k instructions per short
    connection); here a connect costs a dict insert and delete. Every connect of a
    listener has the same timeout, so insertion order is deadline order and the timer
    only waits for the oldest connect still in progress.
    """

    __slots__ = ("loop", "pending", "timeout_s", "timer")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.pending: dict[Connecting, float] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # On the hot path the proxies touch `pending` themselves (a Python method call costs
    # more than the dict operation):
    #   pending[conn] = started + timeout_s  (started: time.monotonic()), then `arm` when
    #   `timer` is None: conn.connect_timeout() runs at that time;
    #   pending.pop(conn, None): it no longer does.

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timer = loop.call_later(self.timeout_s, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = time.monotonic() + DEADLINE_SLACK_S
        pending = self.pending
        expired = []
        for conn, deadline in pending.items():
            if deadline > now:
                break
            expired.append(conn)
        for conn in expired:
            del pending[conn]
        if pending:
            assert self.loop is not None
            self.timer = self.loop.call_later(next(iter(pending.values())) - now, self._fire)
        for conn in expired:
            conn.connect_timeout()


class ListenerContext:
    """Mutable on purpose: a snapshot that moves a ClusterSetIP:port to another service
    rebinds `upstream` here and the listener keeps its socket."""

    __slots__ = ("_give_up_log", "_refusal_log", "access_log", "active", "by_client",
                 "closed", "config", "connect_attempts", "connect_deadlines", "conns",
                 "endpoint_options", "gave_up", "limited", "name", "poller", "refusals",
                 "refused", "upstream", "writes")

    def __init__(self, name: str, upstream: UpstreamSet, config: ProxyConfig,
                 conns: set[Tracked], access_log: AccessLog | None = None,
                 refusals: dict[str, int] | None = None,
                 writes: WriteBatch | None = None, poller: Poller | None = None) -> None:
        self.name = name
        self.upstream = upstream
        # The listener closed (its ClusterSetIP:port left the snapshot): its TCP streams
        # carry on, its HTTP clients are asked to leave (ClientConnection.leaving).
        self.closed = False
        self.config = config
        # Copied from config for the per-connection path: ProxyConfig is an interpreted
        # dataclass, and each of its attributes read from compiled code is a generic
        # look-up (~180 instructions, three a TCP connection).
        self.connect_attempts = config.connect_attempts
        self.limited = bool(config.max_connections_per_listener
                            or config.max_connections_per_client)
        self.conns = conns  # shared by every listener of the manager, for the idle sweep
        self.gave_up = 0
        self.access_log = access_log  # None unless --access-log
        self._give_up_log = LogLimit()
        # --max-connections-per-listener / -per-client: open connections, refusals.
        self.active = 0
        self.by_client = ClientCounts()
        self.refused = 0
        self._refusal_log = LogLimit()
        # By reason, shared by every listener of the manager: listeners come and go with
        # snapshots, and the counters exported must never go backwards.
        self.refusals = refusals if refusals is not None else new_refusals()
        self.connect_deadlines = ConnectDeadlines(config.connect_timeout_s)
        # setsockopt arguments of every endpoint socket (keepalive, TCP_USER_TIMEOUT).
        self.endpoint_options = config.endpoint_socket_options()
        # Shared by every listener of the manager: one flush per poll for all of them.
        self.writes = writes if writes is not None else WriteBatch()
        # Shared by every listener of the manager, which closes it.
        self.poller = poller

    def poller_for(self, loop: asyncio.AbstractEventLoop) -> Poller:
        """The manager's poller; a context made without one (tests, benchmarks) makes its
        own on first use, whose epoll is closed once the loop lets go of its reader."""
        poller = self.poller
        if poller is None or poller.loop is not loop:
            poller = self.poller = Poller(loop)
        return poller

    def admit(self, peer: Any) -> str | None:
        """Count a new stream connection from `peer` (its address, as accept gives it) in;
        None (and counted, logged at most 1/s) when a limit refuses it. The returned key
        goes back to `leave`."""
        config = self.config
        client = ""
        if config.max_connections_per_client:
            client = peer[0] if peer else ""
            if not self.by_client.take(client, config.max_connections_per_client):
                self._refuse(f"client {client} has "
                             f"{config.max_connections_per_client} connections", "client_limit")
                return None
        if config.max_connections_per_listener and \
                self.active >= config.max_connections_per_listener:
            if config.max_connections_per_client:
                self.by_client.give(client)
            self._refuse(f"{self.active} connections open", "listener_limit")
            return None
        self.active += 1
        return client

    def leave(self, client: str) -> None:
        self.active -= 1
        if self.config.max_connections_per_client:
            self.by_client.give(client)

    def _refuse(self, why: str, reason: str, what: str = "connection") -> None:
        self.refused += 1
        self.refusals[reason] += 1
        if self._refusal_log.take(time.monotonic()) >= 0:
            log.warning("listener %s: %s refused by a limit (%s); %d refused so far",
                        self.name, what, why, self.refused)
        return None

    def refuse_flow(self, why: str) -> None:
        """A UDP datagram that would open a flow beyond a limit: counted, logged at most
        1/s as a limit (not as a missing endpoint, where an operator would look first)."""
        self._refuse(why, "udp_flow_limit", "new UDP flow")

    def shed(self) -> None:
        """A client connection or flow dropped because this process ran out of file
        descriptors: counted, logged at most 1/s (not the endpoint's fault)."""
        self.refusals["out_of_descriptors"] += 1
        self.give_up("out of file descriptors")

    def give_up(self, why: str) -> None:
        """A client connection or flow that found no endpoint: counted, logged at most 1/s."""
        self.gave_up += 1
        if self._give_up_log.take(time.monotonic()) >= 0:
            log.warning("listener %s: no endpoint for a client (%s); %d so far",
                        self.name, why, self.gave_up)
