"""UDP proxying: one flow per client address and port, each with its own connected socket.

The listener keeps a bounded flow table, a quarter of it at most per client address; a
datagram from a new client address opens a flow to the host the upstream set picks
(affinity by client IP applies) and replies on that flow go back to that client from the
ClusterSetIP:port it wrote to. A flow ends when idle (the manager's sweep), when its
endpoint answers ICMP port unreachable (or another ICMP error that says it cannot be
reached: UNREACHABLE_ERRNOS), when its endpoint leaves the snapshot or when its listener
closes.

A UDP socket connects without a packet, so a flow's attempt at an endpoint is decided
later, as a TCP connect is: refused when port unreachable comes back before the first
reply and within connect_timeout of the socket opening, ok at the first reply or once
that time has passed without it (a one-way protocol never replies), or when the flow
ends before; timed out when no reply came while the endpoint's whole cluster stayed silent
and the service is one that answers (a blackhole, which sends no port unreachable:
see `UdpFlow.connect_timeout`), and moved as a refused one is. Each attempt counts once, with
that outcome; a client's flow counts one ok connection, or failed once every attempt
was refused. A refused attempt moves the flow: the datagrams it sent go again to another
endpoint (bounded by connect_attempts, as a TCP connect's retries). Port unreachable on
a flow already counted ok ends it: it is a failure toward ejection, not another attempt,
and the next datagram opens a fresh flow, likely elsewhere. A datagram whose write met
the port unreachable was not sent: it goes with the move, or where the client's next
one goes.

Datagrams go out with a system call of our own, not the transport's sendto: when the
kernel's send buffer is full (EAGAIN: a slow or congested link on the way) uvloop queues
every later datagram behind the refused one without a limit, and aborting a transport
with such a queue logs an error per datagram. Here the kernel's buffer is the only
queue: a datagram it refuses is dropped, as a full queue in the kernel or a router drops
one. So is one past what a flow holds while its socket opens. Each drop is counted by
reason and logged at most once a second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import Any

from mcsproxy.clientcounts import ClientCounts, client_share
from mcsproxy.proxy.context import ListenerContext
from mcsproxy.upstream import Host, UpstreamSet

log = logging.getLogger("mcsproxy.proxy.udp")

# Datagrams held per flow while its upstream socket is being set up.
PENDING_DATAGRAMS_MAX = 64
# What a flow keeps of the datagrams it sent before its endpoint's first reply, to send
# them again to another endpoint when that one answers port unreachable. A flow that
# sends more before any reply (a one-way stream) keeps nothing and is not moved.
REPLAY_DATAGRAMS_MAX = 8
REPLAY_BYTES_MAX = 8 * 1024
DROP_LOG_INTERVAL_S = 1.0
# A flow's socket that cannot be set up for want of our own resources: descriptors,
# memory, or (EAGAIN) a free local port, each flow taking one of the ephemeral range for
# itself. The endpoint is not to blame: past the range, every new flow counted a failure
# toward ejecting it (4 of the 5 an ejection takes on each of two endpoints, from 8
# flows over a range of 8 ports) and the log said "2 endpoints port unreachable".
LOCAL_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                            errno.EAGAIN})
# The listening socket's receive buffer: what arrives while the loop is busy elsewhere (a
# GC pass, a large snapshot) waits there, and the kernel drops what does not fit, counted
# nowhere here. At Linux's default (212,992 bytes, about 256 small datagrams) a burst of
# 2,000 such datagrams reached the endpoint as 256; at 1 MiB, all 2,000. As the DNS
# server's; capped by net.core.rmem_max. Flow sockets keep the default: one per flow, a
# limit each (16,384 flows of 1 MiB could pin 16 GiB).
LISTENER_RCVBUF_BYTES = 1 << 20
# What a connected UDP socket reports of the ICMP errors Linux holds fatal (icmp_err_convert
# and its IPv6 twin): the endpoint cannot be reached. Port unreachable (ECONNREFUSED) is
# the usual one; a firewall's reject says host or admin prohibited (EHOSTUNREACH;
# firewalld's default, iptables' --reject-with icmp-host-prohibited), network prohibited
# (ENETUNREACH), or, over IPv6, EACCES. Only port unreachable moved a flow: behind a
# host-prohibited reject, 5 of 10 clients went unanswered over 3 tries each, the
# endpoint's attempts all counted ok and never ejected.
UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                errno.EHOSTDOWN, errno.ENONET, errno.ENOPROTOOPT,
                                errno.EACCES})
# mcsproxy_proxy_udp_dropped_total{reason}, and what the log line says of each.
DROP_REASONS = {
    "opening": f"over {PENDING_DATAGRAMS_MAX} datagrams held while a flow's socket opens",
    "endpoint_buffer_full": "the send buffer towards the endpoint is full",
    "client_buffer_full": "the send buffer towards the client is full",
    "too_big": "larger than the other side's address family carries (65,507 bytes over IPv4)",
}

Address = tuple[Any, ...]


class UdpDrops:
    """Datagrams the UDP proxy dropped, by reason. One per manager, shared by its
    listeners: they come and go with snapshots, and the counters exported must never go
    backwards. Logged at most once a second per reason (each points at another fault)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self._last_log = dict.fromkeys(DROP_REASONS, 0.0)

    def drop(self, listener: str, reason: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_log[reason] >= DROP_LOG_INTERVAL_S:
            self._last_log[reason] = now
            log.warning("listener %s: UDP datagram dropped (%s); %d so far",
                        listener, DROP_REASONS[reason], self.counts[reason])


class UdpListener(asyncio.DatagramProtocol):
    """The ClusterSetIP:port socket: demultiplexes datagrams to flows by client address."""

    def __init__(self, ctx: ListenerContext, drops: UdpDrops | None = None) -> None:
        self.ctx = ctx
        self.drops = drops if drops is not None else UdpDrops()
        self.transport: asyncio.DatagramTransport | None = None
        # Replies are sent on a duplicate of the listening socket (see the module's
        # docstring); a duplicate, so that it owns its descriptor whatever the loop does
        # with the transport's.
        self.sock: socket.socket | None = None
        self.flows: dict[Address, UdpFlow] = {}
        # Flows in the table per client address: one address may hold a quarter of it
        # (client_share), as elsewhere a limit shared by every client is. One address
        # writing from 100 source ports took a 64-flow table whole, and every other
        # client was refused until those flows idled out (--udp-idle-timeout).
        self.by_client = ClientCounts()
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        sock.setblocking(False)  # a full send buffer raises rather than waits
        self.sock = sock

    def datagram_received(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            if not self._admit(addr):
                return
            flow = UdpFlow(self, addr)
            if not flow.open():
                self.by_client.give(addr[0])
                return
            self.flows[addr] = flow
        flow.send(data)

    def _admit(self, addr: Address) -> bool:
        """Room in the table for a new flow of `addr`, taken (`leave` gives it back);
        False, counted and logged as a limit, when the table or the client's share of
        it is full."""
        max_flows = self.ctx.config.udp_max_flows
        if len(self.flows) >= max_flows:
            why = f"flow table full: --udp-max-flows {len(self.flows)}"
        elif not self.by_client.take(addr[0], client_share(max_flows)):
            why = (f"client {addr[0]} holds {client_share(max_flows)} flows, "
                   f"a quarter of --udp-max-flows")
        else:
            return True
        self.dropped += 1
        self.ctx.refuse_flow(why)
        return False

    def leave(self, flow: UdpFlow) -> None:
        """`flow` leaves the table (it ends or moves): its room goes back."""
        if self.flows.get(flow.client_addr) is flow:
            del self.flows[flow.client_addr]
            self.by_client.give(flow.client_addr[0])

    def move(self, failed: UdpFlow, replay: list[bytes]) -> None:
        """`failed` (already out of the table) met port unreachable before its attempt
        counted ok: the client's datagrams go again to another endpoint, as a refused TCP
        connect is retried before the client sees anything."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._admit(failed.client_addr):
            return
        flow = UdpFlow(self, failed.client_addr, failed.tried, failed.began)
        if not flow.open():
            self.by_client.give(flow.client_addr[0])
            return
        flow.upstream.stats.retries += 1
        self.flows[flow.client_addr] = flow
        for data in replay:
            flow.send(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("listener %s: %r", self.ctx.name, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        for flow in list(self.flows.values()):
            flow.abort()
        self.flows.clear()
        self.by_client.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def reply(self, data: bytes, addr: Address) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            sock.sendto(data, addr)  # zero-length too (the transport's sendto drops those)
        except BlockingIOError:
            self.drops.drop(self.ctx.name, "client_buffer_full")
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # an IPv6 endpoint's 65,527 bytes to an IPv4 client
                self.drops.drop(self.ctx.name, "too_big")
                return
            self.error_received(exc)


class UdpFlow(asyncio.DatagramProtocol):
    """One client address's datagrams to one endpoint and the replies back."""

    __slots__ = ("began", "client_addr", "closed", "fd", "host", "idle", "listener", "outcome",
                 "pending", "received", "replay", "replay_bytes", "replies", "sends", "sent",
                 "started", "task", "transport", "tried", "upstream", "watch_rx")

    def __init__(self, listener: UdpListener, client_addr: Address,
                 tried: list[Host] | None = None, began: float | None = None) -> None:
        self.listener = listener
        self.client_addr = client_addr
        self.tried: list[Host] = tried if tried is not None else []  # endpoints that refused
        # Sent while the attempt is undecided (see REPLAY_*); None once it counts ok or
        # once over the bound.
        self.replay: list[bytes] | None = []
        # The attempt's outcome, counted once: None while undecided, "ok" or "refused".
        self.outcome: str | None = None
        self.replay_bytes = 0
        self.upstream: UpstreamSet = listener.ctx.upstream
        self.transport: asyncio.DatagramTransport | None = None
        self.fd = -1  # the transport's socket, which datagrams are written to (module doc)
        self.host: Host | None = None
        self.pending: list[bytes] | None = []
        self.task: asyncio.Task[Any] | None = None
        self.closed = False
        self.idle = 0
        self.sent = 0  # datagram bytes each way, folded into the cluster's counters at the end
        self.received = 0
        # Datagrams each way, which say whether the endpoint answered: bytes do not, as
        # a reply may be empty (an endpoint acknowledging with zero-length datagrams,
        # after one that was not, was ejected as silent and its flow cut every 2 s).
        self.sends = 0
        self.replies = 0
        self.started = time.monotonic()
        # The client's flow began: its first attempt's start (a moved flow is one flow
        # with several attempts in the access log, as a retried TCP connect is one line).
        self.began = self.started if began is None else began
        # An answering flow that sent a datagram waits for a reply on the connect
        # deadlines (see `send`): `replies` when the wait began, -1 while none is kept.
        self.watch_rx = -1

    def open(self) -> bool:
        host = self.upstream.pick(self.client_addr[0], self.tried, len(self.tried) + 1
                                  >= self.listener.ctx.config.connect_attempts)
        if host is None:
            if self.tried:
                self.tried[-1].stats.failed += 1
            else:
                self.upstream.stats.no_endpoint += 1
            # Each tried endpoint failed its own way (port unreachable, a firewall's
            # reject, no route, silence): the log said "port unreachable" for all.
            self.listener.ctx.give_up("no eligible endpoint" if not self.tried else
                                      f"every endpoint failed ({len(self.tried)} tried)")
            self.log_access("failed" if self.tried else "no_endpoint")
            return False
        self.host = host
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(loop.create_datagram_endpoint(
            lambda: self, remote_addr=(host.address, host.port)))
        self.task.add_done_callback(self._opened)
        self.listener.ctx.conns.add(self)
        return True

    def _opened(self, task: asyncio.Task[Any]) -> None:
        self.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or self.closed:
            # Closed: aborted meanwhile (its listener closed, its endpoint removed), and
            # a move would open a flow on a listener that may be gone.
            return
        host = self.host
        assert host is not None
        if isinstance(exc, OSError) and exc.errno in LOCAL_SHORTAGE:
            # Our own descriptors, memory or ports ran out, as in the TCP proxy: not the
            # endpoint's fault, so nothing is held against it (no ejection, no move to
            # another endpoint, which would fail the same way); this flow is shed.
            self._forget()
            ctx = self.listener.ctx
            if exc.errno == errno.EAGAIN:
                ctx.refusals["out_of_descriptors"] += 1
                ctx.give_up("no local UDP port left, see net.ipv4.ip_local_port_range")
            else:
                ctx.shed()
            return
        # The socket could not connect to the endpoint (no route to its network, an
        # address this host cannot reach): nothing was sent, and the flow moves with what
        # it holds, as a TCP connect failing so is retried elsewhere. The client's
        # datagrams were lost instead (5 of 10 clients, one endpoint of two unroutable,
        # until its failures ejected it).
        self.outcome = "error"
        self.upstream.connect_failed(host, str(exc))
        pending, self.pending = self.pending, None
        kept = self.replay is not None
        self._move_or_give_up(host, f"unreachable ({getattr(exc, 'strerror', None) or exc})")
        if pending and not kept:
            self._pass_on(pending)  # more than a move carries: where the next one goes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            # Aborted while the socket was set up: uvloop still hands it over after the
            # cancel, and nothing would ever close it (the flow is out of every table).
            transport.abort()
            return
        assert self.host is not None
        self.fd = transport.get_extra_info("socket").fileno()
        # A UDP socket connects without a packet: opening says nothing of the endpoint's
        # health, its first reply does (`answered`). Resetting the failure count here
        # would let a port-unreachable endpoint take every other new flow forever.
        self.upstream.connect_ok(self.host, self, reset_failures=False)
        # Counted at the first reply, at a port unreachable or, failing both, when
        # connect_timeout has passed (connect_timeout below): on the listener's one timer.
        deadlines = self.listener.ctx.connect_deadlines
        deadlines.pending[self] = time.monotonic() + deadlines.timeout_s
        if deadlines.timer is None:
            deadlines.arm(asyncio.get_running_loop())
        pending, self.pending = self.pending, None
        if pending:
            for i, data in enumerate(pending):
                if not self._sendto(data):
                    # Refused: what the flow kept moved with it; without a replay the
                    # rest was never sent and goes where the client's next datagram goes.
                    if self.replay is None:
                        self._pass_on(pending[i:])
                    break

    def send(self, data: bytes) -> None:
        self.idle = 0
        opening = self.transport is None
        if opening:
            pending = self.pending
            if pending is None or len(pending) >= PENDING_DATAGRAMS_MAX:
                self.listener.drops.drop(self.listener.ctx.name, "opening")
                return
            pending.append(data)
        # Kept before the write: the write itself can meet the endpoint's port unreachable
        # (one that came back for an earlier datagram) and move the flow at once, and this
        # datagram, not sent, must go with the move (it was lost: 5 of 1,500 datagrams).
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(data)
            if len(replay) < REPLAY_DATAGRAMS_MAX and self.replay_bytes <= REPLAY_BYTES_MAX:
                replay.append(data)
            else:
                self.replay = None
        if not opening and not self._sendto(data) and self.replay is None:
            self._pass_on((data,))
        elif self.watch_rx < 0 and self.replies and not self.closed:
            # A flow that got replies waits for one again within the connect timeout: an
            # endpoint blackholed under it otherwise took the client's datagrams for as
            # long as the client sent (one long flow, as a forwarder's pooled socket: 26
            # of 26 queries lost over 9 s, nothing ejected). `connect_timeout` decides.
            # One wait per connect timeout at most, not one per datagram: the replies in
            # between cost nothing (the count of replies is kept anyway).
            self.watch_rx = self.replies
            deadlines = self.listener.ctx.connect_deadlines
            deadlines.pending[self] = time.monotonic() + deadlines.timeout_s
            if deadlines.timer is None:
                deadlines.arm(asyncio.get_running_loop())

    def _sendto(self, data: bytes) -> bool:
        """False when the flow is closed, or the write met port unreachable (which closes
        it): the datagram was not sent."""
        if self.closed:
            return False  # its descriptor may be closed, and its number someone else's
        return self._write(data, first=True)

    def _write(self, data: bytes, first: bool) -> bool:
        """One write; a first one that meets EMSGSIZE is made once more. That error is
        either the one an ICMP "fragmentation needed" left on the socket (a router on the
        way dropped an earlier datagram larger than its MTU; the kernel now fragments to
        it), which this write reported instead of sending (it was lost without a trace),
        or this datagram is larger than the socket's family carries (an IPv6 client's
        65,527 bytes to an IPv4 endpoint): the first is sent the second time, the second
        fails again and is counted dropped."""
        try:
            # The socket is connected: write() sends one datagram, zero-length too.
            os.write(self.fd, data)
        except BlockingIOError:
            self.listener.drops.drop(self.listener.ctx.name, "endpoint_buffer_full")
            return True
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                if first:
                    return self._write(data, first=False)
                self.listener.drops.drop(self.listener.ctx.name, "too_big")
                return True
            self.error_received(exc)  # port unreachable shows here as on any send
            return not self.closed
        self.sent += len(data)
        self.sends += 1
        return True

    def _pass_on(self, datagrams: tuple[bytes, ...] | list[bytes]) -> None:
        """Datagrams this flow did not send and no move carries: each goes where the
        client's next datagram goes (a fresh flow, counted if refused a flow by a limit
        or finding no endpoint), as it would had the port unreachable been read first."""
        listener = self.listener
        if listener.flows.get(self.client_addr) is self:
            return  # still in the table: handing them over would come back here
        for data in datagrams:
            listener.datagram_received(data, self.client_addr)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.idle = 0
        if not self.replies and self.host is not None:
            self.upstream.answered(self.host)
            if self.outcome is None:
                self._established()
                # The attempt's connect time, as a TCP connect's: from the flow opening
                # (the endpoint picked, its socket set up) to the reply that decided it
                # ok. Attempts decided by connect_timeout or by the flow ending are not
                # timed: a one-way protocol never replies, and every one of them would
                # read as the timeout.
                self.host.stats.connect_time.observe(time.monotonic() - self.started)
        self.replies += 1
        self.received += len(data)
        self.listener.reply(data, self.client_addr)

    def connect_timeout(self) -> None:
        """connect_timeout passed with no port unreachable: the attempt counts ok, unless
        no reply came while the endpoint's whole cluster went silent and the service is
        one that answers (`UpstreamSet.flow_unanswered`): then it timed out and the
        flow moves, as a refused one does. A blackholed cluster otherwise took its share
        of new flows for good (1 in 3 queries lost over 36 s with 3 clusters, while the
        same cluster's TCP services failed over within 1 s)."""
        if self.closed:
            return
        host = self.host
        if self.outcome is not None:
            # An answering flow waited a connect timeout since a datagram (`send`).
            watched, self.watch_rx = self.watch_rx, -1
            if host is None or watched < 0:
                return
            if self.replies > watched:
                # A reply came within the wait: the endpoint answers, and its cluster is
                # not silent to `flow_unanswered` (kept here, not at every reply).
                self.upstream.answered(host)
            elif self.upstream.flow_unanswered(host, self, established=True):
                # None since: the cluster is silent, the endpoint ejected; the flow ends
                # (by `cluster_silent`) and the client's next datagram goes elsewhere.
                self.abort()
            return
        if (host is None or not self.sends or self.replies
                or not self.upstream.flow_unanswered(host, self)):
            self._established()
            return
        self.outcome = "timeout"
        self._move_or_give_up(host, "silent")

    def _established(self) -> None:
        self.outcome = "ok"
        self.replay = None  # no longer moved: a later port unreachable ends the flow
        self.listener.ctx.connect_deadlines.pending.pop(self, None)
        host = self.host
        assert host is not None
        host.stats.connections += 1
        host.stats.attempts["ok"] += 1

    def error_received(self, exc: Exception) -> None:
        # A connected UDP socket reports the endpoint's ICMP port unreachable here, and
        # the other ICMP errors that say it cannot be reached (UNREACHABLE_ERRNOS).
        host = self.host
        if host is None or self.closed or getattr(exc, "errno", None) not in UNREACHABLE_ERRNOS:
            return
        why = ("port unreachable" if isinstance(exc, ConnectionRefusedError) else
               f"unreachable ({getattr(exc, 'strerror', None) or exc})")
        if self.outcome is not None:
            # Counted ok already: the endpoint went away under an established flow.
            self.upstream.flow_failed(host, why)
            self.abort()
            return
        self.outcome = "refused"
        self.upstream.connect_failed(host, why)  # the attempt: refused (port) or error
        self._move_or_give_up(host, why)

    def _move_or_give_up(self, host: Host, why: str) -> None:
        """The attempt on `host` failed (`why`): the flow moves to another endpoint with
        what it holds, or, every attempt spent or more sent before any reply than a flow
        keeps to move, the client's flow failed. Its later datagrams open a fresh flow."""
        self.tried.append(host)
        replay = self.replay
        self.abort()
        ctx = self.listener.ctx
        if replay and len(self.tried) < ctx.config.connect_attempts:
            self.listener.move(self, replay)
            return
        host.stats.failed += 1
        ctx.give_up(f"{len(self.tried)} endpoints {why}" if replay else
                    f"{why} after more than a flow keeps to move")
        self.log_access("failed")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.outcome is None and self.fd >= 0:
            self._established()  # ended before its attempt was decided, never refused
        self.closed = True  # its descriptor is closed: nothing more is written to it
        host = self.host
        if host is not None:
            host.stats.bytes_to_upstream += self.sent
            host.stats.bytes_to_client += self.received
            self.upstream.release(host, self)
        if self.outcome == "ok" or self.outcome is None:
            # Not an attempt that failed: that one's flow moved (the next attempt logs
            # it) or failed (logged then).
            self.log_access("ok")
        self._forget()

    def log_access(self, outcome: str) -> None:
        """The client's flow in the access log, once, when it ends: "ok", "failed" (every
        attempt failed) or "no_endpoint", with its attempts, as the TCP proxy logs a
        connection. Each attempt of a moved flow was a line of its own ("refused" twice,
        then "ok", for one client's flow), and a flow that failed or found no endpoint
        had none."""
        access_log = self.listener.ctx.access_log
        if access_log is None:
            return
        # The endpoint of the last attempt; a moved flow that found none left has none.
        host = self.host or (self.tried[-1] if self.tried else None)
        addr = self.client_addr
        access_log.record(
            kind="udp", client=f"{addr[0]}:{addr[1]}", listener=self.listener.ctx.name,
            upstream=self.upstream.name, cluster=host.cluster if host is not None else None,
            endpoint=f"{host.address}:{host.port}" if host is not None else None,
            outcome=outcome, attempts=len(self.tried) + (outcome == "ok"),
            duration_ms=round((time.monotonic() - self.began) * 1000, 3),
            bytes_to_upstream=self.sent, bytes_to_client=self.received)

    def _forget(self) -> None:
        self.listener.ctx.conns.discard(self)
        self.listener.leave(self)

    def abort(self) -> None:
        self.closed = True
        # Out of the table at once, not at connection_lost a loop pass later: a datagram
        # of this client read in between would go to the closing socket and be lost
        # instead of opening a fresh flow.
        self._forget()
        self.listener.ctx.connect_deadlines.pending.pop(self, None)
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def cluster_silent(self, waited_s: float = 0.0) -> None:
        """The endpoint was ejected, its cluster silent: an established flow ends, so the
        client's next datagram opens a flow elsewhere (it would go on into the silence
        while the client sends). An undecided one is decided at its own connect timeout,
        and one to another endpoint of the cluster (`waited_s`) by its own wait."""
        if not waited_s and self.outcome is not None and not self.closed:
            self.abort()

    def expire(self) -> None:
        self.abort()
