"""The controller in Kubernetes mode: one API emulator per member cluster, driven through
the real kubernetes-asyncio client (list + watch, writes, status subresource)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.clusters.kube import KubeTimings
from controlplane.resources import KIND_IMPORT
from tests.test_controller_kube_support import (
    EXPORTS,
    IMPORTS,
    Clusterset,
    clusterset,
    export_web,
    member_slice,
    namespace,
    service,
    service_export,
    writes,
)

FAST_PROBE = KubeTimings(request_timeout_s=0.3, watch_timeout_s=30.0, probe_interval_s=0.1,
                         backoff_base_s=0.05, backoff_cap_s=0.2)


@pytest.fixture
async def cs() -> AsyncIterator[Clusterset]:
    async with clusterset() as cs:
        yield cs


def conditions(cs: Clusterset, cluster: str, name: str = "web") -> dict[str, dict[str, Any]]:
    export = cs[cluster].get_object(EXPORTS, name, "demo") or {}
    return {c["type"]: c for c in export.get("status", {}).get("conditions", [])}


async def test_export_in_a_is_imported_where_the_namespace_exists(cs: Clusterset) -> None:
    for c in ("a", "b"):
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1", "10.1.0.2"])
    await cs.start_controller()
    for c in ("a", "b"):
        imp = cs.imports(c)["web"]
        assert imp["spec"]["type"] == "ClusterSetIP" and len(imp["spec"]["ips"]) == 1
        assert imp["status"] == {"clusters": [{"cluster": "a"}]}
        assert cs.addresses(c, "web") == {"10.1.0.1", "10.1.0.2"}
        [s] = cs.imported_slices(c)
        assert s["metadata"]["ownerReferences"][0]["uid"] == imp["metadata"]["uid"]
        assert "kubernetes.io/service-name" not in s["metadata"]["labels"]
    assert cs.imports("c") == {} and cs.imported_slices("c") == []
    assert conditions(cs, "a")["Ready"]["status"] == "True"
    # A namespace that appears later gets the import too, driven by the watch.
    cs["c"].put_object(namespace("demo"))
    await cs.wait(lambda: "web" in cs.imports("c") and cs.addresses("c", "web"))
    assert cs.imports("c")["web"]["spec"]["ips"] == cs.imports("a")["web"]["spec"]["ips"]


async def test_watched_endpoint_change_and_unexport_propagate(cs: Clusterset) -> None:
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    await cs.start_controller()
    cs["a"].put_object(member_slice("web", ["10.1.0.1", "10.1.0.9"]))
    await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.1", "10.1.0.9"}
                              for c in cs.emulators))
    # Unexport: the import and its slices go everywhere; the Service itself stays.
    cs["a"].store.delete(cs["a"].store.by_name(EXPORTS), "demo", "web")
    await cs.wait(lambda: all(not cs.imports(c) and not cs.imported_slices(c)
                              for c in cs.emulators))
    assert cs["a"].get_object("services", "web", "demo") is not None


async def test_conflicts_reported_on_every_export_via_status(cs: Clusterset) -> None:
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    cs["a"].put_object(service("web", ports=[("http", 80)]))
    cs["a"].put_object(service_export("web", created="2024-01-01T00:00:00Z"))
    cs["b"].put_object(service("web", ports=[("http", 81)], clusterIP="None"))
    cs["b"].put_object(service_export("web", created="2024-06-01T00:00:00Z"))
    await cs.start_controller()
    for c in ("a", "b"):
        conflict = conditions(cs, c)["Conflict"]
        assert conflict["status"] == "True"
        assert conflict["reason"] == "PortConflict,TypeConflict"
        assert 'from oldest service export in "a"' in conflict["message"]
    assert cs.imports("c")["web"]["spec"]["type"] == "ClusterSetIP"
    # Status went through the status subresource, never a replace of the export itself.
    paths = [r.path for r in cs["b"].requests if r.method in ("PUT", "PATCH")
             and "serviceexports" in r.path]
    assert paths and all(p.endswith("/status") for p in paths)
    # The conflict clears when b's export goes: a's status says so.
    cs["b"].store.delete(cs["b"].store.by_name(EXPORTS), "demo", "web")
    await cs.wait(lambda: conditions(cs, "a")["Conflict"]["status"] == "False")


async def test_invalid_export_gets_condition_and_no_import(cs: Clusterset) -> None:
    cs["a"].put_object(namespace("demo"))
    cs["a"].put_object(service_export("nosvc"))
    cs["a"].put_object(service("ext", type="ExternalName", externalName="x.example"))
    cs["a"].put_object(service_export("ext"))
    await cs.start_controller()
    assert conditions(cs, "a", "nosvc")["Valid"]["reason"] == "NoService"
    assert conditions(cs, "a", "ext")["Valid"]["reason"] == "InvalidServiceType"
    assert cs.imports("a") == {}


async def test_no_op_resync_writes_nothing_and_ips_survive_restart(cs: Clusterset) -> None:
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    export_web(cs, "b", ["10.2.0.1"])
    await cs.start_controller()
    ips = cs.imports("c")["web"]["spec"]["ips"]
    await cs.stop_controller()
    before = {c: writes(cs[c]) for c in cs.emulators}
    # A new controller reads back what it wrote: same ClusterSetIP, the conditions'
    # transition times kept (its clock says otherwise), nothing rewritten.
    await cs.start_controller(now=lambda: "2030-01-01T00:00:00Z")
    assert cs.imports("c")["web"]["spec"]["ips"] == ips
    assert {c: writes(cs[c]) for c in cs.emulators} == before
    # Relist after 410 in every cluster: same view, still nothing written.
    for c in cs.emulators:
        cs[c].expire_history()
        cs[c].drop_watches()
    await cs.wait(lambda: all(
        sum(1 for r in cs[c].requests if r.method == "GET" and "watch" not in r.query
            and r.path.endswith("/serviceexports")) >= 2 for c in cs.emulators))
    assert cs.controller is not None
    await cs.controller.flush()
    assert {c: writes(cs[c]) for c in cs.emulators} == before


async def test_foreign_objects_are_never_touched(cs: Clusterset) -> None:
    for c in ("a", "b"):
        cs[c].put_object(namespace("demo"))
    foreign = {"apiVersion": f"{IMPORTS.split('.', 1)[1]}/v1alpha1", "kind": KIND_IMPORT,
               "metadata": {"name": "web", "namespace": "demo", "labels": {"x": "y"}},
               "spec": {"type": "Headless", "ports": []}}
    cs["b"].put_object(foreign)
    other = member_slice("other", ["10.9.9.9"], name="someone-elses")
    other["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"] = "zz"
    cs["b"].put_object(other)
    export_web(cs, "a", ["10.1.0.1"])
    await cs.start_controller()
    assert "ips" not in cs.imports("b")["web"]["spec"]  # left as it was
    assert "ips" in cs.imports("a")["web"]["spec"]
    cs["a"].store.delete(cs["a"].store.by_name(EXPORTS), "demo", "web")
    await cs.wait(lambda: not cs.imports("a") and not cs.imported_slices("b"))
    assert cs.imports("b")["web"]["metadata"]["labels"] == {"x": "y"}
    assert cs["b"].get_object("endpointslices.discovery.k8s.io", "someone-elses", "demo")
    # Only our own imported slice was deleted there.
    deleted = [r.path.rsplit("/", 1)[1] for r in cs["b"].requests if r.method == "DELETE"]
    assert all(name.startswith("web-a-") for name in deleted), deleted


async def test_missed_changes_are_found_by_relist_after_410(cs: Clusterset) -> None:
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    cs["a"].put_object(member_slice("web", ["10.1.0.5"], name="web-second"))
    await cs.start_controller()
    assert cs.addresses("b", "web") == {"10.1.0.1", "10.1.0.5"}
    emu = cs["a"]
    emu.hang()
    emu.drop_watches()  # the reconnects now wait while the history is lost
    await emu.wait_for(lambda: emu.watch_count == 0)
    emu.store.delete(emu.store.by_name("endpointslices.discovery.k8s.io"), "demo", "web-second")
    emu.put_object(member_slice("web", ["10.1.0.1", "10.1.0.7"]))
    emu.expire_history()
    emu.hang(False)
    await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.1", "10.1.0.7"}
                              for c in cs.emulators))


def stale_marked(cs: Clusterset, cluster: str) -> bool:
    slices = cs.imported_slices(cluster)
    return bool(slices) and all(
        s["metadata"].get("annotations", {}).get("mcsproxy.io/stale") == "true" for s in slices)


async def test_api_server_away_keeps_imports_stale_then_resyncs(cs: Clusterset) -> None:
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    controller = await cs.start_controller()
    await cs["a"].stop()
    await cs.wait(lambda: stale_marked(cs, "b") and stale_marked(cs, "c"))
    member = controller.members()["a"]
    assert member["stale"] and member["error"] and member["since"] > 0
    assert all("web" in cs.imports(c) for c in ("b", "c"))  # static stability
    assert cs.addresses("b", "web") == {"10.1.0.1"}
    # A change made while it was away arrives once it answers again.
    cs["a"].put_object(member_slice("web", ["10.1.0.2"]))
    await cs["a"].start()
    await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.2"} and not stale_marked(cs, c)
                              for c in cs.emulators))
    assert controller.members()["a"]["connected"]


async def test_hung_api_server_is_marked_stale_by_the_probe() -> None:
    async with clusterset(("a", "b")) as cs:
        cs.timings = FAST_PROBE
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        controller = await cs.start_controller()
        # Watches still being opened would time out too: only the probe can tell once
        # every watch is open and silent (five inputs, and our imports and slices).
        await cs["a"].wait_for(lambda: cs["a"].watch_count == 7)
        cs["a"].hang()  # open watches stay open and silent; new requests get no answer
        await cs.wait(lambda: stale_marked(cs, "b"))
        assert "GET /version" in (controller.members()["a"]["error"] or "")
        cs["a"].hang(False)
        await cs.wait(lambda: not stale_marked(cs, "b") and cs.addresses("b", "web"))


async def test_karmada_multiclusterservice_is_watched(cs: Clusterset) -> None:
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    cs["a"].put_object(service("web"))
    cs["a"].put_object(member_slice("web", ["10.1.0.1"]))
    await cs.start_controller()
    assert cs.imports("b") == {}
    cs["a"].put_object({
        "apiVersion": "networking.karmada.io/v1alpha1", "kind": "MultiClusterService",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {"types": ["CrossCluster"], "providerClusters": [{"name": "a"}],
                 "consumerClusters": [{"name": "a"}, {"name": "b"}]}})
    await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1"})
    assert "web" in cs.imports("a") and cs.imported_slices("a") == []  # never back to source
    assert cs.imports("c") == {}


async def test_cluster_without_karmada_crd_is_fine(cs: Clusterset) -> None:
    del cs["c"].store.types[("networking.karmada.io", "v1alpha1", "multiclusterservices")]
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    await cs.start_controller()
    assert cs.addresses("c", "web") == {"10.1.0.1"}
    assert not any("multiclusterservices" in r.path for r in cs["c"].requests)
    assert any("multiclusterservices" in r.path for r in cs["b"].requests)
