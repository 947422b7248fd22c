"""`/explain?service=ns/name[&port=]`: where new connections go, and why, in words and JSON.

Everything is read from the balancer itself — `eligible_targets`, `priority_of`,
`level_health`, the upstream set's live `plan` (made by `priority_load`) and its
`split()` — so the explanation cannot drift from what the proxy does. Without a proxy
(`--no-proxy`) the same functions run with every eligible endpoint assumed healthy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcsproxy.config import ProxyConfig
from mcsproxy.model import LOCALITY_ANNOTATION, Endpoint, ImportedService, ServicePort
from mcsproxy.observability.workers import health_scope
from mcsproxy.upstream.balance import (
    cluster_shares,
    eligible_targets,
    level_health,
    priority_load,
    priority_of,
)
from mcsproxy.upstream.upstream_set import UpstreamSet


def locality_reason(service: ImportedService) -> str:
    """Why the locality is what it is; the words put it in parentheses, so it has none."""
    override = service.annotations.get(LOCALITY_ANNOTATION)
    if override in ("local-first", "spread"):
        return f"annotation {LOCALITY_ANNOTATION}: {override}"
    if service.traffic_distribution == "PreferClose":
        return "trafficDistribution: PreferClose"
    return "the KEP-1645 default"


def endpoint_why(ep: Endpoint, port: ServicePort, eligible: bool, any_ready: bool) -> str:
    if ep.port_for(port) is None:
        label = port.name or str(port.port)
        return f"its slice has no port named {label!r}/{port.protocol}"
    if eligible:
        return "ready" if ep.ready else "serving and terminating: used because " \
            "no endpoint is ready"
    if ep.ready:
        return "duplicate address and port"
    if ep.serving and ep.terminating:
        return "serving and terminating: ready endpoints exist" if any_ready \
            else "duplicate address and port"
    return "not ready"


def _clusters(names: list[str]) -> str:
    return ", ".join(sorted(set(names))) or "no cluster"


def explain_port(service: ImportedService, port: ServicePort, local_cluster: str,
                 config: ProxyConfig, upstream: UpstreamSet | None,
                 others_active: Mapping[str, int] | None = None,
                 others_ejected: Mapping[str, Mapping[int, float]] | None = None,
                 ) -> dict[str, Any]:
    """`others_active`: "addr:port" → open connections of the other --workers processes
    (admin.workers_active), added to this process's own. `others_ejected`: "addr:port" →
    worker index → seconds of ejection left, for the endpoints other processes ejected."""
    if upstream is not None:
        upstream.expire_due()  # before reading hosts and plan: see UpstreamSet.expire_due
    others = others_active or {}
    elsewhere = others_ejected or {}
    targets = eligible_targets(service, port)
    eligible = {(t.address, t.port) for t in targets}
    any_ready = any(t.ready for t in targets)
    locality = service.locality
    hosts = upstream.hosts if upstream is not None else {}
    words: list[str] = []
    endpoints = []
    for ep in service.endpoints:
        tport = ep.port_for(port)
        key = (ep.address, tport) if tport is not None else None
        is_eligible = key in eligible
        row: dict[str, Any] = {
            "address": ep.address, "port": tport, "cluster": ep.cluster,
            "ready": ep.ready, "serving": ep.serving, "terminating": ep.terminating,
            "eligible": is_eligible,
            "why": endpoint_why(ep, port, is_eligible, any_ready),
        }
        if is_eligible:
            eligible.discard(key)  # type: ignore[arg-type]  # duplicates: first one only
            row["priority"] = priority_of(ep.cluster, local_cluster, locality)
            host = hosts.get(key)  # type: ignore[arg-type]
            if host is not None:
                row.update(healthy=host.healthy, active_check_up=host.active_up,
                           ejected=host.ejected, times_ejected=host.times_ejected,
                           consecutive_failures=host.consecutive_failures,
                           active_connections=host.active
                           + others.get(f"{host.address}:{host.port}", 0))
                if config.workers > 1:  # as /endpoints: the other processes' ejections
                    row["ejected_by_workers"] = {str(i): left for i, left in sorted(
                        elsewhere.get(f"{host.address}:{host.port}", {}).items())}
            else:
                row["healthy"] = True  # no proxy: Kubernetes' readiness is all we know
        endpoints.append(row)

    nlevels = 1 + max((r["priority"] for r in endpoints if "priority" in r), default=-1)
    total = [0] * nlevels
    healthy = [0] * nlevels
    clusters: list[list[str]] = [[] for _ in range(nlevels)]
    for r in endpoints:
        if "priority" in r:
            total[r["priority"]] += 1
            healthy[r["priority"]] += int(r["healthy"])
            clusters[r["priority"]].append(r["cluster"])
    factor = config.overprovisioning_factor
    threshold = config.panic_threshold_percent
    if upstream is not None:
        plan = upstream.plan
        split = upstream.split()
    else:
        plan = priority_load(healthy, total, factor, threshold)
        split = cluster_shares(plan.loads, [
            [r["cluster"] for r in endpoints if r.get("priority") == i and
             (r["healthy"] or plan.panic[i])] for i in range(nlevels)])

    if locality == "local-first":
        words.append(f"Locality local-first ({locality_reason(service)}): the local cluster "
                     f"{local_cluster} is priority 0, every other cluster priority 1.")
    else:
        words.append(f"Locality spread ({locality_reason(service)}): one priority level with "
                     "every cluster's endpoints, the local one included.")
    excluded = [r for r in endpoints if not r["eligible"]]
    if excluded:
        words.append(f"{len(excluded)} of {len(endpoints)} endpoints are not eligible: "
                     + "; ".join(f"{r['address']} ({r['cluster']}): {r['why']}"
                                 for r in excluded[:5]) + (" ..." if len(excluded) > 5 else "")
                     + ".")
    if not targets:
        words.append("No endpoint is eligible: new connections are refused (reset) after "
                     "the client connects.")

    levels = []
    health_sum = 0
    for i in range(nlevels):
        h = level_health(healthy[i], total[i], factor)
        health_sum += h
        levels.append({"priority": i, "clusters": sorted(set(clusters[i])),
                       "endpoints": total[i], "healthy": healthy[i], "health_percent": h,
                       "load_percent": plan.loads[i] if i < len(plan.loads) else 0,
                       "panic": bool(plan.panic[i]) if i < len(plan.panic) else False})
        words.append(
            f"Priority {i} ({_clusters(clusters[i])}): {healthy[i]} of {total[i]} endpoints "
            f"healthy, x {factor:g} overprovisioning = {h}% health.")
    spill = nlevels > 1 and bool(plan.loads) and plan.loads[0] < 100
    normalized = min(100, health_sum)
    total_panic = bool(targets) and normalized < 100 and all(
        lv["panic"] for lv in levels if lv["endpoints"])
    if total_panic:
        words.append(f"Total health is {normalized}% and every level is in panic: health "
                     "says nothing, so loads follow the number of endpoints per level "
                     "(Envoy's total panic).")
    elif nlevels and normalized < 100 and health_sum > 0:
        words.append(f"Total health is {normalized}% (< 100%): loads are scaled in proportion "
                     "to each level's health.")
    elif nlevels and health_sum == 0 and targets:
        words.append("No level has any health and panic is off: the first level with "
                     "endpoints takes everything, over all of them.")
    if spill:
        words.append(f"Priority 0 takes {plan.loads[0]}% of new connections; "
                     f"{100 - plan.loads[0]}% spill to priority 1"
                     + (" and beyond" if nlevels > 2 else "") + ".")
    elif nlevels > 1 and plan.loads:
        words.append("Priority 0 is healthy enough to take 100% of new connections; "
                     "nothing spills.")
    for lv in levels:
        if lv["panic"]:
            pct = lv["healthy"] * 100 // lv["endpoints"] if lv["endpoints"] else 0
            words.append(f"Priority {lv['priority']} is in panic: {pct}% of its endpoints are "
                         f"healthy, below the {threshold}% panic threshold, so it balances over "
                         f"all {lv['endpoints']}, healthy or not.")
    if split:
        words.append("Expected split of new connections: " + ", ".join(
            f"{c} {v:g}%" for c, v in split.items()) + f" ({config.lb_policy} inside each "
            "level).")
    if service.session_affinity == "ClientIP":
        words.append(f"sessionAffinity ClientIP ({service.affinity_timeout_s}s): a client "
                     "keeps its endpoint while it stays healthy (or its level is in panic) and "
                     "its level takes load.")
    if upstream is None:
        words.append("No proxy runs here (--no-proxy): health is assumed from readiness.")
    scope = health_scope(config.workers) if upstream is not None else None
    if scope is not None:
        words.append(scope[0].upper() + scope[1:] + ".")
    return {
        "port": {"name": port.name, "port": port.port, "protocol": port.protocol,
                 "app_protocol": port.app_protocol},
        "locality": locality, "locality_reason": locality_reason(service),
        "lb_policy": config.lb_policy, "overprovisioning_factor": factor,
        "panic_threshold_percent": threshold, "live": upstream is not None,
        "endpoints": endpoints, "levels": levels, "split": split,
        "spill": spill, "panic": any(plan.panic), "health_scope": scope, "words": words,
    }


def explain(service: ImportedService, port_filter: str | None, local_cluster: str,
            config: ProxyConfig, upstreams: Mapping[tuple[str, str], UpstreamSet] | None,
            others_active: Mapping[str, Mapping[str, int]] | None = None,
            others_ejected: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
            ) -> dict[str, Any]:
    """The explanation of every (or the one asked for) port of a service.

    `upstreams` maps (port name, protocol) to the live upstream set; None without a proxy.
    `others_active`: the other --workers processes' open connections by upstream set name
    and "addr:port" (admin.workers_active); `others_ejected` their ejections, by upstream
    set name, "addr:port" and worker index (WorkerReports.ejected).
    """
    ports = [p for p in service.ports if port_filter in (None, p.name, str(p.port))]
    out: dict[str, Any] = {"service": str(service.key), "type": service.type,
                           "ips": list(service.ips), "local_cluster": local_cluster,
                           "ports": []}
    if service.headless:
        out["words"] = ["Headless service: DNS answers with every ready endpoint's address; "
                        "no proxy, no balancing here."]
        return out
    for port in ports:
        if port.protocol == "SCTP":
            out["ports"].append({"port": {"name": port.name, "port": port.port,
                                          "protocol": "SCTP"},
                                 "words": ["SCTP ports are not proxied."]})
            continue
        upstream = upstreams.get((port.name, port.protocol)) if upstreams is not None else None
        if upstreams is not None and upstream is None:
            out["ports"].append({"port": {"name": port.name, "port": port.port,
                                          "protocol": port.protocol},
                                 "words": ["Not served yet: the proxy has not applied the "
                                           "snapshot with this port."]})
            continue
        out["ports"].append(explain_port(
            service, port, local_cluster, config, upstream,
            (others_active or {}).get(upstream.name) if upstream is not None else None,
            (others_ejected or {}).get(upstream.name) if upstream is not None else None))
    out["words"] = [w for p in out["ports"] for w in p["words"]]
    return out
