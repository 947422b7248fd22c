"""SnapshotStore: incremental commits, changed keys, readiness, subscribers."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from mcsproxy.manifests import ImportSpec, SliceSpec
from mcsproxy.model import Endpoint, ServiceKey, ServicePort
from mcsproxy.store import ObjectId, SnapshotStore

KEY = ServiceKey("test", "web")
OTHER = ServiceKey("test", "api")
PORTS = (ServicePort("http", "TCP", 80),)


def imp(key: ServiceKey, ips: tuple[str, ...] = ("127.240.0.1",)) -> ImportSpec:
    return ImportSpec(key, "ClusterSetIP", ips, PORTS, "None", 10800, None, {}, ())


def slc(key: ServiceKey, cluster: str, *addresses: str) -> SliceSpec:
    return SliceSpec(key, cluster, tuple(
        Endpoint(address=a, addresses=(a,), family=4, cluster=cluster, ports=())
        for a in addresses))


def oid(kind: str, name: str, source: str = "s1") -> ObjectId:
    return ObjectId(source, kind, "test", name)


@pytest.fixture
def store() -> SnapshotStore:
    s = SnapshotStore("cluster-a")
    s.register_source("s1")
    s.upsert(oid("ServiceImport", "web"), imp(KEY))
    s.upsert(oid("EndpointSlice", "web-a"), slc(KEY, "cluster-a", "10.0.0.1"))
    s.upsert(oid("ServiceImport", "api"), imp(OTHER, ("127.240.0.2",)))
    s.mark_synced("s1")
    s.commit()
    return s


def test_first_commit_builds_every_service_and_sets_loaded(store: SnapshotStore) -> None:
    snap = store.current
    assert store.loaded.is_set()
    assert snap.version == 1 and snap.changed == {KEY, OTHER}
    assert [e.address for e in snap.services[KEY].endpoints] == ["10.0.0.1"]
    assert snap.services[OTHER].endpoints == ()


def test_only_touched_services_are_rebuilt(store: SnapshotStore) -> None:
    before = store.current
    store.upsert(oid("EndpointSlice", "web-b"), slc(KEY, "cluster-b", "10.1.0.1"))
    snap = store.commit()
    assert snap.version == 2 and snap.changed == {KEY}
    assert snap.services[OTHER] is before.services[OTHER]  # reused, not rebuilt
    assert sorted(e.cluster for e in snap.services[KEY].endpoints) == ["cluster-a", "cluster-b"]
    assert before.services[KEY].endpoints != snap.services[KEY].endpoints  # old one untouched


def test_an_unchanged_upsert_makes_no_snapshot(store: SnapshotStore) -> None:
    store.upsert(oid("EndpointSlice", "web-a"), slc(KEY, "cluster-a", "10.0.0.1"))
    assert store.commit() is store.current and store.current.version == 1


def test_delete_and_replace_source(store: SnapshotStore) -> None:
    store.delete(oid("EndpointSlice", "web-a"))
    snap = store.commit()
    assert snap.changed == {KEY} and snap.services[KEY].endpoints == ()
    store.replace_source("s1", {oid("ServiceImport", "web"): imp(KEY)})
    snap = store.commit()
    assert set(snap.services) == {KEY} and snap.changed == {OTHER}


def test_a_slice_without_its_import_serves_nothing(store: SnapshotStore) -> None:
    store.delete(oid("ServiceImport", "web"))
    snap = store.commit()
    assert KEY not in snap.services and snap.changed == {KEY}
    store.upsert(oid("ServiceImport", "web"), imp(KEY))  # back: the slice is still there
    assert [e.address for e in store.commit().services[KEY].endpoints] == ["10.0.0.1"]


def test_changing_an_import_changes_the_service(store: SnapshotStore) -> None:
    store.upsert(oid("ServiceImport", "web"), replace(imp(KEY), ips=("127.240.0.9",)))
    assert store.commit().services[KEY].ips == ("127.240.0.9",)


def test_loaded_waits_for_every_source() -> None:
    s = SnapshotStore("cluster-a")
    s.register_source("s1")
    s.register_source("s2")
    s.upsert(oid("ServiceImport", "web"), imp(KEY))
    s.mark_synced("s1")
    s.commit()
    assert not s.loaded.is_set()
    s.mark_synced("s2")
    snap = s.commit()  # nothing changed, but the first full sync still makes a snapshot
    assert s.loaded.is_set() and snap.version == 2


def test_a_failing_subscriber_does_not_stop_the_others(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture
) -> None:
    seen = []

    def broken(_snapshot: object) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(seen.append)
    store.upsert(oid("EndpointSlice", "web-a"), slc(KEY, "cluster-a", "10.0.0.2"))
    with caplog.at_level(logging.ERROR, logger="mcsproxy.store"):
        snap = store.commit()
    assert seen == [snap]
    assert "boom" in caplog.text
