"""The upstream set: every endpoint one (service, port) may send to, with their health.

One `UpstreamSet` per imported service port, shared by every listener of that port (all
ClusterSetIPs) and by every protocol handler (TCP, UDP, and the HTTP proxy):

    host = upstream.pick(client_ip, exclude=tried)   # None: nowhere to go
    ... connect to (host.address, host.port) ...
    upstream.connect_failed(host, "refused")           # counts toward outlier ejection
    upstream.connect_ok(host, conn)                    # conn has .abort(); counted as active
    upstream.response_status(host, 503)                # HTTP: 5xx counts as a failure
    upstream.answered(host)                            # UDP: a reply says it is alive
    upstream.release(host, conn)                       # the connection ended

Health lives here: active checks (`HealthChecker`, started with `start()`) report through
`health_result`, passive failures through `connect_failed`/`response_status`; a host is
*healthy* when its active state is up and it is not ejected. Every health change rebuilds
the per-level host lists and Envoy's load plan once, so `pick` only indexes lists.
An ejection runs out when a reader next looks: `pick` checks the clock itself; every
other reader (admin, metrics, status page, explain) calls `expire_due()` first, or it
would report an ejection that ended while no connection came.
`update()` takes a new target list from a snapshot: hosts that stay keep their state and
connections; removed hosts get nothing new and their connections drain (aborted after
`drain_grace_s` when one is configured; UDP flows, which have no end, at once). Every
state change is logged once (endpoint health changes HEALTH_CHANGES_NAMED_PER_S a second
over the process, the rest counted into the next line).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable
from typing import Final, Protocol

from mcsproxy.config import HealthConfig, OutlierConfig, ProxyConfig
from mcsproxy.loglimit import LogLimit
from mcsproxy.model import Locality
from mcsproxy.observability.events import EventRing
from mcsproxy.observability.stats import ClusterStats, UpstreamStats, connect_outcome
from mcsproxy.upstream.balance import (
    AffinityTable,
    LoadPlan,
    Target,
    choose_level,
    cluster_shares,
    pick_least_connections,
    pick_round_robin,
    priority_load,
    priority_of,
)

log = logging.getLogger("mcsproxy.upstream")

INF: Final = float("inf")


class Connection(Protocol):
    """What an upstream set needs of a proxied connection: a way to end it when draining,
    and to hear that its endpoint was ejected because its cluster went silent."""

    def abort(self) -> None: ...

    def cluster_silent(self, waited_s: float = 0.0) -> None: ...


# The HTTP proxy's reason for a request that got no answer within its per-try timeout.
PER_TRY_TIMEOUT: Final = "timeout (per try)"
# Its reason for one that waited a whole connect timeout, unacknowledged, on an endpoint
# of a cluster found silent (UpstreamSet._partitioned): a timeout as well, and as a
# per-try timeout one sent before the wait began.
SILENT_WAIT: Final = "no answer for a connect timeout, cluster silent"
# Past a connect timeout, how long the proxies let the loop run a completion it has
# already seen before they judge the connect timed out: due timers (and ticks) run before
# the callbacks already queued, so after a stall (a GC pause, a burst of work) a connect
# that finished in time would otherwise be charged to its endpoint as a timeout.
CONNECT_VERDICT_DELAY_S: Final = 0.02
# Endpoints named in the log line of one update that adds them; the rest are counted.
LOG_ADDED_NAMED: Final = 3
# `Host.conns` of every endpoint without a connection yet, never added to (connect_ok
# gives a host its own set first): an empty set each was 216 B of the ~720 B a host
# held, and most endpoints of a big clusterset never see a connection.
NO_CONNS: Final[set[Connection]] = set()
# One generator for every set and health checker given none (the choice in a level,
# least-connections' ties, probe spread): a random.Random is 2.5 KiB, and one in each set
# and each checker came to 5 KiB per TCP service port, 15 MiB at 3,000 services. Not a
# secret, and used from the loop's thread only.
SHARED_RNG: Final = random.Random()
# Endpoint health changes (active checks) logged per second, over every set of the
# process; the rest are counted into the next line. A cluster going dark flips every
# endpoint it has: one line each was 30,000 lines (4.8 MB) in 100 s at 1,000 services of
# 30 endpoints, enough for the kubelet's log rotation to drop what came before, and
# each an event pushing the status page's 500 out within a second. /endpoints and
# /explain show every endpoint's state.
HEALTH_CHANGES_NAMED_PER_S: Final = 20
HEALTH_CHANGES_LOG: Final = LogLimit(HEALTH_CHANGES_NAMED_PER_S)


class Host:
    """One endpoint (address, port) of an upstream set and its health state."""

    __slots__ = (
        "active_up",
        "address",
        "backoff",
        "cluster",
        "conns",
        "consecutive_failures",
        "drain_timer",
        "ejected_until",
        "hc_streak",
        "key",
        "level",
        "port",
        "reached_at",
        "ready",
        "removed",
        "returned_at",
        "stats",
        "times_ejected",
    )

    def __init__(self, target: Target, level: int, stats: ClusterStats) -> None:
        self.address = target.address
        self.port = target.port
        self.key = (target.address, target.port)
        self.cluster = target.cluster
        self.ready = target.ready
        self.level = level
        # Kubernetes already vouched for a ready endpoint: start healthy rather than
        # holding traffic until the first probe, and let active checks take it down.
        self.active_up = True
        self.hc_streak = 0  # consecutive probe results against the current active state
        self.consecutive_failures = 0
        self.times_ejected = 0  # every ejection, for the admin page
        # The ejection multiplier (Envoy's): up one per ejection, down one per base ejection
        # time in service since the last one ended (see UpstreamSet._eject).
        self.backoff = 0
        self.returned_at = 0.0  # when the last ejection ended
        self.ejected_until = 0.0
        self.reached_at = -INF  # last answer: a connect completed, a response, a probe
        self.removed = False
        self.conns: set[Connection] = NO_CONNS  # its own set from the first connection
        self.drain_timer: asyncio.TimerHandle | None = None  # the grace of this removal
        # Its set's counters for its cluster, shared by the cluster's hosts. A
        # ClusterStats of its own, replaced at once, was 10 allocations (0.9 KiB) for
        # nothing per endpoint added: 78 MiB made and freed by a first sync of 90,000.
        self.stats = stats

    @property
    def ejected(self) -> bool:
        return self.ejected_until > 0.0

    @property
    def healthy(self) -> bool:
        return self.active_up and self.ejected_until == 0.0

    @property
    def active(self) -> int:
        return len(self.conns)

    def __repr__(self) -> str:
        return f"{self.address}:{self.port}({self.cluster})"


def _active(host: Host) -> int:
    return len(host.conns)


class UpstreamSet:
    """Endpoints of one service port, their health, and the choice of one per connection."""

    def __init__(
        self,
        name: str,
        local_cluster: str,
        config: ProxyConfig,
        *,
        locality: Locality = "spread",
        affinity_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        datagram: bool = False,
    ) -> None:
        self.name = name
        # UDP: a removed endpoint's flows end at once (see _retire).
        self.datagram = datagram
        self.local_cluster = local_cluster
        self.config = config
        self.outlier: OutlierConfig = config.outlier
        self.locality: Locality = locality
        self._clock = clock
        self._rng = rng or SHARED_RNG
        self._randbelow = self._rng.randrange
        self._least_conn = config.lb_policy == "least-connections"
        self.affinity: AffinityTable | None = (
            AffinityTable(affinity_timeout_s, clock) if affinity_timeout_s else None
        )
        self.hosts: dict[tuple[str, int], Host] = {}
        self.draining: set[Host] = set()
        self._levels: list[list[Host]] = []  # every current host, by priority level
        self._avail: list[list[Host]] = []  # hosts `pick` chooses from, by level
        self.plan = LoadPlan((), ())
        self._rr = 0
        self._next_expiry = INF
        self._panic_logged: tuple[bool, ...] = ()
        self._timed_out_at: dict[str, float] = {}  # cluster → its last connect timeout
        self.health_checker: HealthCheckerLike | None = None
        self.stats = UpstreamStats()
        self.events: EventRing | None = None  # state changes for the status page

    # -- snapshot updates -------------------------------------------------------------
    def update(
        self,
        targets: Iterable[Target],
        locality: Locality | None = None,
        affinity_timeout_s: float | None = None,
    ) -> None:
        """Make `targets` the set's endpoints; keep the state of those that stay."""
        if locality is not None:
            self.locality = locality
        if affinity_timeout_s is None:
            self.affinity = None
        elif self.affinity is None or self.affinity.timeout_s != affinity_timeout_s:
            self.affinity = AffinityTable(affinity_timeout_s, self._clock)
        new: dict[tuple[str, int], Host] = {}
        added: list[Host] = []
        for t in targets:
            level = priority_of(t.cluster, self.local_cluster, self.locality)
            host = self.hosts.get((t.address, t.port))
            if host is None:
                host = self._revive(t) or Host(t, level, self.stats.cluster(t.cluster))
                added.append(host)
            host.cluster, host.ready, host.level = t.cluster, t.ready, level
            host.stats = self.stats.cluster(t.cluster)
            new[host.key] = host
        for key, host in self.hosts.items():
            if key not in new:
                self._retire(host)
        self.hosts = new
        if added:
            self._log_added(added)
        if self._timed_out_at:
            clusters = {h.cluster for h in new.values()}
            self._timed_out_at = {c: t for c, t in self._timed_out_at.items() if c in clusters}
        # Over every host: one revived from draining may bring an ejection that ran out
        # (or runs out) while it was gone, which pick must still see expire.
        self._next_expiry = min((h.ejected_until for h in new.values() if h.ejected_until),
                                default=INF)
        self._rebuild()
        if self.health_checker is not None:
            self.health_checker.sync(list(new.values()))

    def _log_added(self, added: list[Host]) -> None:
        """One line per update, naming at most LOG_ADDED_NAMED endpoints: a line each made
        a gateway's start with 10,000 services of 30 endpoints write 300,000 lines (36 MB),
        enough for the kubelet's log rotation to drop the errors before them."""
        named = ", ".join(f"{h} (priority {h.level})" for h in added[:LOG_ADDED_NAMED])
        more = len(added) - LOG_ADDED_NAMED
        log.info("upstream %s: endpoint%s %s added%s", self.name, "s" if len(added) > 1 else "",
                 named, f", and {more} more" if more > 0 else "")

    def _revive(self, target: Target) -> Host | None:
        """An endpoint that comes back while its old connections drain keeps its state."""
        for host in self.draining:
            if host.key == (target.address, target.port):
                self.draining.discard(host)
                host.removed = False
                self._cancel_drain_timer(host)
                return host
        return None

    def _retire(self, host: Host) -> None:
        host.removed = True
        if not host.conns:
            log.info("upstream %s: endpoint %s removed", self.name, host)
            return
        if self.datagram:
            # A UDP flow never finishes by itself: it lasts while its client keeps sending,
            # so a drain would send to a deleted pod for as long as the client talks. As
            # kube-proxy deletes the conntrack entries of a removed UDP endpoint, its flows
            # end now and the client's next datagram opens a flow to a live endpoint.
            log.info("upstream %s: endpoint %s removed, closing its %d flows",
                     self.name, host, len(host.conns))
            for conn in list(host.conns):
                conn.abort()
            return
        self.draining.add(host)
        grace = self.config.drain_grace_s
        log.info("upstream %s: endpoint %s removed, draining %d connections (grace %s)",
                 self.name, host, len(host.conns), "unlimited" if grace is None else f"{grace}s")
        if grace is not None:
            host.drain_timer = asyncio.get_running_loop().call_later(
                grace, self._drain_expired, host)

    @staticmethod
    def _cancel_drain_timer(host: Host) -> None:
        # A grace belongs to one removal: revived and removed again, the endpoint's
        # connections get the whole grace of the new removal.
        if host.drain_timer is not None:
            host.drain_timer.cancel()
            host.drain_timer = None

    def _drain_expired(self, host: Host) -> None:
        host.drain_timer = None
        if not host.removed or not host.conns:
            return
        log.info("upstream %s: drain grace over for %s, closing %d connections",
                 self.name, host, len(host.conns))
        for conn in list(host.conns):
            conn.abort()

    def close(self) -> None:
        """The service port is gone: every host retires (connections drain as configured)."""
        self.update(())

    # -- the hot path -----------------------------------------------------------------
    def pick(self, client_ip: str | None = None, exclude: Collection[Host] = (),
             last_try: bool = False) -> Host | None:
        """The host for a new connection, or None when the set has nowhere to send it.

        `exclude` holds hosts already tried for this connection: the rest of the chosen
        level is tried first (its clusters not tried yet before the others), then healthy
        hosts of the other levels in priority order (another cluster once the local one is
        exhausted), then anything not yet tried. `last_try`: no attempt follows this one,
        so it goes to a healthy host of a cluster not tried yet when there is one; else a
        local cluster with more endpoints down than the attempts allowed would use them
        all up and fail the client while another cluster is up.
        """
        if self._next_expiry != INF and self._clock() >= self._next_expiry:
            self._expire_ejections()
        affinity = self.affinity
        if affinity is not None and client_ip is not None:
            key = affinity.get(client_ip)
            if key is not None:
                host = self.hosts.get(key)
                # Sticky while pick could choose it: healthy, or its level in panic (then
                # every host of the level is chosen from, and so is this client's), and
                # its level still takes load: a client that spilled to a remote cluster
                # comes back once the local one is healthy again, as Envoy picks the
                # priority before the host and kube-proxy drops filtered endpoints.
                plan = self.plan
                if host is not None and host not in exclude and plan.loads[host.level] and (
                        host.healthy or plan.panic[host.level]):
                    affinity.remember(client_ip, key)
                    return host
                affinity.forget(client_ip)
        avail = self._avail
        if not avail:
            return None
        level = 0 if len(avail) == 1 else choose_level(self.plan.loads, self._randbelow(100))
        hosts = avail[level]
        if exclude:
            away = self._fallback(exclude, {h.cluster for h in exclude}) if last_try else None
            hosts = away or [h for h in hosts if h not in exclude] or self._fallback(exclude)
            if not hosts:
                return None
            if len(hosts) > 1:
                # A connect that timed out hints at a partitioned cluster: its other pods
                # are likely behind the same fault, so spread retries leave it first.
                # Under local-first the level is one cluster and nothing changes.
                tried = {h.cluster for h in exclude}
                fresh = [h for h in hosts if h.cluster not in tried]
                if fresh:
                    hosts = fresh
        host = self._choose(hosts)
        if affinity is not None and client_ip is not None:
            affinity.remember(client_ip, host.key)
        return host

    def _choose(self, hosts: list[Host]) -> Host:
        if len(hosts) == 1:
            return hosts[0]
        if self._least_conn:
            return pick_least_connections(hosts, _active, self._randbelow)
        self._rr += 1
        return pick_round_robin(hosts, self._rr)

    def _fallback(self, exclude: Collection[Host],
                  avoid: Collection[str] | None = None) -> list[Host]:
        """Healthy hosts of the first level that has any, not tried and outside the
        clusters to `avoid`; without `avoid`, anything not tried when none is healthy."""
        for level in self._levels:
            hosts = [h for h in level if h.healthy and h not in exclude
                     and (avoid is None or h.cluster not in avoid)]
            if hosts:
                return hosts
        if avoid is not None:
            return []
        return [h for level in self._levels for h in level if h not in exclude]

    # -- outcomes reported by the proxies ---------------------------------------------
    def connect_ok(self, host: Host, conn: Connection, reset_failures: bool = True) -> None:
        """`conn` now uses `host`. The HTTP proxy passes reset_failures=False: for it a
        connection that opens says nothing about health; `response_status` does."""
        if reset_failures:
            host.consecutive_failures = 0
            host.reached_at = self._clock()
        conns = host.conns
        if conns is NO_CONNS:
            conns = host.conns = set()
        conns.add(conn)
        if host.removed and host not in self.draining:
            # Removed while this connect was under way and with nothing open then, it got
            # no drain (grace timer); the connection escaped --drain-grace for good.
            self._retire(host)

    def release(self, host: Host, conn: Connection) -> None:
        host.conns.discard(conn)
        if host.removed and not host.conns and host in self.draining:
            self.draining.discard(host)
            self._cancel_drain_timer(host)
            log.info("upstream %s: endpoint %s drained", self.name, host)

    def connect_failed(self, host: Host, reason: str) -> None:
        """A local-origin failure (refused, timed out, reset before any byte)."""
        outcome = connect_outcome(reason)
        host.stats.attempts[outcome] += 1
        per_try = reason == PER_TRY_TIMEOUT
        waited = reason == SILENT_WAIT or (
            per_try and self.config.http.per_try_timeout_s >= self.config.connect_timeout_s)
        timed_out = outcome == "timeout" or waited
        if timed_out and self.outlier.consecutive_failures and \
                self._cluster_silent(host, waited=waited):
            # Not one endpoint of the cluster answered during the whole wait: a
            # partition, not a lost SYN (a connect started later would have got through).
            # Waiting for more timeouts would cost more clients a full timeout each.
            self._partitioned(host, reason)
            return
        self._failure(host, reason)

    def _partitioned(self, host: Host, reason: str) -> None:
        host.consecutive_failures += 1
        if not host.ejected:
            self._eject(host, f"{reason} and nothing in {host.cluster} has "
                        f"answered for {self.config.connect_timeout_s:g}s")
        # Only an ejected endpoint's requests give up: one max_ejection_percent keeps
        # in will be used again, and a slow answer on it is still an answer (a 3 s
        # request on a sole endpoint was failed with a 502 after 1.5 s).
        if host.ejected:
            for conn in list(host.conns):
                conn.cluster_silent()
        # The cluster's other endpoints are as silent. A request that has waited a whole
        # connect timeout on one of them, unacknowledged all that time (UpstreamConn:
        # TCP_INFO), is the same evidence: it fails now (retried elsewhere when it may
        # be) and, through connect_failed, that endpoint is ejected in turn. Keep-alive
        # requests on a second local endpoint used to wait out the per-try timeout (2 s
        # in the run, 15 s by default) after the first endpoint's connect timeout had
        # found the cluster blackholed. Not an endpoint max_ejection_percent keeps in,
        # as above, nor a request the endpoint acknowledged: a slow endpoint still
        # answers, a blackholed one cannot acknowledge.
        wait = self.config.connect_timeout_s
        for other in [h for h in self.hosts.values()
                      if h.cluster == host.cluster and h is not host and h.conns]:
            if other.ejected or self._may_eject():
                for conn in list(other.conns):
                    conn.cluster_silent(wait)

    def may_fail_silent(self, host: Host) -> bool:
        """HTTP: a request has waited, unacknowledged, for a connect timeout on `host`
        (Exchange.check_silence). Fail it as SILENT_WAIT when nothing in the cluster
        answered for as long and `host` is ejected or may be: one that
        max_ejection_percent keeps in will be used again, and its requests wait for their
        answer as those of the endpoint whose connect timed out do (`_partitioned`). No
        timeout is recorded here: connect_failed does, if the request fails."""
        since = self._clock() - self.config.connect_timeout_s
        if host.reached_at >= since or any(h.reached_at >= since for h in self.hosts.values()
                                           if h.cluster == host.cluster):
            return False
        return host.ejected or self._may_eject()

    def _may_eject(self) -> bool:
        """One more endpoint may be ejected: never more than max_ejection_percent out."""
        self.expire_due()
        ejected = sum(1 for h in self.hosts.values() if h.ejected)
        return (ejected + 1) * 100 <= self.outlier.max_ejection_percent * len(self.hosts)

    def _cluster_silent(self, host: Host, waited: bool = False,
                        own: Connection | None = None) -> bool:
        """Nothing in `host`'s cluster answered during the wait that just timed out, and
        something else points at a partition rather than one lost SYN: an earlier
        timeout in the cluster with no answer since, an open connection to it, or
        `waited` (the request that timed out was sent before the wait began). On a quiet
        service silence alone holds most of the time (no other client, the last probe
        seconds ago), and one lost SYN (a 1 s connect timeout is Linux's first SYN
        retransmission) ejected the endpoint for 30 s at its first failure. `own`: the
        UDP flow that waited, open to `host` itself, is no other evidence (one lost
        datagram is a lost SYN's like)."""
        now = self._clock()
        cluster = host.cluster
        previous = self._timed_out_at.get(cluster, -INF)
        self._timed_out_at[cluster] = now
        # `host` itself too: removed from the snapshot while its connect was under way,
        # it is in no list of the set, and its cluster may have no host left there.
        peers = [host] + [h for h in self.hosts.values() if h.cluster == cluster]
        answered = max(h.reached_at for h in peers)
        if answered >= now - self.config.connect_timeout_s:
            return False
        if waited or previous > answered:
            return True
        if own is None:
            return any(h.conns for h in peers)
        return any(c is not own for h in peers for c in h.conns)

    def _failure(self, host: Host, reason: str) -> None:
        host.consecutive_failures += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("upstream %s: connect to %s failed: %s", self.name, host, reason)
        limit = self.outlier.consecutive_failures
        if limit and host.consecutive_failures >= limit and not host.ejected:
            self._eject(host, f"{host.consecutive_failures} consecutive failures ({reason})")

    def flow_failed(self, host: Host, reason: str) -> None:
        """UDP: an endpoint went away under a flow already counted ok (port unreachable).
        Not another attempt, as a reset TCP stream is none; still a failure toward
        ejection."""
        self._failure(host, reason)

    def answered(self, host: Host) -> None:
        """UDP: the endpoint replied on a flow. Opening a flow proves nothing (a UDP socket
        connects without a packet), so this, not `connect_ok`, resets the failure count
        that port-unreachable answers build up toward ejection."""
        host.consecutive_failures = 0
        host.reached_at = self._clock()

    def flow_unanswered(self, host: Host, flow: Connection, established: bool = False) -> bool:
        """UDP: `flow` sent datagrams to `host` and got no reply for a connect timeout.
        A one-way protocol never replies, so that alone says nothing; but when the
        service has answered (the flow itself, `established`: replies came, then
        stopped; or any endpoint of the service, this cluster's too), it does reply,
        and when nothing in `host`'s cluster answered for the whole wait and the
        silence is a partition by the rule of connect timeouts (`_cluster_silent`: the
        flow itself is no evidence, so one lost datagram on a quiet service is not one)
        `host` is ejected at once, as by a TCP connect timeout, and the attempt counted
        timed out unless the flow's attempt already counted ok. True when so (the flow
        is to move or end). Not when max_ejection_percent keeps `host` in: the flow
        stays, a late reply is still an answer. Another cluster's answers are not
        required: a local-first service, or a `--workers` process, may never have sent
        elsewhere."""
        if not established and all(h.reached_at == -INF for h in self.hosts.values()):
            return False
        if not self.outlier.consecutive_failures or not self._cluster_silent(host, own=flow):
            return False
        self._partitioned(host, "no reply")
        if not host.ejected:
            return False
        if not established:
            host.stats.attempts["timeout"] += 1
        return True

    def response_status(self, host: Host, status: int) -> None:
        """HTTP: a 5xx counts as a failure toward ejection, anything else resets the count."""
        host.reached_at = self._clock()
        if status >= 500:
            self._failure(host, f"status {status}")
        else:
            host.consecutive_failures = 0

    # -- health state -----------------------------------------------------------------
    def health_result(self, host: Host, failure: str | None, health: HealthConfig) -> None:
        """One active probe's outcome: None on success, else the reason it failed."""
        if host.removed:
            return
        ok = failure is None
        if ok:
            host.reached_at = self._clock()
        if ok == host.active_up:
            host.hc_streak = 0
            return
        host.hc_streak += 1
        needed = health.healthy_threshold if ok else health.unhealthy_threshold
        if host.hc_streak < needed:
            return
        host.active_up = ok
        host.hc_streak = 0
        held = HEALTH_CHANGES_LOG.take(self._clock())
        more = f" ({held} more endpoint health changes not logged before it)" if held > 0 else ""
        if ok:
            if held >= 0:
                log.info("upstream %s: endpoint %s healthy (active check)%s",
                         self.name, host, more)
                self._event("health", f"endpoint {host} healthy (active check){more}")
            if host.ejected:
                # Down by the probes too, and now back past the healthy threshold: the
                # outage the ejection stood for is over (Envoy's
                # successful_active_health_check_uneject_host). Waiting out the ejection
                # kept a cluster that came back without traffic for 30 s, and up to 300 s
                # once ejected again; local-first stayed spilled to remote clusters.
                # An ejection the probes never saw fail (5xx behind a passing health
                # path) has no such transition and runs its time.
                host.ejected_until = 0.0
                host.consecutive_failures = 0
                log.info("upstream %s: endpoint %s returned from ejection (active check)",
                         self.name, host)
                self._event("ejection",
                            f"endpoint {host} returned from ejection (active check)")
        elif held >= 0:
            log.warning("upstream %s: endpoint %s unhealthy (active check: %s)%s",
                        self.name, host, failure, more)
            self._event("health", f"endpoint {host} unhealthy (active check: {failure}){more}")
        self._rebuild()

    def _eject(self, host: Host, why: str) -> None:
        # An ejection that ran out while no pick came must not count against the limit.
        if not self._may_eject():
            if host.consecutive_failures == self.outlier.consecutive_failures:
                log.warning("upstream %s: endpoint %s not ejected (max ejection %d%% reached)",
                            self.name, host, self.outlier.max_ejection_percent)
            return
        now = self._clock()
        base, cap = self.outlier.base_ejection_s, self.outlier.max_ejection_s
        # Envoy's multiplier: ejections in a row lengthen the next, time in service
        # shortens it again (one step per base ejection time). Counting every ejection
        # ever made, one fault a day for ten days had every later lost SYN cost the
        # endpoint the whole 300 s cap.
        if host.backoff:
            host.backoff = max(0, host.backoff - int((now - host.returned_at) // base))
        if base * host.backoff < cap:
            host.backoff += 1
        host.times_ejected += 1
        duration = min(base * host.backoff, cap)
        host.ejected_until = now + duration
        self._next_expiry = min(self._next_expiry, host.ejected_until)
        log.warning("upstream %s: endpoint %s ejected for %.0fs: %s",
                    self.name, host, duration, why)
        host.stats.ejections += 1
        self._event("ejection", f"endpoint {host} ejected for {duration:.0f}s: {why}")
        self._rebuild()

    def expire_due(self) -> None:
        """End the ejections that have run out. `pick` does this check inline (the hot
        path); readers outside it call this before reading hosts, `plan` or the split."""
        if self._next_expiry != INF and self._clock() >= self._next_expiry:
            self._expire_ejections()

    def ejected_for_s(self, host: Host) -> float:
        """Seconds left of `host`'s ejection on this set's clock (0 when not ejected)."""
        return max(0.0, host.ejected_until - self._clock()) if host.ejected else 0.0

    def _expire_ejections(self) -> None:
        now = self._clock()
        nxt = INF
        for host in self.hosts.values():
            if host.ejected_until == 0.0:
                continue
            if host.ejected_until <= now:
                host.returned_at = host.ejected_until
                host.ejected_until = 0.0
                host.consecutive_failures = 0
                log.info("upstream %s: endpoint %s returned from ejection", self.name, host)
                self._event("ejection", f"endpoint {host} returned from ejection")
            else:
                nxt = min(nxt, host.ejected_until)
        self._next_expiry = nxt
        self._rebuild()

    def _rebuild(self) -> None:
        old_split = self._split() if self.events is not None and self.plan.loads else None
        nlevels = 1 + max((h.level for h in self.hosts.values()), default=-1)
        levels: list[list[Host]] = [[] for _ in range(nlevels)]
        for host in self.hosts.values():
            levels[host.level].append(host)
        healthy = [[h for h in lv if h.healthy] for lv in levels]
        plan = priority_load(
            [len(h) for h in healthy],
            [len(lv) for lv in levels],
            self.config.overprovisioning_factor,
            self.config.panic_threshold_percent,
        )
        self._levels = levels
        self._avail = [lv if panic else hl for lv, hl, panic in zip(levels, healthy, plan.panic,
                                                                       strict=True)]
        if not self.hosts:
            self._avail = []
        self.plan = plan
        if plan.panic != self._panic_logged and any(plan.panic) != any(self._panic_logged):
            if any(plan.panic):
                log.warning("upstream %s: panic mode (loads %s, panic %s): balancing over "
                            "unhealthy endpoints too", self.name, plan.loads, plan.panic)
                self._event("panic", f"panic mode (priority loads {list(plan.loads)}): "
                            "balancing over unhealthy endpoints too")
            else:
                log.info("upstream %s: left panic mode (loads %s)", self.name, plan.loads)
                self._event("panic", f"left panic mode (priority loads {list(plan.loads)})")
        self._panic_logged = plan.panic
        if old_split is not None:
            new_split = self._split()
            if new_split != old_split:
                self._event("failover", "traffic split " + _shares(old_split) + " -> "
                            + _shares(new_split))

    def split(self) -> dict[str, float]:
        """Expected percent of new connections per cluster (see `cluster_shares`)."""
        self.expire_due()
        return self._split()

    def _split(self) -> dict[str, float]:
        # Without expire_due: _rebuild compares the split before and after its own change.
        return cluster_shares(self.plan.loads, [[h.cluster for h in lv] for lv in self._avail])

    def _event(self, kind: str, text: str) -> None:
        if self.events is not None:
            self.events.add(kind, self.name, text)

    # -- lifecycle --------------------------------------------------------------------
    def attach_health_checker(self, checker: HealthCheckerLike) -> None:
        self.health_checker = checker
        checker.sync(list(self.hosts.values()))

    async def stop(self) -> None:
        if self.health_checker is not None:
            await self.health_checker.stop()
            self.health_checker = None

    def snapshot_state(self) -> dict[str, object]:
        """Plain data for logs and the admin page."""
        self.expire_due()
        return {
            "locality": self.locality,
            "loads": list(self.plan.loads),
            "panic": list(self.plan.panic),
            "hosts": [
                {"address": h.address, "port": h.port, "cluster": h.cluster, "level": h.level,
                 "healthy": h.healthy, "active_up": h.active_up, "ejected": h.ejected,
                 "active": h.active}
                for h in self.hosts.values()
            ],
            "draining": len(self.draining),
        }


def _shares(split: dict[str, float]) -> str:
    return ", ".join(f"{c} {v:g}%" for c, v in split.items()) or "nowhere"


class HealthCheckerLike(Protocol):
    def sync(self, hosts: list[Host]) -> None: ...
    async def stop(self) -> None: ...
