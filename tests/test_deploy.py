"""deploy/, Dockerfile: every manifest checked offline.

- Kubernetes objects against the Kubernetes OpenAPI schemas shipped in kubernetes-validate
  (strict: unknown fields are errors, as `kubectl apply --validate=strict` would say), for
  the oldest and a recent Kubernetes version we support.
- Our CRDs' own shape, and example ServiceExport/ServiceImport objects against the CRDs'
  openAPIV3Schema (jsonschema), unknown fields rejected as the API server's strict field
  validation does.
- The kustomize base and overlays rendered with `kubectl kustomize` when kubectl is there.
- RBAC granted to each identity == the API calls listed in deploy/rbac-calls.yaml (which
  tests/test_deploy_rbac.py holds to the requests the code really sends).
- Workload hardening, probes and ports; container args through the real CLI parser and
  the real config builders (unknown flags and bad values fail).
- The example member Secrets through the controller's own Secret reader.
- The image's pinned dependencies against pyproject.toml.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import re
import shutil
import subprocess
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from controlplane.clusters import kube_app
from controlplane.clusters.kube_app import MEMBER_LABEL, KubeControllerConfig, member_from_secret
from mcsproxy import manifests
from mcsproxy.cli import build_parser, gateway_config
from mcsproxy.sources import make_source

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACE = "mcsproxy-system"
MCS_GROUP = "multicluster.x-k8s.io"

# The oldest Kubernetes we support (PodDisruptionBudget unhealthyPodEvictionPolicy is on
# by default from 1.27) and a recent one.
KUBERNETES_VERSIONS = ("1.28", "1.33")

# YAML files under deploy/ that are not Kubernetes objects.
NOT_MANIFESTS = {"rbac-calls.yaml"}

# Overlays and what each must contain (kind, name); anything more is fine, less is not.
OVERLAYS: dict[str, set[tuple[str, str]]] = {
    "base": {
        ("CustomResourceDefinition", "serviceimports.multicluster.x-k8s.io"),
        ("CustomResourceDefinition", "serviceexports.multicluster.x-k8s.io"),
        ("DaemonSet", "mcsproxy-gateway"),
        ("Deployment", "mcsproxy-controller"),
        ("PodDisruptionBudget", "mcsproxy-controller"),
        ("NetworkPolicy", "mcsproxy-controller"),
        ("ClusterRole", "mcsproxy-controller-member"),
    },
    "overlays/local": {("DaemonSet", "mcsproxy-gateway"), ("Deployment", "mcsproxy-controller"),
                       ("NetworkPolicy", "mcsproxy-controller")},
    "overlays/member": {("DaemonSet", "mcsproxy-gateway"), ("ClusterRole",
                                                             "mcsproxy-controller-member")},
    "overlays/karmada": {("DaemonSet", "mcsproxy-gateway"), ("Service", "mcsproxy-dns")},
    "overlays/gateway-deployment": {("Deployment", "mcsproxy-gateway"),
                                    ("Service", "mcsproxy-dns")},
}
# What an overlay must not contain.
OVERLAY_EXCLUDES: dict[str, set[str]] = {
    "overlays/karmada": {"CustomResourceDefinition", "Deployment", "Role", "Secret"},
    "overlays/member": {"Deployment", "Role"},
    "overlays/gateway-deployment": {"DaemonSet"},
}

# ---------------------------------------------------------------------------- loading

class _UniqueKeyLoader(yaml.SafeLoader):
    """A duplicated key is a silent overwrite in PyYAML and in kubectl: reject it."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d]


@functools.cache
def _patch_files() -> frozenset[Path]:
    """Files that kustomizations use as patches: partial objects, not manifests."""
    out = set()
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        for patch in load_docs(kfile.read_text())[0].get("patches", ()):
            out.add((kfile.parent / patch["path"]).resolve())
    return frozenset(out)


def manifest_files() -> list[Path]:
    return sorted(
        p for p in DEPLOY.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p.name not in NOT_MANIFESTS
        and p.resolve() not in _patch_files()
    )


@functools.cache
def file_docs(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(load_docs(path.read_text()))


def all_file_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in file_docs(path):
            yield path, doc


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def ident(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata'].get('name')}"


def is_custom_resource(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] == MCS_GROUP


def validate_kubernetes(doc: dict[str, Any], version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {ident(doc)} is not valid for Kubernetes {version}: "
                    f"{path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{where}: {exc.message}")


# ------------------------------------------------------------ Kubernetes schemas (files)

def test_manifest_files_found() -> None:
    names = {rel(p) for p in manifest_files()}
    assert "deploy/base/gateway/daemonset.yaml" in names
    assert "deploy/crds/serviceimports.yaml" in names
    assert "deploy/overlays/local/small.yaml" not in names  # a patch, not an object


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    docs = file_docs(path)
    assert docs, f"{rel(path)} holds no object"
    for doc in docs:
        if is_custom_resource(doc):
            continue  # validated against our CRDs below
        validate_kubernetes(doc, version, rel(path))


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    """The check above can fail: strict mode reports an unknown field."""
    doc = copy.deepcopy(file_docs(DEPLOY / "base/gateway/daemonset.yaml")[0])
    doc["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFilesytem"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


def test_duplicate_yaml_keys_are_rejected() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        load_docs("a: 1\nb: 2\na: 3\n")


def test_every_object_names_its_namespace_when_namespaced() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding",
                      "CustomResourceDefinition", "PriorityClass"}
    for path, doc in all_file_docs():
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], f"{rel(path)}: {ident(doc)}"
        else:
            assert doc["metadata"].get("namespace"), f"{rel(path)}: {ident(doc)} has none"


def test_every_overlay_is_checked() -> None:
    overlays = {str(p.parent.relative_to(DEPLOY))
                for p in (DEPLOY / "overlays").glob("*/kustomization.yaml")}
    assert overlays == set(OVERLAYS) - {"base"}


# ------------------------------------------------------------------------------ CRDs

@functools.cache
def crds() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((DEPLOY / "crds").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in file_docs(path):
            out[doc["spec"]["names"]["kind"]] = doc
    return out


def crd_schema(kind: str, version: str) -> dict[str, Any]:
    for v in crds()[kind]["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} has no version {version}")


@pytest.mark.parametrize("kind", ["ServiceExport", "ServiceImport"])
def test_crd_versions_and_shape(kind: str) -> None:
    crd = crds()[kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{MCS_GROUP}"
    assert spec["group"] == MCS_GROUP and spec["scope"] == "Namespaced"
    versions = {v["name"]: v for v in spec["versions"]}
    assert set(versions) == {"v1alpha1", "v1beta1"}
    assert versions["v1alpha1"]["served"] and versions["v1alpha1"]["storage"]
    assert versions["v1beta1"]["served"] and not versions["v1beta1"]["storage"]
    # Identical schemas are what lets the API server convert with strategy None.
    assert versions["v1alpha1"]["schema"] == versions["v1beta1"]["schema"]
    assert "conversion" not in spec or spec["conversion"] == {"strategy": "None"}
    for v in versions.values():
        assert v["subresources"] == {"status": {}}
        columns = {c["name"] for c in v["additionalPrinterColumns"]}
        assert "Age" in columns and len(columns) >= 3
        for column in v["additionalPrinterColumns"]:
            assert column["jsonPath"].startswith("."), column


def _assert_structural(node: dict[str, Any], where: str) -> None:
    """Structural schema (required for apiextensions.k8s.io/v1): every node has a type."""
    assert "type" in node, f"{where} has no type"
    for name, child in node.get("properties", {}).items():
        _assert_structural(child, f"{where}.{name}")
    if "items" in node:
        _assert_structural(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        _assert_structural(node["additionalProperties"], f"{where}{{}}")
    if node.get("x-kubernetes-list-type") == "map":
        keys = node["x-kubernetes-list-map-keys"]
        assert set(keys) <= set(node["items"].get("required", ())), \
            f"{where}: list-map keys must be required"


@pytest.mark.parametrize("kind", ["ServiceExport", "ServiceImport"])
def test_crd_schema_is_structural(kind: str) -> None:
    _assert_structural(crd_schema(kind, "v1alpha1"), kind)


def test_serviceimport_schema_follows_upstream() -> None:
    spec = crd_schema("ServiceImport", "v1alpha1")["properties"]["spec"]
    assert set(spec["required"]) == {"ports", "type"}
    assert spec["properties"]["type"]["enum"] == ["ClusterSetIP", "Headless"]
    assert spec["properties"]["ips"]["maxItems"] == 2
    assert {"sessionAffinity", "sessionAffinityConfig", "ipFamilies", "internalTrafficPolicy",
            "trafficDistribution"} <= set(spec["properties"])
    assert spec["properties"]["ports"]["items"]["required"] == ["port"]


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject fields the schema does not name, as the API server's strict field validation
    (kubectl's default) does, except under metadata, which the API server checks itself."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {
            k: (v if k == "metadata" else _strict(v)) for k, v in out["properties"].items()
        }
        out.setdefault("additionalProperties", False)
    if "items" in out:
        out["items"] = _strict(out["items"])
    return out


def validate_custom_resource(doc: dict[str, Any]) -> None:
    group, version = doc["apiVersion"].split("/")
    assert group == MCS_GROUP, doc["apiVersion"]
    schema = _strict(crd_schema(doc["kind"], version))
    jsonschema.Draft7Validator(schema).validate(doc)


def example_custom_resources() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{rel(path)}:{ident(doc)}", doc)
            for path, doc in all_file_docs() if is_custom_resource(doc)]


def test_examples_cover_both_kinds_and_versions() -> None:
    seen = {(doc["kind"], doc["apiVersion"]) for _, doc in example_custom_resources()}
    assert seen == {(k, f"{MCS_GROUP}/{v}") for k in ("ServiceExport", "ServiceImport")
                    for v in ("v1alpha1", "v1beta1")}


@pytest.mark.parametrize(("where", "doc"), example_custom_resources(),
                         ids=[w for w, _ in example_custom_resources()])
def test_example_custom_resource_matches_crd(where: str, doc: dict[str, Any]) -> None:
    validate_custom_resource(doc)


def test_example_serviceimports_are_accepted_by_the_gateway() -> None:
    """The CRD and the gateway's own validation (mcsproxy.manifests) agree."""
    imports = [doc for _, doc in example_custom_resources() if doc["kind"] == "ServiceImport"]
    assert len(imports) >= 2
    for doc in imports:
        manifests.parse_service_import(doc)


def _example(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for _, doc in example_custom_resources()
                              if doc["kind"] == kind and "status" in doc))


@pytest.mark.parametrize(("kind", "mutate", "complaint"), [
    ("ServiceImport", lambda d: d["spec"].update(type="SuperclusterIP"), "is not one of"),
    ("ServiceImport", lambda d: d["spec"].pop("ports"), "'ports' is a required property"),
    ("ServiceImport", lambda d: d["spec"].update(ips=["198.18.0.1", "fd00::1", "198.18.0.2"]),
     "is too long"),
    ("ServiceImport", lambda d: d["spec"]["ports"][0].update(port="http"), "is not of type"),
    ("ServiceImport", lambda d: d["spec"].update(ip="198.18.0.1"), "Additional properties"),
    ("ServiceImport", lambda d: d["status"]["clusters"].append({"name": "x"}),
     "'cluster' is a required property"),
    ("ServiceExport", lambda d: d["status"]["conditions"][0].update(status="Yes"),
     "is not one of"),
    ("ServiceExport", lambda d: d["status"]["conditions"][0].pop("lastTransitionTime"),
     "'lastTransitionTime' is a required property"),
    ("ServiceExport", lambda d: d["status"]["conditions"][0].update(reason="not camel"),
     "does not match"),
    ("ServiceExport", lambda d: d["spec"]["exportedLabels"].update(team=3), "is not of type"),
])
def test_crd_schema_rejects_bad_objects(kind: str, mutate: Any, complaint: str) -> None:
    doc = _example(kind)
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError, match=complaint):
        validate_custom_resource(doc)


# --------------------------------------------------------------------------- kustomize

def _kubectl_with_kustomize() -> tuple[str | None, str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None, "kubectl is not installed (it bundles kustomize)"
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(r"Kustomize Version: v(\d+)\.", out)
    if m is None or int(m.group(1)) < 4:
        return None, (f"kubectl's kustomize is too old to read directories in `resources` "
                      f"(needs v4+, kubectl 1.21+): {out.strip()!r}")
    return kubectl, ""


KUBECTL, KUBECTL_MISSING = _kubectl_with_kustomize()
needs_kustomize = pytest.mark.skipif(KUBECTL is None, reason=KUBECTL_MISSING)


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed: {proc.stderr}"
    # Deprecated fields would print a warning: keep the kustomizations current.
    assert "deprecated" not in proc.stderr.lower(), proc.stderr
    return tuple(load_docs(proc.stdout))


@needs_kustomize
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_and_is_valid(overlay: str) -> None:
    docs = rendered(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert OVERLAYS[overlay] <= names, OVERLAYS[overlay] - names
    assert not {d["kind"] for d in docs} & OVERLAY_EXCLUDES.get(overlay, set())
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys))
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            validate_kubernetes(doc, version, f"kustomize {overlay}")
    check_rbac(docs)
    for doc in workloads(docs):
        check_workload(doc, docs)


@needs_kustomize
def test_overlays_set_their_cluster_id() -> None:
    ids = {}
    for overlay in ("overlays/local", "overlays/member", "overlays/karmada"):
        config = next(d for d in rendered(overlay) if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == "mcsproxy-cluster")
        ids[overlay] = config["data"]["cluster-id"]
        assert config["data"]["clusterset-cidr"] == "198.18.0.0/16"
    assert len(set(ids.values())) == len(ids), ids
    local = rendered("overlays/local")
    assert {c["image"] for w in workloads(local) for c in containers(w)} == {"mcsproxy:dev"}


def _kind_walkthrough() -> str:
    """The shell block of deploy/README.md's "A local clusterset with kind"."""
    text = (DEPLOY / "README.md").read_text()
    section = text[text.index("## A local clusterset with kind") :]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@needs_kustomize
def test_kind_walkthrough_loads_every_image_its_overlays_run() -> None:
    """kind nodes pull what was not loaded into them from a registry, where no mcsproxy
    image is: every image the walkthrough's overlays run must be built and loaded (the
    member overlay's gateways sat in ErrImagePull when only mcsproxy:dev was)."""
    block = _kind_walkthrough()
    built = {
        t
        for line in re.findall(r"^docker build (.*)$", block, re.M)
        for t in re.findall(r"-t (\S+)", line)
    }
    loaded = {
        image
        for line in re.findall(r"kind load docker-image (.*?) --name", block)
        for image in line.split()
    }
    overlays = set(re.findall(r"overlays/([a-z-]+)", block))
    assert overlays == {"local", "member"}, overlays
    for overlay in overlays:
        for image in {
            c["image"] for w in workloads(rendered(f"overlays/{overlay}")) for c in containers(w)
        }:
            assert image in built, f"overlays/{overlay} runs {image}, which is not built"
            assert image in loaded, f"overlays/{overlay} runs {image}, not loaded into kind"


KUBECTL_SHIM = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
case "$*" in
  *"get secret mcsproxy-member-token -o json") echo '{"data":{"ca.crt":"Q0EK","token":"VAo="}}';;
  *"config view --raw"*) echo https://127.0.0.1:40001;;
esac
"""


@pytest.mark.skipif(shutil.which("jq") is None, reason="the walkthrough's loop needs jq")
def test_kind_walkthrough_runs_step_3_against_the_kind_contexts(tmp_path: Path) -> None:
    """Step 3's loop, run as the kind section says (its ctx/server in place of step 3's),
    against a kubectl that records its calls: every call names a kind-<id> context and
    every member kubeconfig a server the controller's pods reach. The loop used to
    hard-code `--context $id` and `--context east`, which kind does not name so."""
    text = (DEPLOY / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```sh\n(.*?)```", text, re.S)]
    loop = next(b for b in blocks if "mcsproxy-member-token" in b)
    kind = next((b for b in blocks if "ctx()" in b and "kind-" in b), None)
    assert kind, "the kind section says nothing step 3 can run with the kind- contexts"
    script = kind + loop[loop.index("for id in") :]
    (tmp_path / "kubectl").write_text(KUBECTL_SHIM)
    (tmp_path / "kubectl").chmod(0o755)
    script = script.replace("/tmp/", f"{tmp_path}/")
    proc = subprocess.run(
        ["bash", "-euc", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    contexts = {c.split("--context ")[1].split()[0] for c in calls if "--context " in c}
    assert contexts == {"kind-east", "kind-west", "kind-central"}, contexts
    servers = {c.split("--server=")[1] for c in calls if "--server=" in c}
    assert servers == {f"https://{n}-control-plane:6443" for n in ("east", "west", "central")}


# -------------------------------------------------------------------------------- RBAC

def expected_calls() -> dict[str, dict[str, Any]]:
    return load_docs((DEPLOY / "rbac-calls.yaml").read_text())[0]["identities"]


Grant = tuple[str, str, str, str, str]  # scope, group, resource, verb, resourceName or *


def _expand(scope: str, rule: dict[str, Any]) -> set[Grant]:
    if "nonResourceURLs" in rule:
        return {(scope, "(non-resource URL)", url, v, "*") for url in rule["nonResourceURLs"]
                for v in rule["verbs"]}
    groups = rule.get("apiGroups", [rule.get("group", "")])
    resources = rule.get("resources", [rule.get("resource")])
    names = rule.get("resourceNames") or ["*"]
    return {(scope, g, r, v, n) for g in groups for r in resources
            for v in rule["verbs"] for n in names}


def granted(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]],
            service_account: str) -> set[Grant]:
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out: set[Grant] = set()
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   and s["namespace"] == NAMESPACE for s in binding["subjects"]):
            continue
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace")
        role = roles.get((ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"]))
        assert role is not None, f"{ident(binding)} refers to a missing {ref}"
        scope = "namespace" if binding["kind"] == "RoleBinding" else "cluster"
        if scope == "namespace":
            assert ns == NAMESPACE, f"{ident(binding)} is not in {NAMESPACE}"
        for rule in role["rules"]:
            out |= _expand(scope, rule)
    return out


def check_rbac(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> None:
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for name, identity in expected_calls().items():
        sa = identity["serviceAccount"]
        if sa not in accounts:
            continue  # this overlay does not deploy that component
        want: set[Grant] = set()
        for call in identity["calls"]:
            want |= _expand(call["scope"], call)
        got = granted(docs, sa)
        assert got == want, (f"RBAC for {name} ({sa}) differs from deploy/rbac-calls.yaml: "
                             f"granted but not called {sorted(got - want)}, "
                             f"called but not granted {sorted(want - got)}")
    for doc in docs:
        for rule in doc.get("rules", ()) if doc["kind"] in ("Role", "ClusterRole") else ():
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(field, ())), \
                    f"{ident(doc)}: wildcard in {field}"
            if "nonResourceURLs" in rule:
                # The API server accepts these only in a ClusterRole, and alone in a rule.
                assert doc["kind"] == "ClusterRole", ident(doc)
                assert not {"apiGroups", "resources", "resourceNames"} & set(rule), ident(doc)


def test_rbac_matches_the_api_calls() -> None:
    docs = [doc for _, doc in all_file_docs()]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert {i["serviceAccount"] for i in expected_calls().values()} == accounts
    check_rbac(docs)


def test_rbac_check_catches_an_extra_verb() -> None:
    docs = copy.deepcopy([doc for _, doc in all_file_docs()])
    role = next(d for d in docs if d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == "mcsproxy-gateway")
    role["rules"][0]["verbs"].append("delete")
    with pytest.raises(AssertionError, match="granted but not called"):
        check_rbac(docs)


def test_workloads_run_as_the_identities_in_the_call_list() -> None:
    used = {w["spec"]["template"]["spec"]["serviceAccountName"]
            for _, w in all_file_docs() if w["kind"] in ("Deployment", "DaemonSet")}
    assert used == {"mcsproxy-gateway", "mcsproxy-controller"}


# --------------------------------------------------------------------------- workloads

def workloads(docs: Any) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def _flags(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for arg in args[1:]:
        name, sep, value = arg.partition("=")
        out[name] = value if sep else None
    return out


def _listen_port(value: str | None) -> int:
    assert value is not None
    return int(value.rsplit(":", 1)[1])


# Linux's default net.ipv4.ip_unprivileged_port_start, on a node and in a new pod network
# namespace alike.
UNPRIVILEGED_PORT_START = 1024


def lowest_example_listener_port() -> int:
    """The gateway listens on each ClusterSetIP on the import's own port (spec.ports[].port,
    mcsproxy.proxy.manager binds it as it is): the example frontend import's is 80."""
    return min(p.port for _, doc in example_custom_resources()
               if doc["kind"] == "ServiceImport"
               for p in manifests.parse_service_import(doc).ports)


def check_binds_service_ports(w: dict[str, Any], c: dict[str, Any]) -> None:
    """A gateway must be able to listen on any service port, 80 and 53 included: as root
    only with CAP_NET_BIND_SERVICE (capabilities are dropped), as non-root only where the
    pod's own network namespace lowers ip_unprivileged_port_start (not on the node's
    network, where net.* sysctls are refused; added capabilities never reach non-root)."""
    where = ident(w)
    pod = w["spec"]["template"]["spec"]
    pod_ctx = pod.get("securityContext", {})
    ctx = c["securityContext"]
    run_as = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    if run_as == 0:
        assert "NET_BIND_SERVICE" in ctx["capabilities"].get("add", ()), \
            f"{where}: root without CAP_NET_BIND_SERVICE cannot listen on port 80"
        return
    sysctls = {s["name"]: s["value"] for s in pod_ctx.get("sysctls", ())}
    start = int(sysctls.get("net.ipv4.ip_unprivileged_port_start", UNPRIVILEGED_PORT_START))
    assert not pod.get("hostNetwork", False) and start <= 1, \
        f"{where}: a non-root gateway cannot listen on ports below {start}"


def test_service_ports_below_1024_need_the_bind_right() -> None:
    assert lowest_example_listener_port() < UNPRIVILEGED_PORT_START
    docs = [doc for _, doc in all_file_docs()]
    for w in workloads(docs):
        bad = copy.deepcopy(w)
        c = containers(bad)[0]
        if c["args"][0] != "gateway":
            continue
        c["securityContext"]["capabilities"]["add"] = [
            a for a in c["securityContext"]["capabilities"].get("add", ())
            if a != "NET_BIND_SERVICE"]
        bad["spec"]["template"]["spec"]["securityContext"].pop("sysctls", None)
        with pytest.raises(AssertionError, match="cannot listen on port"):
            check_binds_service_ports(bad, c)


# How long a terminating pod keeps serving before SIGTERM, so that kube-proxy has dropped
# it from the mcsproxy-dns Service (and routes from it) before DNS and listeners close.
MIN_PRESTOP_S = 3


def check_graceful_stop(w: dict[str, Any], c: dict[str, Any], docs: Any) -> None:
    """On SIGTERM the gateway closes its listeners at once and DNS and the admin port as
    soon as no connection is left (mcsproxy.gateway.Gateway.run/drain): a preStop sleep
    keeps it serving while its endpoints are removed, and the grace period must cover the
    sleep plus --drain-timeout, or the kubelet's SIGKILL cuts the drain short."""
    where = ident(w)
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    assert command and command[0] == "sleep" and len(command) == 2, \
        f"{where}: no preStop sleep before SIGTERM"
    sleep_s = float(command[1])
    assert sleep_s >= MIN_PRESTOP_S, f"{where}: preStop sleep {sleep_s} s is too short"
    drain_s = gateway_config(parsed_args(w, c, docs)).proxy.drain_timeout_s
    grace_s = w["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace_s > sleep_s + drain_s, \
        f"{where}: terminationGracePeriodSeconds {grace_s} <= preStop {sleep_s} + drain {drain_s}"


def test_graceful_stop_check_catches_a_short_grace_period() -> None:
    docs = [doc for _, doc in all_file_docs()]
    w = copy.deepcopy(file_docs(DEPLOY / "base/gateway/daemonset.yaml")[0])
    c = containers(w)[0]
    check_graceful_stop(w, c, docs)
    c["args"].append("--drain-timeout=30")
    with pytest.raises(AssertionError, match="terminationGracePeriodSeconds"):
        check_graceful_stop(w, c, docs)


def check_workload(w: dict[str, Any], docs: Any) -> None:
    where = ident(w)
    pod = w["spec"]["template"]["spec"]
    labels = w["spec"]["template"]["metadata"]["labels"]
    assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
    host_network = pod.get("hostNetwork", False)
    pod_ctx = pod.get("securityContext", {})
    assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    volumes = {v["name"]: v for v in pod.get("volumes", ())}
    for c in containers(w):
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, where
        assert ctx["allowPrivilegeEscalation"] is False, where
        assert ctx["capabilities"]["drop"] == ["ALL"], where
        added = set(ctx["capabilities"].get("add", ()))
        run_as = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        flags = _flags(c["args"])
        if added:
            # Added capabilities reach a process only when it runs as UID 0.
            assert added <= {"NET_ADMIN", "NET_BIND_SERVICE"} and run_as == 0, where
        else:
            assert run_as == 65532 and pod_ctx.get("runAsNonRoot") is True, where
        # NET_ADMIN exactly where the gateway manages the VIP interface.
        assert ("NET_ADMIN" in added) == ("--vip-interface" in flags), where
        if c["args"][0] == "gateway" and "--no-proxy" not in flags:
            check_binds_service_ports(w, c)
        if c["args"][0] == "gateway":
            check_graceful_stop(w, c, docs)
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp not writable"
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], where
        image = c["image"]
        assert ":" in image and not image.endswith(":latest"), where

        ports = {p["name"]: p for p in c["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                            ("startupProbe", "/healthz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["port"] in ports, f"{where} {probe}"
        admin_flag = "--admin-listen" if c["args"][0] == "gateway" else "--serve"
        probe_port = ports[c["livenessProbe"]["httpGet"]["port"]]["containerPort"]
        assert _listen_port(flags[admin_flag]) == probe_port, f"{where}: probes miss {admin_flag}"
        if c["args"][0] == "gateway":
            assert flags["--source"] == "kube", where
            dns_port = _listen_port(flags["--dns-listen"])
            assert ports["dns-udp"]["containerPort"] == dns_port == ports["dns-tcp"][
                "containerPort"], where
            # A connection to a ClusterSetIP reaches the listener only where the address
            # is local to the gateway's network namespace: the kernel delivers a routed
            # packet to a socket only for a local destination, and IP_FREEBIND merely lets
            # the bind succeed (a SYN routed to a pod whose listener was bound so timed
            # out). The node's dummy interface, or the pod's own loopback.
            if "--no-proxy" not in flags:
                assert flags.get("--vip-interface") == ("mcs0" if host_network else "lo"), (
                    f"{where}: ClusterSetIPs are not local addresses: routed connections drop"
                )
            if host_network:
                assert pod["dnsPolicy"] == "ClusterFirstWithHostNet", where
        # Kubernetes leaves an undefined $(VAR) in args as it is: every one must be set.
        env = {e["name"] for e in c.get("env", ())}
        for arg in c["args"]:
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                assert var in env, f"{where}: {arg} uses unset ${var}"
        for e in c.get("env", ()):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                cm = [d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == ref["name"]]
                assert cm and ref["key"] in cm[0]["data"], f"{where}: {ref} missing"


def test_workloads_are_hardened_and_probed() -> None:
    docs = [doc for _, doc in all_file_docs()]
    found = workloads(docs)
    assert len(found) == 3  # gateway DaemonSet, gateway Deployment, controller
    for w in found:
        check_workload(w, docs)


# The gateway's peak RSS with --source kube at 10,000 services x 3 clusters x 10 endpoints
# (the first list, measured against the API emulator; 3,000 services: 321 MiB): a limit
# below it OOM-kills every node's gateway at the same first sync, over and over.
GATEWAY_PEAK_MIB_AT_10K_SERVICES = 735
MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]i?)?", quantity)
    assert m, quantity
    return int(m.group(1)) * MEMORY_UNITS.get(m.group(2) or "", 1)


def test_gateway_memory_limit_fits_the_sizing_the_docs_state() -> None:
    docs = [doc for _, doc in all_file_docs()]
    gateways = [c for w in workloads(docs) for c in containers(w) if c["args"][0] == "gateway"]
    assert len(gateways) == 2
    for c in gateways:
        limit = _bytes(c["resources"]["limits"]["memory"])
        assert limit >= GATEWAY_PEAK_MIB_AT_10K_SERVICES * 2**20 * 5 // 4, (
            f"gateway memory limit {c['resources']['limits']['memory']} is under the peak of "
            f"10,000 services ({GATEWAY_PEAK_MIB_AT_10K_SERVICES} MiB) with 25 % to spare"
        )
    assert "fits about 10,000 such services" in (DEPLOY / "README.md").read_text()


# The controller leader's peak RSS in Kubernetes mode, 3 members each exporting 6,000
# services of 10 endpoints (API emulators; 1,000 services: 369 MiB, 3,000: 896 MiB).
CONTROLLER_PEAK_MIB_AT_6K_SERVICES = 1228


def test_controller_memory_limit_fits_the_sizing_the_docs_state() -> None:
    deployment = file_docs(DEPLOY / "base/controller/deployment.yaml")[0]
    limit = containers(deployment)[0]["resources"]["limits"]["memory"]
    assert _bytes(limit) >= CONTROLLER_PEAK_MIB_AT_6K_SERVICES * 2**20 * 5 // 4, (
        f"controller memory limit {limit} is under the peak of 6,000 services "
        f"({CONTROLLER_PEAK_MIB_AT_6K_SERVICES} MiB) with 25 % to spare"
    )
    assert "fits about 6,000 such services" in (DEPLOY / "README.md").read_text()


def test_gateway_daemonset_on_the_node_network() -> None:
    ds = file_docs(DEPLOY / "base/gateway/daemonset.yaml")[0]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    # No CPU limit on the data plane (throttling shows up as tail latency).
    assert "cpu" not in containers(ds)[0]["resources"]["limits"]


@needs_kustomize
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_gateways_have_a_priority_above_ordinary_workloads(overlay: str) -> None:
    """Node infrastructure like kube-proxy: at priority 0 a full node kept a new gateway
    Pending (no preemption among equals) and the kubelet evicted it like any workload."""
    docs = rendered(overlay)
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PriorityClass"}
    gateways = [w for w in workloads(docs)
                if w["spec"]["template"]["metadata"]["labels"].get(
                    "app.kubernetes.io/component") == "gateway"]
    assert gateways
    for workload in gateways:
        name = workload["spec"]["template"]["spec"].get("priorityClassName")
        assert name in classes, f"{ident(workload)}: priorityClassName {name!r} not shipped"
        # The most a user-defined class may have; system-* would need a ResourceQuota
        # outside kube-system on some providers.
        assert classes[name]["value"] == 1_000_000_000
        assert not classes[name].get("globalDefault", False)


def test_controller_runs_two_replicas_with_leader_election_and_a_pdb() -> None:
    base = DEPLOY / "base/controller"
    deployment = file_docs(base / "deployment.yaml")[0]
    assert deployment["spec"]["replicas"] == 2
    config = controller_config(deployment, [doc for _, doc in all_file_docs()])
    assert config.leader_elect
    assert config.identity == f"{deployment['metadata']['name']}-0"  # the pod's name
    lease = config.lease()
    # The Lease and the member Secrets live in the controller's own namespace: where its
    # Role grants them, by the names the code uses.
    calls = expected_calls()["controller"]["calls"]
    assert lease.namespace == config.member_secrets == NAMESPACE
    assert {n for c in calls if c["resource"] == "leases"
            for n in c.get("resourceNames", ())} == {lease.name}
    assert {c["scope"] for c in calls} == {"namespace"}
    pdb = file_docs(base / "pdb.yaml")[0]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", ()):
        key, op, values = expr["key"], expr["operator"], expr.get("values", ())
        if not {"In": key in labels and labels[key] in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def _port_matches(rule_port: dict[str, Any], named: dict[str, int], port: int,
                  protocol: str) -> bool:
    """One entry of a NetworkPolicy rule's `ports`: a number or a container port's name,
    a range up to `endPort`, TCP unless it says otherwise."""
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    first = named.get(rule_port["port"], rule_port["port"])
    return first <= port <= rule_port.get("endPort", first)


def _ingress_admitted(docs: Any, target: dict[str, Any], source_ns: str,
                      source_labels: dict[str, str], port: int,
                      protocol: str = "TCP") -> bool:
    """NetworkPolicy ingress semantics for a pod-network client of `target` (a workload):
    no policy selecting the target's pods admits everything; otherwise one rule of one
    policy must admit the client's pod (podSelector alone: the policy's namespace) and
    the port (by number, range or the container port's name)."""
    pod = target["spec"]["template"]
    ns = target["metadata"]["namespace"]
    named = {p["name"]: p["containerPort"] for c in containers(target)
             for p in c.get("ports", ()) if "name" in p}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and d["metadata"]["namespace"] == ns
                and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
                and _selects(d["spec"]["podSelector"], pod["metadata"]["labels"])]
    if not policies:
        return True
    ns_labels = {"kubernetes.io/metadata.name": source_ns}
    for policy in policies:
        for rule in policy["spec"].get("ingress", ()):
            ports = rule.get("ports")
            if ports is not None and not any(_port_matches(p, named, port, protocol)
                                             for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert "ipBlock" not in peer, "extend _ingress_admitted for ipBlock peers"
                ns_ok = (_selects(peer["namespaceSelector"], ns_labels)
                         if "namespaceSelector" in peer else source_ns == ns)
                if ns_ok and _selects(peer.get("podSelector", {}), source_labels):
                    return True
    return False


def test_controller_port_admits_only_gateways_and_prometheus() -> None:
    """Port 9902 serves the stream and /status (every service and endpoint of the
    clusterset) without authentication: any pod in the cluster could read them. A
    NetworkPolicy admits only gateway pods of the controller's namespace and Prometheus
    in "monitoring"; borrowed labels in another namespace get nowhere."""
    docs = [doc for _, doc in all_file_docs()]
    controller = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "mcsproxy-controller")
    gateway_pod = next(d for d in docs if d["kind"] == "Deployment"
                       and d["metadata"]["name"] == "mcsproxy-gateway")
    gateway_labels = gateway_pod["spec"]["template"]["metadata"]["labels"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    port = 9902
    assert _ingress_admitted(docs, controller, NAMESPACE, gateway_labels, port)
    assert _ingress_admitted(docs, controller, "monitoring", prometheus, port)
    for ns, labels in (("default", {"app": "web"}), (NAMESPACE, {"app": "debug"}),
                       ("default", gateway_labels), ("tenant-a", prometheus)):
        assert not _ingress_admitted(docs, controller, ns, labels, port), (ns, labels)
    # Every overlay that runs the controller renders the policy with it.
    kustomization = load_docs((DEPLOY / "base/controller/kustomization.yaml").read_text())[0]
    assert "networkpolicy.yaml" in kustomization["resources"]


def test_gateway_admin_policy_closes_only_the_admin_port() -> None:
    """overlays/gateway-deployment puts the admin listener (every service, endpoint and
    flag on /config_dump) on the pod IP. The opt-in component admits Prometheus alone to
    it and leaves every other port, TCP and UDP, open to every pod: DNS and the
    proxied ClusterSetIP ports, which can be any port."""
    component = DEPLOY / "components/gateway-admin-policy"
    kustomization = load_docs((component / "kustomization.yaml").read_text())[0]
    assert kustomization["kind"] == "Component"
    policies = [doc for name in kustomization["resources"]
                for doc in file_docs(component / name)]
    gateway = file_docs(DEPLOY / "overlays/gateway-deployment/deployment.yaml")[0]
    docs = [*file_docs(DEPLOY / "overlays/gateway-deployment/deployment.yaml"), *policies]
    # Without the component nothing selects the gateway pods: the admin port is open.
    assert _ingress_admitted([gateway], gateway, "default", {"app": "web"}, 9901)
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert _ingress_admitted(docs, gateway, "monitoring", prometheus, 9901)
    for ns, labels in (("default", {"app": "web"}), (NAMESPACE, {"app": "debug"}),
                       ("tenant-a", prometheus)):
        assert not _ingress_admitted(docs, gateway, ns, labels, 9901), (ns, labels)
        for port, protocol in ((9953, "UDP"), (9953, "TCP"), (1, "TCP"), (80, "TCP"),
                               (9900, "TCP"), (9902, "TCP"), (65535, "TCP"),
                               (9901, "UDP"), (53, "UDP")):
            assert _ingress_admitted(docs, gateway, ns, labels, port, protocol), \
                (ns, labels, port, protocol)


def test_example_member_secrets_are_read_by_the_controller() -> None:
    """deploy/examples/member-kubeconfig-secret.yaml through the controller's own reader,
    as the API server would hand the Secrets over (stringData → base64 data)."""
    found = {}
    for doc in file_docs(DEPLOY / "examples/member-kubeconfig-secret.yaml"):
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert MEMBER_LABEL in doc["metadata"]["labels"]
        data = {k: base64.b64encode(v.encode()).decode() for k, v in doc["stringData"].items()}
        cluster, kubeconfig = member_from_secret({**doc, "data": data})
        assert kubeconfig["current-context"] in {c["name"] for c in kubeconfig["contexts"]}
        found[cluster] = doc["metadata"]["name"]
    assert found == {"east": "mcsproxy-member-east", "west": "mcsproxy-member-west",
                     "central": "central"}  # an empty label value: the Secret's name


def test_dns_service_reaches_the_gateway_dns_port() -> None:
    svc = file_docs(DEPLOY / "base/gateway/dns-service.yaml")[0]
    assert {(p["port"], p["protocol"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        (53, "UDP", "dns-udp"), (53, "TCP", "dns-tcp")}
    for path in (DEPLOY / "base/gateway/daemonset.yaml",
                 DEPLOY / "overlays/gateway-deployment/deployment.yaml"):
        w = file_docs(path)[0]
        assert svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"][
            "labels"].items()
    corefile = file_docs(DEPLOY / "dns/coredns-clusterset.yaml")[0]["data"]["Corefile"]
    block = re.search(r"clusterset\.local:53 \{(.*?)\n\}", corefile, re.S)
    assert block is not None and "forward . MCSPROXY_DNS_IP:53" in block.group(1)


def test_k3s_gets_the_stub_domain_without_replacing_its_corefile() -> None:
    """k3s rewrites its `coredns` ConfigMap (with its NodeHosts) on every restart and
    imports `*.server` keys of `coredns-custom`: the same server block goes there."""
    corefile = file_docs(DEPLOY / "dns/coredns-clusterset.yaml")[0]["data"]["Corefile"]
    stock_block = corefile[corefile.index("clusterset.local:53 {"):]
    custom = file_docs(DEPLOY / "dns/coredns-custom-k3s.yaml")[0]
    assert (custom["metadata"]["name"], custom["metadata"]["namespace"]) == (
        "coredns-custom", "kube-system")
    servers = {k: v for k, v in custom["data"].items() if k.endswith(".server")}
    assert list(servers.values()) == [stock_block], "the k3s block differs from the stock one"
    readme = (DEPLOY / "dns/README.md").read_text()
    assert "coredns-custom-k3s.yaml" in readme and "k3d" in readme


# ------------------------------------------------------------------- the DNS port itself

# Ports a Kubernetes node's own software commonly holds. The gateway DaemonSet listens on
# the node's network, so its DNS port must avoid every one of them, or its bind fails
# with EADDRINUSE and the DaemonSet crash-loops on that node.
NODE_HELD_PORTS: dict[int, str] = {
    53: "DNS (systemd-resolved, dnsmasq)", 5353: "mDNS (avahi-daemon, systemd-resolved)",
    5355: "LLMNR (systemd-resolved)", 9153: "CoreDNS metrics", 9253: "node-local-dns metrics",
    179: "BGP (Calico)", 2379: "etcd", 2380: "etcd peers", 6443: "kube-apiserver",
    4789: "VXLAN", 8472: "VXLAN (flannel, Cilium)", 6081: "Geneve",
    9099: "Calico felix health", 9100: "node exporter", 4240: "Cilium health",
    4244: "Hubble", 9962: "Cilium metrics", 9963: "Cilium operator metrics",
    9964: "Cilium Envoy metrics", 9901: "the gateway's own admin port",
    **{p: "kubelet, kube-proxy, kube-controller-manager, kube-scheduler"
       for p in range(10248, 10261)},
}
# kube-proxy reserves NodePorts on every node; the kernel hands out source ports of
# outgoing connections from ip_local_port_range (Linux default 32768-60999).
NODE_HELD_RANGES = ((30000, 32767, "the NodePort range"),
                    (32768, 60999, "the ephemeral port range"))

# Where the docs state the port the manifests' gateways answer DNS on (the CLI default,
# 127.0.0.1:5353, is another matter and is not matched).
DOC_DNS_PORT = [re.compile(p) for p in (
    r"--dns-listen=\$\(NODE_IP\):(\d+)", r"`\$\(NODE_IP\):(\d+)`",
    r"--dns-listen=0\.0\.0\.0:(\d+)", r"`0\.0\.0\.0:(\d+)` \(the pod IP\)",
    r"<node IP>:(\d+)`", r"@<node IP> -p (\d+)", r"port 53 → (\d+)", r"node IP and (\d+)",
    r"node IP, port (\d+)", r"DNS port (\d+)")]
DNS_PORT_DOCS = ("README.md", "deploy/README.md", "deploy/dns/README.md", "docs/dns-wiring.md")


def gateway_dns_ports(docs: Any) -> dict[str, int]:
    """Each gateway workload's DNS port, with --dns-listen, both containerPorts and the
    mcsproxy-dns Service's targetPorts (resolved against the workload) all agreeing."""
    services = [d for d in docs if d["kind"] == "Service"
                and d["metadata"]["name"] == "mcsproxy-dns"]
    out = {}
    for w in workloads(docs):
        c = containers(w)[0]
        if c["args"][0] != "gateway":
            continue
        where = ident(w)
        dns_port = _listen_port(_flags(c["args"])["--dns-listen"])
        ports = {p["name"]: p for p in c["ports"]}
        for name, protocol in (("dns-udp", "UDP"), ("dns-tcp", "TCP")):
            assert (ports[name]["containerPort"], ports[name]["protocol"]) == (
                dns_port, protocol), f"{where}: containerPort {name} is not --dns-listen"
        labels = w["spec"]["template"]["metadata"]["labels"]
        for svc in services:
            if not svc["spec"]["selector"].items() <= labels.items():
                continue
            for p in svc["spec"]["ports"]:
                target = p["targetPort"]
                target = ports[target]["containerPort"] if isinstance(target, str) else target
                assert target == dns_port, f"{where}: mcsproxy-dns {p['name']} -> {target}"
        pod = w["spec"]["template"]["spec"]
        if pod.get("hostNetwork", False):
            assert dns_port not in NODE_HELD_PORTS, \
                f"{where}: DNS port {dns_port} on the node network is {NODE_HELD_PORTS[dns_port]}"
            for low, high, what in NODE_HELD_RANGES:
                assert not low <= dns_port <= high, f"{where}: DNS port {dns_port} is in {what}"
        out[where] = dns_port
    return out


def _manifest_dns_port() -> int:
    ports = gateway_dns_ports([doc for _, doc in all_file_docs()])
    assert len(ports) == 2 and len(set(ports.values())) == 1, \
        f"the DaemonSet and the Deployment answer DNS on different ports: {ports}"
    return next(iter(ports.values()))


def test_gateway_dns_port_is_one_port_off_the_nodes_ports() -> None:
    """A node with avahi-daemon or systemd-resolved's MulticastDNS holds *:5353 with
    SO_REUSEADDR: the host-network gateway could not bind --dns-listen=$(NODE_IP):5353."""
    port = _manifest_dns_port()
    if KUBECTL is not None:
        for overlay in OVERLAYS:
            assert set(gateway_dns_ports(rendered(overlay)).values()) == {port}, overlay


def test_dns_port_check_catches_mdns_on_the_node_network() -> None:
    docs = [copy.deepcopy(doc) for _, doc in all_file_docs()]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    c = containers(ds)[0]
    c["args"] = [re.sub(r"^--dns-listen=(.*):\d+$", r"--dns-listen=\1:5353", a)
                 for a in c["args"]]
    for p in c["ports"]:
        if p["name"].startswith("dns-"):
            p["containerPort"] = 5353
    with pytest.raises(AssertionError, match="mDNS"):
        gateway_dns_ports(docs)
    c["ports"][0]["containerPort"] = 5354
    with pytest.raises(AssertionError, match="is not --dns-listen"):
        gateway_dns_ports(docs)


def test_docs_name_the_manifests_dns_port() -> None:
    port = _manifest_dns_port()
    texts = {name: (ROOT / name).read_text() for name in DNS_PORT_DOCS}
    texts.update({rel(p): p.read_text() for p in manifest_files()})
    for name, text in texts.items():
        found = [(m.group(0), int(m.group(1))) for rx in DOC_DNS_PORT for m in rx.finditer(text)]
        if name in DNS_PORT_DOCS:
            assert found, f"{name} does not say where the gateway answers DNS"
        wrong = [f for f, p in found if p != port]
        assert not wrong, f"{name} says {wrong}, the manifests use {port}"


# ------------------------------------------------------------------ args vs the real CLI

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _env_values(w: dict[str, Any], c: dict[str, Any], docs: Any) -> dict[str, str]:
    """What the kubelet would put into the container's env (sample values for fields)."""
    fields = {"metadata.namespace": w["metadata"]["namespace"],
              "metadata.name": f"{w['metadata']['name']}-0", "status.hostIP": "10.0.0.1"}
    out = {}
    for e in c.get("env", ()):
        source = e.get("valueFrom", {})
        if "fieldRef" in source:
            out[e["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = next(d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == ref["name"])
            out[e["name"]] = cm["data"][ref["key"]]
        else:
            out[e["name"]] = e["value"]
    return out


def parsed_args(w: dict[str, Any], c: dict[str, Any], docs: Any) -> argparse.Namespace:
    """The container's args with $(VAR) expanded, through the real parser: an unknown
    subcommand, an unknown flag or a bad value fails."""
    env = _env_values(w, c, docs)
    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a)
            for a in c["args"]]
    commands = _subcommands(build_parser())
    assert args[0] in commands, f"{ident(w)}: unknown subcommand {args[0]}"
    parser = commands[args[0]]
    parsed, unknown = parser.parse_known_args(args[1:])
    assert not unknown, f"{ident(w)}: {args[0]} does not accept {unknown}"
    parsed.command = args[0]
    return parsed


def controller_config(w: dict[str, Any], docs: Any) -> KubeControllerConfig:
    args = parsed_args(w, containers(w)[0], docs)
    assert args.command == "controller"
    return kube_app.config_from_args(args)


def test_container_args_parse_with_the_cli() -> None:
    docs = [doc for _, doc in all_file_docs()]
    commands = set()
    for w in workloads(docs):
        for c in containers(w):
            args = parsed_args(w, c, docs)
            commands.add(args.command)
            if args.command == "gateway":
                config = gateway_config(args)
                for spec in config.sources:
                    make_source(spec, config.cluster_id, clusterset_cidr=config.clusterset_cidr)
                assert config.admin.listen[1] == _listen_port(_flags(c["args"])["--admin-listen"])
            else:
                config = controller_config(w, docs)
                assert config.serve is not None and config.serve[1] == 9902
    assert commands == {"gateway", "controller"}


def test_args_check_rejects_an_unknown_flag() -> None:
    docs = [doc for _, doc in all_file_docs()]
    w = copy.deepcopy(file_docs(DEPLOY / "base/controller/deployment.yaml")[0])
    containers(w)[0]["args"].append("--kubeconfig-secret=mcsproxy-members")
    with pytest.raises(AssertionError, match="does not accept"):
        parsed_args(w, containers(w)[0], docs)


# ---------------------------------------------------------------- image and pinned deps

def _constraints(name: str = "constraints.txt") -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_image_pins_every_runtime_dependency_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    hint = "regenerate with .venv/bin/python deploy/pin_constraints.py"
    for raw in project["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt; {hint}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} is outside {req.specifier}; {hint}"


def test_image_build_pins_every_build_requirement_within_its_range() -> None:
    """The mypyc that compiles the image's data path is the one the tests ran against,
    and the pinned pip knows --build-constraint, which the Dockerfile passes."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = _constraints("build-constraints.txt")
    hint = "regenerate with .venv/bin/python deploy/pin_constraints.py"
    for raw in [*requires, "pip>=25.3"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/build-constraints.txt; {hint}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} is outside {req.specifier}; {hint}"
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install -c deploy/build-constraints.txt pip" in text
    assert re.search(r"pip install --no-deps --build-constraint deploy/build-constraints\.txt \.",
                     text)


def test_image_pins_are_closed_under_their_requirements() -> None:
    from importlib import metadata

    pins = _constraints()
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != Version(version):
            continue  # only the pinned version's metadata says what it needs
        for raw in dist.requires or ():
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            assert canonicalize_name(req.name) in pins, \
                f"{name}=={version} needs {req.name}, which deploy/constraints.txt lacks"


def test_dockerfile_builds_a_non_root_image_from_allowed_files() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert "pip install -r deploy/constraints.txt" in text and "pip check" in text
    # No installer in what runs (24 MB of pip and setuptools nothing imports), removed
    # after the checks that use pip, and the entry points still import without them.
    build = text[: text.index("\nFROM ", text.index("FROM ") + 1)]
    uninstall = build.index("pip uninstall --yes --quiet pip setuptools")
    assert build.index("pip check") < uninstall < build.index("import mcsproxy.cli")
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in src.split():
            assert item in allowed, f"COPY {item} is excluded by .dockerignore"
            assert (ROOT / item).exists(), f"COPY {item}: no such file"
