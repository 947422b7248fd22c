"""What the gateway accepts as a ServiceImport or an imported EndpointSlice, and what not."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
import yaml

from mcsproxy.manifests import (
    ManifestError,
    load_yaml_documents,
    object_kind,
    parse_endpoint_slice,
    parse_service_import,
)
from mcsproxy.model import ServiceKey, ServicePort
from tests.test_reconcile_support import with_fields

IMPORT: dict[str, Any] = {
    "apiVersion": "multicluster.x-k8s.io/v1alpha1",
    "kind": "ServiceImport",
    "metadata": {"name": "web", "namespace": "shop",
                 "annotations": {"mcsproxy.io/locality": "local-first"}},
    "spec": {
        "type": "ClusterSetIP",
        "ips": ["127.240.0.1", "fd00::1"],
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "appProtocol": "http"},
                  {"port": 53, "protocol": "UDP"}],
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}},
        "trafficDistribution": "PreferClose",
    },
    "status": {"clusters": [{"cluster": "east"}, {"cluster": "west"}]},
}

SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {"name": "web-east", "namespace": "shop", "labels": {
        "multicluster.kubernetes.io/service-name": "web",
        "multicluster.kubernetes.io/source-cluster": "east"}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    "endpoints": [
        {"addresses": ["10.0.0.1"], "hostname": "web-0", "zone": "z1"},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True,
                                                   "terminating": True}},
    ],
}


@pytest.mark.parametrize(("family", "address", "why"), [
    ("IPv4", "169.254.169.254", "link-local"),  # the cloud metadata service
    ("IPv4", "169.254.1.1", "link-local"),
    ("IPv4", "0.0.0.0", "unspecified"),  # connect() to it reaches the gateway's own node
    ("IPv4", "0.1.2.3", "unspecified"),
    ("IPv4", "224.0.0.1", "multicast"),
    ("IPv4", "239.255.255.250", "multicast"),
    ("IPv6", "fe80::1", "link-local"),
    ("IPv6", "::ffff:169.254.169.254", "link-local"),  # the IPv4 address, mapped
    ("IPv6", "::", "unspecified"),
    ("IPv6", "ff02::1", "multicast"),
])
def test_slices_never_point_the_proxy_at_link_local_unspecified_or_multicast(
        family: str, address: str, why: str) -> None:
    """A member cluster's slice with 169.254.169.254 was served: a pod's connection to the
    ClusterSetIP went from the gateway, on the node's network, to the cloud's metadata
    service (the node's credentials). Such addresses are no endpoint's: the slice is
    refused, as one with an invalid address, and the last good one keeps serving."""
    good = "10.0.0.9" if family == "IPv4" else "fd00::9"
    bad = {**SLICE, "addressType": family,
           "endpoints": [{"addresses": [good]}, {"addresses": [address]}]}
    with pytest.raises(ManifestError) as info:
        parse_endpoint_slice(bad)
    assert f"endpoints[1] address {ipaddress.ip_address(address)} is {why}" in str(info.value)
    assert info.value.path == ("endpoints", 1, "addresses", 0)
    # Loopback stays an endpoint (the demo, a clusterset on one host), as do the rest.
    for fine in (("127.0.0.1", "10.1.2.3", "240.0.0.1") if family == "IPv4"
                 else ("::1", "fd00:ec2::254", "2001:db8::1")):
        ok = parse_endpoint_slice({**bad, "endpoints": [{"addresses": [fine]}]})
        assert ok is not None and ok.endpoints[0].address == fine


def test_service_import_fields() -> None:
    spec = parse_service_import(IMPORT)
    assert spec.key == ServiceKey("shop", "web")
    assert spec.ips == ("127.240.0.1", "fd00::1")
    assert spec.ports == (ServicePort("http", "TCP", 80, "http"), ServicePort("", "UDP", 53))
    assert (spec.session_affinity, spec.affinity_timeout_s) == ("ClientIP", 30)
    assert spec.traffic_distribution == "PreferClose"
    assert spec.clusters == ("east", "west")
    assert object_kind(IMPORT) == "ServiceImport"
    beta = {**IMPORT, "apiVersion": "multicluster.x-k8s.io/v1beta1"}
    assert object_kind(beta) == "ServiceImport"


def test_slice_conditions_follow_the_api_defaults() -> None:
    spec = parse_endpoint_slice(SLICE)
    assert spec is not None
    first, second = spec.endpoints
    # Nil ready and nil serving are true, nil terminating is false (the v1 API reference
    # and kube-proxy; serving does not follow ready).
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    assert (second.ready, second.serving, second.terminating) == (False, True, True)
    draining = {**SLICE, "endpoints": [
        {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "terminating": True}}]}
    spec = parse_endpoint_slice(draining)
    assert spec is not None
    (third,) = spec.endpoints
    assert (third.ready, third.serving, third.terminating) == (False, True, True)
    assert first.hostname == "web-0" and first.cluster == "east" and first.zone == "z1"
    assert first.port_for(ServicePort("http", "TCP", 80)) == 8080
    assert first.port_for(ServicePort("http", "UDP", 80)) is None
    assert first.ports is second.ports  # shared per slice, not copied per endpoint


def test_slice_without_mcs_label_is_not_ours() -> None:
    plain = copy.deepcopy(SLICE)
    plain["metadata"]["labels"] = {"kubernetes.io/service-name": "web"}
    assert parse_endpoint_slice(plain) is None


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    return with_fields(obj, (path, value))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.type", "LoadBalancer", "spec.type must be ClusterSetIP or Headless"),
        ("spec.ips", ["not-an-ip"], "invalid address 'not-an-ip'"),
        ("spec.ips", ["127.240.0.1", "127.240.0.2"], "two IPv4 addresses"),
        ("spec.ports.0.port", 0, "spec.ports[0].port must be an integer 1-65535"),
        ("spec.ports.0.port", "80", "spec.ports[0].port must be an integer 1-65535"),
        ("spec.ports.1.protocol", "ICMP", "spec.ports[1].protocol must be one of"),
        ("spec.ports.1.name", "http", "duplicate port name 'http'"),
        ("spec.ports", [{"port": 80}, {"port": 81}],
         r"duplicate unnamed port \(with several, each needs a name\)"),
        ("spec.ports", [{"name": "a", "port": 80}, {"name": "b", "port": 80}],
         "duplicate port 80/TCP"),
        ("spec.sessionAffinity", "Cookie", "sessionAffinity must be None or ClientIP"),
        ("spec.ports", {"port": 80}, "spec.ports must be a list"),
        ("metadata.name", "", "ServiceImport has no metadata.name"),
    ],
)
def test_invalid_service_imports(path: str, value: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_service_import(_with(IMPORT, path, value))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("addressType", "IPv5", "addressType must be IPv4, IPv6 or FQDN"),
        ("endpoints.0.addresses", [], r"endpoints\[0\] has no addresses"),
        ("endpoints.0.addresses", ["fd00::1"], "is not IPv4"),
        ("endpoints.1.conditions", {"ready": "yes"}, "conditions.ready must be a boolean"),
        ("ports.0.port", 70000, r"ports\[0\].port must be an integer"),
        ("metadata.labels", {"multicluster.kubernetes.io/service-name": "web"},
         "source-cluster is missing"),
        # An imported slice (it names its source cluster) whose service label is lost was
        # skipped as "not ours": its endpoints quietly left the service.
        ("metadata.labels", {"multicluster.kubernetes.io/source-cluster": "east"},
         "service-name is missing"),
    ],
)
def test_invalid_slices(path: str, value: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_endpoint_slice(_with(SLICE, path, value))


def _slice_shape(obj: dict[str, Any]) -> tuple[Any, ...]:
    """(endpoint count, first endpoint's address, addresses, ports, conditions)."""
    spec = parse_endpoint_slice(obj)
    assert spec is not None
    if not spec.endpoints:
        return (0,)
    e = spec.endpoints[0]
    return (len(spec.endpoints), e.address, e.addresses,
            [(p.name, p.protocol, p.port) for p in e.ports], (e.ready, e.serving, e.terminating))


def _slice_with(**changes: Any) -> dict[str, Any]:
    return with_fields(SLICE, *((path.replace("__", "."), v) for path, v in changes.items()))


FIRST = ("10.0.0.1",)
HTTP_8080 = [("http", "TCP", 8080)]
READY = (True, True, False)


# Odd but valid, as API servers and controllers write them: accepted and read as
# kube-proxy reads them.
@pytest.mark.parametrize(("obj", "shape"), [
    (SLICE, (2, "10.0.0.1", FIRST, HTTP_8080, READY)),
    # FQDN slices are for other consumers: no endpoint, and no error for its names.
    (_slice_with(addressType="FQDN", endpoints=[{"addresses": ["web-0.example.com"]}]), (0,)),
    # No ports (a headless Service without ports): null and [] alike expose none.
    (_slice_with(ports=None), (2, "10.0.0.1", FIRST, [], READY)),
    (_slice_with(ports=[]), (2, "10.0.0.1", FIRST, [], READY)),
    # A nil port number means "all ports": nothing to match by name, so no port.
    (_slice_with(ports__0__port=None), (2, "10.0.0.1", FIRST, [], READY)),
    # name "" and no name are both the unnamed port; protocol defaults to TCP.
    (_slice_with(ports__0__name=""), (2, "10.0.0.1", FIRST, [("", "TCP", 8080)], READY)),
    (_slice_with(ports=[{"port": 8080}]), (2, "10.0.0.1", FIRST, [("", "TCP", 8080)], READY)),
    (_slice_with(ports=[{"name": "http", "port": 8080}]), (2, "10.0.0.1", FIRST, HTTP_8080,
                                                           READY)),
    # Conditions {} or absent: ready unknown is ready.
    (_slice_with(endpoints__0__conditions={}), (2, "10.0.0.1", FIRST, HTTP_8080, READY)),
    (_slice_with(endpoints__0__conditions=None), (2, "10.0.0.1", FIRST, HTTP_8080, READY)),
    # Several addresses: the first is the endpoint's (kube-proxy's), all are kept for DNS.
    (_slice_with(endpoints__0__addresses=["10.0.0.1", "10.0.0.9"]),
     (2, "10.0.0.1", ("10.0.0.1", "10.0.0.9"), HTTP_8080, READY)),
    # Topology fields and fields we do not know are ignored.
    (_slice_with(endpoints__0__hints={"forZones": [{"name": "z1"}], "forNodes": [{"name": "n"}]},
                 endpoints__0__nodeName="n", endpoints__0__deprecatedTopology={"a": "b"},
                 endpoints__0__targetRef={"kind": "Pod", "name": "web-0"}, futureField=[1]),
     (2, "10.0.0.1", FIRST, HTTP_8080, READY)),
    # More than the API server's 1000 endpoints per slice: all taken.
    (_slice_with(endpoints=[{"addresses": [f"10.1.{i // 250}.{i % 250}"]} for i in range(1500)]),
     (1500, "10.1.0.0", ("10.1.0.0",), HTTP_8080, READY)),
])
def test_odd_but_valid_slices(obj: dict[str, Any], shape: tuple[Any, ...]) -> None:
    assert _slice_shape(obj) == shape


@pytest.mark.parametrize(("path", "value", "field", "expected"), [
    # Fields of newer MCS API versions, status we do not know: accepted and ignored.
    ("spec.ipFamilies", ["IPv4", "IPv6"], "ips", ("127.240.0.1", "fd00::1")),
    ("spec.internalTrafficPolicy", "Local", "type", "ClusterSetIP"),
    ("futureField", {"x": 1}, "type", "ClusterSetIP"),
    ("status", {"clusters": [{"cluster": "east", "weight": 3}],
                "conditions": [{"type": "Ready", "status": "True"}], "newThing": 1},
     "clusters", ("east",)),
    # sessionAffinityConfig beside sessionAffinity None: no affinity.
    ("spec.sessionAffinity", "None", "session_affinity", "None"),
    # name "" is the unnamed port; protocol defaults to TCP; appProtocol kept as written.
    ("spec.ports", [{"name": "", "port": 80, "appProtocol": "HTTP"}], "ports",
     (ServicePort("", "TCP", 80, "HTTP"),)),
])
def test_odd_but_valid_service_imports(path: str, value: Any, field: str, expected: Any) -> None:
    assert getattr(parse_service_import(_with(IMPORT, path, value)), field) == expected


def test_headless_import_must_not_have_ips() -> None:
    headless = _with(IMPORT, "spec.type", "Headless")
    with pytest.raises(ManifestError, match=r"Headless import must not have spec\.ips"):
        parse_service_import(headless)


def test_yaml_errors_carry_the_line() -> None:
    text = "a: 1\n---\nkind: ServiceImport\nspec: [unclosed\n"
    with pytest.raises(ManifestError) as info:
        list(load_yaml_documents(text, "f.yaml"))
    assert info.value.origin == "f.yaml"
    assert info.value.line == 5
    assert str(info.value).startswith("f.yaml:5: invalid YAML")


@pytest.mark.parametrize(("text", "line", "message"), [
    # Values PyYAML resolves but cannot build raise plain ValueError, not YAMLError.
    ("a: 1\n---\nmetadata:\n  creationTimestamp: 2024-02-30\n", 4,
     "cannot read '2024-02-30' as timestamp"),
    ("a: !!timestamp 2024-13-45\n", 1, "as timestamp"),
    ("a:\n  b: !!float foo\n", 2, "cannot read 'foo' as float"),
    ("a: !!int 0x_\n", 1, "as int"),
    # A key given twice: PyYAML kept the last (a second `endpoints:` replaced the first);
    # kubectl refuses the file.
    ("kind: EndpointSlice\nendpoints: []\nports: []\nendpoints: []\n", 4,
     "duplicate key 'endpoints'"),
    ("a:\n  - b: 1\n    c: 2\n    'b': 3\n", 4, "duplicate key 'b'"),
    # Too deep: libyaml stops at 1000 levels, on the line it reached; the pure-Python
    # parser's recursion names the line where the document starts (its ---).
    ("a: 1\n---\nb: " + "[" * 5000 + "]" * 5000 + "\n",
     3 if yaml.__with_libyaml__ else 2,
     "exceeded maximum nesting depth" if yaml.__with_libyaml__ else "nested too deeply"),
])
def test_unbuildable_values_are_manifest_errors_with_their_line(
        text: str, line: int, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        list(load_yaml_documents(text, "f.yaml"))
    assert info.value.line == line
    assert str(info.value).startswith(f"f.yaml:{line}: invalid YAML") and message in str(info.value)


def test_merge_keys_are_not_duplicates() -> None:
    text = "base: &b {x: 1}\nm:\n  <<: *b\n  y: 2\n"
    assert [doc for _, doc in load_yaml_documents(text, "f.yaml")] == [
        {"base": {"x": 1}, "m": {"x": 1, "y": 2}}]


def test_documents_report_their_first_line() -> None:
    text = "# comment\na: 1\n---\n\nb: 2\n"
    assert list(load_yaml_documents(text, "f.yaml")) == [(2, {"a": 1}), (5, {"b": 2})]


@pytest.mark.parametrize("address", [
    "10.0.0.1", "1.0.0.0", "255.255.255.255", "010.0.0.1", "10.0.0.01", "10.0.0", "10.0.0.1.1",
    "256.0.0.1", " 10.0.0.1", "10.0.0.1 ", "10.0.0.1\x00", "0x0a.0.0.1", "10.0.0.-1",
    "\u0661\u0660.0.0.1", "10.0.0.1/32", "fd00::1", "::ffff:10.0.0.1", 167772161, None,
])
def test_ipv4_slice_addresses_agree_with_ipaddress(address: Any) -> None:
    """The fast IPv4 check accepts exactly the canonical forms ipaddress accepts (0.0.0.0/8,
    link-local and multicast are refused for another reason: see the test above)."""
    try:
        ip = ipaddress.ip_address(address)  # type: ignore[arg-type]
        expected = str(ip) if ip.version == 4 else None
    except (ValueError, TypeError):
        expected = None
    obj = _with(SLICE, "endpoints", [{"addresses": [address]}])
    if expected is None:
        with pytest.raises(ManifestError, match="address"):
            parse_endpoint_slice(obj)
    else:
        spec = parse_endpoint_slice(obj)
        assert spec is not None and spec.endpoints[0].address == expected


# A file as the readers see it: the bad fields sit deep in later documents. Each case
# marks its offending line with "#<" and the error must name exactly that line.
FILE_HEAD = """\
# services of the shop
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterSetIP
  ips: [127.240.0.1]
  ports:
  - name: http
    protocol: TCP
    port: 80
---
"""
FILE_SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-east
  namespace: shop
  labels:
    multicluster.kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: east
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses:
  - 10.0.0.1
  - 10.0.0.2
  conditions:
    ready: true
- addresses:
  - 10.0.0.3
"""


def _first_error(text: str) -> ManifestError:
    """Read every document as the file readers do (mcsproxy.sources.file,
    controlplane.clusters.directory): parse errors re-placed with .at(origin, line)."""
    from mcsproxy.sources.file import parse_file_text

    with pytest.raises(ManifestError) as info:
        parse_file_text(text, "f.yaml", "file:f.yaml")
    return info.value


@pytest.mark.parametrize(("old", "new", "message"), [
    # A bad IP in a list of several, in the third document.
    ("  - 10.0.0.2\n", "  - 999.1.1.1 #<\n", "endpoints[0] has an invalid address '999.1.1.1'"),
    ("  - 10.0.0.3\n", "  - fd00::3 #<\n", "endpoints[1] address fd00::3 is not IPv4"),
    # Wrong types: the key's line.
    ("  port: 8080\n", "  port: '8080' #<\n", "ports[0].port must be an integer 1-65535"),
    ("    ready: true\n", "    ready: yes please #<\n", "conditions.ready must be a boolean"),
    ("addressType: IPv4\n", "addressType: IPv5 #<\n", "addressType must be IPv4, IPv6 or FQDN"),
    ("ports:\n- name: http\n", "ports: #<\n  name: http\n", "ports must be a list"),
    # Missing fields: where they belong (the list item, the labels, the metadata).
    ("- addresses:\n  - 10.0.0.3\n", "- conditions: {} #<\n", "endpoints[1] has no addresses"),
    ("    multicluster.kubernetes.io/source-cluster: east\n", "",
     "label multicluster.kubernetes.io/source-cluster is missing"),
    ("  name: web-east\n", "", "EndpointSlice has no metadata.name"),
])
def test_slice_errors_name_the_line_of_the_bad_field(old: str, new: str, message: str) -> None:
    """They named the line where the document starts (22), however far below the
    field was: in a 200-endpoint slice that points at nothing useful."""
    text = FILE_HEAD + FILE_SLICE.replace(old, new)
    assert old in FILE_SLICE
    if "#<" in text:
        line = text[:text.index("#<")].count("\n") + 1
    elif message.startswith("label "):
        line = text[:text.index("  labels:")].count("\n") + 1
    else:
        line = text[:text.index("metadata:\n  namespace: shop\n  labels")].count("\n") + 1
    error = _first_error(text)
    assert message in error.message
    assert (error.origin, error.line) == ("f.yaml", line), str(error)
    assert str(error).startswith(f"f.yaml:{line}: ")
    assert type(error.line) is int  # the node tree is not kept by a cached error


@pytest.mark.parametrize(("old", "new", "message"), [
    ("  ips: [127.240.0.1]\n", "  ips: [127.240.0.1,\n    127.240.0.999] #<\n",
     "invalid address '127.240.0.999'"),
    ("    port: 80\n", "    port: 99999 #<\n", "spec.ports[0].port must be an integer 1-65535"),
    ("    protocol: TCP\n", "    protocol: [TCP] #<\n", "spec.ports[0].protocol must be one of"),
    ("    port: 80\n", "    port: 80\n  - name: http #<\n    port: 81\n",
     "duplicate port name 'http'"),
    ("  type: ClusterSetIP\n", "  type: Headless\n", "a Headless import must not have spec.ips"),
    ("  ports:\n", "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}} #<\n  ports:\n",
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds must be 1-86400"),
])
def test_import_errors_name_the_line_of_the_bad_field(old: str, new: str, message: str) -> None:
    head = FILE_HEAD.replace(old, new)
    assert old in FILE_HEAD
    text = head + FILE_SLICE
    marker = "#<" if "#<" in text else "  ips:"
    line = text[:text.index(marker)].count("\n") + 1
    error = _first_error(text)
    assert message in error.message
    assert error.line == line, str(error)


def test_an_item_of_a_list_document_is_found_by_its_name() -> None:
    """`kubectl get -o yaml` writes one List document; the bad item's field is named."""
    text = ("apiVersion: v1\nkind: List\nitems:\n"
            + "".join(f"- apiVersion: multicluster.x-k8s.io/v1beta1\n  kind: ServiceImport\n"
                      f"  metadata: {{name: s{i}, namespace: shop}}\n"
                      f"  spec:\n    type: {'Bogus' if i == 2 else 'Headless'}\n"
                      for i in range(4)))
    error = _first_error(text)
    assert "ServiceImport shop/s2: spec.type" in error.message
    assert error.line == text[:text.index("Bogus")].count("\n") + 1


# `kind: List` with the second of three items at fault: the error names a line of that
# item ("#<"), whatever the message says. They named the List's own line: its `kind` key
# (for a kind error), or line 1. KIND is an object kind the reader takes.
LIST_ITEM = ("- apiVersion: multicluster.x-k8s.io/v1beta1\n  kind: KIND\n"
             "  metadata: {{name: {}, namespace: shop}}\n")


@pytest.mark.parametrize(("second", "message"), [
    ("- apiVersion: multicluster.x-k8s.io/v1beta1\n  kind: KINDx #<\n"
     "  metadata: {name: b, namespace: shop}\n", "kind 'KINDx' does not exist"),
    ("- apiVersion: multicluster.x-k8s.io/v1beta1\n  kind: KIND\n  metadata: #<\n"
     "    namespace: shop\n", "KIND has no metadata.name"),
    ("- apiVersion: multicluster.x-k8s.io/v1beta1 #<\n  kind: KIND\n"
     "  metadata: {name: a, namespace: shop}\n", "duplicate KIND shop/a"),
    ("- apiVersion: multicluster.x-k8s.io/v1beta1\n  kind: KIND\n  metadata: [b] #<\n",
     "metadata must be a mapping"),
], ids=["mistyped kind", "no name", "duplicate", "wrong type"])
@pytest.mark.parametrize("reader", ["gateway", "controller"])
def test_an_error_in_a_list_item_names_a_line_of_that_item(
        reader: str, second: str, message: str) -> None:
    from controlplane.clusters.directory import parse_cluster_file
    from mcsproxy.sources.file import parse_file_text

    kind = "ServiceImport" if reader == "gateway" else "ServiceExport"
    text = ("apiVersion: v1\nkind: List\nitems:\n" + LIST_ITEM.format("a") + second
            + LIST_ITEM.format("c")).replace("KIND", kind)
    with pytest.raises(ManifestError) as info:
        if reader == "gateway":
            parse_file_text(text, "f.yaml", "file:f.yaml")
        else:
            parse_cluster_file(text, "f.yaml", "east")
    assert message.replace("KIND", kind) in info.value.message
    assert info.value.line == text[:text.index("#<")].count("\n") + 1, str(info.value)


def test_errors_without_a_document_keep_the_line_given() -> None:
    """Other sources (the Kubernetes API, the controller stream) have no lines."""
    assert ManifestError("x: spec.ips bad", "f.yaml", 7).line == 7
    assert str(ManifestError("spec.ips bad")) == "spec.ips bad"
    error = ManifestError("bad", path=("spec", "ips", 0))
    assert (error.line, error.at("g.yaml", 3).line, error.at("g.yaml", 3).path) == (
        None, 3, ("spec", "ips", 0))


@pytest.mark.parametrize(("doc", "message"), [
    # The core group (apiVersion v1), which the controller reads Service and Namespace from.
    ("apiVersion: v1\nkind: Servce #<\n", "kind 'Servce' does not exist in the core API group"),
    ("apiVersion: v1\nkind: Namespce #<\n", "kind 'Namespce' does not exist in the core"),
    ("apiVersion: v2 #<\nkind: Service\n", "apiVersion 'v2' does not exist for Service: "
     "expected v1"),
    # Karmada's networking group (the controller reads MultiClusterService).
    ("apiVersion: networking.karmada.io/v1alpha1\nkind: MultiClusterServce #<\n",
     "kind 'MultiClusterServce' does not exist in networking.karmada.io"),
    ("apiVersion: networking.karmada.io/v1 #<\nkind: MultiClusterService\n",
     "expected networking.karmada.io/v1alpha1"),
    # discovery.k8s.io: only v1 exists now (v1beta1 was removed in Kubernetes 1.25).
    ("apiVersion: discovery.k8s.io/v1beta1 #<\nkind: EndpointSlice\n",
     "apiVersion 'discovery.k8s.io/v1beta1' does not exist for EndpointSlice"),
    ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlices #<\n", "does not exist in discovery"),
    # A typed list of a kind we read would drop its items unread.
    ("apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImportList #<\nitems: []\n",
     "kind 'ServiceImportList' is not read: put the objects under kind: List"),
    ("apiVersion: v1\nkind: ServiceList #<\nitems: []\n", "kind 'ServiceList' is not read"),
])
def test_a_mistyped_kind_or_version_of_a_group_we_read_is_rejected_at_its_line(
        doc: str, message: str) -> None:
    """They were skipped as 'another kind': the Service or the MultiClusterService they
    meant to describe silently disappeared from the controller's view."""
    text = FILE_HEAD + doc + "metadata: {name: web, namespace: shop}\n"
    error = _first_error(text)
    assert message in error.message
    assert error.line == text[:text.index("#<")].count("\n") + 1, str(error)


@pytest.mark.parametrize("doc", [
    "apiVersion: apps/v1\nkind: Deploymnt\n",  # a wholly foreign group: not ours to judge
    "apiVersion: v1\nkind: ConfigMap\n",
    "apiVersion: v1\nkind: ConfigMapList\nitems: []\n",
    "apiVersion: networking.karmada.io/v1alpha1\nkind: MultiClusterIngress\n",
    "apiVersion: serving.knative.dev/v1\nkind: Service\n",  # Service of another group
    "apiVersion: v1\nkind: Config\nclusters: []\n",  # a kubeconfig
    "kind: Service\n",  # no apiVersion at all
])
def test_foreign_groups_and_existing_kinds_are_still_skipped(doc: str) -> None:
    from mcsproxy.sources.file import parse_file_text

    text = FILE_HEAD + doc + "metadata: {name: web, namespace: shop}\n"
    assert len(parse_file_text(text, "f.yaml", "file:f.yaml")) == 1  # the ServiceImport
