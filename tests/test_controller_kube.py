"""The controller in Kubernetes mode: one API emulator per member cluster, driven through
the real kubernetes-asyncio client (list + watch, writes, status subresource)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.clusters.kube import KubeTimings
from controlplane.clusters.kube_api import KubeApi
from controlplane.clusters.kube_app import KubeControllerApp
from controlplane.clusters.kube_holds import KubeHoldStore
from controlplane.controller import Controller
from controlplane.resources import KIND_IMPORT
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.test_controller_kube_support import (
    EXPORTS,
    FAST,
    IMPORTS,
    Clusterset,
    clusterset,
    export_web,
    kube_controller,
    member_slice,
    namespace,
    service,
    service_export,
    write_kubeconfig,
    writes,
)

FAST_PROBE = KubeTimings(request_timeout_s=0.3, watch_timeout_s=30.0, probe_interval_s=0.1,
                         backoff_base_s=0.05, backoff_cap_s=0.2, stale_after_s=0.3)


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


async def test_an_object_the_cluster_refuses_holds_up_nothing_else(cs: Clusterset) -> None:
    """a refuses anything new in its namespace "locked" (being deleted, a webhook, a
    quota): only b's api import there is missing. Before: the refused import ended a's
    batch, so web's slices and its ServiceExport status in a were never written either,
    nor anything a later batch carried with the retried import (deletes included)."""
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
        cs[c].put_object(namespace("locked"))
    export_web(cs, "a", ["10.1.0.1"])
    cs["b"].put_object(service("api", ns="locked"))
    cs["b"].put_object(member_slice("api", ["10.2.0.1"], ns="locked"))
    cs["b"].put_object(service_export("api", ns="locked"))
    cs["a"].fail_next(None, 403, method="POST", path="/namespaces/locked/serviceimports")
    controller = await cs.start_controller()
    assert cs.addresses("a", "web") == {"10.1.0.1"}
    assert conditions(cs, "a")["Ready"]["status"] == "True"
    assert cs.imports("a", "locked") == {} and "api" in cs.imports("c", "locked")
    assert cs.addresses("a", "api", "locked") == {"10.2.0.1"}  # its slice, without owner
    assert "a" in controller.failed_clusters
    cs["a"].store.delete(cs["a"].store.by_name(EXPORTS), "demo", "web")
    await cs.wait(lambda: not cs.imports("a") and not cs.imported_slices("a"))

    def refused() -> int:
        return sum(1 for r in cs["a"].requests
                   if r.method == "POST" and "/locked/serviceimports" in r.path)

    await cs.wait(lambda: refused() >= 2)  # retried: the slice is not sent again
    assert [r.path for r in cs["a"].requests if r.method == "PUT"] == []
    cs["a"].clear_faults()

    def owned() -> bool:
        imp = cs.imports("a", "locked").get("api")
        return imp is not None and all(
            s["metadata"].get("ownerReferences", [{}])[0].get("uid") == imp["metadata"]["uid"]
            for s in cs.imported_slices("a", "locked"))

    await cs.wait(owned)


async def test_a_write_refused_for_good_is_retried_less_and_less_often(
        cs: Clusterset) -> None:
    """A refusal that lasts (a webhook, a quota) was retried, and logged as an error,
    every second for as long as it lasted: now 1 s, then 2 s, doubling to 30 s."""
    for c in cs.emulators:
        cs[c].put_object(namespace("locked"))
    cs["b"].put_object(service("api", ns="locked"))
    cs["b"].put_object(member_slice("api", ["10.2.0.1"], ns="locked"))
    cs["b"].put_object(service_export("api", ns="locked"))
    cs["a"].fail_next(None, 403, method="POST", path="/namespaces/locked/serviceimports")

    def refused() -> int:
        return sum(1 for r in cs["a"].requests
                   if r.method == "POST" and "/locked/serviceimports" in r.path)

    await cs.start_controller()
    loop = asyncio.get_running_loop()
    tries = []
    for n in (1, 2, 3):
        await cs["a"].wait_for(lambda n=n: refused() >= n, timeout=5)
        tries.append(loop.time())
    # Lower bounds only: a loaded machine may delay a retry, never hurry it.
    assert tries[1] - tries[0] >= 0.8
    assert tries[2] - tries[1] >= 1.7  # was 1 s again


async def test_a_namespace_being_deleted_gets_no_imports(cs: Clusterset) -> None:
    """b's namespace demo is being deleted (deletionTimestamp set; the API server refuses
    anything new in it, 403): the controller takes its import out of there instead of
    creating it again. Before: the namespace controller's deletes were repaired as drift,
    refused, and retried with an error every second until the namespace was gone, for
    ever when a finalizer held it."""
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    controller = await cs.start_controller()
    assert "web" in cs.imports("b")
    doomed = namespace("demo")
    doomed["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    cs["b"].put_object(doomed)
    mark = len(cs["b"].requests)
    await cs.wait(lambda: not cs.imports("b") and not cs.imported_slices("b"))
    cs["a"].put_object(member_slice("web", ["10.1.0.1", "10.1.0.2"]))
    await cs.wait(lambda: cs.addresses("c", "web") == {"10.1.0.1", "10.1.0.2"})
    assert [r.path for r in cs["b"].requests[mark:] if r.method in ("POST", "PUT")] == []
    assert "b" not in controller.failed_clusters
    # Deleted after all, then made again: imported again.
    cs["b"].delete_object("namespaces", "demo")
    cs["b"].put_object(namespace("demo"))
    await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1", "10.1.0.2"})


async def test_an_exporters_namespace_deleted_unexports_everywhere(cs: Clusterset) -> None:
    """a's namespace demo deleted (the API server deletes everything in it, as the
    emulator now does too): its Service and ServiceExport go, so b and c lose the import,
    and nothing is written into a's namespace meanwhile. In an emulator that deleted only
    the namespace object, a's export lived on and b and c kept importing it."""
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    controller = await cs.start_controller()
    await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1"})
    mark = len(cs["a"].requests)
    assert cs["a"].delete_object("namespaces", "demo")
    await cs.wait(lambda: not cs.imports("b") and not cs.imports("c"))
    assert not cs.imported_slices("b") and not cs.imported_slices("c")
    assert [r.path for r in cs["a"].requests[mark:] if r.method in ("POST", "PUT")] == []
    assert "a" not in controller.failed_clusters


async def test_a_start_cut_short_leaves_no_writer_behind(cs: Clusterset) -> None:
    """A term ended (stopped, lease lost) while its first reconcile is being written:
    its writers end with it. Before: they wrote on after the term, into clients closed
    under them ("task write cluster a failed: AssertionError" in 2 of 6 runs of
    test_a_term_that_starts_with_a_member_down_serves_the_others, stopping its first
    controller)."""
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    cs["b"].hold_answers(method="POST")  # b's first write hangs: the start waits on it
    controller = Controller([cs.client(c) for c in cs.emulators])
    start = spawn(controller.start(), name="start cut short")
    await cs["b"].wait_for(lambda: any(r.method == "POST" for r in cs["b"].requests))
    await cancel_and_wait([start])
    try:
        assert [t.get_name() for t in asyncio.all_tasks()
                if t.get_name().startswith("write cluster")] == []
    finally:
        cs["b"].release_answers()
        await controller.close()


async def test_a_start_cut_short_leaves_no_holds_writer_behind(cs: Clusterset) -> None:
    """A start that released an address saves the holds in the background: cut short
    (the term ended), that writer went on, retrying for good a write its fence refuses,
    one task per term ended so; and the store of a start retried was never closed."""
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    await cs.start_controller()
    await cs.stop_controller()
    cs["a"].delete_object(EXPORTS, "web", "demo")  # its address is released at the start
    cs["a"].fail_next(None, 503, method="POST", path="/configmaps")  # holds not saved yet
    cs["b"].hold_answers(method="DELETE")  # the start waits on b's delete of the import
    holds = KubeHoldStore(KubeApi(cs["a"].api_client(), "holds", 2.0), "kube-system",
                          backoff_base_s=0.05, backoff_cap_s=0.1)
    controller = Controller([cs.client(c) for c in cs.emulators], holds=holds)
    start = spawn(controller.start(), name="start cut short")
    await cs["a"].wait_for(lambda: holds.write_failures >= 2)
    await cs["b"].wait_for(lambda: any(r.method == "DELETE" for r in cs["b"].requests))
    await cancel_and_wait([start])
    try:
        assert [t.get_name() for t in asyncio.all_tasks()
                if t.get_name().startswith("save ")] == []
    finally:
        cs["b"].release_answers()
        cs["a"].clear_faults()
        await controller.close()
        await holds.api.client.close()


async def test_a_large_batch_waits_its_turn_without_a_task_a_write(cs: Clusterset) -> None:
    """A task was made for every write of a batch, waiting its turn (30,000 at once for
    a member going stale at 10,000 services: the loop held 0.25 s to make them)."""
    cs["b"].put_object(namespace("demo"))
    client = cs.client("b")
    await client.sync()
    imports = [{"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": KIND_IMPORT,
                "metadata": {"name": f"s{i}", "namespace": "demo"},
                "spec": {"type": "Headless", "ports": []}} for i in range(100)]
    cs["b"].hold_answers(method="POST")
    applying = spawn(client.apply(imports), name="apply")
    try:
        await cs["b"].wait_for(lambda: sum(r.method == "POST" for r in cs["b"].requests)
                               == client.timings.write_concurrency)
        batch = [t for t in asyncio.all_tasks()
                 if t.get_coro().__qualname__.startswith("KubeClusterClient._bounded")]
        assert len(batch) == client.timings.write_concurrency
        cs["b"].release_answers()
        await applying
        assert len(cs.imports("b")) == 100
    finally:
        cs["b"].release_answers()
        await cancel_and_wait([applying])
        await client.close()


async def test_a_namespace_made_in_a_member_rewrites_no_export_status(cs: Clusterset) -> None:
    """The Ready condition counted the importing clusters: a namespace made in one (a
    member joining) rewrote every export's status in every exporter for that number."""
    for c in ("a", "b"):
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    controller = await cs.start_controller()
    before = writes(cs["a"])
    cs["c"].put_object(namespace("demo"))
    await cs.wait(lambda: "web" in cs.imports("c"))
    await controller.flush()
    assert writes(cs["a"]) == before
    assert conditions(cs, "a")["Ready"]["status"] == "True"


async def test_a_relist_is_not_held_while_the_watch_after_it_runs(cs: Clusterset) -> None:
    """A relist's list, a local of the informer's loop, was held for the whole watch
    after it (until the next relist; our own objects relist every resync_s): a second
    copy of every object of the resource as the server sent it."""
    emu = cs["a"]
    emu.put_object(namespace("demo"))
    for i in range(300):
        emu.put_object(service(f"s{i}", ports=[(f"p{p}", 8000 + p) for p in range(10)]))
    client = cs.client("a")
    await client.sync()
    watching = spawn(client.watch(lambda *_: None), name="watch a")
    tracemalloc.start(12)
    ours = [tracemalloc.Filter(True, "*/controlplane/*", all_frames=True)]
    try:
        await emu.wait_for(lambda: emu.watch_count == 7)
        before = tracemalloc.take_snapshot().filter_traces(ours)
        listed = len(emu.requests)
        emu.expire_history()
        emu.drop_watches()  # each resource resumed, refused (410), listed again
        await emu.wait_for(lambda: emu.watch_count == 7 and sum(
            "watch" not in r.query for r in emu.requests[listed:]) >= 7)
        gc.collect()
        grown = tracemalloc.take_snapshot().filter_traces(ours).compare_to(before, "filename")
        held = sum(d.size_diff for d in grown if d.size_diff > 0)
        assert held < 200_000, held  # the services' list alone is ~1 MB of objects
    finally:
        tracemalloc.stop()
        await cancel_and_wait([watching])
        await client.close()


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


async def test_a_watch_answered_too_large_resource_version_relists(cs: Clusterset) -> None:
    """After an etcd restore every version the controller holds is ahead of the API
    server's, which answers each watch resumed from one 504 "Too large resource version":
    the controller lists again (as client-go does) and follows a's changes. Before: it
    resumed from the same version for good, a stale and none of its changes read."""
    cs["a"].store.rv = 1000  # a history: our few writes after the restore stay below it
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    controller = await cs.start_controller()
    await cs["a"].wait_for(lambda: cs["a"].watch_count == 7)  # every watch resumed
    cs["a"].restore_backup()
    cs["a"].put_object(member_slice("web", ["10.1.0.2"]))
    await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.2"} and not stale_marked(cs, c)
                              for c in cs.emulators))
    assert controller.members()["a"]["connected"]


async def test_a_watch_error_event_of_an_odd_shape_relists(cs: Clusterset) -> None:
    """An ERROR event whose Status code is not a number raised ValueError in the watch:
    the member's informer ended for good while the member still showed as connected, and
    none of its later changes came in."""
    for c in cs.emulators:
        cs[c].put_object(namespace("demo"))
    export_web(cs, "a", ["10.1.0.1"])
    controller = await cs.start_controller()
    await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1"})
    await cs["a"].wait_for(lambda: cs["a"].watch_count == 7)
    cs["a"].send_watch_event("endpointslices.discovery.k8s.io", "ERROR", {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": "oops",
        "message": "an aggregated API server's own shape"})
    cs["a"].put_object(member_slice("web", ["10.1.0.2"]))
    await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.2"} for c in cs.emulators))
    assert controller.members()["a"]["connected"]


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


async def test_a_restart_of_a_members_api_server_rewrites_nothing() -> None:
    """A failure that the next retry gets past (an API server restart, a watch refused
    with 504 after an etcd restore and relisted) is no outage: marking the member stale
    and back wrote every slice imported from it twice in every member."""
    async with clusterset() as cs:
        cs.timings = dataclasses.replace(FAST, stale_after_s=3.0)
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        controller = await cs.start_controller()
        await cs["a"].wait_for(lambda: cs["a"].watch_count == 7)
        before = {c: writes(cs[c]) for c in cs.emulators}
        await cs["a"].stop()
        await cs.wait(lambda: controller.members()["a"]["error"] is not None)
        await cs["a"].start()
        await cs["a"].wait_for(lambda: cs["a"].watch_count == 7)
        cs["a"].restore_backup()  # every watch answered 504: relisted
        await cs["a"].wait_for(lambda: cs["a"].watch_count == 7)
        await controller.flush()
        assert controller.members()["a"]["connected"]
        assert {c: writes(cs[c]) for c in cs.emulators} == before
        assert not any(stale_marked(cs, c) for c in cs.emulators)


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


def export_named(cs: Clusterset, cluster: str, name: str, addresses: list[str]) -> None:
    cs[cluster].put_object(service(name))
    cs[cluster].put_object(member_slice(name, addresses))
    cs[cluster].put_object(service_export(name))


def sourced_from(cs: Clusterset, cluster: str, source: str) -> dict[str, dict[str, Any]]:
    """Our imported slices in `cluster` whose endpoints come from `source`, by name."""
    return {s["metadata"]["name"]: s for s in cs.imported_slices(cluster)
            if s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"] == source}


async def http_get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        if resp.status != 200 or resp.content_type == "application/json":
            return resp.status, await resp.json(content_type=None)
        return resp.status, json.loads(await resp.content.readline())  # a stream's first


async def test_a_term_that_starts_with_a_member_down_serves_the_others(
        tmp_path: Path) -> None:
    """A controller restarted while c's API server is down: it leads, reconciles every
    service c does not export (a's change and a's new export reach b), and leaves those c
    may export (db, and shared, which a exports too) in b exactly as last written, until
    c answers. Before: the term waited for c, reconciling nothing and not leading."""
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_named(cs, "a", "web", ["10.1.0.1"])
        export_named(cs, "c", "db", ["10.3.0.1"])
        export_named(cs, "a", "shared", ["10.1.0.5"])
        export_named(cs, "c", "shared", ["10.3.0.5"])
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")

        def app() -> KubeControllerApp:
            return kube_controller(kubeconfig, "one", serve=("127.0.0.1", 0))

        first = app()
        task = spawn(first.run(), name="controller before")
        try:
            await cs.wait(lambda: cs.addresses("b", "db") == {"10.3.0.1"} and
                          cs.addresses("b", "shared") == {"10.1.0.5", "10.3.0.5"} and
                          cs.addresses("b", "web") == {"10.1.0.1"})
        finally:
            first.stop()
            await cancel_and_wait([task])
        from_c = sourced_from(cs, "b", "c")
        imports_b = cs.imports("b")
        await cs["c"].stop()

        second = app()
        task = spawn(second.run(), name="controller after")
        try:
            await asyncio.wait_for(second.led.wait(), 5)
            assert second.server is not None and second.server.bound is not None
            url = f"http://127.0.0.1:{second.server.bound[1]}"
            assert await http_get(f"{url}/readyz") == (200, {"ready": True, "leading": True})
            controller = second.controller
            assert controller is not None
            assert [str(k) for k in controller.waiting("c")] == ["demo/db", "demo/shared"]
            member = controller.members()["c"]
            assert member["stale"] and not member["connected"] and member["error"]
            assert member["services_waiting"] == 2
            gauge = second.metrics.registry.get_sample_value
            assert gauge("mcsproxy_controller_member_connected", {"cluster": "c"}) == 0
            # Its endpoints as last imported (db's and shared's), stale.
            assert gauge("mcsproxy_controller_stale_endpoints", {"cluster": "c"}) == 2
            # Those waiting are still imported, and counted (they were not: 1, web's).
            assert gauge("mcsproxy_controller_service_imports") == 3
            # b's gateways get their stream; c's, not read yet, are told to come back.
            status, snapshot = await http_get(f"{url}/v1/stream?cluster=b")
            assert status == 200 and snapshot["type"] == "snapshot"
            assert (await http_get(f"{url}/v1/stream?cluster=c"))[0] == 404

            # shared (exported by a and c: the failover case) takes a's change; c's part
            # and the import stay as last written.
            cs["a"].put_object(member_slice("shared", ["10.1.0.6"]))
            cs["a"].put_object(member_slice("web", ["10.1.0.2"]))
            export_named(cs, "a", "api", ["10.1.0.8"])
            await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.2"} and
                          cs.addresses("b", "api") == {"10.1.0.8"} and
                          cs.addresses("a", "api") == {"10.1.0.8"} and
                          cs.addresses("b", "shared") == {"10.1.0.6", "10.3.0.5"})
            assert sourced_from(cs, "b", "c") == from_c  # untouched, not even marked
            assert {n: cs.imports("b")[n] for n in ("db", "shared")} == \
                {n: imports_b[n] for n in ("db", "shared")}

            cs["c"].put_object(member_slice("db", ["10.3.0.2"]))  # changed while away
            await cs["c"].start()
            await cs.wait(lambda: cs.addresses("b", "db") == {"10.3.0.2"} and
                          cs.addresses("b", "shared") == {"10.1.0.6", "10.3.0.5"} and
                          cs.addresses("c", "api") == {"10.1.0.8"} and
                          cs.addresses("c", "web") == {"10.1.0.2"})
            assert controller.waiting("c") == [] and controller.members()["c"]["connected"]
            assert "unread" not in controller.members()["c"]
            assert gauge("mcsproxy_controller_member_connected", {"cluster": "c"}) == 1
            assert gauge("mcsproxy_controller_stale_endpoints", {"cluster": "c"}) == 0
            assert (await http_get(f"{url}/v1/stream?cluster=c"))[0] == 200
        finally:
            second.stop()
            await cancel_and_wait([task])


def karmada_mcs(name: str, providers: list[str], consumers: list[str]) -> dict[str, Any]:
    return {"apiVersion": "networking.karmada.io/v1alpha1", "kind": "MultiClusterService",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"types": ["CrossCluster"],
                     "providerClusters": [{"name": p} for p in providers],
                     "consumerClusters": [{"name": c} for c in consumers]}}


async def test_a_multiclusterservice_only_in_a_member_down_at_the_start_is_kept(
        tmp_path: Path) -> None:
    """web is provided by a through a MultiClusterService that only c holds. Restarted
    with c down, the controller cannot know it: the import and a's slices in b stay as
    last written until c answers. Before: nothing read named web, so its import and
    slices were deleted from a and b at the start of the term."""
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        cs["a"].put_object(service("web"))
        cs["a"].put_object(member_slice("web", ["10.1.0.1"]))
        cs["c"].put_object(karmada_mcs("web", ["a"], ["a", "b"]))
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        first = kube_controller(kubeconfig, "one")
        task = spawn(first.run(), name="controller before")
        try:
            await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1"})
        finally:
            first.stop()
            await cancel_and_wait([task])
        imports_b, slices_b = cs.imports("b"), cs.imported_slices("b")
        await cs["c"].stop()

        second = kube_controller(kubeconfig, "one")
        task = spawn(second.run(), name="controller after")
        try:
            await asyncio.wait_for(second.led.wait(), 5)
            controller = second.controller
            assert controller is not None
            assert [str(k) for k in controller.waiting("c")] == ["demo/web"]
            assert cs.imports("b") == imports_b and cs.imported_slices("b") == slices_b
            assert "web" in cs.imports("a")

            cs["a"].put_object(member_slice("web", ["10.1.0.2"]))  # changed while c is away
            await cs["c"].start()
            await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.2"})
            assert cs.imports("b")["web"]["spec"] == imports_b["web"]["spec"]
            assert controller.waiting("c") == []
        finally:
            second.stop()
            await cancel_and_wait([task])
