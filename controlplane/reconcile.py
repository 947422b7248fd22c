"""KEP-1645 (and Karmada MultiClusterService) as pure functions, one service key at a time.

`resolve()` settles one service across the clusterset: who exports it validly, who
imports it, the merged ports and properties (oldest export wins), and every conflict.
`render()` turns that into objects: one ServiceImport shared by every consumer, imported
EndpointSlices per source cluster, and each ServiceExport with its conditions.
`reconcile_clusterset()` runs both over every key for the table tests; the controller
(`--once` included) calls the per-key functions for dirty keys only, so one change costs
work for one service, not for the clusterset.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from controlplane.allocator import (
    DEFAULT_CIDR,
    AllocationError,
    ClusterSetIPAllocator,
    parse_cidrs,
)
from controlplane.clusters.state import ClusterObjects
from controlplane.conditions import Conditions, condition, conditions_by_type
from controlplane.resources import (
    CONTROLLER_MANAGER,
    EXTERNAL_NAME,
    KIND_EXPORT,
    KIND_IMPORT,
    KIND_SLICE,
    ExportInfo,
    McsInfo,
    ObjectRef,
    PortInfo,
    ServiceInfo,
)
from mcsproxy.manifests import LABEL_MANAGED_BY, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, SliceSpec
from mcsproxy.model import EMPTY_MAPPING, Endpoint, ServiceKey

IMPORT_API_VERSION = "multicluster.x-k8s.io/v1alpha1"
MAX_ENDPOINTS_PER_SLICE = 100
STALE_ANNOTATION = "mcsproxy.io/stale"
_OWNER_UID_NAMESPACE = uuid.UUID("5b0c1f0e-4a7e-4d0b-9a38-6d6373707278")

Obj = dict[str, Any]


# -- inputs ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MemberInput:
    """What one member cluster says about one service key."""

    cluster: str
    has_namespace: bool = True
    service: ServiceInfo | None = None
    slices: tuple[SliceSpec, ...] = ()
    export: ExportInfo | None = None
    mcs: McsInfo | None = None
    stale: bool = False  # the cluster stopped answering: this is its last known state
    previous_conditions: Conditions = field(default_factory=lambda: EMPTY_MAPPING)


@dataclass(frozen=True, slots=True)
class ServiceInputs:
    key: ServiceKey
    members: tuple[MemberInput, ...]  # every member cluster, sorted by name


def member_input(
    key: ServiceKey,
    cluster: str,
    objects: ClusterObjects,
    stale: bool = False,
    previous_conditions: Conditions = EMPTY_MAPPING,
) -> MemberInput:
    return MemberInput(
        cluster=cluster,
        has_namespace=key.namespace in objects.namespaces,
        service=objects.services.get(key),
        slices=objects.slices_for(key),
        export=objects.exports.get(key),
        mcs=objects.mcs.get(key),
        stale=stale,
        previous_conditions=previous_conditions,
    )


# -- resolution --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Exporter:
    cluster: str
    created: datetime
    service: ServiceInfo
    export: ExportInfo | None  # None: a Karmada MultiClusterService provider


@dataclass(frozen=True, slots=True)
class Resolution:
    key: ServiceKey
    exporters: tuple[Exporter, ...] = ()  # oldest first; the first one wins conflicts
    consumers: tuple[str, ...] = ()
    type: str = "ClusterSetIP"
    ports: tuple[PortInfo, ...] = ()
    session_affinity: str = "None"
    affinity_timeout_s: int | None = None
    internal_traffic_policy: str = "Cluster"
    traffic_distribution: str | None = None
    ip_families: tuple[str, ...] = ("IPv4",)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAPPING)
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAPPING)
    conflicts: tuple[tuple[str, str], ...] = ()  # (reason, message)
    invalid: Mapping[str, tuple[str, str]] = field(default_factory=lambda: EMPTY_MAPPING)
    # Why a ClusterSetIP service is imported nowhere for now: no address was free for it.
    unallocated: str | None = None

    @property
    def imported(self) -> bool:
        return bool(self.exporters and self.consumers)

    @property
    def needs_ips(self) -> bool:
        return self.imported and self.type == "ClusterSetIP"


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _property_conflict(
    reason: str,
    what: str,
    exporters: Sequence[Exporter],
    value: Callable[[Exporter], Any],
    total: int | None = None,
) -> tuple[str, str] | None:
    """`exporters` are those compared; `total` (default: all of them) those exporting."""
    if len(exporters) < 2:
        return None
    winner = value(exporters[0])
    disagree = sum(1 for e in exporters[1:] if value(e) != winner)
    if not disagree:
        return None
    return reason, (
        f"Conflicting {what}. Using {_shown(winner)} from oldest service export in "
        f'"{exporters[0].cluster}". {disagree}/{total or len(exporters)} clusters disagree.'
    )


def _merge_ports(
    exporters: Sequence[Exporter],
) -> tuple[tuple[PortInfo, ...], tuple[str, str] | None]:
    """Union by name, then by (protocol, port); the oldest export keeps a disputed port.

    A name used for non-identical (port, protocol, appProtocol) is disputed too (KEP-1645
    "Service Port"): appProtocol decides how the gateway proxies the port."""
    by_name: dict[str, tuple[PortInfo, str]] = {}
    by_number: dict[tuple[str, int], tuple[PortInfo, str]] = {}
    merged: list[PortInfo] = []
    disagree: set[str] = set()
    first: tuple[PortInfo, str, PortInfo] | None = None
    for e in exporters:
        for p in e.service.ports:
            known = by_name.get(p.name)
            if known is None:
                known = by_number.get((p.protocol, p.port))
                if known is None:
                    by_name[p.name] = by_number[(p.protocol, p.port)] = (p, e.cluster)
                    merged.append(p)
                    continue
            elif known[0] == p:
                continue
            disagree.add(e.cluster)
            first = first or (*known, p)
    if first is None:
        return tuple(merged), None
    port, owner, other = first
    label = f'"{port.name}" ' if port.name else "(unnamed) "
    shown = f"{label}{port.port}/{port.protocol}"
    if (port.name, port.protocol, port.port) == (other.name, other.protocol, other.port):
        shown += (f' with appProtocol "{port.app_protocol}"' if port.app_protocol
                  else " without appProtocol")
    return tuple(merged), (
        "PortConflict",
        f"Conflicting ports. Using port {shown} from oldest service "
        f'export in "{owner}". {len(disagree)}/{len(exporters)} clusters disagree.',
    )


def _oldest_mcs(members: Iterable[MemberInput]) -> McsInfo | None:
    found = [(m.mcs.created, m.cluster, m.mcs) for m in members
             if m.mcs is not None and m.mcs.cross_cluster]
    return min(found, key=lambda t: (t[0], t[1]))[2] if found else None


def resolve(inputs: ServiceInputs) -> Resolution:
    key = inputs.key
    invalid: dict[str, tuple[str, str]] = {}
    candidates: list[Exporter] = []
    everyone = [m.cluster for m in inputs.members]
    mcs = _oldest_mcs(inputs.members)
    providers = set(mcs.providers or everyone) if mcs is not None else set()
    for m in inputs.members:
        if m.export is not None:
            if m.service is None:
                invalid[m.cluster] = (
                    "NoService", f'Service "{key}" does not exist in cluster "{m.cluster}"'
                )
            elif m.service.type == EXTERNAL_NAME:
                invalid[m.cluster] = (
                    "InvalidServiceType", "Service of type ExternalName cannot be exported"
                )
            else:
                candidates.append(Exporter(m.cluster, m.export.created, m.service, m.export))
        elif (m.cluster in providers and m.service is not None
              and m.service.type != EXTERNAL_NAME and mcs is not None):
            candidates.append(Exporter(m.cluster, mcs.created, m.service, None))
    if not candidates:
        return Resolution(key, invalid=invalid)
    exporters = tuple(sorted(candidates, key=lambda e: (e.created, e.cluster)))
    with_namespace = {m.cluster for m in inputs.members if m.has_namespace}
    if any(e.export is not None for e in exporters):
        consumers = with_namespace
    else:
        assert mcs is not None
        consumers = with_namespace & set(mcs.consumers or everyone)
    winner = exporters[0]
    svc = winner.service
    labelled = [e for e in exporters if e.export is not None]

    def svc_type(e: Exporter) -> str:
        return "Headless" if e.service.headless else "ClusterSetIP"

    def labels(e: Exporter) -> Mapping[str, str]:
        return dict(e.export.exported_labels) if e.export else {}

    def annotations(e: Exporter) -> Mapping[str, str]:
        return dict(e.export.exported_annotations) if e.export else {}

    same_affinity = [e for e in exporters if e.service.session_affinity == svc.session_affinity]
    ports, port_conflict = _merge_ports(exporters)
    found = [
        port_conflict,
        _property_conflict("TypeConflict", "type", exporters, svc_type),
        _property_conflict("SessionAffinityConflict", "session affinity", exporters,
                           lambda e: e.service.session_affinity),
        _property_conflict("SessionAffinityConfigConflict", "session affinity timeout",
                           same_affinity, lambda e: e.service.affinity_timeout_s,
                           len(exporters)),
        _property_conflict("LabelsConflict", "exported labels", labelled, labels),
        _property_conflict("AnnotationsConflict", "exported annotations", labelled, annotations),
        _property_conflict("InternalTrafficPolicyConflict", "internal traffic policy",
                           exporters, lambda e: e.service.internal_traffic_policy),
        _property_conflict("TrafficDistributionConflict", "traffic distribution", exporters,
                           lambda e: e.service.traffic_distribution),
        _property_conflict("IPFamilyConflict", "IP families", exporters,
                           lambda e: list(e.service.ip_families)),
    ]
    first_labelled = labelled[0] if labelled else None
    return Resolution(
        key=key,
        exporters=exporters,
        consumers=tuple(sorted(consumers)),
        type=svc_type(winner),
        ports=ports,
        session_affinity=svc.session_affinity,
        affinity_timeout_s=svc.affinity_timeout_s,
        internal_traffic_policy=svc.internal_traffic_policy,
        traffic_distribution=svc.traffic_distribution,
        ip_families=svc.ip_families,
        labels=labels(first_labelled) if first_labelled else EMPTY_MAPPING,
        annotations=annotations(first_labelled) if first_labelled else EMPTY_MAPPING,
        conflicts=tuple(c for c in found if c is not None),
        invalid=invalid,
    )


# -- rendering ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServiceResult:
    """Every object one service key puts into any cluster. Objects are shared between
    consumers (the same import and slices everywhere): treat them as read-only."""

    key: ServiceKey
    service_import: Obj | None = None
    consumers: tuple[str, ...] = ()
    slices: Mapping[str, tuple[Obj, ...]] = field(default_factory=lambda: EMPTY_MAPPING)
    # Karmada providers get no endpoints of their own back.
    not_to_self: frozenset[str] = frozenset()
    exports: Mapping[str, Obj] = field(default_factory=lambda: EMPTY_MAPPING)
    # Consumers with a ClusterSetIP range of their own (--cluster-cidr) get their own copy.
    cluster_imports: Mapping[str, Obj] = field(default_factory=lambda: EMPTY_MAPPING)

    def objects_for(self, cluster: str) -> dict[ObjectRef, Obj]:
        objects: dict[ObjectRef, Obj] = {}
        ns, name = self.key
        if self.service_import is not None and cluster in self.consumers:
            objects[ObjectRef(KIND_IMPORT, ns, name)] = self.cluster_imports.get(
                cluster, self.service_import)
            for source, slices in self.slices.items():
                if source == cluster and cluster in self.not_to_self:
                    continue
                for s in slices:
                    objects[ObjectRef(KIND_SLICE, ns, s["metadata"]["name"])] = s
        export = self.exports.get(cluster)
        if export is not None:
            objects[ObjectRef(KIND_EXPORT, ns, name)] = export
        return objects


def owner_uid(key: ServiceKey) -> str:
    """A stand-in uid for the ServiceImport owner reference (a kube client puts the real one)."""
    return str(uuid.uuid5(_OWNER_UID_NAMESPACE, str(key)))


def _port_obj(p: PortInfo) -> Obj:
    obj: Obj = {"name": p.name} if p.name else {}
    obj["protocol"] = p.protocol
    obj["port"] = p.port
    if p.app_protocol:
        obj["appProtocol"] = p.app_protocol
    return obj


def _import_obj(res: Resolution, ips: Sequence[str]) -> Obj:
    meta: Obj = {"name": res.key.name, "namespace": res.key.namespace}
    if res.labels:
        meta["labels"] = dict(res.labels)
    if res.annotations:
        meta["annotations"] = dict(res.annotations)
    spec: Obj = {"type": res.type}
    if res.type == "ClusterSetIP":
        spec["ips"] = list(ips)
        spec["ipFamilies"] = ["IPv6" if ":" in ip else "IPv4" for ip in ips]
    else:
        spec["ipFamilies"] = list(res.ip_families)
    spec["ports"] = [_port_obj(p) for p in res.ports]
    spec["sessionAffinity"] = res.session_affinity
    if res.affinity_timeout_s is not None:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": res.affinity_timeout_s}}
    if res.internal_traffic_policy != "Cluster":
        spec["internalTrafficPolicy"] = res.internal_traffic_policy
    if res.traffic_distribution is not None:
        spec["trafficDistribution"] = res.traffic_distribution
    return {
        "apiVersion": IMPORT_API_VERSION,
        "kind": KIND_IMPORT,
        "metadata": meta,
        "spec": spec,
        "status": {"clusters": [{"cluster": c} for c in sorted(e.cluster for e in res.exporters)]},
    }


def _endpoint_obj(ep: Endpoint) -> Obj:
    obj: Obj = {
        "addresses": list(ep.addresses),
        "conditions": {"ready": ep.ready, "serving": ep.serving, "terminating": ep.terminating},
    }
    if ep.hostname:
        obj["hostname"] = ep.hostname
    if ep.zone:
        obj["zone"] = ep.zone
    return obj


def slice_name_prefix(key: ServiceKey, source: str) -> str:
    # The hash keeps "a-b"+"c" and "a"+"b-c" apart; the rest is for people reading lists.
    digest = hashlib.blake2b(f"{key}/{source}".encode(), digest_size=4).hexdigest()
    return f"{key.name}-{source}"[:200].rstrip("-.") + f"-{digest}"


def _slices_obj(
    key: ServiceKey,
    exporter: Exporter,
    slices: Sequence[SliceSpec],
    import_ports: Sequence[PortInfo],
    stale: bool,
    headless: bool = False,
) -> tuple[Obj, ...]:
    """One source cluster's endpoints as imported slices: ≤100 endpoints each, only the
    ports the import serves and the source's Service exposes, matched by name. A headless
    service's endpoints are imported with none of those ports too: its DNS names list the
    ready endpoints of every exporting cluster (mcs-spec.md, DNS), not only of those
    exposing a port of the import."""
    served = {(p.name, p.protocol) for p in import_ports} & {
        (p.name, p.protocol) for p in exporter.service.ports
    }
    groups: dict[tuple[int, tuple[tuple[str, str, int], ...]], list[Endpoint]] = {}
    seen: set[tuple[tuple[str, ...], tuple[tuple[str, str, int], ...]]] = set()
    for s in slices:
        for ep in s.endpoints:
            ports = tuple(sorted((p.name, p.protocol, p.port) for p in ep.ports
                                 if (p.name, p.protocol) in served))
            if import_ports and not ports and not headless:
                continue  # nothing a client of the import could reach there
            # The same endpoint with the same ports in two slices (the source moving it)
            # is one. With other ports it is not: a selectorless Service's slices may be
            # one per port, and kube-proxy serves each port from the slice naming it.
            if (ep.addresses, ports) in seen:
                continue
            seen.add((ep.addresses, ports))
            groups.setdefault((ep.family, ports), []).append(ep)
    prefix = slice_name_prefix(key, exporter.cluster)
    owner = {"apiVersion": IMPORT_API_VERSION, "kind": KIND_IMPORT, "name": key.name,
             "uid": owner_uid(key)}
    labels = {
        LABEL_SERVICE_NAME: key.name,
        LABEL_SOURCE_CLUSTER: exporter.cluster,
        LABEL_MANAGED_BY: CONTROLLER_MANAGER,
    }
    out: list[Obj] = []
    for (family, ports), endpoints in sorted(groups.items()):
        for start in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            meta: Obj = {
                "name": f"{prefix}-{len(out)}",
                "namespace": key.namespace,
                "labels": dict(labels),
                "ownerReferences": [dict(owner)],
            }
            if stale:
                meta["annotations"] = {STALE_ANNOTATION: "true"}
            out.append({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": KIND_SLICE,
                "metadata": meta,
                "addressType": "IPv4" if family == 4 else "IPv6",
                "ports": [{"name": n, "protocol": proto, "port": port} for n, proto, port in ports],
                "endpoints": [_endpoint_obj(ep)
                              for ep in endpoints[start:start + MAX_ENDPOINTS_PER_SLICE]],
            })
    return tuple(out)


def _export_obj(
    m: MemberInput, res: Resolution, now: str
) -> Obj:
    assert m.export is not None
    prev = m.previous_conditions
    bad = res.invalid.get(m.cluster)
    if bad is not None:
        reason, message = bad
        conditions = [
            condition("Valid", False, reason, message, prev, now),
            condition("Ready", False, "Failed", f"Not exported: {message}", prev, now),
        ]
    else:
        conditions = [condition("Valid", True, "Valid", "Service is valid for export", prev, now)]
        if res.unallocated is not None:
            conditions.append(condition(
                "Ready", False, "Pending",
                f"No ClusterSetIP free: {res.unallocated}; imported once one is released",
                prev, now,
            ))
        elif res.consumers:
            # No count of the importing clusters: a member joining, or a namespace made
            # in one, rewrote the status of every export of it in every exporting member
            # for that number alone (20 services: 20 status writes in each exporter).
            conditions.append(condition(
                "Ready", True, "Exported",
                "Service is imported where its namespace exists", prev, now,
            ))
        else:
            conditions.append(condition(
                "Ready", False, "Pending", "No member cluster has the namespace", prev, now,
            ))
        if res.conflicts:
            conditions.append(condition(
                "Conflict", True, ",".join(r for r, _ in res.conflicts),
                " ".join(msg for _, msg in res.conflicts), prev, now,
            ))
        else:
            conditions.append(condition(
                "Conflict", False, "NoConflicts", "No conflicts with other exports", prev, now,
            ))
    obj = dict(m.export.manifest)
    obj["status"] = {"conditions": conditions}
    return obj


def assign_ips(
    res: Resolution,
    allocator: ClusterSetIPAllocator,
    cluster_allocators: Mapping[str, ClusterSetIPAllocator] = EMPTY_MAPPING,
) -> tuple[Resolution, tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The service's ClusterSetIPs from the clusterset's range and each cluster's own, all
    or none: a service no address is free for is imported nowhere for now, its exports
    saying why, and what it held is released (held for it). An AllocationError raised
    from here used to end the controller's loop, every other service's updates with it."""
    if res.needs_ips:
        try:
            ips = allocator.ensure(res.key, res.ip_families)
            own = {c: a.ensure(res.key, res.ip_families) for c, a in cluster_allocators.items()}
            return res, ips, own
        except AllocationError as exc:
            res = replace(res, consumers=(), unallocated=str(exc))
    allocator.release(res.key)
    for a in cluster_allocators.values():
        a.release(res.key)
    return res, (), {}


def render(
    res: Resolution,
    inputs: ServiceInputs,
    ips: Sequence[str],
    now: str,
    cluster_ips: Mapping[str, Sequence[str]] = EMPTY_MAPPING,
) -> ServiceResult:
    """`ips` for every consumer, except those named in `cluster_ips` (own ranges)."""
    exports = {m.cluster: _export_obj(m, res, now) for m in inputs.members if m.export is not None}
    if not res.imported:
        return ServiceResult(res.key, exports=exports)
    members = {m.cluster: m for m in inputs.members}
    slices = {
        e.cluster: _slices_obj(res.key, e, members[e.cluster].slices, res.ports,
                               members[e.cluster].stale, res.type == "Headless")
        for e in res.exporters
    }
    return ServiceResult(
        key=res.key,
        service_import=_import_obj(res, ips),
        consumers=res.consumers,
        slices={c: s for c, s in slices.items() if s},
        not_to_self=frozenset(e.cluster for e in res.exporters if e.export is None),
        exports=exports,
        cluster_imports={c: _import_obj(res, own) for c, own in cluster_ips.items()
                         if c in res.consumers},
    )


# -- whole clusterset --------------------------------------------------------------------
@dataclass(slots=True)
class Prior:
    """What an earlier run wrote: ClusterSetIPs by key, conditions by (cluster, key)."""

    ips: dict[ServiceKey, tuple[str, ...]] = field(default_factory=dict)
    conditions: dict[tuple[str, ServiceKey], Conditions] = field(default_factory=dict)

    def add(self, cluster: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            return
        key = ServiceKey(str(meta.get("namespace", "default")), str(meta.get("name", "")))
        if obj.get("kind") == KIND_IMPORT:
            spec = obj.get("spec")
            ips = spec.get("ips") if isinstance(spec, Mapping) else None
            if isinstance(ips, list) and ips and key not in self.ips:
                self.ips[key] = tuple(str(ip) for ip in ips)
        elif obj.get("kind") == KIND_EXPORT:
            self.conditions[(cluster, key)] = conditions_by_type(obj)

    @classmethod
    def from_published(cls, published: Mapping[str, Iterable[Mapping[str, Any]]]) -> Prior:
        prior = cls()
        for cluster in sorted(published):
            for obj in published[cluster]:
                prior.add(cluster, obj)
        return prior


def keys_to_reconcile(members: Mapping[str, ClusterObjects]) -> set[ServiceKey]:
    """Only an export or a MultiClusterService makes a key matter."""
    keys: set[ServiceKey] = set()
    for objects in members.values():
        keys.update(objects.exports)
        keys.update(objects.mcs)
    return keys


def reconcile_clusterset(
    members: Mapping[str, ClusterObjects],
    *,
    now: str,
    previous: Mapping[str, Iterable[Mapping[str, Any]]] = EMPTY_MAPPING,  # type: ignore[assignment]
    stale: Iterable[str] = (),
    cidrs: str = DEFAULT_CIDR,
) -> dict[str, dict[ObjectRef, Obj]]:
    """Every member's objects (+ what was written before) → every member's desired objects."""
    prior = Prior.from_published(previous)
    allocator = ClusterSetIPAllocator(parse_cidrs(cidrs))
    for key in sorted(prior.ips):
        allocator.reserve(key, prior.ips[key])
    stale = set(stale)
    clusters = sorted(members)
    desired: dict[str, dict[ObjectRef, Obj]] = {c: {} for c in clusters}
    for key in sorted(keys_to_reconcile(members)):
        inputs = ServiceInputs(key, tuple(
            member_input(key, c, members[c], c in stale,
                         prior.conditions.get((c, key), EMPTY_MAPPING))
            for c in clusters
        ))
        res, ips, _ = assign_ips(resolve(inputs), allocator)
        result = render(res, inputs, ips, now)
        for c in clusters:
            desired[c].update(result.objects_for(c))
    return desired
