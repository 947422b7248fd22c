"""`--source kube` against the API emulator, through the real kubernetes_asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi, DiscoveryV1Api

from mcsproxy.manifests import parse_service_import
from mcsproxy.model import ServiceKey
from mcsproxy.sources.kube import KubeSource
from mcsproxy.sources.kube_watch import WatchTimings
from mcsproxy.store import ObjectId, SnapshotStore
from tests.kube_emulator import KubeEmulator

MCS = "multicluster.x-k8s.io"
KARMADA = "networking.karmada.io"
FAST = WatchTimings(request_timeout_s=1.0, watch_timeout_s=2.0, idle_margin_s=0.5,
                    backoff_initial_s=0.02, backoff_max_s=0.2, not_served_retry_s=0.2,
                    page_size=1)
WEB = ServiceKey("test", "web")


def service_import(name: str, ip: str | None = "127.240.3.1", version: str = "v1alpha1",
                   ports: list[dict[str, Any]] | None = None, namespace: str = "test",
                   **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "ClusterSetIP" if ip else "Headless",
        "ports": ports if ports is not None else [{"name": "http", "protocol": "TCP",
                                                   "port": 80}],
        **spec}
    if ip:
        body["ips"] = [ip]
    return {"apiVersion": f"{MCS}/{version}", "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def imported_slice(name: str, service: str, cluster: str, addresses: list[str],
                   namespace: str = "test", port: int = 8080) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace, "labels": {
                "multicluster.kubernetes.io/service-name": service,
                "multicluster.kubernetes.io/source-cluster": cluster,
                "endpointslice.kubernetes.io/managed-by": "mcsproxy.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def karmada_slice(provider: str, orig: str, service: str, addresses: list[str],
                  namespace: str = "test", port: int = 8080) -> dict[str, Any]:
    """A slice as Karmada's dispatch controller writes it into a consumer cluster."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{provider}-{orig}", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-dispatch-controller.karmada.io"},
                         "annotations": {"endpointslice.karmada.io/provision-cluster": provider}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def native_slice(name: str, service: str, addresses: list[str], namespace: str = "test",
                 port: int = 8080) -> dict[str, Any]:
    """A slice as kube-controller-manager writes it for a local Service with a selector."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def multicluster_service(name: str, providers: list[str] | None = None,
                         consumers: list[str] | None = None, namespace: str = "test",
                         created: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    spec: dict[str, Any] = {"types": ["CrossCluster"]}
    if providers:
        spec["providerClusters"] = [{"name": p} for p in providers]
    if consumers:
        spec["consumerClusters"] = [{"name": c} for c in consumers]
    return {"apiVersion": f"{KARMADA}/v1alpha1", "kind": "MultiClusterService",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
            "spec": spec}


def local_service(name: str, ports: list[dict[str, Any]], namespace: str = "test",
                  **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": "10.96.0.10", "ports": ports, **spec}}


def claimed_service(name: str, ports: list[dict[str, Any]], namespace: str = "test",
                    **spec: Any) -> dict[str, Any]:
    """A Service as Karmada propagates it for a CrossCluster MultiClusterService: the MCS
    controller's claim on the template is copied into every provider and consumer."""
    svc = local_service(name, ports, namespace, **spec)
    svc["metadata"] |= {
        "labels": {"resourcetemplate.karmada.io/claimed-by": "MultiClusterService",
                   "multiclusterservice.karmada.io/permanent-id": f"id-{name}",
                   "karmada.io/managed": "true"},
        "annotations": {"multiclusterservice.karmada.io/name": name,
                        "multiclusterservice.karmada.io/namespace": namespace,
                        "resourcebinding.karmada.io/name": f"{name}-service"}}
    return svc


class Running:
    def __init__(self, emu: KubeEmulator, source: KubeSource, store: SnapshotStore) -> None:
        self.emu, self.source, self.store = emu, source, store

    @property
    def status(self) -> Any:
        return self.store.sources[self.source.name]

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait for the store to reach a state; re-checked on each snapshot or API request."""
        changed = asyncio.Event()
        self.store.subscribe(lambda _snapshot: changed.set())
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await self.emu.wait_for(changed.is_set, timeout=0.2)

    def endpoints(self, key: ServiceKey = WEB) -> list[tuple[str, str]]:
        svc = self.store.current.services.get(key)
        return sorted((e.cluster, e.address) for e in svc.endpoints) if svc else []


@contextlib.asynccontextmanager
async def started(emu: KubeEmulator, source: KubeSource,
                  store: SnapshotStore) -> AsyncIterator[Running]:
    """source running into store, its first snapshot loaded; cancelled on the way out."""
    task = asyncio.create_task(source.run(store))
    try:
        async with asyncio.timeout(5):
            await store.loaded.wait()
        yield Running(emu, source, store)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running(emu: KubeEmulator, tmp_path: Path, cluster_id: str = "east",
                  timings: WatchTimings = FAST, **kwargs: Any) -> AsyncIterator[Running]:
    source = KubeSource(cluster_id, kubeconfig=str(emu.kubeconfig(tmp_path / "kubeconfig")),
                        timings=timings, **kwargs)
    async with started(emu, source, SnapshotStore(cluster_id)) as run:
        yield run


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        yield emu


async def test_imports_appear_change_and_disappear(emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(service_import("web"))
    emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1", "10.1.0.2"]))
    emu.put_object(service_import("other", "127.240.3.2", version="v1beta1"))
    async with running(emu, tmp_path) as run, emu.api_client() as api:
        web = run.store.current.services[WEB]
        assert web.ips == ("127.240.3.1",) and [p.port for p in web.ports] == [80]
        assert run.endpoints() == [("west", "10.1.0.1"), ("west", "10.1.0.2")]
        assert run.store.current.get("test", "other").ips == ("127.240.3.2",)
        assert run.status.synced and run.status.connected and run.status.error is None
        # Listed in pages of one: the continue token was followed.
        assert any(r.query.get("continue") for r in emu.requests)

        custom, discovery = CustomObjectsApi(api), DiscoveryV1Api(api)
        await discovery.create_namespaced_endpoint_slice(
            "test", imported_slice("web-north", "web", "north", ["10.2.0.1"]))
        await run.until(lambda: ("north", "10.2.0.1") in run.endpoints())
        await custom.patch_namespaced_custom_object(
            MCS, "v1alpha1", "test", "serviceimports", "web",
            {"spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 8000}]}},
            _content_type="application/merge-patch+json")
        await run.until(lambda: run.store.current.services[WEB].ports[0].port == 8000)
        await discovery.delete_namespaced_endpoint_slice("web-west", "test")
        await run.until(lambda: run.endpoints() == [("north", "10.2.0.1")])
        await custom.delete_namespaced_custom_object(MCS, "v1alpha1", "test",
                                                     "serviceimports", "web")
        await run.until(lambda: WEB not in run.store.current.services)
        # A slice whose import is gone serves nothing, and nothing else moved.
        assert run.store.current.get("test", "other") is not None
        # One v1alpha1 watch: v1beta1 (same storage) is not watched twice.
        watched = {r.path for r in emu.requests if r.query.get("watch") == "True"}
        assert f"/apis/{MCS}/v1alpha1/serviceimports" in watched
        assert f"/apis/{MCS}/v1beta1/serviceimports" not in watched


async def test_a_burst_of_changes_costs_one_snapshot(emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(service_import("web"))
    async with running(emu, tmp_path) as run:
        before = run.store.current.version
        for i in range(50):
            emu.put_object(imported_slice(f"web-{i}", "web", "west", [f"10.1.1.{i + 1}"]))
        await run.until(lambda: len(run.endpoints()) == 50)
        # 50 watch events, coalesced: far fewer snapshots than events.
        assert run.store.current.version - before < 10


async def test_a_large_list_is_applied_whole_and_the_collector_runs_again(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """600 imports and slices: applied with the collector paused (BULK_ITEMS), all of them
    served, and automatic collection back on afterwards."""
    for i in range(600):
        emu.put_object(service_import(f"svc-{i}", f"127.240.{4 + i // 250}.{i % 250 + 1}"))
        emu.put_object(imported_slice(f"svc-{i}-west", f"svc-{i}", "west", [f"10.3.{i // 250}."
                                                                            f"{i % 250 + 1}"]))
    timings = dataclasses.replace(FAST, page_size=1000)
    try:
        async with running(emu, tmp_path, timings=timings) as run:
            assert gc.isenabled()
            await run.until(lambda: sum(1 for s in run.store.current.services.values()
                                        if s.endpoints) == 600)
            assert run.store.current.get("test", "svc-599").endpoints[0].address == "10.3.2.100"
    finally:
        gc.unfreeze()


async def test_bad_object_is_skipped_and_last_good_kept(
        emu: KubeEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    emu.put_object(service_import("web"))
    bad = service_import("broken", ports=[{"name": "x", "protocol": "TCP", "port": 70000}])
    emu.put_object(bad)
    caplog.set_level(logging.ERROR, "mcsproxy.sources.kube")
    async with running(emu, tmp_path) as run:
        assert run.store.current.get("test", "broken") is None
        assert run.store.current.get("test", "web") is not None
        assert "ServiceImport test/broken" in caplog.text
        # A good version is later broken: the good one keeps serving.
        emu.put_object(service_import("web", ports=[{"name": "x", "protocol": "ICMP",
                                                     "port": 80}]))
        emu.put_object(service_import("sentinel", "127.240.3.9"))
        await run.until(lambda: run.store.current.get("test", "sentinel") is not None)
        assert run.store.current.services[WEB].ports[0].protocol == "TCP"
        assert "ServiceImport test/web" in caplog.text
        assert run.source.m_rejected._value.get() >= 2


async def test_an_object_deleted_and_created_again_bad_while_away_is_not_kept(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """Deleted, then created again under the same name with a spec that does not validate,
    while the watches are down: the relist after 410 shows the new object only (another
    uid). The version kept was the deleted object's, so it goes, as the live watch's
    DELETED makes it go; a bad version of the same object keeps its last good one."""
    bad_ports = [{"name": "http", "protocol": "TCP", "port": 70000}]
    emu.put_object(service_import("web"))
    emu.put_object(service_import("kept", "127.240.3.2"))
    emu.put_object(imported_slice("kept-west", "kept", "west", ["10.1.0.1"]))
    emu.put_object(imported_slice("kept-north", "kept", "north", ["10.2.0.1"]))
    emu.put_object(multicluster_service("kweb"))
    emu.put_object(local_service("kweb", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "kweb-a", "kweb", ["10.11.0.1"]))
    emu.put_object(karmada_slice("member2", "kweb-b", "kweb", ["10.12.0.1"]))
    emu.put_object(native_slice("kweb-local", "kweb", ["10.13.0.1"]))
    emu.put_object(multicluster_service("kother"))  # served: CrossCluster, every consumer
    kweb, kept = ServiceKey("test", "kweb"), ServiceKey("test", "kept")
    async with running(emu, tmp_path, cluster_id="member3") as run:
        await run.until(lambda: len(run.endpoints(kweb)) == 3 and len(run.endpoints(kept)) == 2
                        and run.store.current.get("test", "kother") is not None)
        emu.hang()
        emu.drop_watches()
        gone = [("serviceimports.multicluster.x-k8s.io", "web"),
                ("endpointslices.discovery.k8s.io", "kept-north"),
                ("endpointslices.discovery.k8s.io", "member2-kweb-b"),
                ("endpointslices.discovery.k8s.io", "kweb-local"),
                ("multiclusterservices.networking.karmada.io", "kother")]
        for resource, name in gone:
            assert emu.delete_object(resource, name, "test")
        emu.put_object(service_import("web", ports=bad_ports))
        emu.put_object(service_import("kept", "127.240.3.2", ports=bad_ports))  # same uid
        emu.put_object(imported_slice("kept-north", "kept", "north", ["10.2.0.1"], port=70000))
        emu.put_object(karmada_slice("member2", "kweb-b", "kweb", ["10.12.0.1"], port=70000))
        emu.put_object(native_slice("kweb-local", "kweb", ["10.13.0.1"], port=70000))
        emu.put_object({**multicluster_service("kother"), "spec": {"types": "CrossCluster"}})
        emu.put_object(service_import("sentinel", "127.240.3.9"))
        emu.expire_history()
        emu.hang(False)
        await run.until(lambda: run.store.current.get("test", "sentinel") is not None
                        and run.store.current.get("test", "web") is None
                        and run.store.current.get("test", "kother") is None
                        and run.endpoints(kweb) == [("member1", "10.11.0.1")]
                        and run.endpoints(kept) == [("west", "10.1.0.1")])
        assert all(r.relists_gone for r in run.source.reflectors)
        assert run.store.current.get("test", "kept").ports[0].port == 80  # its last good
        assert run.source.objects == 4  # kept, kept-west, sentinel; Karmada's kweb


async def test_410_relist_applies_what_was_missed(emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(service_import("web"))
    emu.put_object(service_import("gone", "127.240.3.3"))
    emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1"]))
    async with running(emu, tmp_path) as run:
        lists = sum(r.lists for r in run.source.reflectors)
        emu.hang()  # the watches stall while things change
        emu.drop_watches()
        emu.store.delete(emu.store.by_kind(f"{MCS}/v1alpha1", "ServiceImport"), "test", "gone",
                         None)
        emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.9"]))
        emu.put_object(service_import("new", "127.240.3.4"))
        emu.expire_history()  # and the history that would tell them is gone
        emu.hang(False)
        await run.until(lambda: run.store.current.get("test", "new") is not None
                        and run.store.current.get("test", "gone") is None
                        and run.endpoints() == [("west", "10.1.0.9")])
        assert sum(r.relists_gone for r in run.source.reflectors) >= 2
        assert sum(r.lists for r in run.source.reflectors) > lists
        assert sorted(str(k) for k in run.store.current.services) == [
            "test/new", "test/web"]


async def test_api_server_down_keeps_serving_then_resyncs(
        emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(service_import("web"))
    emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1"]))
    async with running(emu, tmp_path) as run:
        version = run.store.current.version
        await emu.stop()
        await run.until(lambda: not run.status.connected)
        assert run.status.error and run.status.synced
        # Static stability: the last snapshot keeps serving, unchanged.
        assert run.store.current.version == version
        assert run.endpoints() == [("west", "10.1.0.1")]
        emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.2"]))  # while away
        await emu.start()
        await run.until(lambda: run.status.connected
                        and run.endpoints() == [("west", "10.1.0.2")])
        assert run.status.error is None


async def test_api_server_hanging_times_out_and_recovers(
        emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(service_import("web"))
    async with running(emu, tmp_path) as run:
        emu.hang()
        emu.drop_watches()
        await run.until(lambda: not run.status.connected, timeout=8)
        assert "Timeout" in (run.status.error or "") or "Disconnected" in (run.status.error
                                                                           or "")
        emu.hang(False)
        emu.put_object(service_import("late", "127.240.3.5"))
        await run.until(lambda: run.store.current.get("test", "late") is not None
                        and run.status.connected, timeout=8)


async def test_servfail_state_until_first_complete_list(
        emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(service_import("web"))
    emu.fail_next(3, 503, path="/endpointslices")
    store = SnapshotStore("east")
    source = KubeSource("east", kubeconfig=str(emu.kubeconfig(tmp_path / "kc")), timings=FAST)
    task = asyncio.create_task(source.run(store))
    try:
        await emu.wait_for(lambda: sum(r.path.endswith("/endpointslices")
                                       for r in emu.requests) >= 2)
        assert not store.loaded.is_set()  # the DNS answers SERVFAIL meanwhile
        async with asyncio.timeout(5):
            await store.loaded.wait()
        assert store.current.get("test", "web") is not None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_v1beta1_only_cluster(tmp_path: Path) -> None:
    async with KubeEmulator() as emu:
        emu.store.types.pop((MCS, "v1alpha1", "serviceimports"), None)
        emu.put_object(service_import("web", version="v1beta1"))
        async with running(emu, tmp_path) as run:
            assert run.store.current.services[WEB].ips == ("127.240.3.1",)
            await emu.wait_for(lambda: any(
                r.path == f"/apis/{MCS}/v1beta1/serviceimports" and r.query.get("watch")
                for r in emu.requests))


async def test_karmada_dispatched_slices_form_a_served_service(
        emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(multicluster_service("web", providers=["member1", "member2"]))
    emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"]))
    emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1", "10.12.0.2"]))
    emu.put_object(karmada_slice("member9", "web-zzz", "web", ["10.19.0.1"]))  # not a provider
    emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80,
                                          "targetPort": 8080}]))
    # The cluster's own slices (kubernetes.io/service-name, no Karmada manager) stay out.
    emu.put_object({**karmada_slice("x", "own", "web", ["10.0.0.1"]), "metadata": {
        "name": "web-own", "namespace": "test",
        "labels": {"kubernetes.io/service-name": "web"}}})
    async with running(emu, tmp_path, cluster_id="member3") as run, emu.api_client() as api:
        web = run.store.current.services[WEB]
        assert web.type == "ClusterSetIP" and len(web.ips) == 1
        assert web.ips[0].startswith("127.240.")
        assert [(p.name, p.port) for p in web.ports] == [("http", 80)]  # the Service's port
        assert run.endpoints() == [("member1", "10.11.0.1"), ("member2", "10.12.0.1"),
                                   ("member2", "10.12.0.2")]
        assert web.clusters == ("member1", "member2")
        assert web.endpoints[0].port_for(web.ports[0]) == 8080
        ip = web.ips[0]

        await DiscoveryV1Api(api).delete_namespaced_endpoint_slice("member1-web-abc", "test")
        await run.until(lambda: run.endpoints() == [("member2", "10.12.0.1"),
                                                    ("member2", "10.12.0.2")])
        assert run.store.current.services[WEB].ips == (ip,)  # stable while it lives
        # Without the MultiClusterService the dispatched slices decide, unfiltered (Karmada
        # itself dispatches only providers' slices).
        await CustomObjectsApi(api).delete_namespaced_custom_object(
            KARMADA, "v1alpha1", "test", "multiclusterservices", "web")
        await run.until(lambda: run.endpoints() == [("member2", "10.12.0.1"),
                                                    ("member2", "10.12.0.2"),
                                                    ("member9", "10.19.0.1")])
        assert run.store.current.services[WEB].ips == (ip,)
        for name in ("member2-web-def", "member9-web-zzz"):
            await DiscoveryV1Api(api).delete_namespaced_endpoint_slice(name, "test")
        await run.until(lambda: WEB not in run.store.current.services)

    # Stable across restarts: the same set of services gets the same addresses.
    emu.put_object(multicluster_service("web", providers=["member1", "member2"]))
    async with running(emu, tmp_path, cluster_id="member3") as again:
        assert again.store.current.services[WEB].ips == (ip,)


async def test_karmada_consumer_without_multicluster_service(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """What a Karmada consumer member really holds: the propagated Service and the
    providers' dispatched slices, never the MultiClusterService (Karmada does not apply it
    to members). That is enough to serve the service."""
    emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"]))
    emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1"]))
    # A local Service nobody dispatches slices for stays out.
    emu.put_object(local_service("plain", [{"name": "http", "protocol": "TCP", "port": 80}]))
    async with running(emu, tmp_path, cluster_id="member3") as run, emu.api_client() as api:
        await run.until(lambda: WEB in run.store.current.services)
        web = run.store.current.services[WEB]
        assert web.type == "ClusterSetIP" and web.ips[0].startswith("127.240.")
        assert [(p.name, p.port) for p in web.ports] == [("http", 80)]  # the Service's
        assert run.endpoints() == [("member1", "10.11.0.1"), ("member2", "10.12.0.1")]
        assert web.clusters == ("member1", "member2")
        assert run.store.current.get("test", "plain") is None
        ip = web.ips

        # Slices added and removed move the endpoints; the address stays.
        emu.put_object(karmada_slice("member1", "web-ghi", "web", ["10.11.0.2"]))
        await run.until(lambda: ("member1", "10.11.0.2") in run.endpoints())
        discovery = DiscoveryV1Api(api)
        await discovery.delete_namespaced_endpoint_slice("member2-web-def", "test")
        await run.until(lambda: run.endpoints() == [("member1", "10.11.0.1"),
                                                    ("member1", "10.11.0.2")])
        assert run.store.current.services[WEB].ips == ip

        # The last dispatched slice gone (and the Service): no longer served.
        await discovery.delete_namespaced_endpoint_slice("member1-web-abc", "test")
        await discovery.delete_namespaced_endpoint_slice("member1-web-ghi", "test")
        await CoreV1Api(api).delete_namespaced_service("web", "test")
        await run.until(lambda: WEB not in run.store.current.services)
        assert run.status.connected and run.status.error is None


async def test_karmada_local_endpoints_when_also_a_provider(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """Karmada never dispatches a cluster's slices back to itself: a provider that is also
    a consumer gets its own endpoints from the Service's native slices, tagged with its
    own cluster id, so local-first and failover work."""
    emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}],
                                 trafficDistribution="PreferClose"))
    emu.put_object(native_slice("web-x1", "web", ["10.10.0.1"]))
    emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1"]))
    # Native slices of a Service Karmada serves nothing for stay out.
    emu.put_object(native_slice("plain-x1", "plain", ["10.10.0.9"]))
    async with running(emu, tmp_path, cluster_id="member1") as run, emu.api_client() as api:
        await run.until(lambda: WEB in run.store.current.services)
        assert run.endpoints() == [("member1", "10.10.0.1"), ("member2", "10.12.0.1")]
        assert run.store.current.services[WEB].traffic_distribution == "PreferClose"
        assert run.store.current.get("test", "plain") is None
        # Local endpoints follow the native slices.
        emu.put_object(native_slice("web-x1", "web", ["10.10.0.1", "10.10.0.2"]))
        await run.until(lambda: ("member1", "10.10.0.2") in run.endpoints())
        # A propagated MultiClusterService that does not list this cluster as a provider
        # leaves the local endpoints out.
        emu.put_object(multicluster_service("web", providers=["member2"]))
        await run.until(lambda: run.endpoints() == [("member2", "10.12.0.1")])
        await CustomObjectsApi(api).delete_namespaced_custom_object(
            KARMADA, "v1alpha1", "test", "multiclusterservices", "web")
        await run.until(lambda: len(run.endpoints()) == 3)
        # Local endpoints alone do not make a Karmada service: the name goes with the last
        # dispatched slice.
        await DiscoveryV1Api(api).delete_namespaced_endpoint_slice("member2-web-def", "test")
        await run.until(lambda: WEB not in run.store.current.services)


async def test_karmada_sole_provider_serves_its_own_endpoints(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """The only provider gets no dispatched slice (Karmada never sends a cluster's own slices
    back): the claim Karmada copies onto the propagated Service plus local endpoints make
    it a provider, so the clusterset name resolves there too, and keeps its address when
    another provider's slices arrive."""
    http = [{"name": "http", "protocol": "TCP", "port": 80}]
    emu.put_object(claimed_service("web", http))
    emu.put_object(native_slice("web-x1", "web", ["10.10.0.1"]))
    # Claimed but no local endpoints: a consumer with nothing dispatched yet stays out.
    emu.put_object(claimed_service("cons", http))
    emu.put_object(native_slice("cons-x1", "cons", []))
    # Local endpoints of a Service Karmada has not claimed stay out.
    emu.put_object(local_service("plain", http))
    emu.put_object(native_slice("plain-x1", "plain", ["10.10.0.9"]))
    async with running(emu, tmp_path, cluster_id="member1") as run, emu.api_client() as api:
        # In the first snapshot already: no NXDOMAIN window when the gateway restarts.
        web = run.store.current.services[WEB]
        assert web.type == "ClusterSetIP" and web.ips[0].startswith("127.240.")
        assert [(p.name, p.port) for p in web.ports] == [("http", 80)]
        assert run.endpoints() == [("member1", "10.10.0.1")]
        assert run.store.current.get("test", "cons") is None
        assert run.store.current.get("test", "plain") is None
        ip = web.ips

        # Another provider's slice arrives: merged, the address stays.
        emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1"]))
        await run.until(lambda: len(run.endpoints()) == 2)
        assert run.store.current.services[WEB].ips == ip
        await DiscoveryV1Api(api).delete_namespaced_endpoint_slice("member2-web-def", "test")
        await run.until(lambda: run.endpoints() == [("member1", "10.10.0.1")])
        assert run.store.current.services[WEB].ips == ip

        # Karmada drops the claim (the MultiClusterService is gone or no longer
        # CrossCluster): no longer served.
        emu.put_object(local_service("web", http))
        await run.until(lambda: WEB not in run.store.current.services)
        assert run.status.connected and run.status.error is None


async def test_karmada_sole_provider_scaled_to_zero_keeps_its_name(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """KEP-1645: an import lives as long as its export, whatever its endpoint count. The
    only provider scaled to zero (its native slice emptied, then deleted) keeps the name,
    ports and ClusterSetIP with no endpoints, and serves its endpoints again when they
    return; its Service deleted, or the claim dropped, ends it."""
    http = [{"name": "http", "protocol": "TCP", "port": 80}]
    emu.put_object(claimed_service("web", http))
    emu.put_object(native_slice("web-x1", "web", ["10.10.0.1"]))
    async with running(emu, tmp_path, cluster_id="member1") as run, emu.api_client() as api:
        ip = run.store.current.services[WEB].ips
        discovery = DiscoveryV1Api(api)
        karmada = run.source.karmada
        assert karmada is not None

        def served_empty() -> bool:
            web = run.store.current.services.get(WEB)
            return web is not None and not web.endpoints

        emu.put_object(native_slice("web-x1", "web", []))
        await run.until(served_empty)
        await discovery.delete_namespaced_endpoint_slice("web-x1", "test")
        await run.until(lambda: ("test", "web-x1") not in karmada.local_keys)
        web = run.store.current.services[WEB]
        assert (web.ips, [(p.name, p.port) for p in web.ports]) == (ip, [("http", 80)])
        assert not web.endpoints

        emu.put_object(native_slice("web-x2", "web", ["10.10.0.2"]))
        await run.until(lambda: run.endpoints() == [("member1", "10.10.0.2")])
        assert run.store.current.services[WEB].ips == ip

        # At zero again, the claim dropped: gone; claimed again at zero: still out (it
        # could be a consumer), until an endpoint shows it provides.
        emu.put_object(native_slice("web-x2", "web", []))
        await run.until(served_empty)
        emu.put_object(local_service("web", http))
        await run.until(lambda: WEB not in run.store.current.services)
        emu.put_object(claimed_service("web", http))
        await run.until(lambda: WEB in karmada.claimed)
        assert WEB not in run.store.current.services
        emu.put_object(native_slice("web-x2", "web", ["10.10.0.2"]))
        await run.until(lambda: WEB in run.store.current.services)

        # The provider's Service deleted: the name goes, with or without endpoints.
        emu.put_object(native_slice("web-x2", "web", []))
        await run.until(served_empty)
        await CoreV1Api(api).delete_namespaced_service("web", "test")
        await run.until(lambda: WEB not in run.store.current.services)
        assert run.status.connected and run.status.error is None


async def test_karmada_without_multicluster_services_oldest_service_keeps_the_address(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """No MultiClusterService to date them: the Services' creationTimestamps order the
    allocation, so colliding hashes resolve the same way across restarts, whatever order
    the slices are listed in."""
    names = [f"svc{i}" for i in range(5)]
    for i, name in enumerate(reversed(names)):
        emu.put_object({**local_service(name, [{"name": "http", "protocol": "TCP",
                                                "port": 80}]),
                        "metadata": {"name": name, "namespace": "test",
                                     "creationTimestamp": f"2024-01-0{i + 1}T00:00:00Z"}})
    for name in names:
        emu.put_object(karmada_slice("member1", f"{name}-abc", name, ["10.11.0.1"]))
    async with running(emu, tmp_path, clusterset_cidr="127.240.7.0/29") as run:
        await run.until(lambda: all(run.store.current.get("test", n) for n in names))
        first = {n: run.store.current.get("test", n).ips for n in names}
        assert len({ips for ips in first.values()}) == 5
    async with running(emu, tmp_path, clusterset_cidr="127.240.7.0/29") as run:
        await run.until(lambda: all(run.store.current.get("test", n) for n in names))
        assert {n: run.store.current.get("test", n).ips for n in names} == first


async def test_a_failing_services_list_holds_back_karmada_services_only(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """A dispatched slice at startup starts the Services and native slices watches; while
    every Services list fails, the first sync publishes the ServiceImports, the source
    status carries the error, and the Karmada service waits until the list works."""
    emu.put_object(service_import("web"))
    emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1"]))
    emu.put_object(local_service("kweb", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "kweb-a", "kweb", ["10.11.0.1"]))
    emu.fail_next(None, 503, path="/api/v1/services")  # the claimed Services' too
    kweb = ServiceKey("test", "kweb")
    async with running(emu, tmp_path, cluster_id="member3") as run:
        assert run.endpoints() == [("west", "10.1.0.1")]
        assert run.store.current.get("test", "kweb") is None
        assert run.status.synced and "services.v1: HTTP 503" in (run.status.error or "")
        emu.clear_faults()
        await run.until(lambda: run.endpoints(kweb) == [("member1", "10.11.0.1")])
        await run.until(lambda: run.status.error is None)


async def test_a_failing_multicluster_services_list_holds_back_karmada_services_only(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """MultiClusterServices refused (403: a ClusterRole without them; or 5xx from a broken
    CRD) used to hold back the first sync: every name SERVFAIL, ServiceImports too. Only
    Karmada's services wait for that list now."""
    emu.put_object(service_import("web"))
    emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1"]))
    emu.put_object(local_service("kweb", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "kweb-a", "kweb", ["10.11.0.1"]))
    emu.fail_next(None, 403, path=f"/apis/{KARMADA}/v1alpha1/multiclusterservices")
    kweb = ServiceKey("test", "kweb")
    async with running(emu, tmp_path, cluster_id="member3") as run:
        assert run.endpoints() == [("west", "10.1.0.1")]
        assert run.store.current.get("test", "kweb") is None
        assert run.status.synced and "multiclusterservices" in (run.status.error or "")
        emu.clear_faults()
        await run.until(lambda: run.endpoints(kweb) == [("member1", "10.11.0.1")])
        await run.until(lambda: run.status.error is None)


async def test_karmada_member_without_the_multicluster_service_crd(tmp_path: Path) -> None:
    """A member without Karmada's networking CRD (404 on the group) still serves the
    dispatched slices."""
    async with KubeEmulator() as emu:
        emu.store.types.pop((KARMADA, "v1alpha1", "multiclusterservices"), None)
        emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
        emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"]))
        async with running(emu, tmp_path, cluster_id="member3") as run:
            await run.until(lambda: WEB in run.store.current.services)
            assert run.endpoints() == [("member1", "10.11.0.1")]
            assert run.status.connected and run.status.error is None


async def test_karmada_ports_from_slices_and_consumers(
        emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(multicluster_service("web"))  # providers and consumers: all clusters
    emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"], port=9090))
    emu.put_object(multicluster_service("elsewhere", consumers=["member7"]))
    emu.put_object(karmada_slice("member1", "elsewhere-1", "elsewhere", ["10.11.0.2"]))
    async with running(emu, tmp_path, cluster_id="member3") as run:
        web = run.store.current.services[WEB]
        assert [(p.name, p.protocol, p.port) for p in web.ports] == [("http", "TCP", 9090)]
        assert run.store.current.get("test", "elsewhere") is None  # not a consumer here
        # A ServiceImport of the same name (an MCS controller's) wins over Karmada's.
        emu.put_object(service_import("web", "127.240.9.9"))
        await run.until(lambda: run.store.current.services[WEB].ips == ("127.240.9.9",))
        assert run.endpoints() == []


async def test_karmada_colliding_hashes_oldest_keeps_the_address(
        emu: KubeEmulator, tmp_path: Path) -> None:
    # A /29 pool has 6 usable addresses minus .0: collisions are certain.
    names = [f"svc{i}" for i in range(5)]
    for i, name in enumerate(names):
        emu.put_object(multicluster_service(name, created=f"2024-01-0{i + 1}T00:00:00Z"))
    async with running(emu, tmp_path, clusterset_cidr="127.240.7.0/29") as run:
        first = {n: run.store.current.get("test", n).ips for n in names}
        assert len({ips for ips in first.values()}) == 5
    async with running(emu, tmp_path, clusterset_cidr="127.240.7.0/29") as run:
        assert {n: run.store.current.get("test", n).ips for n in names} == first


async def test_karmada_services_a_relist_brings_are_allocated_oldest_first(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """Two services that hash to the same address of the /29 (svc0 and svc2: .4) arrive in
    one relist after 410, the newer one's slice listed first: the older one gets the
    address, as on a fresh start, so a restart moves neither."""
    http = [{"name": "http", "protocol": "TCP", "port": 80}]
    for i, name in enumerate(("svc0", "svc2", "svc1")):
        emu.put_object({**local_service(name, http), "metadata": {
            "name": name, "namespace": "test", "creationTimestamp": f"2024-01-0{i + 1}T00:00:00Z"}})
    emu.put_object(karmada_slice("member1", "c", "svc1", ["10.11.0.1"]))  # starts Karmada's
    names = ("svc0", "svc2")
    async with running(emu, tmp_path, clusterset_cidr="127.240.7.0/29") as run:
        await run.until(lambda: run.store.current.get("test", "svc1") is not None)
        emu.hang()
        emu.drop_watches()
        emu.put_object(karmada_slice("member1", "a", "svc2", ["10.11.0.2"]))  # listed first
        emu.put_object(karmada_slice("member1", "b", "svc0", ["10.11.0.3"]))
        emu.expire_history()
        emu.hang(False)
        await run.until(lambda: all(run.store.current.get("test", n) for n in names))
        first = {n: run.store.current.get("test", n).ips for n in names}
        assert first["svc0"] == ("127.240.7.4",)
    async with running(emu, tmp_path, clusterset_cidr="127.240.7.0/29") as run:
        await run.until(lambda: all(run.store.current.get("test", n) for n in names))
        assert {n: run.store.current.get("test", n).ips for n in names} == first


def dated_service(name: str, day: int) -> dict[str, Any]:
    svc = local_service(name, [{"name": "http", "protocol": "TCP", "port": 80}])
    svc["metadata"]["creationTimestamp"] = f"2024-01-{day:02d}T00:00:00Z"
    return svc


async def test_karmada_gateways_started_apart_agree_on_colliding_addresses(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """Every gateway of a cluster allocates on its own and mcsproxy-dns answers from any
    of them, so each must give a service the address every other gives it. svc0 and svc2
    hash to .4 of the /29. One gateway runs while the newer svc2 turns cross-cluster, then
    the older svc0: svc2 used to keep .4 (svc0 .5) until that gateway restarted, while a
    gateway started meanwhile gave svc0 .4 (svc2 .5): a client told svc0 = .4 by one
    reached svc2 through the other. Deleting svc0 then moved svc2 to .4 only in the later
    gateways."""
    cidr = "127.240.7.0/29"

    def addresses(run: Running) -> dict[str, tuple[str, ...]]:
        return {n: svc.ips for n in ("svc0", "svc1", "svc2")
                if (svc := run.store.current.get("test", n)) is not None}

    emu.put_object(dated_service("svc1", 2))
    emu.put_object(karmada_slice("member1", "svc1-a", "svc1", ["10.11.0.1"]))
    async with running(emu, tmp_path, clusterset_cidr=cidr) as early:
        emu.put_object(dated_service("svc2", 3))
        emu.put_object(karmada_slice("member1", "svc2-a", "svc2", ["10.11.0.2"]))
        await early.until(lambda: "svc2" in addresses(early))
        emu.put_object(dated_service("svc0", 1))
        emu.put_object(karmada_slice("member1", "svc0-a", "svc0", ["10.11.0.3"]))
        await early.until(lambda: "svc0" in addresses(early))
        async with running(emu, tmp_path, clusterset_cidr=cidr) as late:
            await late.until(lambda: len(addresses(late)) == 3)
            assert addresses(late)["svc0"] == ("127.240.7.4",)
            await early.until(lambda: addresses(early) == addresses(late), timeout=2)
            emu.delete_object("endpointslices.discovery.k8s.io", "member1-svc0-a", "test")
            emu.delete_object("services", "svc0", "test")
            await late.until(lambda: len(addresses(late)) == 2)
            assert addresses(late)["svc2"] == ("127.240.7.4",)
            await early.until(lambda: addresses(early) == addresses(late), timeout=2)
    async with running(emu, tmp_path, clusterset_cidr=cidr) as restarted:
        await restarted.until(lambda: len(addresses(restarted)) == 2)
        assert addresses(restarted)["svc2"] == ("127.240.7.4",)


async def test_karmada_service_pushed_out_of_a_full_range_is_withdrawn(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """Six services fill the /29; an older seventh turns cross-cluster: the newest has no
    address any more and is withdrawn (whatever a gateway started now would serve),
    never left served at an address another service now has. When one goes, the
    newest gets an address again, as in a gateway started then (it stayed out until
    something of its own changed: the log promised "served once an address is free")."""
    names = [f"svc{i}" for i in range(7)]
    cidr = "127.240.7.0/29"

    def served(run: Running) -> dict[str, tuple[str, ...]]:
        return {n: svc.ips for n in names
                if (svc := run.store.current.get("test", n)) is not None}

    for day, name in enumerate(names[1:], start=2):
        emu.put_object(dated_service(name, day))
        emu.put_object(karmada_slice("member1", f"{name}-a", name, ["10.11.0.1"]))
    async with running(emu, tmp_path, clusterset_cidr=cidr) as run:
        await run.until(lambda: all(run.store.current.get("test", n) for n in names[1:]))
        emu.put_object(dated_service("svc0", 1))
        emu.put_object(karmada_slice("member1", "svc0-a", "svc0", ["10.11.0.1"]))
        await run.until(lambda: "svc0" in served(run))
        assert "svc6" not in served(run) and len(set(served(run).values())) == 6
        emu.delete_object("endpointslices.discovery.k8s.io", "member1-svc3-a", "test")
        await run.until(lambda: "svc3" not in served(run))
        await run.until(lambda: "svc6" in served(run), timeout=2)
        async with running(emu, tmp_path, clusterset_cidr=cidr) as fresh:
            assert served(fresh) == served(run)


async def test_karmada_service_leaves_a_service_imports_address_in_every_gateway(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """An MCS controller writes ServiceImports from the range the gateway allocates
    Karmada's services from (127.240.0.0/16 for both, by default): kweb hashes to .3 of the
    /29, which a ServiceImport then takes. kweb kept .3, so the gateway answered both
    names with one address and one listener served both. A ServiceImport wins: kweb moves
    on in a running gateway and in one started later alike, and back when the import
    goes; a MultiClusterService's import (our own) is no obstacle."""
    cidr = "127.240.7.0/29"
    kweb = ServiceKey("test", "kweb")

    def addresses(run: Running) -> dict[str, tuple[str, ...]]:
        return {str(k): svc.ips for k, svc in run.store.current.services.items()}

    emu.put_object(dated_service("kweb", 1))
    emu.put_object(karmada_slice("member1", "kweb-a", "kweb", ["10.11.0.1"]))
    async with running(emu, tmp_path, clusterset_cidr=cidr) as early:
        assert addresses(early) == {"test/kweb": ("127.240.7.3",)}  # its hash's slot
        emu.put_object(service_import("real", "127.240.7.3"))
        await early.until(lambda: len(addresses(early)) == 2)
        assert addresses(early) == {"test/kweb": ("127.240.7.4",),
                                    "test/real": ("127.240.7.3",)}
        async with running(emu, tmp_path, clusterset_cidr=cidr) as late:
            assert addresses(late) == addresses(early)
            emu.delete_object("serviceimports.multicluster.x-k8s.io", "real", "test")
            for run in (early, late):
                await run.until(lambda r=run: addresses(r) == {"test/kweb": ("127.240.7.3",)})
        assert early.endpoints(kweb) == [("member1", "10.11.0.1")]


async def test_karmada_service_moves_for_an_import_that_arrives_in_a_relist(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """The other order inside one gateway: Karmada's services placed first, the
    ServiceImports (one on kweb's address, one on a free one) arrive in a relist after
    410; and an import another source put in the shared store before the kube source
    started (svc1's slot, .1) is no Karmada service's either."""
    cidr = "127.240.7.0/29"
    store = SnapshotStore("east")
    other = parse_service_import(service_import("filed", "127.240.7.1", namespace="other"))
    store.upsert(ObjectId("file:/etc/mcs", "ServiceImport", "other", "filed"), other)
    emu.put_object(dated_service("kweb", 1))
    emu.put_object(karmada_slice("member1", "kweb-a", "kweb", ["10.11.0.1"]))
    emu.put_object(dated_service("svc1", 2))
    emu.put_object(karmada_slice("member1", "svc1-a", "svc1", ["10.11.0.2"]))
    source = KubeSource("east", kubeconfig=str(emu.kubeconfig(tmp_path / "kubeconfig")),
                        timings=FAST, clusterset_cidr=cidr)
    async with started(emu, source, store) as run:
        def ips(name: str) -> tuple[str, ...]:
            svc = run.store.current.get("test", name)
            return svc.ips if svc is not None else ()

        await run.until(lambda: bool(ips("kweb") and ips("svc1")))
        assert (ips("kweb"), ips("svc1")) == (("127.240.7.3",), ("127.240.7.2",))
        emu.hang()
        emu.drop_watches()
        emu.put_object(service_import("real", "127.240.7.3"))
        emu.put_object(service_import("spare", "127.240.7.6"))
        emu.expire_history()
        emu.hang(False)
        await run.until(lambda: ips("real") == ("127.240.7.3",))
        assert (ips("kweb"), ips("svc1")) == (("127.240.7.4",), ("127.240.7.2",))
        assert source.reflectors[0].relists_gone >= 1


async def test_without_karmada_the_source_still_syncs(tmp_path: Path) -> None:
    async with KubeEmulator() as emu:
        emu.store.types.pop((KARMADA, "v1alpha1", "multiclusterservices"), None)
        emu.put_object(service_import("web"))
        async with running(emu, tmp_path) as run:
            assert run.store.current.get("test", "web") is not None
            assert run.status.connected and run.status.error is None
            # No Karmada service: of the cluster's Services only those Karmada claims
            # (by label selector) are ever listed, never all of them.
            await emu.wait_for(lambda: any(r.path == "/api/v1/services"
                                           for r in emu.requests))
            services = [r for r in emu.requests if r.path == "/api/v1/services"]
            assert all(
                r.query.get("labelSelector") == "resourcetemplate.karmada.io/claimed-by="
                                                "MultiClusterService" for r in services)


async def test_bookmarks_keep_a_quiet_watch_resumable(tmp_path: Path) -> None:
    # A short history: without bookmarks, a resume after unrelated churn would be a 410.
    async with KubeEmulator(history=5, bookmark_interval=0.05) as emu:
        emu.put_object(service_import("web"))
        # Watches long enough that none ends by itself during the test.
        quiet = dataclasses.replace(FAST, watch_timeout_s=60.0)
        async with running(emu, tmp_path, timings=quiet) as run:
            await emu.wait_for(lambda: emu.watch_count == len(run.source.reflectors))
            for i in range(20):  # other resources move the resourceVersion on
                emu.put_object({"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": f"cm{i}", "namespace": "test"}})
            current = str(emu.store.rv)
            await run.until(lambda: all(r.resource_version == current  # by bookmarks
                                        for r in run.source.reflectors))
            emu.drop_watches()
            emu.put_object(service_import("late", "127.240.3.6"))
            await run.until(lambda: run.store.current.get("test", "late") is not None)
            assert sum(r.relists_gone for r in run.source.reflectors) == 0
            watches = [r for r in emu.requests if r.query.get("watch") == "True"
                       and r.path.endswith("/serviceimports")]
            assert watches[-1].query["resourceVersion"] == current
