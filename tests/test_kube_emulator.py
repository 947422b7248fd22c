"""The Kubernetes API emulator, driven through the real kubernetes_asyncio client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import config, watch
from kubernetes_asyncio.client import (
    ApiClient,
    ApisApi,
    CoordinationV1Api,
    CoreApi,
    CoreV1Api,
    CustomObjectsApi,
    DiscoveryV1Api,
)
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube_emulator import KubeEmulator
from tests.kube_emulator.server import MAX_LIST_SNAPSHOTS

MCS = "multicluster.x-k8s.io"
MERGE = "application/merge-patch+json"


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator(bookmark_interval=0.05) as emu:
        yield emu


@pytest.fixture
async def api(emu: KubeEmulator) -> AsyncIterator[ApiClient]:
    async with emu.api_client() as api:
        yield api


def configmap(name: str, labels: dict[str, str] | None = None, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels or {}}, "data": data}


def service_export(name: str, version: str = "v1alpha1", **extra: Any) -> dict[str, Any]:
    return {"apiVersion": f"{MCS}/{version}", "kind": "ServiceExport",
            "metadata": {"name": name}, **extra}


async def collect(func: Any, *args: Any, n: int, **kwargs: Any) -> list[dict[str, Any]]:
    """The first n events of a watch (fewer if the server ends it within 5 s)."""
    events: list[dict[str, Any]] = []
    async with watch.Watch() as w:
        async for event in w.stream(func, *args, timeout_seconds=5, **kwargs):
            events.append(event)
            if len(events) == n:
                break
    return events


def status_of(error: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body = json.loads(error.value.body)
    assert body["kind"] == "Status"
    assert body["code"] == error.value.status
    return body


async def test_create_answers_201_then_409_already_exists(api: ApiClient) -> None:
    core = CoreV1Api(api)
    _, code, _ = await core.create_namespaced_config_map_with_http_info("ns", configmap("a"))
    assert code == 201
    with pytest.raises(ApiException) as error:
        await core.create_namespaced_config_map("ns", configmap("a"))
    assert error.value.status == 409
    assert status_of(error)["reason"] == "AlreadyExists"


async def test_create_fills_server_metadata_and_generate_name(api: ApiClient) -> None:
    core = CoreV1Api(api)
    body = configmap("")
    body["metadata"] = {"generateName": "cm-", "resourceVersion": "999", "uid": "mine"}
    created = await core.create_namespaced_config_map("ns", body)
    meta = created.metadata
    assert meta.name.startswith("cm-") and len(meta.name) == 8
    assert meta.namespace == "ns" and meta.uid != "mine" and meta.generation == 1
    assert int(meta.resource_version) > 0 and meta.creation_timestamp is not None


async def test_get_missing_answers_404_status(api: ApiClient) -> None:
    with pytest.raises(ApiException) as error:
        await CoreV1Api(api).read_namespaced_service("nope", "ns")
    assert error.value.status == 404
    body = status_of(error)
    assert (body["reason"], body["message"]) == ("NotFound", 'services "nope" not found')
    with pytest.raises(ApiException) as error:
        await CustomObjectsApi(api).get_namespaced_custom_object(
            MCS, "v1alpha1", "ns", "serviceexports", "nope")
    assert status_of(error)["message"] == f'serviceexports.{MCS} "nope" not found'


@pytest.mark.parametrize(("selector", "expected"), [
    ("app=web", ["a", "b"]),
    ("app==web,tier=front", ["a"]),
    ("app!=web", ["c", "d"]),
    ("tier in (front, back)", ["a", "b", "c"]),
    ("tier notin (front)", ["b", "c", "d"]),
    ("tier", ["a", "b", "c"]),
    ("!tier", ["d"]),
    ("app=web,tier notin (back)", ["a"]),
])
async def test_list_filters_by_label_selector(
        api: ApiClient, selector: str, expected: list[str]) -> None:
    core = CoreV1Api(api)
    for name, labels in [("a", {"app": "web", "tier": "front"}),
                         ("b", {"app": "web", "tier": "back"}),
                         ("c", {"app": "db", "tier": "back"}), ("d", {})]:
        await core.create_namespaced_config_map("ns", configmap(name, labels))
    listed = await core.list_namespaced_config_map("ns", label_selector=selector)
    assert [item.metadata.name for item in listed.items] == expected


async def test_list_across_namespaces_field_selector_and_pages(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    for ns in ("ns1", "ns2"):
        for name in ("x", "y"):
            await core.create_namespaced_config_map(ns, configmap(name))
    everything = await core.list_config_map_for_all_namespaces()
    assert [(i.metadata.namespace, i.metadata.name) for i in everything.items] == [
        ("ns1", "x"), ("ns1", "y"), ("ns2", "x"), ("ns2", "y")]
    assert everything.metadata.resource_version == str(emu.store.rv)
    picked = await core.list_config_map_for_all_namespaces(
        field_selector="metadata.name=y,metadata.namespace!=ns1")
    assert [(i.metadata.namespace, i.metadata.name) for i in picked.items] == [("ns2", "y")]
    page = await core.list_config_map_for_all_namespaces(limit=3)
    assert len(page.items) == 3 and page.metadata.remaining_item_count == 1
    rest = await core.list_config_map_for_all_namespaces(limit=3, _continue=page.metadata._continue)
    assert [(i.metadata.namespace, i.metadata.name) for i in rest.items] == [("ns2", "y")]
    assert rest.metadata._continue is None
    with pytest.raises(ApiException) as error:
        await core.list_namespaced_config_map("ns1", label_selector="a in (b")
    assert error.value.status == 400
    with pytest.raises(ApiException) as error:
        await core.list_namespaced_config_map("ns1", _continue="not-a-token")
    assert status_of(error)["reason"] == "BadRequest"


async def test_a_paged_list_is_one_snapshot_at_the_first_page_version(
        emu: KubeEmulator, api: ApiClient) -> None:
    """Every page of a list is read at the first page's resourceVersion, as kube-apiserver
    serves them: what changes between pages is in none of them, and a watch from that
    version sees it. A continue token whose snapshot is gone answers 410 Expired."""
    core = CoreV1Api(api)
    for name in "abc":
        await core.create_namespaced_config_map("ns", configmap(name, v="1"))
    first = await core.list_namespaced_config_map("ns", limit=1)
    rv = first.metadata.resource_version
    # Between the pages: "a" (on page 1) changes, "c" (not read yet) goes, "d" comes.
    await core.patch_namespaced_config_map("a", "ns", {"data": {"v": "2"}})
    await core.delete_namespaced_config_map("c", "ns")
    await core.create_namespaced_config_map("ns", configmap("d"))
    pages, token = [first], first.metadata._continue
    while token:
        pages.append(await core.list_namespaced_config_map("ns", limit=1, _continue=token))
        token = pages[-1].metadata._continue
    assert [(i.metadata.name, i.data["v"]) for p in pages for i in p.items] == [
        ("a", "1"), ("b", "1"), ("c", "1")]
    assert {p.metadata.resource_version for p in pages} == {rv}
    events = await collect(core.list_namespaced_config_map, "ns", n=3, resource_version=rv)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("MODIFIED", "a"), ("DELETED", "c"), ("ADDED", "d")]
    # A token can be used again (a retried page) until its snapshot is forgotten.
    again = await core.list_namespaced_config_map("ns", limit=1,
                                                  _continue=first.metadata._continue)
    assert [i.metadata.name for i in again.items] == ["b"]
    # Forgotten: compacted (the history expired), or MAX_LIST_SNAPSHOTS newer lists.
    emu.expire_history()
    with pytest.raises(ApiException) as error:
        await core.list_namespaced_config_map("ns", limit=1, _continue=first.metadata._continue)
    assert error.value.status == 410 and status_of(error)["reason"] == "Expired"
    oldest = (await core.list_namespaced_config_map("ns", limit=1)).metadata._continue
    for _ in range(MAX_LIST_SNAPSHOTS):
        await core.list_namespaced_config_map("ns", limit=1)
    with pytest.raises(ApiException) as error:
        await core.list_namespaced_config_map("ns", limit=1, _continue=oldest)
    assert error.value.status == 410


async def test_replace_with_stale_resource_version_conflicts(api: ApiClient) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_config_map("ns", configmap("a", v="1"))
    created.data = {"v": "2"}
    replaced = await core.replace_namespaced_config_map("a", "ns", created)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    created.data = {"v": "3"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as error:
        await core.replace_namespaced_config_map("a", "ns", created)
    assert error.value.status == 409
    assert status_of(error)["reason"] == "Conflict"
    unchanged = await core.replace_namespaced_config_map("a", "ns", replaced)
    assert unchanged.metadata.resource_version == replaced.metadata.resource_version


async def test_merge_and_json_patches(api: ApiClient) -> None:
    core, custom = CoreV1Api(api), CustomObjectsApi(api)
    await core.create_namespaced_config_map("ns", configmap("a", {"x": "1"}, k="v", drop="me"))
    patched = await core.patch_namespaced_config_map(  # a dict goes as strategic merge patch
        "a", "ns", {"metadata": {"labels": {"y": "2"}}, "data": {"drop": None, "new": "n"}})
    assert patched.metadata.labels == {"x": "1", "y": "2"}
    assert patched.data == {"k": "v", "new": "n"}
    patched = await core.patch_namespaced_config_map("a", "ns", [  # a list goes as JSON patch
        {"op": "test", "path": "/data/k", "value": "v"},
        {"op": "replace", "path": "/data/k", "value": "w"},
        {"op": "remove", "path": "/metadata/labels/x"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "c"}},
        {"op": "copy", "from": "/data/new", "path": "/data/copied"},
        {"op": "move", "from": "/data/new", "path": "/data/moved"}])
    assert patched.data == {"k": "w", "copied": "n", "moved": "n"}
    assert patched.metadata.labels == {"y": "2"}
    assert patched.metadata.annotations == {"a/b": "c"}
    with pytest.raises(ApiException) as error:
        await core.patch_namespaced_config_map(
            "a", "ns", [{"op": "test", "path": "/data/k", "value": "other"}])
    assert error.value.status == 422

    await custom.create_namespaced_custom_object(
        MCS, "v1alpha1", "ns", "serviceexports", service_export("e"))
    patched = await custom.patch_namespaced_custom_object(
        MCS, "v1alpha1", "ns", "serviceexports", "e", {"metadata": {"labels": {"l": "1"}}},
        _content_type=MERGE)
    assert patched["metadata"]["labels"] == {"l": "1"}
    # Like the real API: CustomObjectsApi sends a dict as application/json-patch+json
    # unless told otherwise, and a JSON patch must be a list.
    with pytest.raises(ApiException) as error:
        await custom.patch_namespaced_custom_object(
            MCS, "v1alpha1", "ns", "serviceexports", "e", {"metadata": {"labels": {}}})
    assert error.value.status == 400


async def test_patch_carrying_stale_resource_version_conflicts(api: ApiClient) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_config_map("ns", configmap("a"))
    await core.patch_namespaced_config_map("a", "ns", {"data": {"k": "1"}})
    with pytest.raises(ApiException) as error:
        await core.patch_namespaced_config_map("a", "ns", {"metadata": {
            "resourceVersion": created.metadata.resource_version}, "data": {"k": "2"}})
    assert error.value.status == 409


async def test_delete_returns_object_and_watch_sees_it(api: ApiClient) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_config_map("ns", configmap("a"))
    _, code, _ = await core.delete_namespaced_config_map_with_http_info("a", "ns")
    assert code == 200
    with pytest.raises(ApiException) as error:
        await core.read_namespaced_config_map("a", "ns")
    assert error.value.status == 404
    with pytest.raises(ApiException) as error:
        await core.delete_namespaced_config_map("a", "ns")
    assert error.value.status == 404
    events = await collect(core.list_namespaced_config_map, "ns", n=1,
                           resource_version=created.metadata.resource_version)
    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events] == [
        ("DELETED", "a")]


async def test_finalizers_delay_deletion(api: ApiClient) -> None:
    core = CoreV1Api(api)
    body = configmap("a")
    body["metadata"]["finalizers"] = ["example.com/keep"]
    await core.create_namespaced_config_map("ns", body)
    _, code, _ = await core.delete_namespaced_config_map_with_http_info("a", "ns")
    assert code == 202
    pending = await core.read_namespaced_config_map("a", "ns")
    assert pending.metadata.deletion_timestamp is not None
    await core.patch_namespaced_config_map("a", "ns", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as error:
        await core.read_namespaced_config_map("a", "ns")
    assert error.value.status == 404


def owned(name: str, *owners: Any, block: bool = False) -> dict[str, Any]:
    body = configmap(name)
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": o.metadata.name,
         "uid": o.metadata.uid, **({"blockOwnerDeletion": True} if block else {})}
        for o in owners]
    return body


async def names_until(emu: KubeEmulator, core: CoreV1Api, wanted: set[str]) -> set[str]:
    """The ConfigMaps of ns once they are `wanted` (or after 2 s): the collector's work."""
    async def names() -> set[str]:
        return {c.metadata.name for c in (await core.list_namespaced_config_map("ns")).items}
    for _ in range(40):
        if await names() == wanted:
            break
        await asyncio.sleep(0.05)
    return await names()


async def test_garbage_collector_deletes_what_all_owners_left(
        emu: KubeEmulator, api: ApiClient) -> None:
    """As kube-controller-manager's: the dependents of a deleted owner go (in the
    background), one that still has another owner only loses the reference, and one
    created naming an owner uid that does not exist goes too."""
    core = CoreV1Api(api)
    owner = await core.create_namespaced_config_map("ns", configmap("owner"))
    other = await core.create_namespaced_config_map("ns", configmap("other"))
    await core.create_namespaced_config_map("ns", owned("dep", owner))
    await core.create_namespaced_config_map("ns", owned("shared", owner, other))
    await core.delete_namespaced_config_map("owner", "ns")
    assert await names_until(emu, core, {"other", "shared"}) == {"other", "shared"}
    shared = await core.read_namespaced_config_map("shared", "ns")
    assert [r.uid for r in shared.metadata.owner_references] == [other.metadata.uid]
    # Owned by a uid that is not (or no longer) there: collected at once.
    await core.create_namespaced_config_map("ns", owned("dangling", owner))
    assert await names_until(emu, core, {"other", "shared"}) == {"other", "shared"}


async def test_garbage_collector_orphan_and_foreground_deletion(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    owner = await core.create_namespaced_config_map("ns", configmap("owner"))
    await core.create_namespaced_config_map("ns", owned("dep", owner))
    await core.delete_namespaced_config_map("owner", "ns", propagation_policy="Orphan")
    assert await names_until(emu, core, {"dep"}) == {"dep"}
    assert not (await core.read_namespaced_config_map("dep", "ns")).metadata.owner_references
    # Foreground: the owner waits, marked, until its blocking dependents are gone.
    owner = await core.create_namespaced_config_map("ns", configmap("owner"))
    blocker = owned("blocker", owner, block=True)
    blocker["metadata"]["finalizers"] = ["example.com/keep"]
    await core.create_namespaced_config_map("ns", blocker)
    await core.delete_namespaced_config_map("owner", "ns", propagation_policy="Foreground")
    await asyncio.sleep(0.1)
    marked = await core.read_namespaced_config_map("owner", "ns")
    assert marked.metadata.deletion_timestamp is not None
    assert "foregroundDeletion" in marked.metadata.finalizers
    await core.patch_namespaced_config_map("blocker", "ns", {"metadata": {"finalizers": None}})
    assert await names_until(emu, core, {"dep"}) == {"dep"}


async def test_a_deleted_namespace_takes_its_content_along(
        emu: KubeEmulator, api: ApiClient) -> None:
    """As the namespace controller does: Terminating while its objects are deleted (one
    with a finalizer holds it), nothing new accepted in it, then gone."""
    core = CoreV1Api(api)
    await core.create_namespace({"metadata": {"name": "ns"}})
    await core.create_namespaced_config_map("ns", configmap("plain"))
    held = configmap("held")
    held["metadata"]["finalizers"] = ["example.com/keep"]
    await core.create_namespaced_config_map("ns", held)
    await core.create_namespaced_config_map("other", configmap("elsewhere"))
    await core.delete_namespace("ns")
    assert await names_until(emu, core, {"held"}) == {"held"}
    terminating = await core.read_namespace("ns")
    assert terminating.status.phase == "Terminating"
    with pytest.raises(ApiException) as error:
        await core.create_namespaced_config_map("ns", configmap("late"))
    assert error.value.status == 403
    await core.patch_namespaced_config_map("held", "ns", {"metadata": {"finalizers": None}})
    for _ in range(40):
        if not [n for n in (await core.list_namespace()).items if n.metadata.name == "ns"]:
            break
        await asyncio.sleep(0.05)
    assert [n.metadata.name for n in (await core.list_namespace()).items] == []
    assert [c.metadata.name for c in
            (await core.list_namespaced_config_map("other")).items] == ["elsewhere"]


async def test_status_subresource_is_isolated(api: ApiClient) -> None:
    custom = CustomObjectsApi(api)
    args = (MCS, "v1alpha1", "ns", "serviceexports")
    created = await custom.create_namespaced_custom_object(
        *args, service_export("e", status={"conditions": [{"type": "Bogus"}]}))
    assert "status" not in created
    status = {"conditions": [{"type": "Valid", "status": "True"}]}
    written = await custom.patch_namespaced_custom_object_status(
        *args, "e", {"status": status, "metadata": {"labels": {"ignored": "yes"}}},
        _content_type=MERGE)
    assert written["status"] == status and "labels" not in written["metadata"]
    assert written["metadata"]["generation"] == 1  # status writes never bump generation

    written["status"] = {"conditions": []}
    written["metadata"]["labels"] = {"kept": "yes"}
    replaced = await custom.replace_namespaced_custom_object(*args, "e", written)
    assert replaced["status"] == status and replaced["metadata"]["labels"] == {"kept": "yes"}

    replaced["status"] = {"conditions": []}
    replaced["metadata"]["labels"] = {}
    via_status = await custom.replace_namespaced_custom_object_status(*args, "e", replaced)
    assert via_status["status"] == {"conditions": []}
    assert via_status["metadata"]["labels"] == {"kept": "yes"}
    got = await custom.get_namespaced_custom_object_status(*args, "e")
    assert got["status"] == {"conditions": []}
    # A status merge patch carrying the resourceVersion it was built on is refused once the
    # object moved on: how a writer of a list read from the object avoids lost updates.
    with pytest.raises(ApiException) as error:
        await custom.patch_namespaced_custom_object_status(
            *args, "e", {"metadata": {"resourceVersion": written["metadata"]["resourceVersion"]},
                         "status": status}, _content_type=MERGE)
    assert error.value.status == 409
    assert (await custom.get_namespaced_custom_object_status(*args, "e"))["status"] == got["status"]


async def test_generation_bumps_on_spec_changes_only(api: ApiClient) -> None:
    custom = CustomObjectsApi(api)
    args = (MCS, "v1alpha1", "ns", "serviceimports")
    body = {"apiVersion": f"{MCS}/v1alpha1", "kind": "ServiceImport", "metadata": {"name": "s"},
            "spec": {"type": "ClusterSetIP", "ports": [{"port": 80, "protocol": "TCP"}]}}
    await custom.create_namespaced_custom_object(*args, body)
    labelled = await custom.patch_namespaced_custom_object(
        *args, "s", {"metadata": {"labels": {"a": "b"}}}, _content_type=MERGE)
    assert labelled["metadata"]["generation"] == 1
    respec = await custom.patch_namespaced_custom_object(
        *args, "s", {"spec": {"ips": ["10.0.0.1"]}}, _content_type=MERGE)
    assert respec["metadata"]["generation"] == 2
    status = await custom.patch_namespaced_custom_object_status(
        *args, "s", {"status": {"clusters": [{"cluster": "c1"}]}}, _content_type=MERGE)
    assert status["metadata"]["generation"] == 2


async def test_versions_share_storage_and_rewrite_api_version(api: ApiClient) -> None:
    custom = CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(
        MCS, "v1alpha1", "ns", "serviceexports", service_export("e"))
    got = await custom.get_namespaced_custom_object(MCS, "v1beta1", "ns", "serviceexports", "e")
    assert got["apiVersion"] == f"{MCS}/v1beta1" and got["kind"] == "ServiceExport"
    listed = await custom.list_cluster_custom_object(MCS, "v1beta1", "serviceexports")
    assert listed["kind"] == "ServiceExportList"
    assert [i["apiVersion"] for i in listed["items"]] == [f"{MCS}/v1beta1"]


async def test_builtin_typed_apis(api: ApiClient) -> None:
    lease = {"metadata": {"name": "leader"},
             "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15}}
    coordination = CoordinationV1Api(api)
    created = await coordination.create_namespaced_lease("kube-system", lease)
    created.spec.holder_identity = "you"
    replaced = await coordination.replace_namespaced_lease("leader", "kube-system", created)
    assert replaced.spec.holder_identity == "you"
    slice_ = {"metadata": {"name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
              "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.1"]}],
              "ports": [{"port": 80, "protocol": "TCP"}]}
    discovery = DiscoveryV1Api(api)
    await discovery.create_namespaced_endpoint_slice("ns", slice_)
    listed = await discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name=s")
    assert [s.endpoints[0].addresses for s in listed.items] == [["10.1.0.1"]]
    await CoreV1Api(api).create_namespace({"metadata": {"name": "ns"}})
    assert [n.metadata.name for n in (await CoreV1Api(api).list_namespace()).items] == ["ns"]


async def test_discovery(emu: KubeEmulator, api: ApiClient) -> None:
    assert (await CoreApi(api).get_api_versions()).versions == ["v1"]
    groups = {g.name: g for g in (await ApisApi(api).get_api_versions()).groups}
    assert {"discovery.k8s.io", MCS, "networking.karmada.io", "coordination.k8s.io"} <= set(groups)
    assert [v.version for v in groups[MCS].versions] == ["v1alpha1", "v1beta1"]
    resources = await CustomObjectsApi(api).get_api_resources(MCS, "v1beta1")
    assert {r.name for r in resources.resources} >= {"serviceexports", "serviceexports/status"}
    emu.register("example.com", "v1", "widgets", "Widget", namespaced=False)
    await CustomObjectsApi(api).create_cluster_custom_object(
        "example.com", "v1", "widgets", {"metadata": {"name": "w"}})
    assert emu.get_object("widgets.example.com", "w")["kind"] == "Widget"


async def test_watch_resumes_after_a_resource_version(api: ApiClient) -> None:
    core = CoreV1Api(api)
    first = await core.create_namespaced_config_map("ns", configmap("a"))
    await core.create_namespaced_config_map("ns", configmap("b"))
    await core.create_namespaced_config_map("other", configmap("c"))
    await core.patch_namespaced_config_map("a", "ns", {"data": {"k": "v"}})
    await core.delete_namespaced_config_map("b", "ns")
    events = [(e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
              for e in await collect(core.list_namespaced_config_map, "ns", n=3,
                                     resource_version=first.metadata.resource_version)]
    assert [(kind, name) for kind, name, _ in events] == [
        ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    versions = [int(rv) for _, _, rv in events]
    assert versions == sorted(versions) and versions[0] > int(first.metadata.resource_version)


async def test_watch_without_version_sends_current_state_then_live(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_config_map("ns", configmap("old", {"app": "x"}))
    events: list[tuple[str, str]] = []
    async with watch.Watch() as w:
        async for event in w.stream(core.list_namespaced_config_map, "ns", label_selector="app=x"):
            events.append((event["type"], event["object"].metadata.name))
            if len(events) == 1:
                await core.create_namespaced_config_map("ns", configmap("ignored"))
                await core.create_namespaced_config_map("ns", configmap("new", {"app": "x"}))
                # leaving the selection is seen as DELETED
                await core.patch_namespaced_config_map(
                    "old", "ns", {"metadata": {"labels": {"app": "y"}}})
            if len(events) == 3:
                break
    assert events == [("ADDED", "old"), ("ADDED", "new"), ("DELETED", "old")]
    await emu.wait_for(lambda: emu.watch_count == 0)


async def test_watch_resume_after_history_expiry_raises_410(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_config_map("ns", configmap("a"))
    emu.expire_history()
    with pytest.raises(ApiException) as error:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_namespaced_config_map, "ns", timeout_seconds=5,
                                    resource_version=created.metadata.resource_version):
                pytest.fail("no event expected")
    assert error.value.status == 410
    assert error.value.reason.startswith("Expired: too old resource version")
    # Without timeout_seconds kubernetes_asyncio retries a 410 once before raising it.
    emu.requests.clear()
    with pytest.raises(ApiException) as error:
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_namespaced_config_map, "ns",
                                    resource_version=created.metadata.resource_version):
                pytest.fail("no event expected")
    assert error.value.status == 410 and len(emu.requests) == 2
    # A relist hands out a version that can be watched from again.
    listed = await core.list_namespaced_config_map("ns")
    await core.create_namespaced_config_map("ns", configmap("b"))
    events = await collect(core.list_namespaced_config_map, "ns", n=1,
                           resource_version=listed.metadata.resource_version)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "b")]


async def test_bounded_history_expires_old_versions() -> None:
    async with KubeEmulator(history=3) as emu, emu.api_client() as client:
        core = CoreV1Api(client)
        first = await core.create_namespaced_config_map("ns", configmap("a"))
        for name in "bcde":
            await core.create_namespaced_config_map("ns", configmap(name))
        with pytest.raises(ApiException) as error:
            await collect(core.list_namespaced_config_map, "ns", n=1,
                          resource_version=first.metadata.resource_version)
        assert error.value.status == 410
        second = await core.read_namespaced_config_map("b", "ns")
        events = await collect(core.list_namespaced_config_map, "ns", n=3,
                               resource_version=second.metadata.resource_version)
        assert [e["object"].metadata.name for e in events] == ["c", "d", "e"]


async def test_lost_events_reach_no_watch_only_a_list(api: ApiClient, emu: KubeEmulator) -> None:
    core = CoreV1Api(api)
    first = await core.create_namespaced_config_map("ns", configmap("a"))
    emu.lose_events()
    await core.create_namespaced_config_map("ns", configmap("lost"))
    emu.lose_events(False)
    await core.create_namespaced_config_map("ns", configmap("seen"))
    events = await collect(core.list_namespaced_config_map, "ns", n=1,
                           resource_version=first.metadata.resource_version)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "seen")]
    listed = await core.list_namespaced_config_map("ns")
    assert [o.metadata.name for o in listed.items] == ["a", "lost", "seen"]


async def test_held_answers_come_after_later_events(api: ApiClient, emu: KubeEmulator) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_config_map("ns", configmap("a"))
    emu.hold_answers(method="PATCH", path="/configmaps/a")
    patch = asyncio.ensure_future(core.patch_namespaced_config_map("a", "ns", {"data": {"k": "1"}}))
    await emu.wait_for(lambda: (emu.get_object("configmaps", "a", "ns") or {}).get("data"))
    emu.put_object(configmap("a", k="2") | {"metadata": {"name": "a", "namespace": "ns"}})
    events = await collect(core.list_namespaced_config_map, "ns", n=2,
                           resource_version=created.metadata.resource_version)
    assert [e["object"].data for e in events] == [{"k": "1"}, {"k": "2"}]
    assert not patch.done()  # its answer still held, after the later change's event
    emu.release_answers()
    assert (await asyncio.wait_for(patch, 5)).data == {"k": "1"}


async def test_timeout_seconds_ends_the_stream(emu: KubeEmulator, api: ApiClient) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with watch.Watch() as w:
        events = [e async for e in w.stream(CoreV1Api(api).list_namespaced_config_map, "ns",
                                            timeout_seconds=1)]
    assert events == [] and 0.9 < loop.time() - started < 3
    await emu.wait_for(lambda: emu.watch_count == 0)


async def test_bookmarks_carry_the_current_version(emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_config_map("ns", configmap("a"))
    async with watch.Watch() as w:
        async for event in w.stream(core.list_namespaced_config_map, "ns",
                                    allow_watch_bookmarks=True, timeout_seconds=5):
            if event["type"] == "BOOKMARK":
                assert event["raw_object"] == {
                    "kind": "ConfigMap", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(emu.store.rv)}}
                assert w.resource_version == str(emu.store.rv)
                break
            assert event["type"] == "ADDED"
        else:
            pytest.fail("no bookmark")


async def test_fail_next_injects_errors(emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    emu.fail_next(2)
    for _ in range(2):
        with pytest.raises(ApiException) as error:
            await core.list_namespaced_config_map("ns")
        assert error.value.status == 500 and status_of(error)["reason"] == "InternalError"
    await core.list_namespaced_config_map("ns")
    emu.fail_next(None, 503, method="POST", path="/configmaps")
    await core.list_namespaced_config_map("ns")
    for _ in range(3):
        with pytest.raises(ApiException) as error:
            await core.create_namespaced_config_map("ns", configmap("a"))
        assert status_of(error)["reason"] == "ServiceUnavailable"
    emu.clear_faults()
    await core.create_namespaced_config_map("ns", configmap("a"))


async def test_hang_holds_requests_until_released(emu: KubeEmulator, api: ApiClient) -> None:
    emu.hang()
    request = asyncio.create_task(CoreV1Api(api).list_namespaced_config_map("ns"))
    await emu.wait_for(lambda: len(emu.requests) == 1)
    done, _ = await asyncio.wait([request], timeout=0.05)
    assert not done
    emu.hang(False)
    assert (await asyncio.wait_for(request, 5)).items == []


async def test_stop_and_start_keep_data_and_port(emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_config_map("ns", configmap("a"))
    url = emu.url
    emu.hang()
    hung = asyncio.create_task(core.list_namespaced_config_map("ns"))
    await emu.wait_for(lambda: len(emu.requests) == 2)
    await emu.stop()
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(hung, 5)
    with pytest.raises(aiohttp.ClientConnectionError):
        await core.list_namespaced_config_map("ns")
    await emu.start()
    assert emu.url == url
    got = await core.read_namespaced_config_map("a", "ns")
    assert got.metadata.uid == created.metadata.uid


async def test_dropped_watches_are_resumed_by_the_client(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_config_map("ns", configmap("a"))
    seen: list[str] = []
    async with watch.Watch() as w:
        async for event in w.stream(core.list_namespaced_config_map, "ns"):
            seen.append(event["object"].metadata.name)
            if len(seen) == 1:
                emu.drop_watches()
                await core.create_namespaced_config_map("ns", configmap("b"))
            else:
                break
    assert seen == ["a", "b"]
    watches = [r for r in emu.requests if r.query.get("watch") == "True"]
    assert len(watches) == 2 and watches[1].query["resourceVersion"] == "1"


async def test_aborted_watches_surface_as_client_errors(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_config_map("ns", configmap("a"))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with watch.Watch() as w:
            async for _ in w.stream(core.list_namespaced_config_map, "ns"):
                emu.drop_watches(abort=True)
    await emu.wait_for(lambda: emu.watch_count == 0)


async def test_kubeconfig_with_token(tmp_path: Path) -> None:
    async with KubeEmulator(token="s3cret") as emu:
        path = emu.kubeconfig(tmp_path / "kubeconfig", context_name="member1")
        async with await config.new_client_from_config(
                config_file=str(path), context="member1") as client:
            await CoreV1Api(client).create_namespace({"metadata": {"name": "ns"}})
        async with ApiClient() as anonymous:
            anonymous.configuration.host = emu.url
            with pytest.raises(ApiException) as error:
                await CoreV1Api(anonymous).list_namespace()
            assert error.value.status == 401
        assert emu.get_object("namespaces", "ns") is not None


async def test_put_object_keeps_given_metadata(emu: KubeEmulator, api: ApiClient) -> None:
    emu.put_object(service_export("old", "v1beta1", status={"conditions": []}, metadata={
        "name": "old", "namespace": "ns", "creationTimestamp": "2020-01-01T00:00:00Z"}))
    listed = await CustomObjectsApi(api).list_namespaced_custom_object(
        MCS, "v1alpha1", "ns", "serviceexports")
    [item] = listed["items"]
    assert item["metadata"]["creationTimestamp"] == "2020-01-01T00:00:00Z"
    assert item["status"] == {"conditions": []} and item["apiVersion"] == f"{MCS}/v1alpha1"
    assert [o["metadata"]["name"] for o in emu.list_objects(f"serviceexports.{MCS}")] == ["old"]
    # Put again, changed: the same object (uid, creationTimestamp), as an update keeps them;
    # deleted first, it is a new one.
    uid = item["metadata"]["uid"]
    changed = emu.put_object(service_export("old", status={"conditions": [{"type": "Valid"}]},
                                            metadata={"name": "old", "namespace": "ns"}))
    assert changed["metadata"]["uid"] == uid
    assert changed["metadata"]["creationTimestamp"] == "2020-01-01T00:00:00Z"
    assert emu.delete_object(f"serviceexports.{MCS}", "old", "ns")
    again = emu.put_object(service_export("old", metadata={"name": "old", "namespace": "ns"}))
    assert again["metadata"]["uid"] != uid
    assert again["metadata"]["creationTimestamp"] != "2020-01-01T00:00:00Z"


async def test_delete_object_removes_directly_and_watches_see_it(
        emu: KubeEmulator, api: ApiClient) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_config_map("ns", configmap("a"))
    watcher = asyncio.create_task(collect(core.list_namespaced_config_map, "ns", n=2))
    await emu.wait_for(lambda: emu.watch_count == 1)
    assert emu.delete_object("configmaps", "a", "ns")
    assert not emu.delete_object("configmaps", "a", "ns")
    assert [e["type"] for e in await asyncio.wait_for(watcher, 5)] == ["ADDED", "DELETED"]
    assert emu.get_object("configmaps", "a", "ns") is None


async def test_accepted_tokens_are_a_set_the_test_rotates(tmp_path: Path) -> None:
    async with KubeEmulator(token="old") as emu:
        async with emu.api_client() as old:
            await CoreV1Api(old).list_namespace()
            emu.tokens = {"new"}  # rotated: the old token is refused from now on
            with pytest.raises(ApiException) as error:
                await CoreV1Api(old).list_namespace()
            assert error.value.status == 401 and emu.unauthorized == 1
        async with ApiClient() as new:
            new.configuration.host = emu.url
            new.configuration.api_key["BearerToken"] = "Bearer new"
            await CoreV1Api(new).list_namespace()
        assert emu.unauthorized == 1


async def test_tls_serves_https_trusted_through_its_ca_file(tmp_path: Path) -> None:
    async with KubeEmulator(tls=True) as emu:
        assert emu.url.startswith("https://")
        path = emu.kubeconfig(tmp_path / "kubeconfig")
        async with await config.new_client_from_config(config_file=str(path)) as client:
            await CoreV1Api(client).create_namespace({"metadata": {"name": "ns"}})
        async with ApiClient() as untrusting:  # the system CAs do not know it
            untrusting.configuration.host = emu.url
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await CoreV1Api(untrusting).list_namespace()
        assert emu.get_object("namespaces", "ns") is not None
