"""The demo clusterset: which clusters exist, what runs where, and its manifests.

Every address is on loopback so the demo needs no root: cluster N's pods live on
127.0.N.x, its gateway on 127.0.10.N, ClusterSetIPs come from 127.240.0.0/16. A process
that may not bind ports below 1024 gets the services' unprivileged ports instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMESPACE = "demo"
CLUSTERSET_CIDR = "127.240.0.0/16"
CONTROL_URL = "http://127.0.0.1:9900"
# Without root (or CAP_NET_BIND_SERVICE) ports below 1024 cannot be bound: a service
# port there moves up by this much (web 8080, echo 8007) rather than leave the
# ClusterSetIP unserved.
UNPRIVILEGED_PORT_OFFSET = 8000


@dataclass(frozen=True)
class DemoService:
    name: str
    kind: str  # "http" | "echo"
    port: int  # the service port clients dial (when ports below 1024 can be bound)
    target_port: int  # where the backends listen
    exporters: tuple[str, ...]
    replicas: int = 2
    prefer_close: bool = False
    headless: bool = False

    def service_port(self, low_ports: bool) -> int:
        """The port clients dial, when this process can (or cannot) bind ports < 1024."""
        if low_ports or self.port >= 1024:
            return self.port
        return self.port + UNPRIVILEGED_PORT_OFFSET


@dataclass(frozen=True)
class DemoCluster:
    name: str
    index: int  # 1-based; picks the cluster's 127.0.N.x addresses

    def pod_ip(self, pod: int) -> str:
        return f"127.0.{self.index}.{pod + 1}"

    @property
    def clusterset_cidr(self) -> str:
        """Each cluster's ClusterSetIPs of its own, so three gateways share this host."""
        return f"127.240.{self.index}.0/24"

    @property
    def gateway_ip(self) -> str:
        return f"127.0.10.{self.index}"

    @property
    def dns_listen(self) -> str:
        return f"{self.gateway_ip}:5353"

    @property
    def admin_listen(self) -> str:
        return f"{self.gateway_ip}:9901"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_listen}/"


CLUSTERS = (DemoCluster("east", 1), DemoCluster("west", 2), DemoCluster("central", 3))

SERVICES = (
    DemoService("web", "http", 80, 8080, ("east", "west"), prefer_close=True),
    DemoService("echo", "echo", 7, 7007, ("east", "west", "central")),
    DemoService("db", "echo", 5432, 5432, ("west", "central"), headless=True),
    DemoService("reports", "http", 80, 8081, ("central",)),
)


def cluster(name: str) -> DemoCluster:
    for c in CLUSTERS:
        if c.name == name:
            return c
    raise KeyError(f"no demo cluster {name!r}; clusters: {', '.join(c.name for c in CLUSTERS)}")


def pod_name(svc: DemoService, c: DemoCluster, pod: int) -> str:
    return f"{svc.name}-{pod}" if svc.headless else f"{svc.name}-{c.name}-{pod}"


def _service(svc: DemoService, created: str, low_ports: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": "None" if svc.headless else None,
        "selector": {"app": svc.name},
        "ports": [{
            "name": "http" if svc.kind == "http" else "tcp",
            "protocol": "TCP",
            "port": svc.service_port(low_ports),
            "targetPort": svc.target_port,
            **({"appProtocol": "http"} if svc.kind == "http" else {}),
        }],
    }
    if spec["clusterIP"] is None:
        del spec["clusterIP"]
    if svc.prefer_close:
        spec["trafficDistribution"] = "PreferClose"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc.name, "namespace": NAMESPACE, "creationTimestamp": created},
        "spec": spec,
    }


def _slice(svc: DemoService, c: DemoCluster) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc.name}-{c.name}",
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": svc.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{
            "name": "http" if svc.kind == "http" else "tcp",
            "protocol": "TCP",
            "port": svc.target_port,
        }],
        "endpoints": [
            {
                "addresses": [c.pod_ip(pod)],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                **({"hostname": pod_name(svc, c, pod)} if svc.headless else {}),
                "targetRef": {"kind": "Pod", "name": pod_name(svc, c, pod),
                              "namespace": NAMESPACE},
            }
            for pod in range(svc.replicas)
        ],
    }


def cluster_manifests(c: DemoCluster, low_ports: bool = True) -> list[dict[str, Any]]:
    """What member cluster `c` holds: the namespace, and each service it exports (on
    ports below 1024 only if `low_ports`)."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    ]
    for svc in SERVICES:
        if c.name not in svc.exporters:
            continue
        # Exports in the first exporting cluster are the oldest: they win any conflict.
        created = f"2026-01-0{svc.exporters.index(c.name) + 1}T00:00:00Z"
        docs.append(_service(svc, created, low_ports))
        docs.append(_slice(svc, c))
        docs.append({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport",
            "metadata": {"name": svc.name, "namespace": NAMESPACE, "creationTimestamp": created},
        })
    return docs
