"""The controller's Prometheus metrics, in a registry of its own (one per controller, so
two controllers in one process, as in tests, never collide)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# Propagation is mostly sub-millisecond to tens of ms; keep resolution there.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class ControllerMetrics:
    def set_conflicts(self, conflicts: dict[object, tuple[tuple[str, str], ...]]) -> None:
        counts: dict[str, int] = {}
        for found in conflicts.values():
            for reason, _ in found:
                counts[reason] = counts.get(reason, 0) + 1
        self._conflict_reasons.update(counts)
        for reason in self._conflict_reasons:  # reasons that went away read 0
            self.conflicts.labels(reason).set(counts.get(reason, 0))

    def forget_members(self, clusters: Iterable[str]) -> None:
        """Remove the members' per-cluster gauges (their controller closed): a member that
        left, or a term that ended, kept its last values for the life of the process, so
        a removed member read as connected with its exports. The next controller sets
        those of the members it has."""
        for gauge in (self.member_connected, self.member_input_error, self.stale_endpoints,
                      self.exports):
            for cluster in clusters:
                with contextlib.suppress(KeyError):  # never set for this member
                    gauge.remove(cluster)

    def end_term(self, clusters: Iterable[str]) -> None:
        """A controller closed (its replica stopped leading, or it is rebuilt on other
        members): what it reported of the clusterset is no longer this replica's to
        report. A standby kept its last term's imports and conflicts, so a sum over the
        replicas counted them twice after a handover. The next controller sets them."""
        self.forget_members(clusters)
        self.imports.set(0)
        self.unallocated.set(0)
        self.set_conflicts({})

    def propagation_summary(self) -> dict[str, dict[str, float | None]]:
        """Per stage: changes observed, and the p50/p99 bucket bounds, for /status."""
        buckets: dict[str, list[tuple[float, float]]] = {}
        for metric in self.propagation.collect():
            for s in metric.samples:
                if s.name.endswith("_bucket"):
                    buckets.setdefault(s.labels["stage"], []).append(
                        (float(s.labels["le"]), s.value))
        out: dict[str, dict[str, float | None]] = {}
        for stage, pairs in sorted(buckets.items()):
            pairs.sort()
            total = pairs[-1][1] if pairs else 0.0
            row: dict[str, float | None] = {"count": total}
            for name, q in (("p50", 0.5), ("p99", 0.99)):
                le = next((le for le, n in pairs if total and n >= q * total), None)
                if le is not None and math.isinf(le):
                    # JSON has no Infinity: it was written bare, which no JSON parser
                    # takes (the status page failed on every refresh from then on).
                    row[f"{name}_s"] = None
                    row[f"{name}_above_s"] = max(b for b, _ in pairs if not math.isinf(b))
                else:
                    row[f"{name}_s"] = le
            out[stage] = row
        return out

    def __init__(self) -> None:
        # No `<name>_created` series (the time each counter or histogram was made): the
        # gateway's /metrics has none, and the dashboards read neither. prometheus_client
        # only offers this switch for the whole process.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.propagation = Histogram(
            "mcsproxy_controller_propagation_seconds",
            "Change observed in a member cluster until written (stage=written) or handed "
            "to gateway streams (stage=streamed)",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.reconcile = Histogram(
            "mcsproxy_controller_reconcile_seconds",
            "Time to reconcile one batch of dirty services and write the results",
            buckets=LATENCY_BUCKETS, registry=r)
        self.services_reconciled = Counter(
            "mcsproxy_controller_services_reconciled_total",
            "Service keys reconciled (one per dirty key per batch)", registry=r)
        self.objects_written = Counter(
            "mcsproxy_controller_objects_written_total",
            "Objects created or replaced in member clusters", ["cluster"], registry=r)
        self.objects_deleted = Counter(
            "mcsproxy_controller_objects_deleted_total",
            "Objects deleted from member clusters", ["cluster"], registry=r)
        self.drift_repairs = Counter(
            "mcsproxy_controller_drift_repairs_total",
            "Objects we wrote into member clusters, found changed or removed by someone "
            "else and written again", ["cluster"], registry=r)
        self.unwanted_removed = Counter(
            "mcsproxy_controller_unwanted_removed_total",
            "Objects labelled as ours found in member clusters while running (left by an "
            "earlier controller, made by hand) that nothing wants there, deleted",
            ["cluster"], registry=r)
        self.write_errors = Counter(
            "mcsproxy_controller_write_errors_total",
            "Failed writes to member clusters", ["cluster"], registry=r)
        self.member_secret_errors = Counter(
            "mcsproxy_controller_member_secret_errors_total",
            "Failed requests listing or watching the member Secrets (--member-secrets); "
            "the last good members keep being served", registry=r)
        self.member_connected = Gauge(
            "mcsproxy_controller_member_connected",
            "1 while the member cluster answers, 0 while its endpoints are stale",
            ["cluster"], registry=r)
        self.member_input_error = Gauge(
            "mcsproxy_controller_member_input_error",
            "1 while the member cluster has rejected input (its last good state is used)",
            ["cluster"], registry=r)
        self.stale_endpoints = Gauge(
            "mcsproxy_controller_stale_endpoints",
            "Endpoints exported by a member cluster that stopped answering",
            ["cluster"], registry=r)
        self.imports = Gauge(
            "mcsproxy_controller_service_imports",
            "Services imported somewhere in the clusterset", registry=r)
        self.unallocated = Gauge(
            "mcsproxy_controller_unallocated_services",
            "ClusterSetIP services imported nowhere because no address in their range "
            "was free", registry=r)
        self.stream_subscribers = Gauge(
            "mcsproxy_controller_stream_subscribers",
            "Gateways connected to the stream", registry=r)
        self.conflicts = Gauge(
            "mcsproxy_controller_conflicts",
            "Services whose exports conflict, by KEP-1645 condition reason", ["reason"],
            registry=r)
        self._conflict_reasons: set[str] = set()
        self.exports = Gauge(
            "mcsproxy_controller_exports",
            "ServiceExports (and Karmada MultiClusterServices) in each member cluster",
            ["cluster"], registry=r)
        self.http_connections_closed = Counter(
            "mcsproxy_controller_http_connections_closed",
            "Connections to --serve closed by a limit: connection_limit, client_limit "
            "(refused at accept), head_timeout (no complete request head in time)",
            ["outcome"], registry=r)
        self.stream_resyncs = Counter(
            "mcsproxy_controller_stream_resyncs_total",
            "Full snapshots sent to gateways (first connect, too old a version, lagging)",
            registry=r)
        self.relists_gone = Counter(
            "mcsproxy_controller_relists_gone",
            "Watches of a member cluster that expired (410 Gone: the API server's history "
            "no longer reaches their version) and were listed again, by cluster and "
            "resource; cluster \"\" is the controller's own (--member-secrets)",
            ["cluster", "resource"], registry=r)
        self.stream_dropped = Counter(
            "mcsproxy_controller_stream_dropped_total",
            "Gateway streams closed because the gateway took no data for the write timeout "
            "(stopped reading); it resumes or resyncs when it reconnects", registry=r)
