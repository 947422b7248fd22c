"""Immutable snapshot types: what the gateway serves.

A snapshot is built off the hot path from ServiceImports and imported EndpointSlices and
swapped in whole; DNS, proxy and admin only ever read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

ServiceType = Literal["ClusterSetIP", "Headless"]
Protocol = Literal["TCP", "UDP", "SCTP"]
Locality = Literal["spread", "local-first"]

LOCALITY_ANNOTATION = "mcsproxy.io/locality"
DEFAULT_AFFINITY_TIMEOUT_S = 10800  # kube-proxy's default for ClientIP affinity
EMPTY_MAPPING: Mapping[str, str] = MappingProxyType({})


class ServiceKey(NamedTuple):
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str  # "" for an unnamed port, as in the Kubernetes API
    protocol: Protocol
    port: int
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of one source cluster. Ports are shared by every endpoint of a slice."""

    address: str  # the first address; EndpointSlice addresses are fungible
    addresses: tuple[str, ...]
    family: int  # 4 or 6
    cluster: str
    ports: tuple[EndpointPort, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    hostname: str | None = None
    zone: str | None = None
    node_name: str | None = None

    def port_for(self, service_port: ServicePort) -> int | None:
        """Target port for a service port, matched by name and protocol as kube-proxy does."""
        for p in self.ports:
            if p.name == service_port.name and p.protocol == service_port.protocol:
                return p.port
        return None


@dataclass(frozen=True, slots=True)
class ImportedService:
    key: ServiceKey
    type: ServiceType
    ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    session_affinity: Literal["None", "ClientIP"] = "None"
    affinity_timeout_s: int = DEFAULT_AFFINITY_TIMEOUT_S
    traffic_distribution: str | None = None
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAPPING)
    clusters: tuple[str, ...] = ()  # status.clusters: the exporting clusters

    @property
    def headless(self) -> bool:
        return self.type == "Headless"

    @property
    def locality(self) -> Locality:
        """local-first when PreferClose or the annotation asks; the annotation wins."""
        override = self.annotations.get(LOCALITY_ANNOTATION)
        if override in ("local-first", "spread"):
            return override  # type: ignore[return-value]
        return "local-first" if self.traffic_distribution == "PreferClose" else "spread"

    def endpoint_clusters(self) -> tuple[str, ...]:
        return tuple(sorted({e.cluster for e in self.endpoints}))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view of every imported service; replaced whole, never mutated."""

    version: int
    services: Mapping[ServiceKey, ImportedService]
    # Keys whose ImportedService differs from the previous snapshot (added, changed or
    # removed), so consumers can update incrementally instead of rebuilding everything.
    changed: frozenset[ServiceKey] = frozenset()
    built_at: float = 0.0

    def get(self, namespace: str, name: str) -> ImportedService | None:
        return self.services.get(ServiceKey(namespace, name))


EMPTY_SNAPSHOT = Snapshot(version=0, services=MappingProxyType({}))
