"""Builders for member-cluster objects, shared by the reconcile and controller tests."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from controlplane.allocator import ClusterSetIPAllocator, parse_cidrs
from controlplane.clusters import ChangeSet
from controlplane.clusters.state import ClusterObjects
from controlplane.reconcile import reconcile_clusterset
from controlplane.resources import (
    KIND_EXPORT,
    KIND_IMPORT,
    KIND_SLICE,
    ObjectRef,
    parse_member_object,
)
from mcsproxy.model import ServiceKey

NOW = "2025-01-01T00:00:00Z"
LATER = "2025-01-02T00:00:00Z"
MCS_API = "multicluster.x-k8s.io/v1alpha1"
Obj = dict[str, Any]


def with_fields(doc: Obj, *changes: tuple[str, Any]) -> Obj:
    """A copy of doc with each (dotted path, value) set; a number indexes a list
    ("ports.0.name")."""
    doc = copy.deepcopy(doc)
    for path, value in changes:
        *parents, leaf = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return doc


def namespace(name: str = "test") -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service(name: str = "web", ns: str = "test", *, svc_type: str = "ClusterIP",
            headless: bool = False, ports: Iterable[tuple[str, str, int]] = (("http", "TCP", 80),),
            **spec: Any) -> Obj:
    body: Obj = {"type": svc_type,
                 "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports]}
    if headless:
        body["clusterIP"] = "None"
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": body}


def export(name: str = "web", ns: str = "test", created: str | None = "2024-01-01T00:00:00Z",
           labels: Mapping[str, str] | None = None,
           annotations: Mapping[str, str] | None = None, **meta: Any) -> Obj:
    spec: Obj = {}
    if labels is not None:
        spec["exportedLabels"] = dict(labels)
    if annotations is not None:
        spec["exportedAnnotations"] = dict(annotations)
    metadata: Obj = {"name": name, "namespace": ns, **meta}
    if created is not None:
        metadata["creationTimestamp"] = created
    obj: Obj = {"apiVersion": MCS_API, "kind": "ServiceExport", "metadata": metadata}
    if spec:
        obj["spec"] = spec
    return obj


def eslice(name: str, addresses: Iterable[str], svc: str = "web", ns: str = "test", *,
           ports: Iterable[tuple[str, str, int]] = (("http", "TCP", 8080),),
           family: str = "IPv4", hostnames: Iterable[str | None] | None = None,
           ready: bool = True, labels: Mapping[str, str] | None = None,
           conditions: Mapping[str, bool] | None = None) -> Obj:
    """`conditions`, when given, are every endpoint's as they stand (else from `ready`)."""
    addresses = list(addresses)
    names = list(hostnames) if hostnames is not None else [None] * len(addresses)
    if conditions is None:
        conditions = {"ready": ready, "serving": ready, "terminating": not ready}
    endpoints = []
    for address, hostname in zip(addresses, names, strict=True):
        ep: Obj = {"addresses": [address], "conditions": dict(conditions)}
        if hostname:
            ep["hostname"] = hostname
        endpoints.append(ep)
    all_labels = {"kubernetes.io/service-name": svc, **(labels or {})}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": all_labels},
            "addressType": family,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
            "endpoints": endpoints}


def mcs(name: str = "web", ns: str = "test", providers: Iterable[str] = (),
        consumers: Iterable[str] = (), types: Iterable[str] = ("CrossCluster",),
        created: str = "2024-01-01T00:00:00Z") -> Obj:
    return {"apiVersion": "networking.karmada.io/v1alpha1", "kind": "MultiClusterService",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"types": list(types),
                     "providerClusters": [{"name": c} for c in providers],
                     "consumerClusters": [{"name": c} for c in consumers]}}


def cluster(cluster_id: str, *docs: Obj) -> ClusterObjects:
    objects = ClusterObjects()
    parsed = {}
    for doc in docs:
        result = parse_member_object(doc, cluster_id)
        if result is not None:
            parsed[result[0]] = result[1]
    objects.replace_all(parsed, ChangeSet())
    return objects


def exporter(cluster_id: str, *, created: str = "2024-01-01T00:00:00Z", svc: Obj | None = None,
             addresses: Iterable[str] = ("127.0.1.1",), **export_kw: Any) -> ClusterObjects:
    """A cluster with namespace test exporting test/web with a one-endpoint slice."""
    return cluster(cluster_id, namespace(), svc or service(),
                   eslice(f"web-{cluster_id}", addresses), export(created=created, **export_kw))


def reconcile(members: Mapping[str, ClusterObjects], **kw: Any) -> dict[str, dict[ObjectRef, Obj]]:
    kw.setdefault("now", NOW)
    return reconcile_clusterset(members, **kw)


def service_import(desired: Mapping[str, Mapping[ObjectRef, Obj]], cluster_id: str,
                   name: str = "web", ns: str = "test") -> Obj | None:
    return desired[cluster_id].get(ObjectRef(KIND_IMPORT, ns, name))


def export_status(desired: Mapping[str, Mapping[ObjectRef, Obj]], cluster_id: str,
                  name: str = "web", ns: str = "test") -> dict[str, Obj]:
    obj = desired[cluster_id][ObjectRef(KIND_EXPORT, ns, name)]
    return {c["type"]: c for c in obj["status"]["conditions"]}


def slices(desired: Mapping[str, Mapping[ObjectRef, Obj]], cluster_id: str) -> list[Obj]:
    return [o for r, o in sorted(desired[cluster_id].items()) if r.kind == KIND_SLICE]


def colliding_names(cidr: str, ns: str = "test") -> tuple[str, str, str]:
    """Two service names whose first probe in `cidr` is the same address, and that
    address: found with the real allocator, so the collision follows its hash."""
    first: dict[str, str] = {}
    for i in range(1000):
        name = f"svc{i}"
        (ip,) = ClusterSetIPAllocator(parse_cidrs(cidr)).ensure(ServiceKey(ns, name), ["IPv4"])
        if ip in first:
            return first[ip], name, ip
        first[ip] = name
    raise AssertionError(f"no two names collide in {cidr}")
