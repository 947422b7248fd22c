"""SnapshotStore: incremental commits, changed keys, readiness, subscribers."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from mcsproxy.manifests import ImportSpec, SliceSpec
from mcsproxy.model import Endpoint, ServiceKey, ServicePort
from mcsproxy.store import BUCKETS, ObjectId, ServiceMap, SnapshotStore

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


def test_address_watchers_see_every_imports_addresses_come_move_and_go(
        store: SnapshotStore) -> None:
    seen: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    store.watch_addresses(lambda o, old, new: seen.append((o.name, old, new)))
    assert sorted(seen) == [("api", (), ("127.240.0.2",)), ("web", (), ("127.240.0.1",))]
    seen.clear()
    store.upsert(oid("ServiceImport", "web"), replace(imp(KEY), clusters=("a",)))  # same ips
    store.upsert(oid("EndpointSlice", "web-b"), slc(KEY, "cluster-b", "10.1.0.1"))
    store.upsert(oid("ServiceImport", "web"), imp(KEY, ("127.240.0.9",)))
    store.upsert(oid("ServiceImport", "new", "s2"), imp(OTHER, ("127.240.0.3",)))
    store.delete(oid("ServiceImport", "api"))
    assert seen == [("web", ("127.240.0.1",), ("127.240.0.9",)),
                    ("new", (), ("127.240.0.3",)), ("api", ("127.240.0.2",), ())]


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


def test_a_one_service_change_copies_one_bucket_not_the_clusterset() -> None:
    s = SnapshotStore("cluster-a")
    s.register_source("s1")
    keys = [ServiceKey("test", f"s{i}") for i in range(3 * BUCKETS)]
    for key in keys:
        s.upsert(oid("ServiceImport", key.name), imp(key))
    s.mark_synced("s1")
    before = s.commit()
    s.upsert(oid("EndpointSlice", "s7-a"), slc(keys[7], "cluster-a", "10.0.0.7"))
    after = s.commit()
    assert after.changed == {keys[7]} and len(after.services) == len(keys)
    old, new = before.services, after.services
    assert isinstance(old, ServiceMap) and isinstance(new, ServiceMap)
    # Structure shared: every bucket but the changed key's is the very same dict.
    differing = [i for i, (a, b) in enumerate(zip(old._buckets, new._buckets, strict=True))
                 if a is not b]
    assert differing == [hash(keys[7]) % BUCKETS]
    assert all(new[k] is old[k] for k in keys if k != keys[7])
    # ...and the reader of the old snapshot still sees it as it was.
    assert old[keys[7]].endpoints == () and len(new[keys[7]].endpoints) == 1


def test_service_map_reads_like_the_dict_it_replaces() -> None:
    services = {ServiceKey("ns", f"s{i}"): imp(ServiceKey("ns", f"s{i}")) for i in range(50)}
    m = ServiceMap.of(services)  # type: ignore[arg-type]
    assert m == services and len(m) == 50 and set(m) == set(services)
    assert dict(m.items()) == services and sorted(map(id, m.values())) == sorted(
        map(id, services.values()))
    gone, added = ServiceKey("ns", "s3"), ServiceKey("other", "x")
    m2 = m.evolve({gone: None, added: imp(added),  # type: ignore[dict-item]
                   ServiceKey("ns", "never-there"): None})
    assert len(m2) == 50 and gone not in m2 and added in m2 and m2.get(gone) is None
    assert len(m) == 50 and gone in m and added not in m  # the old map is untouched
    assert [] not in m and m.get(added, "default") == "default"  # type: ignore[comparison-overlap]
    with pytest.raises(KeyError):
        m2[gone]
    assert ServiceMap.of(m) is m and len(ServiceMap()) == 0
