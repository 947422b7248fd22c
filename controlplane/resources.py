"""Member-cluster objects (Namespace, Service, EndpointSlice, ServiceExport, Karmada
MultiClusterService) → small validated records the reconcile reads.

Only the fields reconcile uses are kept, as CoreDNS keeps small indexed copies of the
Kubernetes objects. EndpointSlices go through mcsproxy.manifests so that an endpoint is
judged valid by the same code in the controller and in the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from mcsproxy.manifests import (
    LABEL_MANAGED_BY,
    LABEL_SOURCE_CLUSTER,
    MCS_GROUP,
    MCS_VERSIONS,
    ManifestError,
    SliceSpec,
    as_list,
    as_mapping,
    as_port_number,
    as_protocol,
    as_str_map,
    namespaced_name,
    parse_endpoint_slice,
)
from mcsproxy.model import DEFAULT_AFFINITY_TIMEOUT_S, ServiceKey

KARMADA_GROUP_VERSION = "networking.karmada.io/v1alpha1"
LABEL_K8S_SERVICE_NAME = "kubernetes.io/service-name"
KARMADA_DISPATCH_MANAGER = "endpointslice-dispatch-controller.karmada.io"
CONTROLLER_MANAGER = "controller.mcsproxy.io"  # our managed-by label value
EXTERNAL_NAME = "ExternalName"
# Sorts after every real timestamp: an export without creationTimestamp is the newest.
NO_TIMESTAMP = datetime.max.replace(tzinfo=UTC)

KIND_NAMESPACE = "Namespace"
KIND_SERVICE = "Service"
KIND_SLICE = "EndpointSlice"
KIND_EXPORT = "ServiceExport"
KIND_IMPORT = "ServiceImport"
KIND_MCS = "MultiClusterService"


class ObjectRef(NamedTuple):
    kind: str
    namespace: str  # "" for cluster-scoped objects
    name: str


@dataclass(frozen=True, slots=True)
class PortInfo:
    name: str
    protocol: str
    port: int
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    key: ServiceKey
    type: str  # ClusterIP | NodePort | LoadBalancer | ExternalName
    headless: bool
    ports: tuple[PortInfo, ...]
    session_affinity: str
    affinity_timeout_s: int | None  # None unless sessionAffinity is ClientIP
    internal_traffic_policy: str
    traffic_distribution: str | None
    ip_families: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExportInfo:
    key: ServiceKey
    created: datetime
    exported_labels: Mapping[str, str]
    exported_annotations: Mapping[str, str]
    # The object as the user wrote it (status dropped): echoed back with our status.
    manifest: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class McsInfo:
    key: ServiceKey
    created: datetime
    cross_cluster: bool
    providers: tuple[str, ...]  # empty: every cluster
    consumers: tuple[str, ...]  # empty: every cluster


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    # Being deleted (metadata.deletionTimestamp): the API server takes nothing new in it,
    # so it counts as absent, its imports with it.
    terminating: bool = False


Parsed = NamespaceInfo | ServiceInfo | SliceSpec | ExportInfo | McsInfo


def parse_timestamp(value: Any, what: str) -> datetime:
    if value is None:
        return NO_TIMESTAMP
    if isinstance(value, datetime):  # YAML turns unquoted timestamps into datetimes
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        raise ManifestError(f"{what} must be an RFC 3339 timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(f"{what} must be an RFC 3339 timestamp, not {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _service(obj: Mapping[str, Any]) -> ServiceInfo:
    meta = as_mapping(obj.get("metadata"), "metadata")
    namespace, name = namespaced_name(meta, "Service")
    where = f"Service {namespace}/{name}"
    spec = as_mapping(obj.get("spec"), f"{where}: spec")
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", EXTERNAL_NAME):
        raise ManifestError(f"{where}: unknown spec.type {svc_type!r}")
    ports: list[PortInfo] = []
    for i, raw in enumerate(as_list(spec.get("ports"), f"{where}: spec.ports")):
        p = as_mapping(raw, f"{where}: spec.ports[{i}]")
        pname = p.get("name") or ""
        app = p.get("appProtocol")
        if not isinstance(pname, str) or (app is not None and not isinstance(app, str)):
            raise ManifestError(f"{where}: spec.ports[{i}] name/appProtocol must be strings")
        ports.append(PortInfo(
            pname,
            as_protocol(p.get("protocol"), f"{where}: spec.ports[{i}].protocol"),
            as_port_number(p.get("port"), f"{where}: spec.ports[{i}].port"),
            app,
        ))
    affinity = spec.get("sessionAffinity") or "None"
    if affinity not in ("None", "ClientIP"):
        raise ManifestError(f"{where}: spec.sessionAffinity must be None or ClientIP")
    timeout: int | None = None
    if affinity == "ClientIP":
        cfg = as_mapping(spec.get("sessionAffinityConfig"), f"{where}: sessionAffinityConfig")
        client_ip = as_mapping(cfg.get("clientIP"), f"{where}: sessionAffinityConfig.clientIP")
        timeout = client_ip.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
            raise ManifestError(f"{where}: timeoutSeconds must be 1-86400")
    policy = spec.get("internalTrafficPolicy") or "Cluster"
    if policy not in ("Cluster", "Local"):
        raise ManifestError(f"{where}: spec.internalTrafficPolicy must be Cluster or Local")
    traffic = spec.get("trafficDistribution")
    if traffic is not None and not isinstance(traffic, str):
        raise ManifestError(f"{where}: spec.trafficDistribution must be a string")
    families = tuple(as_list(spec.get("ipFamilies"), f"{where}: spec.ipFamilies")) or ("IPv4",)
    if any(f not in ("IPv4", "IPv6") for f in families) or len(set(families)) != len(families):
        raise ManifestError(f"{where}: spec.ipFamilies must hold IPv4 and/or IPv6 once each")
    return ServiceInfo(
        key=ServiceKey(namespace, name),
        type=svc_type,
        headless=spec.get("clusterIP") == "None",
        ports=tuple(ports),
        session_affinity=affinity,
        affinity_timeout_s=timeout,
        internal_traffic_policy=policy,
        traffic_distribution=traffic,
        ip_families=families,
    )


def _export(obj: Mapping[str, Any]) -> ExportInfo:
    meta = as_mapping(obj.get("metadata"), "metadata")
    namespace, name = namespaced_name(meta, KIND_EXPORT)
    where = f"ServiceExport {namespace}/{name}"
    spec = as_mapping(obj.get("spec"), f"{where}: spec")
    manifest = {k: v for k, v in obj.items() if k != "status"}
    kept_meta = {k: meta[k] for k in ("name", "namespace", "labels", "annotations",
                                      "creationTimestamp", "uid") if k in meta}
    kept_meta.setdefault("namespace", namespace)
    created = parse_timestamp(meta.get("creationTimestamp"), f"{where}: creationTimestamp")
    if "creationTimestamp" in kept_meta and not isinstance(kept_meta["creationTimestamp"], str):
        kept_meta["creationTimestamp"] = format_time(created)
    manifest["metadata"] = kept_meta
    return ExportInfo(
        key=ServiceKey(namespace, name),
        created=created,
        exported_labels=as_str_map(spec.get("exportedLabels"), f"{where}: spec.exportedLabels"),
        exported_annotations=as_str_map(
            spec.get("exportedAnnotations"), f"{where}: spec.exportedAnnotations"
        ),
        manifest=manifest,
    )


def _cluster_names(value: Any, what: str) -> tuple[str, ...]:
    names = []
    for i, raw in enumerate(as_list(value, what)):
        entry = as_mapping(raw, f"{what}[{i}]")
        cluster = entry.get("name")
        if not isinstance(cluster, str) or not cluster:
            raise ManifestError(f"{what}[{i}].name must be a cluster name")
        names.append(cluster)
    return tuple(sorted(set(names)))


def _mcs(obj: Mapping[str, Any]) -> McsInfo:
    meta = as_mapping(obj.get("metadata"), "metadata")
    namespace, name = namespaced_name(meta, KIND_MCS)
    where = f"MultiClusterService {namespace}/{name}"
    spec = as_mapping(obj.get("spec"), f"{where}: spec")
    types = as_list(spec.get("types"), f"{where}: spec.types")
    return McsInfo(
        key=ServiceKey(namespace, name),
        created=parse_timestamp(meta.get("creationTimestamp"), f"{where}: creationTimestamp"),
        cross_cluster="CrossCluster" in types,
        providers=_cluster_names(spec.get("providerClusters"), f"{where}: providerClusters"),
        consumers=_cluster_names(spec.get("consumerClusters"), f"{where}: consumerClusters"),
    )


def _is_member_slice(labels: Mapping[str, str]) -> bool:
    """A slice the member's own EndpointSlice controller made for one of its Services.

    Imported slices (ours or another MCS implementation's) and Karmada's dispatched ones
    describe other clusters' endpoints: exporting them again would loop them around.
    """
    if LABEL_SOURCE_CLUSTER in labels:
        return False
    return labels.get(LABEL_MANAGED_BY) not in (CONTROLLER_MANAGER, KARMADA_DISPATCH_MANAGER)


def parse_member_object(obj: Mapping[str, Any], cluster: str) -> tuple[ObjectRef, Parsed] | None:
    """One member-cluster object → (ref, record); None for kinds reconcile ignores."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if kind == KIND_NAMESPACE and api_version == "v1":
        meta = as_mapping(obj.get("metadata"), "metadata")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError("Namespace has no metadata.name")
        terminating = bool(meta.get("deletionTimestamp"))
        return ObjectRef(KIND_NAMESPACE, "", name), NamespaceInfo(name, terminating)
    if kind == KIND_SERVICE and api_version == "v1":
        svc = _service(obj)
        return ObjectRef(KIND_SERVICE, svc.key.namespace, svc.key.name), svc
    if kind == KIND_SLICE and api_version == "discovery.k8s.io/v1":
        meta = as_mapping(obj.get("metadata"), "metadata")
        namespace, name = namespaced_name(meta, KIND_SLICE)
        labels = as_str_map(meta.get("labels"), f"EndpointSlice {namespace}/{name}: labels")
        service_name = labels.get(LABEL_K8S_SERVICE_NAME)
        if not service_name or not _is_member_slice(labels):
            return None
        spec = parse_endpoint_slice(obj, service_name=service_name, cluster=cluster)
        if spec is None:
            return None
        return ObjectRef(KIND_SLICE, namespace, name), spec
    if kind == KIND_EXPORT and api_version in {f"{MCS_GROUP}/{v}" for v in MCS_VERSIONS}:
        export = _export(obj)
        return ObjectRef(KIND_EXPORT, export.key.namespace, export.key.name), export
    if kind == KIND_MCS and api_version == KARMADA_GROUP_VERSION:
        mcs = _mcs(obj)
        return ObjectRef(KIND_MCS, mcs.key.namespace, mcs.key.name), mcs
    return None


def service_key_of(ref: ObjectRef, parsed: Parsed) -> ServiceKey | None:
    """The service an object belongs to (None for a Namespace)."""
    if isinstance(parsed, SliceSpec):
        return parsed.key
    if ref.kind == KIND_NAMESPACE:
        return None
    return ServiceKey(ref.namespace, ref.name)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

