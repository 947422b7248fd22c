"""The status page's and `mcsproxy status`'s data: clusters x services at a glance.

Health and the expected split come from this process's upstream sets; traffic counters
(connections, requests, active) from the merged metric families, so with `--workers N`
the page shows every process's traffic. The page computes the live split from the
difference between two reads of the counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mcsproxy import compiled
from mcsproxy.observability.families import Families
from mcsproxy.observability.observer import host_state, port_label
from mcsproxy.observability.workers import health_scope

if TYPE_CHECKING:
    from mcsproxy.gateway import Gateway
    from mcsproxy.model import ImportedService, ServicePort, Snapshot
    from mcsproxy.proxy.manager import UpstreamKey
    from mcsproxy.upstream import UpstreamSet

EVENTS_SHOWN = 50
TRAFFIC_SERIES_PER_TURN = 5000
# The families the traffic table reads (labels service, port, cluster first), and which
# column a series counts into, if any.
TRAFFIC_COLUMNS: dict[str, Callable[[tuple[str, ...]], str | None]] = {
    "mcsproxy_proxy_connections":
        lambda key: {"ok": "connections", "failed": "failed"}.get(key[3]),
    # A request no endpoint answered (outcome failed, the last one's cluster) is a failure,
    # as a TCP connection whose every attempt failed: counted in `requests` it showed a
    # cluster refusing every request as "31 total" with no failure, and as live traffic.
    "mcsproxy_http_requests":
        lambda key: "failed" if key[3] == "failed" else "requests",
    "mcsproxy_upstream_active_connections": lambda key: "active",
}


async def traffic_by_cluster(
        families: Families) -> dict[tuple[str, str], dict[str, dict[str, int]]]:
    """(service, port) → cluster → {connections, requests, active, failed} from the
    families, with a turn of the loop every TRAFFIC_SERIES_PER_TURN series (10,000
    services: 100,000 series, made in one go a 43-60 ms stop of the loop). Sample values
    are floats (Prometheus has no other type); these are counts, and the API says so: 3,
    not 3.0."""
    out: dict[tuple[str, str], dict[str, dict[str, int]]] = {}

    def slot(service: str, port: str, cluster: str) -> dict[str, int]:
        return out.setdefault((service, port), {}).setdefault(
            cluster, {"connections": 0, "requests": 0, "active": 0, "failed": 0})

    done = 0
    for name, column_of in TRAFFIC_COLUMNS.items():
        fam = families.by_name.get(name)
        if fam is None:
            continue
        for key, n in fam.values.items():
            column = column_of(key)
            if column is not None:
                slot(key[0], key[1], key[2])[column] += int(n)
            done += 1
            if done % TRAFFIC_SERIES_PER_TURN == 0:
                await asyncio.sleep(0)
    return out


def active_connections(families: Families) -> int:
    """Open client connections (TCP and HTTP) and UDP flows, every process's."""
    active = families.by_name.get("mcsproxy_proxy_active_connections")
    return int(active.total()) if active is not None else 0


def status_parts(gateway: Gateway,
                 traffic: dict[tuple[str, str], dict[str, dict[str, int]]],
                 active: int, ready: bool, detail: dict[str, Any], events_since: int = 0,
                 ) -> tuple[Iterator[tuple[dict[str, Any], int]], Callable[[], dict[str, Any]]]:
    """The status as (its service rows, each with the units of work it cost; the rest).

    The rows are a generator, so an answer can be written as they are built
    (mcsproxy/jsonstream.py); the rest is to be called after them: its `clusters` are
    the ones the rows met. `traffic` and `active` from the families, by
    traffic_by_cluster and active_connections; `ready, detail` as /readyz reports them."""
    snapshot = gateway.store.current
    proxy = gateway.proxy
    observer = gateway.observer
    local = gateway.config.cluster_id
    clusters: set[str] = {local}
    upstreams = {(u.service, u.port_name, u.protocol): (u, s)
                 for u, s in (proxy.upstreams.items() if proxy is not None else ())}

    def rows() -> Iterator[tuple[dict[str, Any], int]]:
        for key in sorted(snapshot.services):
            service = snapshot.services[key]
            clusters.update(service.endpoint_clusters())
            for port in service.ports:
                yield service_row(snapshot, service, port, upstreams.get(
                    (key, port.name, port.protocol)), traffic), 1 + len(service.endpoints)

    def rest() -> dict[str, Any]:
        return {
            "time": time.time(),
            "gateway": {
                "cluster_id": local, "ready": ready, "uptime_s": round(
                    time.time() - observer.started_at, 1),
                "snapshot_version": detail["snapshot_version"],
                "snapshot_age_s": detail["snapshot_age_s"], "services": detail["services"],
                "workers": gateway.config.proxy.workers, "proxy": proxy is not None,
                "active_connections": active,
                "data_path": compiled.STATE, "python": compiled.interpreter(),
                "health_scope": health_scope(gateway.config.proxy.workers)
                if proxy is not None else None,
            },
            "sources": detail["sources"],
            "clusters": sorted(clusters, key=lambda c: (c != local, c)),
            # A `since` past our last event is from before a restart (numbering starts
            # over): all recent events then, and `events_seq` tells the page to start over.
            "events": observer.events.since(
                events_since if events_since <= observer.events.seq else 0, EVENTS_SHOWN),
            "events_seq": observer.events.seq,
            "demo_control": gateway.config.admin.demo_control,
        }

    return rows(), rest


def service_row(snapshot: Snapshot, service: ImportedService, port: ServicePort,
                entry: tuple[UpstreamKey, UpstreamSet] | None,
                traffic: dict[tuple[str, str], dict[str, dict[str, int]]]) -> dict[str, Any]:
    """One service port's row: its endpoints' health per cluster and, with a proxy, the
    expected split, and its traffic per cluster."""
    key = service.key
    plabel = port.name or str(port.port)
    row: dict[str, Any] = {
        "service": str(key), "port": plabel, "number": port.port,
        "protocol": port.protocol, "app_protocol": port.app_protocol,
        "ips": list(service.ips), "headless": service.headless,
        "locality": service.locality, "clusters": {}, "panic": False,
        "loads": [], "served": entry is not None,
    }
    cells: dict[str, dict[str, Any]] = {}
    if entry is not None:
        ukey, upstream = entry
        plabel = port_label(ukey, snapshot)
        upstream.expire_due()  # before reading hosts and plan: see UpstreamSet.expire_due
        row["panic"] = any(upstream.plan.panic)
        row["loads"] = list(upstream.plan.loads)
        split = upstream.split()
        for host in upstream.hosts.values():
            cell = cells.setdefault(host.cluster, {
                "endpoints": 0, "healthy": 0, "unhealthy": 0, "ejected": 0,
                "priority": host.level})
            cell["endpoints"] += 1
            cell[host_state(host)] += 1
        for cluster, cell in cells.items():
            cell["expected_share"] = split.get(cluster, 0.0)
    else:
        for ep in service.endpoints:
            if ep.port_for(port) is None and not service.headless:
                continue
            cell = cells.setdefault(ep.cluster, {
                "endpoints": 0, "healthy": 0, "unhealthy": 0, "ejected": 0})
            cell["endpoints"] += 1
            cell["healthy" if ep.ready else "unhealthy"] += 1
    for cluster, counts in traffic.get((str(key), plabel), {}).items():
        if cluster == "none":
            continue
        cells.setdefault(cluster, {"endpoints": 0, "healthy": 0, "unhealthy": 0,
                                   "ejected": 0}).update(counts)
    row["clusters"] = dict(sorted(cells.items()))
    return row
