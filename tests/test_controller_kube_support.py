"""Three member clusters, one Kubernetes API emulator each, and builders for their objects.

Shared by the Kubernetes-mode controller tests, the leader tests and the propagation bench.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from controlplane.clusters.kube import KubeClusterClient, KubeTimings
from controlplane.clusters.kube_app import KubeControllerApp, KubeControllerConfig
from controlplane.controller import Controller
from controlplane.resources import CONTROLLER_MANAGER
from mcsproxy.manifests import LABEL_MANAGED_BY
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.kube_emulator import KubeEmulator

MCS = "multicluster.x-k8s.io"
IMPORTS = f"serviceimports.{MCS}"
EXPORTS = f"serviceexports.{MCS}"
SLICES = "endpointslices.discovery.k8s.io"
FAST = KubeTimings(request_timeout_s=2.0, watch_timeout_s=30.0, probe_interval_s=0.2,
                   backoff_base_s=0.05, backoff_cap_s=0.3, stale_after_s=0.5)
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service(name: str, ns: str = "demo", ports: list[tuple[str, int]] | None = None,
            **spec: Any) -> dict[str, Any]:
    ports = [("http", 80)] if ports is None else ports
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": n, "protocol": "TCP", "port": p} for n, p in ports],
                     **spec}}


def member_slice(svc: str, addresses: list[str], ns: str = "demo", port: int = 8080,
                 name: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-abc", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc,
                                    LABEL_MANAGED_BY: "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}}
                          for a in addresses]}


def service_export(name: str, ns: str = "demo", created: str | None = None,
                   version: str = "v1alpha1") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": f"{MCS}/{version}", "kind": "ServiceExport", "metadata": meta}


def ours(obj: dict[str, Any]) -> bool:
    return obj["metadata"].get("labels", {}).get(LABEL_MANAGED_BY) == CONTROLLER_MANAGER


def writes(emu: KubeEmulator) -> int:
    return sum(1 for r in emu.requests if r.method in WRITE_METHODS)


@dataclass
class Clusterset:
    emulators: dict[str, KubeEmulator]
    clients: dict[str, KubeClusterClient] = field(default_factory=dict)
    controller: Controller | None = None
    timings: KubeTimings = FAST
    _tasks: list[Any] = field(default_factory=list)

    def __getitem__(self, cluster: str) -> KubeEmulator:
        return self.emulators[cluster]

    def client(self, cluster: str) -> KubeClusterClient:
        return KubeClusterClient(cluster, self.emulators[cluster].api_client(), self.timings)

    async def start_controller(self, **kwargs: Any) -> Controller:
        self.clients = {c: self.client(c) for c in self.emulators}
        controller = Controller(self.clients.values(), **kwargs)
        self.controller = controller
        await controller.start()
        self._tasks.append(spawn(controller.run(), name="test controller"))
        return controller

    async def stop_controller(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.controller is not None:
            await self.controller.close()
            self.controller = None

    def imports(self, cluster: str, ns: str = "demo") -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self[cluster].list_objects(IMPORTS, ns)}

    def imported_slices(self, cluster: str, ns: str = "demo") -> list[dict[str, Any]]:
        return [o for o in self[cluster].list_objects(SLICES, ns) if ours(o)]

    def addresses(self, cluster: str, svc: str, ns: str = "demo") -> set[str]:
        return {a for s in self.imported_slices(cluster, ns)
                if s["metadata"]["labels"]["multicluster.kubernetes.io/service-name"] == svc
                for ep in s["endpoints"] for a in ep["addresses"]}

    async def wait(self, predicate: Any, timeout: float = 5.0) -> None:
        """Until predicate() holds, re-checked whenever any emulator sees a request."""
        waits = [asyncio.ensure_future(e.wait_for(predicate, timeout))
                 for e in self.emulators.values()]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # TimeoutError when nothing made it true in time
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


@contextlib.asynccontextmanager
async def clusterset(names: tuple[str, ...] = ("a", "b", "c"),
                     bookmark_interval: float = 60.0) -> AsyncIterator[Clusterset]:
    async with contextlib.AsyncExitStack() as stack:
        emulators = {}
        for name in names:
            emulators[name] = await stack.enter_async_context(
                KubeEmulator(bookmark_interval=bookmark_interval))
        cs = Clusterset(emulators)
        try:
            yield cs
        finally:
            await cs.stop_controller()


def export_web(cs: Clusterset, cluster: str, addresses: list[str], **kwargs: Any) -> None:
    """Service demo/web with one slice of `addresses` in `cluster`, exported."""
    emu = cs[cluster]
    emu.put_object(service("web"))
    emu.put_object(member_slice("web", addresses))
    emu.put_object(service_export("web", **kwargs))


def kube_controller(kubeconfig: Path, identity: str, clusters: tuple[str, ...] = ("a", "b", "c"),
                    **kwargs: Any) -> KubeControllerApp:
    """A Kubernetes-mode replica over write_kubeconfig's contexts, on a short Lease."""
    return KubeControllerApp(KubeControllerConfig(
        kubeconfig=kubeconfig, contexts=tuple((c, c) for c in clusters),
        lease_namespace="kube-system", lease_duration_s=1.5, identity=identity,
        timings=FAST, **kwargs))


class Members(Protocol):
    """A Clusterset, or anything else holding an emulator per cluster ID."""

    emulators: dict[str, KubeEmulator]


def write_kubeconfig(cs: Members, path: Path) -> Path:
    """One kubeconfig with a context per member, named by its cluster ID."""
    merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [],
                              "users": [], "contexts": []}
    for cluster, emu in cs.emulators.items():
        doc = yaml.safe_load(emu.kubeconfig(path.with_suffix(f".{cluster}"), cluster).read_text())
        for key in ("clusters", "users", "contexts"):
            merged[key].extend(doc[key])
        merged.setdefault("current-context", cluster)
    path.write_text(yaml.safe_dump(merged))
    return path
