"""The controller in Kubernetes mode: one API emulator per member cluster, driven through
the real kubernetes-asyncio client (list + watch, writes, status subresource)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.resources import KIND_IMPORT
from tests.test_controller_kube_support import (
    EXPORTS,
    IMPORTS,
    Clusterset,
    clusterset,
    member_slice,
    namespace,
    service,
    service_export,
    writes,
)


@pytest.fixture
async def cs() -> AsyncIterator[Clusterset]:
    async with clusterset() as cs:
        yield cs


def export_web(cs: Clusterset, cluster: str, addresses: list[str], **kwargs: Any) -> None:
    emu = cs[cluster]
    emu.put_object(service("web"))
    emu.put_object(member_slice("web", addresses))
    emu.put_object(service_export("web", **kwargs))


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
