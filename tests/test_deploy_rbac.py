"""deploy/rbac-calls.yaml derived from the code: the real controller (leader election,
--member-secrets, member clients) and the gateway's kube source run against API
emulators; every request they send is turned into the attributes Kubernetes authorizes
(verb, API group, resource/subresource, namespace, name, or non-resource URL), and:

- every request is allowed by the identity's calls in rbac-calls.yaml (a new call
  without RBAC fails here; tests/test_deploy.py then holds the Roles to the file);
- every grant in rbac-calls.yaml is used by some request (least privilege);
- a static cross-check over the source: every HTTP method and resource named in an
  identity's modules shows up among its recorded requests, so a call on a code path the
  scenario does not reach still fails the test.

The scenario drives the rare paths on purpose: 409 on an update or a status patch (get,
then write again), export deletion (deletes with preconditions), the Lease's create/renew/release,
the held-ClusterSetIPs ConfigMap's read, create (an address released) and update (taken back).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from controlplane.clusters.kube_app import MEMBER_LABEL, KubeControllerApp, KubeControllerConfig
from controlplane.clusters.kube_holds import HOLDS_CONFIGMAP, holds_json
from tests.kube_emulator import KubeEmulator, Request
from tests.test_controller_kube_support import (
    EXPORTS,
    FAST,
    clusterset,
    export_web,
    member_slice,
    namespace,
    service,
)
from tests.test_deploy import NAMESPACE, ROOT, expected_calls
from tests.test_kube_source import multicluster_service, running, service_import

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# Where each identity's API calls are made (generic transport modules, kube_api.py, name
# no method or resource of their own).
MODULES = {
    "controller": ["controlplane/leader.py", "controlplane/clusters/kube_app.py",
                   "controlplane/clusters/kube_members.py", "controlplane/clusters/kube_holds.py"],
    "controller-member": ["controlplane/clusters/kube.py"],
    "gateway": ["mcsproxy/sources/kube.py", "mcsproxy/sources/kube_watch.py",
                "mcsproxy/sources/kube_karmada.py"],
}


class Attributes(NamedTuple):
    """What the API server's authorizer sees of a request (RequestInfo)."""

    verb: str
    group: str | None  # None: a non-resource URL
    resource: str  # resource[/subresource], or the URL
    namespace: str
    name: str


def is_watch(request: Request) -> bool:
    # The API server parses the flag with Go's strconv.ParseBool; the generated client
    # sends "True".
    return request.query.get("watch", "").lower() in ("1", "t", "true")


def attributes(request: Request) -> Attributes:
    """Kubernetes' RequestInfoFactory, for the paths the code uses."""
    parts = [p for p in request.path.split("/") if p]
    if (parts[:1] == ["api"] and len(parts) >= 3) or (parts[:1] == ["apis"] and len(parts) >= 4):
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        name = rest[1] if len(rest) > 1 else ""
        resource = "/".join([rest[0], *rest[2:3]])
        verb = VERBS[request.method]
        if request.method == "GET" and not name:
            verb = "watch" if is_watch(request) else "list"
        elif request.method == "DELETE" and not name:
            verb = "deletecollection"
        return Attributes(verb, group, resource, namespace, name)
    return Attributes(request.method.lower(), None, request.path, "", "")


def allows(call: dict[str, Any], attrs: Attributes, verb: str) -> bool:
    """One grant of rbac-calls.yaml (one verb of it) allows these request attributes."""
    if attrs.verb != verb:
        return False
    if attrs.group is None:
        return any(u == attrs.resource or (u.endswith("*") and attrs.resource.startswith(u[:-1]))
                   for u in call.get("nonResourceURLs", ()))
    if "nonResourceURLs" in call or (call["group"], call["resource"]) != (attrs.group,
                                                                           attrs.resource):
        return False
    if call["scope"] == "namespace" and attrs.namespace != NAMESPACE:
        return False
    names = call.get("resourceNames")
    return not names or attrs.name in names


def check_identity(identity: str, requests: Iterable[Request]) -> set[Attributes]:
    calls = expected_calls()[identity]["calls"]
    seen = {attributes(r) for r in requests}
    used: set[tuple[int, str]] = set()
    denied = []
    for attrs in sorted(seen, key=lambda a: (a.group is None, *map(str, a))):
        grants = {(i, v) for i, call in enumerate(calls) for v in call["verbs"]
                  if allows(call, attrs, v)}
        if not grants:
            denied.append(attrs)
        used |= grants
    assert not denied, (f"{identity}: the code makes calls deploy/rbac-calls.yaml does not "
                        f"grant: {denied}")
    unused = [(calls[i].get("resource") or calls[i]["nonResourceURLs"], v)
              for i, call in enumerate(calls) for v in call["verbs"] if (i, v) not in used]
    assert not unused, f"{identity}: granted in deploy/rbac-calls.yaml but never called: {unused}"
    if any("nonResourceURLs" in c for c in calls):
        for call in calls:  # each URL is used, not just one of the list
            for url in call.get("nonResourceURLs", ()):
                assert any(a.group is None and a.resource == url for a in seen), \
                    f"{identity}: {url} granted but never requested"
    return seen


# ------------------------------------------------------------------- static cross-check

def _strings(tree: ast.AST) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def named_in_source(identity: str, vocabulary: set[str]) -> tuple[set[str], set[str]]:
    """HTTP methods and resource plurals named by string literals in the identity's
    modules (f-string parts included, split at '/')."""
    methods: set[str] = set()
    resources: set[str] = set()
    for module in MODULES[identity]:
        for text in _strings(ast.parse((ROOT / module).read_text())):
            if text in HTTP_METHODS:
                methods.add(text)
            # `/namespaces/{ns}/...` scopes a path; it does not name the resource.
            text = re.sub(r"namespaces/(\{[^}]*\})?", "", text)
            resources |= set(re.split(r"[/{}]", text)) & vocabulary
    return methods, resources


def check_source_calls(identity: str, requests: list[Request], vocabulary: set[str]) -> None:
    methods, resources = named_in_source(identity, vocabulary)
    recorded_methods = {r.method for r in requests}
    recorded_resources = {a.resource.split("/")[0] for a in map(attributes, requests)
                          if a.group is not None}
    assert methods <= recorded_methods, (
        f"{identity}: {sorted(methods - recorded_methods)} appear in {MODULES[identity]} but "
        "the scenario never sent them: extend it (and rbac-calls.yaml) for the new call")
    assert resources <= recorded_resources, (
        f"{identity}: {sorted(resources - recorded_resources)} named in {MODULES[identity]} "
        "but never requested: extend the scenario (and rbac-calls.yaml)")


def vocabulary() -> set[str]:
    """Resource plurals a source string may name: every one the emulator serves and every
    one rbac-calls.yaml grants."""
    emu = KubeEmulator()
    plurals = {t.plural for t in emu.store.types.values()}
    for identity in expected_calls().values():
        plurals |= {c["resource"].split("/")[0] for c in identity["calls"] if "resource" in c}
    return plurals


# ------------------------------------------------------------------------- the scenario

def _since(emu: KubeEmulator, start: int) -> list[Request]:
    return emu.requests[start:]


async def record_controller(tmp_path: Path) -> tuple[list[Request], list[Request]]:
    """(the controller's requests to its own cluster, its requests to the members)."""
    async with clusterset(("home", "m1", "m2")) as cs:
        home, m1, m2 = cs["home"], cs["m1"], cs["m2"]
        for c in ("m1", "m2"):
            cs[c].put_object(namespace("demo"))
            raw = cs[c].kubeconfig(tmp_path / f"member-{c}", "member").read_bytes()
            home.put_object({"apiVersion": "v1", "kind": "Secret",
                             "metadata": {"name": f"mcsproxy-member-{c}", "namespace": NAMESPACE,
                                          "labels": {MEMBER_LABEL: c}},
                             "data": {"kubeconfig": base64.b64encode(raw).decode()}})
        export_web(cs, "m1", ["10.1.0.1"])
        app = KubeControllerApp(KubeControllerConfig(
            kubeconfig=home.kubeconfig(tmp_path / "home", "home"), member_secrets=NAMESPACE,
            lease_namespace=NAMESPACE, lease_duration_s=1.5, identity="recorder",
            timings=FAST))
        task = asyncio.ensure_future(app.run())
        try:
            await asyncio.wait_for(app.led.wait(), 10)
            await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.1"}
                                      for c in ("m1", "m2")))
            exported = m1.get_object(EXPORTS, "web", "demo")
            assert exported is not None and exported.get("status", {}).get("conditions")
            for emu in (m1, m2):  # the liveness probe and every watch have run
                await emu.wait_for(lambda e=emu: any(r.path == "/version" for r in e.requests))
            # The member Secrets are watched for the whole term.
            await home.wait_for(lambda: any(r.path.endswith("/secrets") and is_watch(r)
                                            for r in home.requests))
            renewals = sum(1 for r in home.requests if r.method == "PUT")
            await home.wait_for(lambda: sum(1 for r in home.requests if r.method == "PUT")
                                > renewals)

            # A slice changed underneath: 409, get, update again.
            m2.fail_next(1, 409, method="PUT", path="/endpointslices/")
            m1.put_object(member_slice("web", ["10.1.0.1", "10.1.0.2"]))
            await cs.wait(lambda: cs.addresses("m2", "web") == {"10.1.0.1", "10.1.0.2"})
            # The same for an import (its ports change).
            m2.fail_next(1, 409, method="PUT", path="/serviceimports/")
            m1.put_object(service("web", ports=[("http", 80), ("admin", 81)]))
            await cs.wait(lambda: len(cs.imports("m2").get("web", {}).get("spec", {})
                                      .get("ports", ())) == 2)
            # The export's conditions cleared by hand: written again, on a 409 read again.
            m1.fail_next(1, 409, method="PATCH", path="/serviceexports/")
            edited = dict(exported, status={"conditions": []})
            m1.put_object(edited)
            await m1.wait_for(lambda: (m1.get_object(EXPORTS, "web", "demo") or {})
                              .get("status", {}).get("conditions"))
            # The export goes: imports and slices are deleted everywhere, and its address
            # is held (the ConfigMap created).
            ip = cs.imports("m2")["web"]["spec"]["ips"]
            m1.store.delete(m1.store.by_name(EXPORTS), "demo", "web")
            await cs.wait(lambda: not any(cs.imports(c) or cs.imported_slices(c)
                                          for c in ("m1", "m2")))
            await home.wait_for(lambda: home.get_object("configmaps", HOLDS_CONFIGMAP,
                                                        NAMESPACE) is not None)
            # Exported again: it takes its address back (the ConfigMap updated).
            m1.put_object(exported)
            await cs.wait(lambda: cs.imports("m2").get("web", {}).get("spec", {})
                          .get("ips") == ip)
            await home.wait_for(lambda: not holds_json(home.get_object(
                "configmaps", HOLDS_CONFIGMAP, NAMESPACE) or {})["holds"])
        finally:
            app.stop()
            await asyncio.wait_for(task, 10)
        released = home.get_object("leases.coordination.k8s.io", "mcsproxy-controller",
                                   NAMESPACE)
        assert released is not None and released["spec"]["holderIdentity"] == ""
        return list(home.requests), m1.requests + m2.requests


async def record_gateway(tmp_path: Path) -> list[Request]:
    async with KubeEmulator() as emu:
        emu.put_object(service_import("web"))
        emu.put_object(multicluster_service("shop"))  # the Services are then watched too
        async with running(emu, tmp_path, "east") as gw:
            for plural in ("serviceimports", "endpointslices", "multiclusterservices",
                           "services"):
                await gw.until(lambda p=plural: any(
                    r.path.endswith(f"/{p}") and is_watch(r)
                    for r in emu.requests))
        return list(emu.requests)


async def test_rbac_calls_are_exactly_what_the_code_sends(tmp_path: Path) -> None:
    home, members = await record_controller(tmp_path)
    gateway = await record_gateway(tmp_path)
    words = vocabulary()
    for identity, requests in (("controller", home), ("controller-member", members),
                               ("gateway", gateway)):
        check_identity(identity, requests)
        check_source_calls(identity, requests, words)


def test_request_attributes_follow_kubernetes() -> None:
    def attrs(method: str, path: str, **query: str) -> Attributes:
        return attributes(Request(method, path, query))

    assert attrs("GET", "/api/v1/namespaces") == Attributes("list", "", "namespaces", "", "")
    assert attrs("GET", "/api/v1/namespaces/demo") == Attributes("get", "", "namespaces", "",
                                                                 "demo")
    assert attrs("GET", "/apis/discovery.k8s.io/v1/endpointslices", watch="true") == \
        Attributes("watch", "discovery.k8s.io", "endpointslices", "", "")
    assert attrs("PATCH", "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/d/serviceexports/"
                 "web/status") == Attributes("patch", "multicluster.x-k8s.io",
                                             "serviceexports/status", "d", "web")
    assert attrs("POST", "/apis/coordination.k8s.io/v1/namespaces/ns/leases") == \
        Attributes("create", "coordination.k8s.io", "leases", "ns", "")
    assert attrs("GET", "/apis/networking.karmada.io") == Attributes("get", None,
                                                                     "/apis/networking.karmada.io",
                                                                     "", "")


def test_the_check_fails_on_an_ungranted_and_on_an_unused_call() -> None:
    lease = "/apis/coordination.k8s.io/v1/namespaces/" + NAMESPACE + "/leases"
    used = [Request("POST", lease, {}), Request("GET", lease + "/mcsproxy-controller", {}),
            Request("PUT", lease + "/mcsproxy-controller", {}),
            Request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets", {}),
            Request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets", {"watch": "true"})]
    configmaps = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
    used += [Request("GET", f"{configmaps}/{HOLDS_CONFIGMAP}", {}),
             Request("POST", configmaps, {}),
             Request("PUT", f"{configmaps}/{HOLDS_CONFIGMAP}", {})]
    check_identity("controller", used)
    try:
        check_identity("controller", [*used, Request("DELETE", lease + "/x", {})])
    except AssertionError as exc:
        assert "does not grant" in str(exc)
    else:
        raise AssertionError("a delete of a Lease passed")
    try:
        check_identity("controller", used[1:])
    except AssertionError as exc:
        assert "never called" in str(exc)
    else:
        raise AssertionError("an unused create grant passed")
    # Another namespace or another Lease name is not covered by the Role.
    other = [*used, Request("GET", lease.replace(NAMESPACE, "kube-system") + "/x", {})]
    try:
        check_identity("controller", other)
    except AssertionError as exc:
        assert "does not grant" in str(exc)
    else:
        raise AssertionError("a Lease in another namespace passed")


def test_static_check_sees_every_method_and_resource_in_the_source() -> None:
    words = vocabulary()
    methods, resources = named_in_source("controller-member", words)
    assert methods == set(HTTP_METHODS)
    assert {"namespaces", "services", "endpointslices", "serviceexports",
            "serviceimports", "multiclusterservices"} <= resources
    assert named_in_source("controller", words) == ({"GET", "POST", "PUT"},
                                                    {"leases", "secrets", "configmaps"})
    _, gateway = named_in_source("gateway", words)
    assert {"serviceimports", "endpointslices", "multiclusterservices", "services"} <= gateway
