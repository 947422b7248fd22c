"""Drift repair in Kubernetes mode: what the controller wrote into a member and someone
else deleted or edited is written again, without waiting for a change in the exports,
and the echoes of its own writes never start a write loop. A write that failed is
written again too, whatever else was written to that member meanwhile."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.clusters import ChangeSet
from controlplane.clusters.kube_managed import Kept
from controlplane.controller import Controller
from controlplane.resources import KIND_IMPORT, KIND_SLICE, ObjectRef
from mcsproxy.model import ServiceKey
from mcsproxy.tasks import spawn
from tests.test_controller_kube_support import (
    EXPORTS,
    FAST,
    IMPORTS,
    SLICES,
    Clusterset,
    clusterset,
    export_web,
    member_slice,
    namespace,
    service,
    service_export,
    writes,
)

REPAIR_S = 5.0  # each repair must land within this
API = ServiceKey("demo", "api")


@contextlib.asynccontextmanager
async def a_exports_web(resync_s: float | None = None) -> AsyncIterator[Clusterset]:
    """Members a and b with namespace demo, a exporting web; resync_s: relist that often."""
    async with clusterset(("a", "b")) as cs:
        if resync_s is not None:
            cs.timings = dataclasses.replace(FAST, resync_s=resync_s)
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        yield cs


@pytest.fixture
async def cs() -> AsyncIterator[Clusterset]:
    async with a_exports_web() as cs:
        yield cs


def content(obj: dict[str, Any] | None) -> Any:
    """What the controller owns of an object: everything but server-set metadata."""
    if obj is None:
        return None
    meta = obj["metadata"]
    return ({k: v for k, v in obj.items() if k != "metadata"},
            meta.get("labels"), meta.get("annotations"),
            [o["name"] for o in meta.get("ownerReferences", ())])


class Written:
    """b's import and imported slice as the controller wrote them, to compare with."""

    def __init__(self, cs: Clusterset) -> None:
        self.cs = cs
        self.import_ = content(cs.imports("b")["web"])
        [self.slice] = cs.imported_slices("b")
        self.slice_name = self.slice["metadata"]["name"]
        export = cs["a"].get_object(EXPORTS, "web", "demo")
        assert export is not None
        self.export_status = export["status"]

    def restored(self) -> bool:
        imp = self.cs.imports("b").get("web")
        slices = self.cs.imported_slices("b")
        export = self.cs["a"].get_object(EXPORTS, "web", "demo") or {}
        return (imp is not None and content(imp) == self.import_
                and [content(s) for s in slices] == [content(self.slice)]
                # the slice is owned by the import that is there now
                and slices[0]["metadata"]["ownerReferences"][0]["uid"] == imp["metadata"]["uid"]
                and export.get("status") == self.export_status)


async def until_restored(cs: Clusterset, written: Written) -> None:
    await cs.wait(written.restored, timeout=REPAIR_S)


async def test_deleted_and_edited_objects_are_written_again_without_a_loop(
        cs: Clusterset) -> None:
    controller = await cs.start_controller()
    b = cs["b"]
    written = Written(cs)
    old_uid = cs.imports("b")["web"]["metadata"]["uid"]

    # The import deleted: written again (a new uid), and the slice now names that one.
    b.store.delete(b.store.by_name(IMPORTS), "demo", "web")
    await until_restored(cs, written)
    assert cs.imports("b")["web"]["metadata"]["uid"] != old_uid

    # The imported slice deleted.
    b.store.delete(b.store.by_name(SLICES), "demo", written.slice_name)
    await until_restored(cs, written)

    # The slice edited: other endpoints, another port.
    edited = copy.deepcopy(b.get_object(SLICES, written.slice_name, "demo"))
    assert edited is not None
    edited["endpoints"] = [{"addresses": ["10.6.6.6"], "conditions": {"ready": True}}]
    edited["ports"][0]["port"] = 9999
    b.put_object(edited)
    await until_restored(cs, written)

    # The import edited: no ports, no addresses, another status.
    imp = copy.deepcopy(cs.imports("b")["web"])
    imp["spec"]["ports"], imp["spec"]["ips"] = [], []
    imp["status"] = {"clusters": [{"cluster": "zz"}]}
    b.put_object(imp)
    await until_restored(cs, written)

    # The export's status (the conditions the controller writes) edited in a.
    export = copy.deepcopy(cs["a"].get_object(EXPORTS, "web", "demo"))
    assert export is not None
    export["status"] = {"conditions": []}
    cs["a"].put_object(export)
    await until_restored(cs, written)

    repaired = controller.metrics.registry.get_sample_value(
        "mcsproxy_controller_drift_repairs_total", {"cluster": "b"})
    assert repaired is not None and repaired >= 4

    # Its own writes' echoes are not drift: nothing is written while nothing changes.
    before = {c: writes(cs[c]) for c in cs.emulators}
    with pytest.raises(TimeoutError):
        await cs.wait(lambda: {c: writes(cs[c]) for c in cs.emulators} != before,
                      timeout=0.5)


async def test_a_change_whose_event_was_lost_is_found_by_the_periodic_relist() -> None:
    async with a_exports_web(resync_s=1.0) as cs:
        await cs.start_controller()
        written = Written(cs)
        b = cs["b"]
        b.lose_events()  # no watch, open or resumed, ever sees this deletion
        b.store.delete(b.store.by_name(SLICES), "demo", written.slice_name)
        b.lose_events(False)
        await until_restored(cs, written)
        # Relisting every second finds nothing to write when nothing changed.
        lists = sum(1 for r in b.requests if r.path.endswith("/serviceimports")
                    and "watch" not in r.query)
        before = writes(b)
        await b.wait_for(lambda: sum(1 for r in b.requests if r.path.endswith("/serviceimports")
                                     and "watch" not in r.query) >= lists + 2)
        assert writes(b) == before


async def test_a_change_made_while_our_answer_is_on_its_way_is_not_lost(
        cs: Clusterset) -> None:
    controller = await cs.start_controller()
    written = Written(cs)
    b = cs["b"]

    def repaired() -> float:
        return controller.metrics.registry.get_sample_value(
            "mcsproxy_controller_drift_repairs_total", {"cluster": "b"}) or 0.0

    def edit_slice(address: str) -> None:
        edited = copy.deepcopy(b.get_object(SLICES, written.slice_name, "demo"))
        assert edited is not None
        edited["endpoints"] = [{"addresses": [address], "conditions": {"ready": True}}]
        b.put_object(edited)

    # The repair's replace takes effect, but its answer is held back ...
    b.hold_answers(method="PUT", path="/endpointslices/")
    edit_slice("10.6.6.6")
    await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1"})
    # ... while someone edits the slice again, and that event is seen first.
    edit_slice("10.7.7.7")
    await cs.wait(lambda: repaired() == 2)
    b.release_answers()
    # The older answer does not hide the newer change: it is read again and repaired.
    await until_restored(cs, written)


async def test_a_failed_write_is_not_dropped_by_a_later_batch_for_other_services(
        cs: Clusterset) -> None:
    await cs.start_controller()
    a, b = cs["a"], cs["b"]
    b.fail_next(1, 500, method="PUT", path="/endpointslices/")
    a.put_object(member_slice("web", ["10.1.0.1", "10.1.0.2"]))
    await b.wait_for(lambda: any(r.method == "PUT" and "/endpointslices/" in r.path
                                 for r in b.requests))
    # Before its retry is due, a batch for another service is written to b ...
    a.put_object(service("api"))
    a.put_object(member_slice("api", ["10.1.0.9"]))
    a.put_object(service_export("api"))
    await cs.wait(lambda: cs.addresses("b", "api") == {"10.1.0.9"})
    # ... and the failed write still happens.
    await cs.wait(lambda: cs.addresses("b", "web") == {"10.1.0.1", "10.1.0.2"})


def stray(obj: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of one of our objects under another name, as a hand or an earlier controller
    would have left it: our label, no server-set fields."""
    copied = copy.deepcopy(obj)
    meta = copied["metadata"]
    for server_set in ("uid", "resourceVersion", "creationTimestamp", "generation"):
        meta.pop(server_set, None)
    meta["name"] = name
    return copied


def deletes(emu: Any) -> list[str]:
    return [r.path for r in emu.requests if r.method == "DELETE"]


async def test_objects_with_our_label_that_nothing_wants_are_deleted_while_running(
        cs: Clusterset) -> None:
    """A ServiceImport and an imported slice labelled as ours appear in b while the
    controller runs (not wanted there: no such export): both are deleted, by the watch,
    and nothing that is wanted is ever deleted or written again."""
    controller = await cs.start_controller()
    b = cs["b"]
    written = Written(cs)
    uids = {o["metadata"]["uid"] for o in (cs.imports("b")["web"], *cs.imported_slices("b"))}
    before = writes(b)
    b.put_object(stray(cs.imports("b")["web"], "ghost"))
    ghost_slice = stray(written.slice, "ghost-b-1")
    ghost_slice["metadata"]["labels"]["multicluster.kubernetes.io/service-name"] = "ghost"
    # Without an owner (orphaned, or made by hand): one naming a ServiceImport that is
    # not there is the garbage collector's (emulated too), not the controller's, to delete.
    del ghost_slice["metadata"]["ownerReferences"]
    b.put_object(ghost_slice)
    await cs.wait(lambda: "ghost" not in cs.imports("b") and len(cs.imported_slices("b")) == 1,
                  timeout=REPAIR_S)
    assert sorted(deletes(b)) == [
        "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices/ghost-b-1",
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceimports/ghost"]
    assert writes(b) == before + 2
    assert written.restored()
    assert {o["metadata"]["uid"] for o in (cs.imports("b")["web"],
                                           *cs.imported_slices("b"))} == uids
    assert controller.metrics.registry.get_sample_value(
        "mcsproxy_controller_unwanted_removed_total", {"cluster": "b"}) == 2


async def test_an_unwanted_object_whose_event_was_lost_is_deleted_by_the_relist() -> None:
    async with a_exports_web(resync_s=1.0) as cs:
        await cs.start_controller()
        b = cs["b"]
        b.lose_events()  # only the periodic relist finds it
        b.put_object(stray(cs.imports("b")["web"], "ghost"))
        b.lose_events(False)
        await cs.wait(lambda: "ghost" not in cs.imports("b"), timeout=REPAIR_S)
        assert deletes(b) == [
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceimports/ghost"]


async def test_an_object_with_our_label_is_kept_when_its_service_becomes_wanted(
        cs: Clusterset) -> None:
    """b reports a labelled import of api in the very turn a's export of api is seen, before
    that export is reconciled (what the controller wrote has no import of api yet): the
    decision waits for api's reconcile, which wants it there, so it is taken over (written
    as wanted), never deleted."""
    a, b = cs["a"], cs["b"]
    cs.clients = {c: cs.client(c) for c in cs.emulators}
    controller = Controller(cs.clients.values())
    cs.controller = controller
    await controller.start()
    early = stray(cs.imports("b")["web"], "api")
    early["spec"]["ports"] = []
    seen = controller.on_change

    def on_change(cluster: str, changes: ChangeSet) -> None:
        seen(cluster, changes)
        if cluster == "a" and API in changes.keys and API in cs.clients["a"].objects.exports \
                and "api" not in cs.imports("b"):
            b.put_object(early)  # and b's watch reports it in the same turn
            seen("b", ChangeSet(published={ObjectRef(KIND_IMPORT, "demo", "api"): early}))

    controller.on_change = on_change  # type: ignore[method-assign]
    cs._tasks.append(spawn(controller.run(), name="test controller"))
    a.put_object(service("api"))
    a.put_object(member_slice("api", ["10.1.0.9"], name="api-abc"))
    await cs.wait(lambda: API in cs.clients["a"].objects.services)  # else not exportable
    a.put_object(service_export("api"))
    await cs.wait(lambda: cs.addresses("b", "api") == {"10.1.0.9"}, timeout=REPAIR_S)
    await cs.wait(lambda: cs.imports("b")["api"]["spec"]["ports"] != [], timeout=REPAIR_S)
    assert deletes(b) == []


def foreign(type_: str, status: str = "True") -> dict[str, str]:
    """A condition of a type another controller owns (a policy engine, a GitOps tool)."""
    return {"type": type_, "status": status, "reason": "Checked",
            "message": f"{type_} says so", "lastTransitionTime": "2024-01-01T00:00:00Z"}


def export_conditions(cs: Clusterset, cluster: str = "a") -> list[dict[str, Any]]:
    export = cs[cluster].get_object(EXPORTS, "web", "demo") or {}
    return list(export.get("status", {}).get("conditions", []))


def set_export_conditions(cs: Clusterset, conditions: list[dict[str, Any]]) -> None:
    """Someone else's write of a's ServiceExport status."""
    export = copy.deepcopy(cs["a"].get_object(EXPORTS, "web", "demo"))
    assert export is not None
    export["status"] = {"conditions": conditions}
    cs["a"].put_object(export)


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def conflict_in_b() -> list[dict[str, Any]]:
    """b exports web too, on another port: a's export gets Conflict=True."""
    return [service("web", ports=[("http", 81)]), member_slice("web", ["10.2.0.1"]),
            service_export("web")]


async def test_conditions_of_other_controllers_are_kept_and_are_no_drift(
        cs: Clusterset) -> None:
    """Conditions are a map keyed by type: the controller owns Valid, Ready and Conflict of
    a ServiceExport, and writes them without removing, changing or reordering anyone
    else's; another controller's conditions coming and changing are no reason to write."""
    await cs.start_controller()
    a = cs["a"]
    ours = export_conditions(cs)
    assert [c["type"] for c in ours] == ["Valid", "Ready", "Conflict"]

    async def nothing_written_by_us() -> None:
        before = {c: writes(cs[c]) for c in cs.emulators}
        with pytest.raises(TimeoutError):
            await cs.wait(lambda: {c: writes(cs[c]) for c in cs.emulators} != before,
                          timeout=0.5)

    # Another controller puts its conditions before and after ours: no write by us.
    policy, synced = foreign("PolicyCompliant"), foreign("Synced")
    set_export_conditions(cs, [policy, *ours, synced])
    await nothing_written_by_us()
    # ... and changes one of them: still none.
    policy = foreign("PolicyCompliant", "False")
    set_export_conditions(cs, [policy, *ours, synced])
    await nothing_written_by_us()
    assert export_conditions(cs) == [policy, *ours, synced]

    # A conflict comes and goes: each time ours change, theirs stay as and where they were.
    for obj in conflict_in_b():
        cs["b"].put_object(obj)
    await cs.wait(lambda: by_type(export_conditions(cs))["Conflict"]["status"] == "True")
    now = export_conditions(cs)
    assert (now[0], now[-1]) == (policy, synced)
    assert [c["type"] for c in now] == ["PolicyCompliant", "Valid", "Ready", "Conflict",
                                        "Synced"]
    cs["b"].store.delete(cs["b"].store.by_name(EXPORTS), "demo", "web")
    await cs.wait(lambda: by_type(export_conditions(cs))["Conflict"]["status"] == "False")
    now = export_conditions(cs)
    assert (now[0], now[-1]) == (policy, synced)

    # One of ours edited by someone else is still drift: repaired, theirs kept.
    repaired = export_conditions(cs)
    tampered = copy.deepcopy(repaired)
    tampered[2]["reason"] = "Tampered"  # Ready
    set_export_conditions(cs, tampered)
    await cs.wait(lambda: export_conditions(cs) == repaired, timeout=REPAIR_S)
    assert a.get_object(EXPORTS, "web", "demo") is not None


async def test_a_status_write_on_a_stale_read_is_refused_and_done_again(
        cs: Clusterset) -> None:
    """The status write carries the resourceVersion it was built on: a condition another
    controller added since (its event not seen yet) is not lost to a blind overwrite."""
    await cs.start_controller()
    a = cs["a"]

    def status_writes() -> int:
        return sum(1 for r in a.requests
                   if r.method == "PATCH" and r.path.endswith("/serviceexports/web/status"))

    before = status_writes()
    a.lose_events()  # our view of a's export stays as it was
    set_export_conditions(cs, [*export_conditions(cs), foreign("Synced")])
    for obj in conflict_in_b():
        cs["b"].put_object(obj)
    await cs.wait(lambda: by_type(export_conditions(cs))["Conflict"]["status"] == "True")
    assert [c["type"] for c in export_conditions(cs)] == ["Valid", "Ready", "Conflict",
                                                          "Synced"]
    assert status_writes() == before + 2  # refused (409), read again, written


async def test_what_the_cluster_holds_is_held_once_after_a_restart() -> None:
    """What a member holds of ours was kept whole per member (read back, or as our writes
    got it back) beside the controller's copy: after a restart each member's copy of an
    imported slice was its own, 114 KiB per service against 70 at a first start (500
    services, 3 members, 3 slices of 10 endpoints each). The client keeps digests, the
    controller the render every consumer shares."""
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1", "10.1.0.2"])
        export_web(cs, "b", ["10.2.0.1"])
        await cs.start_controller()
        await cs.stop_controller()
        before = {c: writes(cs[c]) for c in cs.emulators}
        controller = await cs.start_controller()
        assert {c: writes(cs[c]) for c in cs.emulators} == before
        refs = [r for r in controller.written["a"] if r.kind in (KIND_IMPORT, KIND_SLICE)]
        assert len(refs) == 3  # the import, a slice from each exporter
        for ref in refs:
            shared = controller.written["a"][ref]
            assert all(controller.written[c][ref] is shared for c in ("b", "c")), ref
            for c in cs.emulators:
                kept = cs.clients[c].own.live[ref]
                assert isinstance(kept, Kept) and kept.uid and kept.rv
        # Of a ServiceExport's status as read back, only where our conditions stand is
        # kept (the controller holds them): 5 KiB a service at 3 exporting members.
        for c in ("a", "b"):
            [seen] = cs.clients[c]._export_status.values()
            assert "lastTransitionTime" not in repr(seen), seen
