"""The gateway's observer: event ring, access log, snapshot timing and worker reports,
and `collect()`, which turns every counter of this process into metric families.

Metric names follow `mcsproxy_<subsystem>_<name>_<unit>`; labels are bounded (service,
port, cluster, outcome, qtype, rcode, source, priority; never a client address).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mcsproxy.gc_pause import collector_off
from mcsproxy.jsonstream import Turns
from mcsproxy.model import ServiceKey, Snapshot
from mcsproxy.observability.accesslog import AccessLog
from mcsproxy.observability.events import EventRing
from mcsproxy.observability.families import Families
from mcsproxy.observability.stats import (
    APPLY_BUCKETS,
    CONNECT_BUCKETS,
    DNS_BUCKETS,
    REQUEST_BUCKETS,
    Buckets,
    UpstreamStats,
)
from mcsproxy.observability.workers import RETIRED_KEEP_S, WorkerReporter, WorkerReports
from mcsproxy.proxy.udp import DROP_REASONS as UDP_DROP_REASONS
from mcsproxy.proxy.workers import WorkerPool
from mcsproxy.tasks import cancel_and_wait, spawn

if TYPE_CHECKING:
    from mcsproxy.gateway import Gateway
    from mcsproxy.proxy.manager import UpstreamKey
    from mcsproxy.upstream import UpstreamSet

log = logging.getLogger("mcsproxy.observability")

SOURCE_POLL_S = 1.0
HOST_STATES = ("healthy", "unhealthy", "ejected")


def port_label(ukey: UpstreamKey, snapshot: Snapshot) -> str:
    """The service port's name, or its number when unnamed (then it is the only port)."""
    if ukey.port_name:
        return ukey.port_name
    service = snapshot.services.get(ukey.service)
    if service is not None:
        for p in service.ports:
            if p.name == "" and p.protocol == ukey.protocol:
                return str(p.port)
    return "-"


def host_state(host: Any) -> str:
    if host.ejected:
        return "ejected"
    return "healthy" if host.active_up else "unhealthy"


class Observer:
    """Component: started first, stopped last, so every other component can report."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        config = gateway.config
        self.worker_index = config.proxy.worker_index
        self.events = EventRing()
        self.access_log: AccessLog | None = (
            AccessLog(config.access_log, config.access_log_format)
            if config.access_log else None)
        self.apply_time = Buckets(APPLY_BUCKETS)
        self.started_at = time.time()
        self.workers = WorkerReports(config.proxy.workers) \
            if config.proxy.workers > 1 and self.worker_index == 0 else None
        self.reporter = WorkerReporter(self.worker_index, self.worker_report,
                                       ejections=self.worker_ejections) \
            if self.worker_index > 0 else None
        self._sources: dict[str, tuple[bool, bool, str | None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        # Counters must not go backwards while a series is exported: a service port
        # removed and imported again between two scrapes gets a new upstream set with
        # counters at 0, and the old set's draining connections still count into the
        # old one. So the sets a port had are kept and summed (see _retire_upstreams).
        self._last_upstreams: dict[UpstreamKey, UpstreamSet] = {}
        # Per port: retired sets with connections still open (their bytes still grow),
        # and the counters of those done, folded into one (so a port that flaps for
        # weeks holds one object, not every set it ever had).
        self._retired: dict[UpstreamKey, tuple[UpstreamStats, list[UpstreamSet]]] = {}
        self._seen_at: dict[UpstreamKey, float] = {}
        self._expired_connections = 0
        self._collecting = asyncio.Lock()  # gather(): one collection at a time

    # -- component --------------------------------------------------------------------
    async def start(self) -> None:
        if self.access_log is not None:
            await self.access_log.start()
        if self.reporter is not None:
            try:
                await self.reporter.start()
            except OSError as exc:
                # The proxy matters more than its counters: serve, and say why they are missing.
                log.warning("worker %d cannot report metrics to the main process: %s",
                            self.worker_index, exc)
                self.reporter = None
            return
        self.gateway.store.subscribe(self._on_snapshot)
        self._tasks.append(spawn(self._watch_sources(), name="observer sources"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.reporter is not None:
            await self.reporter.stop()
        if self.access_log is not None:
            await self.access_log.stop()

    # -- events -----------------------------------------------------------------------
    def _on_snapshot(self, snapshot: Snapshot) -> None:
        changed = sorted(str(k) for k in snapshot.changed)
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                          else "")
        self.events.add("snapshot", f"v{snapshot.version}",
                        f"{len(snapshot.services)} services, {len(changed)} changed"
                        + (f" ({shown})" if changed else ""))
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(spawn(self._time_apply(snapshot), name="observer apply timing"))

    async def _time_apply(self, snapshot: Snapshot) -> None:
        """Built (the snapshot's wall-clock stamp) until DNS and proxy serve it."""
        proxy = self.gateway.proxy
        if proxy is not None:
            await proxy.wait_applied(snapshot.version)
        if snapshot.built_at:
            self.apply_time.observe(max(0.0, time.time() - snapshot.built_at))

    async def _watch_sources(self) -> None:
        while True:
            for name, st in self.gateway.store.sources.items():
                now = (st.connected, st.synced, st.error)
                before = self._sources.get(name)
                if before != now:
                    self._sources[name] = now
                    if before is not None or not st.connected or st.error:
                        state = "connected" if st.connected else "disconnected"
                        state += ", synced" if st.synced else ", not synced"
                        self.events.add("source", name, state +
                                        (f" (error: {st.error})" if st.error else ""))
            await asyncio.sleep(SOURCE_POLL_S)

    # -- metrics ----------------------------------------------------------------------
    async def gather(self) -> Families:
        """This process's families, plus every worker's when there are workers.

        Collected a few upstream sets at a time, the loop given a turn between them
        (the proxy and DNS run on it: 10,000 services made 500,000 series, 0.7 s of
        work). One collection at a time, as each retires the upstream sets replaced
        since the one before."""
        # The cyclic collector off meanwhile (gc_pause.collector_off): every series is a
        # new object that lives until the answer is sent, and their numbers set off full
        # collections, each a stop of the loop (measured with a worker's report of 360,000
        # series merged into a frozen heap: 20-30 of 20-100 ms each, for nothing to free).
        with collector_off():
            async with self._collecting:
                families = Families()
                turns = Turns()
                for units in self._collect_steps(families):
                    if turns.due(units):
                        await asyncio.sleep(0)
            if self.workers is not None:
                await self.workers.merge_into(families)
                families.gauge("mcsproxy_gateway_workers_reporting",
                               "Extra proxy worker processes that answered this scrape").add(
                    (), self.workers.reporting)
                for pool in self.gateway.components:
                    if isinstance(pool, WorkerPool):
                        deaths = families.counter(
                            "mcsproxy_gateway_worker_restarts",
                            "Proxy worker processes restarted, by why they ended: exited "
                            "(a crash, a kill) or stuck (no heartbeat: killed)", ["reason"])
                        for reason, n in pool.deaths.items():
                            deaths.add([reason], n)
        return families

    async def worker_report(self) -> tuple[Families, Iterator[tuple[str, dict[str, int]]]]:
        """What a worker sends the main process (WorkerReporter): its families, gathered
        with turns of the loop, and its open connections per endpoint of each upstream
        set, made one set at a time as the report is written."""
        families = await self.gather()
        proxy = self.gateway.proxy
        upstreams = list(proxy.upstreams.values()) if proxy is not None else []
        return families, ((u.name, {f"{h.address}:{h.port}": h.active
                                    for h in u.hosts.values()}) for u in upstreams)

    def worker_ejections(self) -> dict[str, dict[str, float]]:
        """A worker's ejections for its report: upstream set → "addr:port" → seconds
        left. Each process ejects on the failures it sees, so the main process's pages
        alone showed an endpoint this worker keeps out as in service."""
        proxy = self.gateway.proxy
        out: dict[str, dict[str, float]] = {}
        for upstream in proxy.upstreams.values() if proxy is not None else ():
            upstream.expire_due()
            ejected = {f"{h.address}:{h.port}": round(upstream.ejected_for_s(h), 1)
                       for h in upstream.hosts.values() if h.ejected}
            if ejected:
                out[upstream.name] = ejected
        return out

    def _collect_steps(self, f: Families) -> Iterator[int]:
        """Fill `f`, yielding the units of work done (upstream sets, endpoints) as it
        goes: the caller may give the loop a turn at each."""
        if self.worker_index == 0:
            self._collect_dns(f)
            self._collect_store(f)
            closed = f.counter("mcsproxy_admin_connections_closed",
                               "Admin connections closed by a limit: connection_limit, "
                               "client_limit (refused at accept), head_timeout (no complete "
                               "request head in time), answer_timeout (a /metrics answer not "
                               "read in time)", ["outcome"])
            for reason, n in self.gateway.admin.guard.closed.items():
                closed.add([reason], n)
        yield from self._collect_proxy(f)
        if self.access_log is not None:
            records = f.counter("mcsproxy_accesslog_records",
                                "Access log records by fate (written, dropped: queue full "
                                "or write error)", ["outcome"])
            records.add(["written"], self.access_log.written)
            records.add(["dropped"], self.access_log.dropped + self.access_log.write_failed)

    def _collect_dns(self, f: Families) -> None:
        stats = self.gateway.dns.stats
        stats.fold()
        queries = f.counter("mcsproxy_dns_queries",
                            "DNS queries answered, by transport, question type and rcode "
                            "(dropped: not answered)", ["transport", "qtype", "rcode"])
        for key, n in stats.counts.items():
            queries.add(key, n)
        latency = f.histogram("mcsproxy_dns_query_duration_seconds",
                              "Time to answer a query that missed the answer memo (built) "
                              "or was forwarded (forwarded); memo hits are not timed",
                              ["path"], DNS_BUCKETS)
        for path, buckets in stats.latency.items():
            latency.observe_buckets([path], buckets)
        failures = f.counter("mcsproxy_dns_forward_failures",
                             "Forwarded queries the gateway answered SERVFAIL itself, by "
                             "outcome (timeout: the upstream did not answer in time; "
                             "pending_full: too many forwards pending; client_limit: too "
                             "many pending for the client's address)",
                             ["outcome"])
        for outcome, n in stats.forward_failures.items():
            failures.add([outcome], n)
        mismatches = f.counter("mcsproxy_dns_forward_mismatched_answers",
                               "Upstream answers dropped because their question was not "
                               "the one sent (question: another one, forged or misrouted; "
                               "case: the same name in another letter case, DNS 0x20)",
                               ["outcome"])
        for reason, n in stats.forward_mismatches.items():
            mismatches.add([reason], n)

    def _collect_store(self, f: Families) -> None:
        store = self.gateway.store
        snap = store.current
        f.gauge("mcsproxy_snapshot_version", "Version of the snapshot being served").add(
            (), snap.version)
        f.gauge("mcsproxy_snapshot_age_seconds", "Seconds since the served snapshot was "
                "built (0 before the first)").add(
            (), max(0.0, time.time() - snap.built_at) if snap.built_at else 0.0)
        f.gauge("mcsproxy_snapshot_services", "Services in the served snapshot").add(
            (), len(snap.services))
        f.histogram("mcsproxy_snapshot_apply_duration_seconds",
                    "Snapshot built until DNS and every listener serve it", [],
                    APPLY_BUCKETS).observe_buckets((), self.apply_time)
        connected = f.gauge("mcsproxy_source_connected", "1 while the source reaches its "
                            "origin", ["source"])
        synced = f.gauge("mcsproxy_source_synced", "1 once the source delivered its initial "
                         "state", ["source"])
        objects = f.gauge("mcsproxy_source_objects", "Objects the source holds", ["source"])
        # Connected and synced say nothing of input the source refused: a file source with
        # a rejected file (serving its last good version) read 1 and 1, healthy, to any
        # alert; only /readyz named the error.
        failing = f.gauge("mcsproxy_source_error", "1 while the source reports an error (a "
                          "rejected file or object, a failing connection: /readyz says "
                          "which); the last good state keeps serving", ["source"])
        for name, st in store.sources.items():
            connected.add([name], int(st.connected))
            synced.add([name], int(st.synced))
            objects.add([name], st.objects)
            failing.add([name], int(st.error is not None))
        ready = store.loaded.is_set() and not self.gateway.stopping
        f.gauge("mcsproxy_gateway_ready", "1 while /readyz says ready").add((), int(ready))
        f.gauge("mcsproxy_gateway_start_time_seconds", "Unix time the gateway started").add(
            (), self.started_at)

    def _collect_proxy(self, f: Families) -> Iterator[int]:
        proxy = self.gateway.proxy
        if proxy is None:
            return
        snap = proxy.store.current
        svc = ["service", "port"]
        conns = f.counter("mcsproxy_proxy_connections",
                          "Client connections (UDP: flows) by destination cluster and "
                          "outcome: ok (connected), failed (every attempt failed; the last "
                          "one's cluster), no_endpoint (cluster none)",
                          [*svc, "cluster", "outcome"])
        attempts = f.counter("mcsproxy_upstream_connect_attempts",
                             "Upstream connect attempts by outcome (ok, refused, timeout, "
                             "error)", [*svc, "cluster", "outcome"])
        connect_time = f.histogram("mcsproxy_upstream_connect_duration_seconds",
                                   "Upstream connect latency of successful attempts "
                                   "(UDP: flow opened until the endpoint's first reply; "
                                   "flows it never answers are not timed)",
                                   [*svc, "cluster"], CONNECT_BUCKETS)
        retries = f.counter("mcsproxy_proxy_retries",
                            "Attempts after the first on another endpoint (TCP connects, "
                            "HTTP requests)", svc)
        exhausted = f.counter("mcsproxy_proxy_retry_budget_exhausted",
                              "HTTP retries refused because the retry budget was spent", svc)
        nbytes = f.counter("mcsproxy_proxy_transferred_bytes",
                           "Bytes relayed, by direction (to_upstream, to_client)",
                           [*svc, "cluster", "direction"])
        active = f.gauge("mcsproxy_upstream_active_connections",
                         "Open connections to the cluster's endpoints", [*svc, "cluster"],
                         summed=True)
        endpoints = f.gauge("mcsproxy_upstream_endpoints",
                            "Endpoints by health state (healthy, unhealthy: failing active "
                            "checks, ejected: outlier detection); with --workers N the main "
                            "process's own",
                            [*svc, "cluster", "state"])
        ejections = f.counter("mcsproxy_upstream_ejections",
                              "Outlier ejections of the cluster's endpoints", [*svc, "cluster"])
        requests = f.counter("mcsproxy_http_requests",
                             "HTTP requests by destination cluster and outcome (status class "
                             "or error)", [*svc, "cluster", "outcome"])
        request_time = f.histogram(
            "mcsproxy_http_request_duration_seconds",
            "HTTP request duration: from the request head received in full to the last "
            "byte of the response handed to the client connection's transport (reset, "
            "client_closed: to where the request ended), by destination cluster as in "
            "mcsproxy_http_requests_total; no_endpoint requests are not timed",
            [*svc, "cluster"], REQUEST_BUCKETS)
        load = f.gauge("mcsproxy_upstream_priority_load_percent",
                       "Share of new connections each priority level receives", [*svc, "priority"])
        panic = f.gauge("mcsproxy_upstream_panic", "1 while the priority level is in panic "
                        "(balancing over unhealthy endpoints too)", [*svc, "priority"])
        share = f.gauge("mcsproxy_upstream_expected_share_percent",
                        "Share of new connections each cluster is expected to receive",
                        [*svc, "cluster"])
        self._retire_upstreams(proxy.upstreams)
        total_ok = self._expired_connections
        for ukey, (folded, sets) in self._retired.items():
            if ukey not in proxy.upstreams:  # not exported now, but still counted below
                total_ok += _carried(folded, sets)
        # The sets as they are now: the proxy may replace some while this yields.
        for ukey, upstream in list(proxy.upstreams.items()):
            labels = [str(ukey.service), port_label(ukey, snap)]
            folded, sets = self._retired.get(ukey, (None, []))
            for counted in (folded, *sets, upstream):
                if counted is None:
                    continue
                st = counted if isinstance(counted, UpstreamStats) else counted.stats
                conns.add([*labels, "none", "no_endpoint"], st.no_endpoint)
                for outcome, n in st.unrouted.items():
                    requests.add([*labels, "none", outcome], n)
                retries.add(labels, st.retries)
                exhausted.add(labels, st.retry_budget_exhausted)
                live = {} if isinstance(counted, UpstreamStats) else _live_bytes(counted)
                for cluster, cs in st.clusters.items():
                    cl = [*labels, cluster]
                    conns.add([*cl, "ok"], cs.connections)
                    conns.add([*cl, "failed"], cs.failed)
                    total_ok += cs.connections
                    for outcome, n in cs.attempts.items():
                        attempts.add([*cl, outcome], n)
                    connect_time.observe_buckets(cl, cs.connect_time)
                    up, down = live.get(cluster, (0, 0))
                    nbytes.add([*cl, "to_upstream"], cs.bytes_to_upstream + up)
                    nbytes.add([*cl, "to_client"], cs.bytes_to_client + down)
                    ejections.add(cl, cs.ejections)
                    if cs.requests:  # HTTP ports only: TCP and UDP get no empty series
                        for outcome, n in cs.requests.items():
                            requests.add([*cl, outcome], n)
                            total_ok += n
                        request_time.observe_buckets(cl, cs.request_time)
            # Summed per cluster here, then one series each: a Family.add per endpoint
            # was 720,000 of a gather's 1.3M at 6,000 services of 2 ports and 30 endpoints.
            open_by_cluster = dict.fromkeys(upstream.stats.clusters, 0)
            by_state = {(cluster, state): 0 for cluster in upstream.stats.clusters
                        for state in HOST_STATES}
            upstream.expire_due()  # an ejection that ran out while no connection came
            for host in upstream.hosts.values():
                cluster = host.cluster
                open_by_cluster[cluster] = open_by_cluster.get(cluster, 0) + host.active
                key = (cluster, host_state(host))
                by_state[key] = by_state.get(key, 0) + 1
            for cluster, n in open_by_cluster.items():
                active.add((*labels, cluster), n)
            for (cluster, state), n in by_state.items():
                endpoints.add((*labels, cluster, state), n)
            for level, (pct, in_panic) in enumerate(zip(upstream.plan.loads, upstream.plan.panic,
                                                        strict=True)):
                load.add([*labels, str(level)], pct)
                panic.add([*labels, str(level)], int(in_panic))
            for cluster, pct in upstream.split().items():
                share.add([*labels, cluster], pct)
            yield 1 + len(upstream.hosts)
        # HTTP client connections live in the engine's own set, not in proxy.conns (that
        # one is the TCP and UDP idle sweep's); without them a keep-alive client read 0.
        f.gauge("mcsproxy_proxy_active_connections", "Open client connections (TCP and "
                "HTTP) and UDP flows", summed=True).add(
            (), len(proxy.conns) + len(proxy.http.clients))
        f.gauge("mcsproxy_proxy_listeners", "Listening sockets (ClusterSetIP x port)").add(
            (), len(proxy.listeners))
        f.gauge("mcsproxy_proxy_listeners_failing",
                "Listeners a service wants that could not bind now (the address is held "
                "elsewhere; tried again with backoff, /readyz lists them)").add(
            (), len(proxy.failing_listeners()))
        refused = f.counter("mcsproxy_proxy_refused",
                            "Client connections and UDP flows turned away before any endpoint "
                            "was tried, by outcome: listener_limit, client_limit "
                            "(--max-connections-per-listener/-client), udp_flow_limit "
                            "(--udp-max-flows, a quarter of it per client address), "
                            "out_of_descriptors (or memory; UDP: local ports)", ["outcome"])
        for outcome, n in proxy.refusals.items():
            refused.add([outcome], n)
        udp_dropped = f.counter("mcsproxy_proxy_udp_dropped",
                                "UDP datagrams dropped by the proxy, by reason: " + "; ".join(
                                    f"{r}: {why}" for r, why in UDP_DROP_REASONS.items()),
                                ["reason"])
        for reason, n in proxy.udp_drops.counts.items():
            udp_dropped.add([reason], n)
        # Its own family, not proxy_refused_total: that one counts connections turned away
        # at accept by outcome; these are requests (a front door connection can have many)
        # answered with a status, and a sum over both would mean nothing.
        http_refused = f.counter("mcsproxy_http_refused",
                                 "HTTP requests refused before a service was chosen (not in "
                                 "mcsproxy_http_requests_total), by listener_kind (listener: "
                                 "a ClusterSetIP, front_door: --http-listen), status sent "
                                 "(none: closed without one) and reason",
                                 ["listener_kind", "status", "reason"])
        for key, n in proxy.http.refused.items():
            http_refused.add(key, n)
        # HTTP counts its requests: its endpoint connections are pooled, and an HTTP-only
        # gateway read 0 here for every process.
        f.counter("mcsproxy_proxy_worker_connections",
                  "TCP connections, UDP flows and HTTP requests each proxy process carried "
                  "(how --workers share the load)",
                  ["worker"]).add([str(self.worker_index)], total_ok)

    def _retire_upstreams(self, live: dict[UpstreamKey, UpstreamSet]) -> None:
        """Keep the upstream sets replaced or removed since the last collection, per
        service port, until the port has been gone for RETIRED_KEEP_S."""
        now = time.monotonic()
        # A set still live under another key is a renamed port's (ProxyManager's
        # _keep_renamed): its counters go on in the new series, not twice.
        kept = {id(u) for u in live.values()}
        for ukey, old in self._last_upstreams.items():
            if live.get(ukey) is not old and id(old) not in kept:
                self._retired.setdefault(ukey, (UpstreamStats(), []))[1].append(old)
        self._last_upstreams = dict(live)
        for folded, sets in self._retired.values():
            for old in [u for u in sets if not u.draining
                        and not any(h.conns for h in u.hosts.values())]:
                sets.remove(old)
                folded.absorb(old.stats)
        for ukey in live:
            if ukey in self._retired:
                self._seen_at[ukey] = now
        for ukey in [k for k in self._retired if k not in live]:
            seen = self._seen_at.setdefault(ukey, now)
            if now - seen > RETIRED_KEEP_S:
                # The series is long gone: its connections stay in the worker's total.
                folded, sets = self._retired.pop(ukey)
                self._expired_connections += _carried(folded, sets)
                del self._seen_at[ukey]


def _carried(folded: UpstreamStats, sets: list[UpstreamSet]) -> int:
    """What a retired port adds to mcsproxy_proxy_worker_connections_total: its TCP
    connections, UDP flows and HTTP requests, the same sum whether it is retired or
    forgotten (HTTP requests were dropped at forgetting, and the counter went down)."""
    return sum(cs.connections + sum(cs.requests.values())
               for st in (folded, *(u.stats for u in sets)) for cs in st.clusters.values())


def _live_bytes(upstream: UpstreamSet) -> dict[str, tuple[int, int]]:
    """Bytes of connections still open, per cluster (ended ones are in the counters)."""
    out: dict[str, tuple[int, int]] = {}
    for host in (*upstream.hosts.values(), *upstream.draining):
        if not host.conns:
            continue
        up = down = 0
        for conn in host.conns:
            up += getattr(conn, "sent", 0)
            down += getattr(conn, "received", 0)
        a, b = out.get(host.cluster, (0, 0))
        out[host.cluster] = (a + up, b + down)
    return out


def service_key(text: str) -> ServiceKey | None:
    ns, sep, name = text.partition("/")
    return ServiceKey(ns, name) if sep and ns and name else None
