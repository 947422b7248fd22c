"""The controller's Prometheus metrics, in a registry of its own (one per controller, so
two controllers in one process, as in tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Propagation is mostly sub-millisecond to tens of ms; keep resolution there.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class ControllerMetrics:
    def __init__(self) -> None:
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
        self.write_errors = Counter(
            "mcsproxy_controller_write_errors_total",
            "Failed writes to member clusters", ["cluster"], registry=r)
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
        self.stream_subscribers = Gauge(
            "mcsproxy_controller_stream_subscribers",
            "Gateways connected to the stream", registry=r)
        self.stream_resyncs = Counter(
            "mcsproxy_controller_stream_resyncs_total",
            "Full snapshots sent to gateways (first connect, too old a version, lagging)",
            registry=r)
