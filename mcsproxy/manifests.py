"""Kubernetes objects (ServiceImport, EndpointSlice) → validated model pieces.

Every source (files, the Kubernetes API, the controller's stream) hands objects as plain
dicts; this module is the one place that decides what a valid object is, so the same
input is accepted or rejected alike whatever carried it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mcsproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT_S,
    EMPTY_MAPPING,
    Endpoint,
    EndpointPort,
    ServiceKey,
    ServicePort,
)

MCS_GROUP = "multicluster.x-k8s.io"
MCS_VERSIONS = ("v1alpha1", "v1beta1")
LABEL_SERVICE_NAME = "multicluster.kubernetes.io/service-name"
LABEL_SOURCE_CLUSTER = "multicluster.kubernetes.io/source-cluster"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
PROTOCOLS = ("TCP", "UDP", "SCTP")


FieldPath = tuple[str | int, ...]  # mapping keys and list indexes from an object's root


class ManifestError(ValueError):
    """An object that cannot be served, with where it came from.

    `path` is the offending field (("spec", "ips", 1)); without one, a message that
    starts with a field expression ("ServiceImport ns/web: spec.ports[0].port must be
    ...") names it. Given a DocLine from load_yaml_documents (or document_objects, for
    an item of a List), `line` becomes that field's line (the key's, or the list
    item's), else the document's (or the item's) first line.
    """

    def __init__(self, message: str, origin: str = "", line: int | None = None,
                 path: FieldPath | None = None) -> None:
        self.message = message
        self.origin = origin
        self.path = path
        node = getattr(line, "node", None)
        if node is not None:  # only on an error: the happy path never walks nodes
            item = getattr(line, "item", None)
            if item is not None:
                node = _list_item(node, item)
            if node is not None:
                line = _field_line(node, path if path is not None else _message_path(message))
        self.line = None if line is None else int(line)  # never keeps the node tree
        where = f"{origin}:{self.line}" if origin and line is not None else origin
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, origin: str, line: int | None) -> ManifestError:
        return ManifestError(self.message, origin, line, self.path)


@dataclass(frozen=True, slots=True)
class ImportSpec:
    key: ServiceKey
    type: str
    ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    session_affinity: str
    affinity_timeout_s: int
    traffic_distribution: str | None
    annotations: Mapping[str, str]
    clusters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SliceSpec:
    key: ServiceKey
    cluster: str
    endpoints: tuple[Endpoint, ...]


# libyaml's parser when PyYAML was built with it (the PyPI wheels are): measured on 10,000
# EndpointSlices of 30 endpoints (20 MB), 6.6 s against 55 s of CPU for the pure-Python one.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """A safe loader whose scalar constructors report a value they cannot build at its line,
    and which rejects a key given twice in one mapping.

    PyYAML resolves `2024-02-30` as a timestamp, `!!float foo` as a float, and their
    constructors raise a bare ValueError (no mark), which would escape as a crash. It also
    keeps the last of two equal keys without a word (a second `endpoints:` replaced the
    first), where kubectl refuses the file: so do we, at the second key's line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _checked(tag: str) -> None:
    build = yaml.SafeLoader.yaml_constructors[tag]

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return build(loader, node)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {tag.rsplit(':', 1)[-1]}: {exc}",
                node.start_mark) from None

    _Loader.add_constructor(tag, construct)


for _tag in ("timestamp", "int", "float"):
    _checked(f"tag:yaml.org,2002:{_tag}")


class DocLine(int):
    """A document's first line (1-based) that also holds the document's composed node
    while the reader looks at the document. A ManifestError given it as its line names
    the offending field's line instead: the marks are already in the node tree PyYAML
    composed before constructing, so placing an error costs nothing until one occurs.
    With `item`, it stands for that item of a `kind: List` document's `items`: fields
    are looked up from the item, and a missing one is placed at the item's first line."""

    node: yaml.Node
    item: int | None

    def __new__(cls, line: int, node: yaml.Node, item: int | None = None) -> DocLine:
        self = super().__new__(cls, line)
        self.node = node
        self.item = item
        return self


def document_objects(line: int, doc: Mapping[str, Any]) -> Iterator[tuple[int, Any]]:
    """The objects of one document, each with the line to report its errors at: a
    `kind: List` document's items each as its own (an error in the third item names
    that item's field, not the List), any other document as itself."""
    items = doc.get("items") if doc.get("kind") == "List" else None
    if not isinstance(items, list):
        yield line, doc
        return
    node = getattr(line, "node", None)
    for i, item in enumerate(items):
        yield (line if node is None else DocLine(line, node, i)), item


def load_yaml_documents(text: str, origin: str) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line, document) for each YAML document; ManifestError on bad YAML.
    The line is a DocLine: pass it to ManifestError to name the bad field's line."""
    loader = _Loader(text)
    line: int | None = None
    try:
        # The pure-Python parser's mark: where a document too deep to compose starts
        # (libyaml's parser has none, and stops at 1000 levels with a marked error).
        mark = getattr(loader, "get_mark", None)
        while loader.check_node():
            if mark is not None:
                line = mark().line + 1
            node = loader.get_node()
            if node is None:
                continue
            line = node.start_mark.line + 1
            yield DocLine(line, node), loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ManifestError(f"invalid YAML: {exc.problem or exc}", origin, line) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"invalid YAML: {exc}", origin) from None
    except RecursionError:
        raise ManifestError("invalid YAML: nested too deeply", origin, line) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # Whatever else a constructor raises: the document's line is the closest we know.
        raise ManifestError(f"invalid YAML: {exc}", origin, line) from None
    finally:
        loader.dispose()


_FIELD_EXPR = re.compile(r"(?:[A-Z][A-Za-z]* [^\s:]+: )?"  # "ServiceImport ns/name: "
                         r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*)(?=[\s:]|$)")


def _message_path(message: str) -> FieldPath:
    """The field a message starts with: "Service ns/s: spec.ports[0].port must be ..."
    → ("spec", "ports", 0, "port"). A first word that is no field of the object
    ("duplicate port ...") simply finds nothing: the document's line stands."""
    found = _FIELD_EXPR.match(message)
    if found is None:
        return ()
    return tuple(int(part[1:-1]) if part.startswith("[") else part
                 for part in re.findall(r"\[\d+\]|[^.\[]+", found.group(1)))


def _get(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """(key node, value node) of a mapping's key, None when absent or not a mapping."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None


def _list_item(root: yaml.Node, index: int) -> yaml.Node | None:
    """The node of a `kind: List` document's `index`th item; None when it cannot be
    found there: the document's line stands then, rather than a field of the List."""
    items = None
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:  # the last `items` key, as the constructor takes it
            if isinstance(k, yaml.ScalarNode) and k.value == "items":
                items = v
    if isinstance(items, yaml.SequenceNode) and 0 <= index < len(items.value):
        return items.value[index]
    return None


def _field_line(root: yaml.Node, path: FieldPath) -> int:
    """The 1-based line of `path` in a document (or a List item): the key's line for a
    mapping entry, the item's for a list entry. A field that is missing reports where
    its parent is."""
    node, mark = root, root.start_mark
    for part in path:
        if isinstance(part, int):
            if not isinstance(node, yaml.SequenceNode) or not 0 <= part < len(node.value):
                break
            node = node.value[part]
            mark = node.start_mark
        else:
            found = _get(node, part)
            if found is None:
                break
            mark, node = found[0].start_mark, found[1]
    return mark.line + 1


def object_kind(obj: Mapping[str, Any]) -> str | None:
    """'ServiceImport' / 'EndpointSlice' when the object is one we serve, else None."""
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str):  # a list or a map here is junk, not our object
        return None
    if kind == "ServiceImport" and api_version in {f"{MCS_GROUP}/{v}" for v in MCS_VERSIONS}:
        return "ServiceImport"
    if kind == "EndpointSlice" and api_version == "discovery.k8s.io/v1":
        return "EndpointSlice"
    return None


# The API groups whose objects file readers take (the gateway: ServiceImport and
# EndpointSlice; the controller's member folders also Namespace, Service, ServiceExport and
# Karmada's MultiClusterService), with the versions and kinds that exist there. An object
# of another group (apps/v1 Deployment, ...) is skipped, and so is any kind these groups
# have that no reader takes (v1 ConfigMap). But a document of these groups whose kind or
# version does not exist is a typo: skipped, it would silently withdraw what it meant to
# describe, so file readers reject it instead.
CORE_KINDS = (
    "Binding", "ComponentStatus", "ConfigMap", "Endpoints", "Event", "LimitRange",
    "Namespace", "Node", "PersistentVolume", "PersistentVolumeClaim", "Pod", "PodTemplate",
    "ReplicationController", "ResourceQuota", "Secret", "Service", "ServiceAccount",
    "List", "Status",
    "Config",  # not an API kind, but a kubeconfig file says apiVersion: v1, kind: Config
)
KARMADA_NETWORKING_GROUP = "networking.karmada.io"
OUR_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    MCS_GROUP: (MCS_VERSIONS, ("ServiceImport", "ServiceExport")),
    "discovery.k8s.io": (("v1",), ("EndpointSlice",)),
    "": (("v1",), CORE_KINDS),  # the core group: apiVersion v1
    KARMADA_NETWORKING_GROUP: (("v1alpha1",), ("MultiClusterService", "MultiClusterIngress")),
}
# Kinds some file reader takes: a FooList of them would drop every item unread.
READ_KINDS = frozenset({"ServiceImport", "ServiceExport", "EndpointSlice", "Namespace",
                        "Service", "MultiClusterService"})
# Kinds no other group has: under another apiVersion they are a typo of ours. (Service,
# Namespace or MultiClusterService also exist elsewhere, as Knative's or GKE's.)
_KIND_GROUP = {kind: group for group in (MCS_GROUP, "discovery.k8s.io")
               for kind in OUR_GROUPS[group][1]}


def _group_words(group: str) -> str:
    return group or "the core API group (apiVersion v1)"


def _api_versions(group: str) -> str:
    return " or ".join(f"{group}/{v}" if group else v for v in OUR_GROUPS[group][0])


def kind_error(obj: Mapping[str, Any]) -> str | None:
    """Why a file's object cannot be what it claims (a kind that does not exist in its
    API group, a version that does not exist, one of our kinds under another apiVersion),
    else None. Messages start with the field at fault, so the error names its line.
    """
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not api_version:
        group: str | None = None  # no group at all: not one we read
        version = ""
    else:
        group, _, version = api_version.rpartition("/")
    if isinstance(kind, str) and kind in _KIND_GROUP and group != _KIND_GROUP[kind]:
        return (f"apiVersion {api_version!r} does not exist for {kind}: expected "
                f"{_api_versions(_KIND_GROUP[kind])}")
    if group not in OUR_GROUPS:
        return None
    versions, kinds = OUR_GROUPS[group]
    hint = ("a kind such as Service or Namespace" if not group
            else " or ".join(kinds))
    if not isinstance(kind, str) or not kind:
        return f"{api_version} object without a kind (expected {hint})"
    if kind.endswith("List") and kind[:-4] in kinds:
        if kind[:-4] in READ_KINDS:
            return (f"kind {kind!r} is not read: put the objects under kind: List, or one "
                    "per document")
    elif kind not in kinds:
        return f"kind {kind!r} does not exist in {_group_words(group)} (expected {hint})"
    if version not in versions:
        return (f"apiVersion {api_version!r} does not exist for {kind}: expected "
                f"{_api_versions(group)}")
    return None


# Field validators: the gateway's parsers below and the controller's member-object parsers
# (controlplane/resources.py) judge the same fields with the same code and messages. Each
# takes the value and `what` (where it sits, for the error) and returns it checked, or
# raises ManifestError.


def as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    """A mapping; a missing one (None) is empty."""
    if value is None:
        return EMPTY_MAPPING
    if not isinstance(value, Mapping):
        raise ManifestError(f"{what} must be a mapping, not {type(value).__name__}")
    return value


def as_list(value: Any, what: str) -> list[Any]:
    """A list; a missing one (None) is empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ManifestError(f"{what} must be a list, not {type(value).__name__}")
    return value


def as_str_map(value: Any, what: str) -> Mapping[str, str]:
    """Labels or annotations: strings to strings."""
    m = as_mapping(value, what)
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ManifestError(f"{what} must map strings to strings ({k!r})")
    return dict(m) if m else EMPTY_MAPPING


def as_port_number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ManifestError(f"{what} must be an integer 1-65535, not {value!r}")
    return value


def as_protocol(value: Any, what: str) -> str:
    """TCP, UDP or SCTP; TCP when missing, as Kubernetes defaults it."""
    proto = "TCP" if value is None else value
    if proto not in PROTOCOLS:
        raise ManifestError(f"{what} must be one of {', '.join(PROTOCOLS)}, not {value!r}")
    return proto


def namespaced_name(meta: Mapping[str, Any], kind: str) -> tuple[str, str]:
    """(namespace, name) from metadata; namespace "default" when missing."""
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{kind} has no metadata.name", path=("metadata", "name"))
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not namespace:
        raise ManifestError(f"{kind} {name}: metadata.namespace must be a string",
                            path=("metadata", "namespace"))
    return namespace, name


def parse_service_import(obj: Mapping[str, Any]) -> ImportSpec:
    meta = as_mapping(obj.get("metadata"), "metadata")
    namespace, name = namespaced_name(meta, "ServiceImport")
    where = f"ServiceImport {namespace}/{name}"
    spec = as_mapping(obj.get("spec"), f"{where}: spec")
    svc_type = spec.get("type", "ClusterSetIP")
    if svc_type not in ("ClusterSetIP", "Headless"):
        raise ManifestError(
            f"{where}: spec.type must be ClusterSetIP or Headless, not {svc_type!r}"
        )
    ips: list[str] = []
    families: set[int] = set()
    for k, raw in enumerate(as_list(spec.get("ips"), f"{where}: spec.ips")):
        try:
            ip = ipaddress.ip_address(raw)
        except (ValueError, TypeError):
            raise ManifestError(f"{where}: spec.ips has an invalid address {raw!r}",
                                path=("spec", "ips", k)) from None
        if ip.version in families:
            raise ManifestError(f"{where}: spec.ips has two IPv{ip.version} addresses",
                                path=("spec", "ips", k))
        families.add(ip.version)
        ips.append(str(ip))
    if svc_type == "Headless" and ips:
        raise ManifestError(f"{where}: a Headless import must not have spec.ips",
                            path=("spec", "ips"))
    ports: list[ServicePort] = []
    seen_names: set[str] = set()
    seen_numbers: set[tuple[str, int]] = set()
    for i, raw in enumerate(as_list(spec.get("ports"), f"{where}: spec.ports")):
        p = as_mapping(raw, f"{where}: spec.ports[{i}]")
        pname = p.get("name") or ""
        if not isinstance(pname, str):
            raise ManifestError(f"{where}: spec.ports[{i}].name must be a string")
        number = as_port_number(p.get("port"), f"{where}: spec.ports[{i}].port")
        proto = as_protocol(p.get("protocol"), f"{where}: spec.ports[{i}].protocol")
        app = p.get("appProtocol")
        if app is not None and not isinstance(app, str):
            raise ManifestError(f"{where}: spec.ports[{i}].appProtocol must be a string")
        if pname in seen_names:
            # Two unnamed ports read "duplicate port 81/TCP", which named no duplicate.
            what = f"port name {pname!r}" if pname else "unnamed port (with several, " \
                "each needs a name)"
            raise ManifestError(f"{where}: duplicate {what}", path=("spec", "ports", i))
        if (proto, number) in seen_numbers:
            raise ManifestError(f"{where}: duplicate port {number}/{proto}",
                                path=("spec", "ports", i))
        seen_names.add(pname)
        seen_numbers.add((proto, number))
        ports.append(ServicePort(pname, proto, number, app))  # type: ignore[arg-type]
    affinity = spec.get("sessionAffinity") or "None"
    if affinity not in ("None", "ClientIP"):
        raise ManifestError(f"{where}: spec.sessionAffinity must be None or ClientIP")
    timeout = DEFAULT_AFFINITY_TIMEOUT_S
    cfg = as_mapping(spec.get("sessionAffinityConfig"), f"{where}: spec.sessionAffinityConfig")
    client_ip = as_mapping(cfg.get("clientIP"), f"{where}: spec.sessionAffinityConfig.clientIP")
    if client_ip.get("timeoutSeconds") is not None:
        timeout = client_ip["timeoutSeconds"]
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
            raise ManifestError(
                f"{where}: spec.sessionAffinityConfig.clientIP.timeoutSeconds must be 1-86400")
    traffic = spec.get("trafficDistribution")
    if traffic is not None and not isinstance(traffic, str):
        raise ManifestError(f"{where}: spec.trafficDistribution must be a string")
    status = as_mapping(obj.get("status"), f"{where}: status")
    clusters = tuple(
        str(as_mapping(c, f"{where}: status.clusters").get("cluster", ""))
        for c in as_list(status.get("clusters"), f"{where}: status.clusters")
    )
    return ImportSpec(
        key=ServiceKey(namespace, name),
        type=svc_type,
        ips=tuple(ips),
        ports=tuple(ports),
        session_affinity=affinity,
        affinity_timeout_s=timeout,
        traffic_distribution=traffic,
        annotations=as_str_map(meta.get("annotations"), f"{where}: metadata.annotations"),
        clusters=tuple(c for c in clusters if c),
    )


def _condition(conditions: Mapping[str, Any], name: str, default: bool) -> bool:
    value = conditions.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ManifestError(f"conditions.{name} must be a boolean")
    return value


# Addresses no pod or endpoint has, which the proxy must never connect to for a client:
# link-local above all (169.254.169.254 is the cloud's metadata service, with the node's
# credentials, and the gateway runs on the node's network), unspecified ("this host")
# and multicast. Kubernetes refuses them in Endpoints; a member cluster's EndpointSlice
# (or one written by whoever compromised it) reached the proxy with them. Loopback stays
# allowed: the demo and a one-host clusterset run every endpoint on it.
NEVER_ENDPOINT_V4 = ("169.254.", "0.", *(f"{octet}." for octet in range(224, 240)))
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def _never_an_endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` can never be an endpoint's address, or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 reaches the IPv4 address
    if ip.is_link_local:
        return "link-local (where the cloud metadata service answers)"
    if ip.is_unspecified or (ip.version == 4 and ip in THIS_NETWORK):
        return "unspecified (this host)"
    if ip.is_multicast:
        return "multicast"
    return None


def _is_canonical_ipv4(raw: object) -> bool:
    """A dotted quad exactly as ipaddress would print it. inet_pton takes only four
    decimal octets without leading zeros, so what it accepts is already canonical; at
    ~0.1 µs against ipaddress's ~2.7 µs it carried a 50k-service first sync's largest
    cost. Anything else takes the ipaddress path, which also words the error."""
    if type(raw) is not str:
        return False
    try:
        socket.inet_pton(socket.AF_INET, raw)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


def parse_endpoint_slice(
    obj: Mapping[str, Any],
    service_name: str | None = None,
    cluster: str | None = None,
) -> SliceSpec | None:
    """An imported slice; None for a slice that is not tied to an imported service.

    `service_name` / `cluster` let a caller that knows them another way (Karmada's
    dispatched slices) supply what the MCS labels would say.
    """
    meta = as_mapping(obj.get("metadata"), "metadata")
    namespace, name = namespaced_name(meta, "EndpointSlice")
    where = f"EndpointSlice {namespace}/{name}"
    labels = as_str_map(meta.get("labels"), f"{where}: metadata.labels")
    service_name = service_name or labels.get(LABEL_SERVICE_NAME)
    if not service_name:
        if LABEL_SOURCE_CLUSTER in labels:  # imported, but tied to no service: a mistake
            raise ManifestError(f"{where}: label {LABEL_SERVICE_NAME} is missing",
                                path=("metadata", "labels"))
        return None
    cluster = cluster or labels.get(LABEL_SOURCE_CLUSTER)
    if not cluster:
        raise ManifestError(f"{where}: label {LABEL_SOURCE_CLUSTER} is missing",
                            path=("metadata", "labels"))
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        return SliceSpec(ServiceKey(namespace, service_name), cluster, ())
    if address_type not in ("IPv4", "IPv6"):
        raise ManifestError(f"{where}: addressType must be IPv4, IPv6 or FQDN")
    family = 4 if address_type == "IPv4" else 6
    ports: list[EndpointPort] = []
    for i, raw in enumerate(as_list(obj.get("ports"), f"{where}: ports")):
        p = as_mapping(raw, f"{where}: ports[{i}]")
        if p.get("port") is None:
            continue  # a nil port means "all ports": nothing we can map by name
        ports.append(
            EndpointPort(
                str(p.get("name") or ""),
                as_protocol(p.get("protocol"), f"{where}: ports[{i}].protocol"),  # type: ignore[arg-type]
                as_port_number(p.get("port"), f"{where}: ports[{i}].port"),
            )
        )
    shared_ports = tuple(ports)
    endpoints: list[Endpoint] = []
    for i, raw in enumerate(as_list(obj.get("endpoints"), f"{where}: endpoints")):
        ep = as_mapping(raw, f"{where}: endpoints[{i}]")
        addresses = as_list(ep.get("addresses"), f"{where}: endpoints[{i}].addresses")
        if not addresses:
            raise ManifestError(f"{where}: endpoints[{i}] has no addresses",
                                path=("endpoints", i, "addresses"))
        parsed: list[str] = []
        for raw_addr in addresses:
            if family == 4 and _is_canonical_ipv4(raw_addr) and \
                    not raw_addr.startswith(NEVER_ENDPOINT_V4):
                parsed.append(raw_addr)
                continue
            at = ("endpoints", i, "addresses", len(parsed))
            try:
                ip = ipaddress.ip_address(raw_addr)
            except (ValueError, TypeError):
                raise ManifestError(
                    f"{where}: endpoints[{i}] has an invalid address {raw_addr!r}", path=at
                ) from None
            if ip.version != family:
                raise ManifestError(f"{where}: endpoints[{i}] address {ip} is not {address_type}",
                                    path=at)
            if (why := _never_an_endpoint(ip)) is not None:
                raise ManifestError(f"{where}: endpoints[{i}] address {ip} is {why}", path=at)
            parsed.append(str(ip))
        conds = as_mapping(ep.get("conditions"), f"{where}: endpoints[{i}].conditions")
        try:
            ready = _condition(conds, "ready", True)
            # Nil serving is true, not "as ready": the v1 API reference says so and
            # kube-proxy parses it so; the older "defer to ready" wording would hide a
            # terminating endpoint (ready false, serving unset) from the fallback.
            serving = _condition(conds, "serving", True)
            terminating = _condition(conds, "terminating", False)
        except ManifestError as exc:
            raise ManifestError(f"{where}: endpoints[{i}].{exc.message}") from None
        hostname = ep.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            raise ManifestError(f"{where}: endpoints[{i}].hostname must be a string")
        zone = ep.get("zone")
        node = ep.get("nodeName")
        endpoints.append(
            Endpoint(
                address=parsed[0],
                addresses=tuple(parsed),
                family=family,
                cluster=cluster,
                ports=shared_ports,
                ready=ready,
                serving=serving,
                terminating=terminating,
                hostname=hostname or None,
                zone=zone if isinstance(zone, str) else None,
                node_name=node if isinstance(node, str) else None,
            )
        )
    return SliceSpec(ServiceKey(namespace, service_name), cluster, tuple(endpoints))
