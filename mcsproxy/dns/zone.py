"""The clusterset zone as an index of names → packed record sets, updated per snapshot.

Every record set is packed once, with its owner name (and the SOA's) written as
compression pointers into the question, which always sits at offset 12: the packed bytes
follow any casing of the question and only depend on the lowercased name. SRV targets are
written out in full: RFC 2782 forbids compressing them, and resolvers that follow it
(CoreDNS writes them so too) may misread a pointer there. The index is updated
incrementally from `Snapshot.changed` (rebuilt whole after a version it missed, or after
an update that raised: responder.apply); record sets, and the per-endpoint names of
headless services, are packed on the first query for them and kept until the service
changes (bench/snapshot measures this against packing everything eagerly).

A service has names only when its namespace and name are RFC 1123 labels, as Kubernetes
asks of a namespace and a Service (a ServiceImport, a CRD, may be named `a.b`; a file
source may say `Test`); a headless endpoint, when its hostname is one and its cluster ID
is one or several. Anything else could share its names with another service or endpoint
(`Test/web` those of `test/web`, hostname `a.b` in cluster `c` those of hostname `a` in
cluster `b.c`), and a service name of two labels has no place in the index.

The apex has an NS record set (RFC 1034 4.2.1: every zone has one at its top) naming the
SOA's MNAME, ns.dns.<zone>, as CoreDNS's kubernetes plugin does; that name answers with the
address the responder listens on, which also comes with the NS answer as additional data.

An SRV record set carries the address records of its targets for the additional section
(KEP-1645 DNS specification 2.3.2 and 2.4.2 allow them; CoreDNS sends them), kept apart
from the answer so that an answer short of room can drop them first (responder.message).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Final, TypeVar

from mcsproxy.config import CLUSTER_ID_RE, DNS_LABEL_RE
from mcsproxy.dns.wire import (
    ANY,
    NS,
    SRV,
    TXT,
    NameError_,
    address_rdata,
    encode_labels,
    encode_name,
    label_offsets,
    pointer,
    rr,
    srv_rdata,
    txt_rdata,
)
from mcsproxy.model import Endpoint, ImportedService, ServiceKey, ServicePort, Snapshot

log = logging.getLogger("mcsproxy.dns.zone")

OWNER: Final = pointer(12)  # the question's name
NS_LABELS: Final = b"\x02ns\x03dns"  # the name server: ns.dns.<zone>, CoreDNS's name for it
DNS_VERSION: Final = "1.0.0"
DNS_VERSION_TTL: Final = 28800
SRV_PRIORITY: Final = 10
SRV_WEIGHT: Final = 100

# The additional section of an answer: packed records, and (records, bytes) at the end of
# each record set in it, so that a message short of room keeps whole record sets only.
Additional = tuple[bytes, tuple[tuple[int, int], ...]]
RRset = tuple[int, bytes, Additional | None]  # record count, packed records, additional
RRsets = dict[int, RRset]  # qtype → its record set
EMPTY_RRSETS: RRsets = {}
K = TypeVar("K")


class Node:
    """A name that exists. Its record sets are packed on first use, then kept."""

    __slots__ = ("_build", "_rrsets")

    def __init__(
        self, build: Callable[[], RRsets] | None = None, rrsets: RRsets | None = None
    ) -> None:
        self._build = build
        self._rrsets = rrsets

    def rrsets(self) -> RRsets:
        built = self._rrsets
        if built is None:
            assert self._build is not None
            built = self._rrsets = _with_any(self._build())
            self._build = None
        return built


def _with_any(rrsets: RRsets) -> RRsets:
    """Add the ANY answer: every record set of the name (RFC 8482 allows fewer; we can)."""
    if rrsets:
        rrsets[ANY] = (
            sum(count for count, _, _ in rrsets.values()),
            b"".join(packed for _, packed, _ in rrsets.values()),
            None,
        )
    return rrsets


EMPTY_NODE: Final = Node(rrsets=EMPTY_RRSETS)


def _add_records(rrsets: dict[K, list[bytes]], key: K, record: bytes) -> None:
    records = rrsets.setdefault(key, [])
    if record not in records:
        records.append(record)


def _address_records(owner: bytes, addresses: Iterable[str], ttl: int,
                     ) -> Iterator[tuple[int, bytes]]:
    """(A or AAAA, packed record at `owner`) for each address."""
    for address in addresses:
        rtype, rdata = address_rdata(address)
        yield rtype, rr(owner, rtype, ttl, rdata)


def _add_addresses(rrsets: dict[int, list[bytes]], addresses: Iterable[str], ttl: int) -> None:
    """The question's name's A and AAAA records."""
    for rtype, record in _address_records(OWNER, addresses, ttl):
        _add_records(rrsets, rtype, record)


# Additional records by (owner, type): one record set each.
Extra = dict[tuple[bytes, int], list[bytes]]


def _add_extra(extra: Extra, owner: bytes, addresses: Iterable[str], ttl: int) -> None:
    for rtype, record in _address_records(owner, addresses, ttl):
        _add_records(extra, (owner, rtype), record)


def _pack(rrsets: dict[int, list[bytes]], srv_additional: Extra | None = None) -> RRsets:
    packed: RRsets = {rtype: (len(records), b"".join(records), None)
                      for rtype, records in rrsets.items()}
    if srv_additional and SRV in packed:
        count, records, _ = packed[SRV]
        packed[SRV] = (count, records, _pack_additional(srv_additional.values()))
    return packed


def _pack_additional(rrsets: Iterable[list[bytes]]) -> Additional:
    data = bytearray()
    ends = []
    count = 0
    for records in rrsets:
        for record in records:
            data += record
        count += len(records)
        ends.append((count, len(data)))
    return bytes(data), tuple(ends)


def dashed(address: str) -> str:
    return address.replace(".", "-").replace(":", "-")


def dns_label(name: str) -> bytes:
    """A namespace, Service name or hostname as one wire label; NameError_ unless it is an
    RFC 1123 label: encode_labels alone takes `a.b` for two labels and `Test` for `test`."""
    if not DNS_LABEL_RE.match(name):
        raise NameError_(f"{name!r} is not an RFC 1123 label")
    return encode_labels(name)


def endpoint_labels(endpoint: Endpoint) -> bytes:
    """<hostname or dashed address>.<cluster> of a headless endpoint, as wire labels."""
    if not CLUSTER_ID_RE.match(endpoint.cluster):
        raise NameError_(f"cluster ID {endpoint.cluster!r} is not an RFC 1123 name")
    host = dns_label(endpoint.hostname) if endpoint.hostname else encode_labels(
        dashed(endpoint.address))
    return host + encode_labels(endpoint.cluster)


class ServiceEntry:
    """One imported service in the zone: its names, and its endpoints' names when headless."""

    __slots__ = ("_endpoint_nodes", "_named", "names", "ns_wire", "svc", "ttl", "wire")

    def __init__(self, svc: ImportedService, ns_wire: bytes, wire: bytes, ttl: int) -> None:
        self.svc = svc
        self.ns_wire = ns_wire  # <ns>.svc.<zone>, root byte included
        self.wire = wire  # <svc>.<ns>.svc.<zone>, root byte included
        self.ttl = ttl
        self.names: list[bytes] = []  # the names this service added to the index
        self._named: list[tuple[bytes, Endpoint]] | None = None
        self._endpoint_nodes: dict[bytes, Node] | None = None

    # -- headless endpoints ------------------------------------------------------------
    def named_endpoints(self) -> list[tuple[bytes, Endpoint]]:
        """(<hostname or dashed IP>.<cluster> labels, endpoint) for every ready endpoint."""
        if self._named is None:
            named = []
            for e in self.svc.endpoints:
                if not e.ready:
                    continue
                try:
                    prefix = endpoint_labels(e)
                except NameError_:
                    continue  # still in the service's A/AAAA answer, just not nameable
                if len(prefix) + len(self.wire) <= 255:
                    named.append((prefix, e))
            self._named = named
        return self._named

    def endpoint_node(self, prefix: bytes) -> Node | None:
        nodes = self._endpoint_nodes
        if nodes is None:
            grouped: dict[bytes, dict[int, list[bytes]]] = {}
            for name, e in self.named_endpoints():
                _add_addresses(grouped.setdefault(name, {}), e.addresses, self.ttl)
            nodes = self._endpoint_nodes = {
                name: Node(rrsets=_with_any(_pack(sets))) for name, sets in grouped.items()
            }
        return nodes.get(prefix)

    # -- record sets -------------------------------------------------------------------
    def ready_addresses(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.svc.endpoints:
            if e.ready:
                for address in e.addresses:
                    seen[address] = None
        return list(seen)

    def service_rrsets(self) -> RRsets:
        """A/AAAA and bare SRV at the service name; the SRV targets' addresses go with
        the SRV record set as its additional data."""
        sets: dict[int, list[bytes]] = {}
        ttl = self.ttl
        if self.svc.headless:
            _add_addresses(sets, self.ready_addresses(), ttl)
            return _pack(sets, self.srv_records(sets, self.svc.ports, OWNER))
        _add_addresses(sets, self.svc.ips, ttl)
        for port in self.svc.ports:  # one per distinct (target, port)
            _add_records(sets, SRV, rr(OWNER, SRV, ttl, srv_rdata(
                SRV_PRIORITY, SRV_WEIGHT, port.port, self.wire)))
        return _pack(sets, self.service_additional(OWNER))

    def port_rrsets(self, prefix_len: int, port_name: str, protocol: str) -> RRsets:
        """SRV at _<port>._<proto>.<service>: the service (or each endpoint) as target."""
        svc_ptr = pointer(12 + prefix_len)
        records: dict[int, list[bytes]] = {}
        port = next(p for p in self.svc.ports if p.name == port_name and p.protocol == protocol)
        if self.svc.headless:
            return _pack(records, self.srv_records(records, (port,), svc_ptr))
        _add_records(records, SRV, rr(OWNER, SRV, self.ttl, srv_rdata(
            SRV_PRIORITY, SRV_WEIGHT, port.port, self.wire)))
        return _pack(records, self.service_additional(svc_ptr))

    def service_additional(self, svc_ptr: bytes) -> Extra:
        """The SRV target's addresses: the ClusterSetIPs at the service name."""
        extra: Extra = {}
        _add_extra(extra, svc_ptr, self.svc.ips, self.ttl)
        return extra

    def srv_records(self, sets: dict[int, list[bytes]], ports: Iterable[ServicePort],
                    svc_ptr: bytes) -> Extra:
        """A headless service's SRV records, one per ready endpoint and port, into `sets`;
        returns the addresses of the endpoints they name, for the additional section."""
        extra: Extra = {}
        for prefix, e in self.named_endpoints():
            target = prefix + self.wire
            named = False
            for port in ports:
                number = srv_port(e, port)
                if number is not None:
                    named = True
                    _add_records(sets, SRV, rr(OWNER, SRV, self.ttl, srv_rdata(
                        SRV_PRIORITY, SRV_WEIGHT, number, target)))
            if named:
                _add_extra(extra, prefix + svc_ptr, e.addresses, self.ttl)
        return extra


def srv_port(endpoint: Endpoint, port: ServicePort) -> int | None:
    """The port a headless SRV record names for this endpoint, None for no record.

    An endpoint whose slice lists ports but not this one belongs to a cluster whose
    Service does not expose it, and gets none of its traffic (mcs-spec "Export and
    import" 7; the proxy's eligible_targets skips it too). A slice without ports names
    none of them: the service port stands.
    """
    number = endpoint.port_for(port)
    if number is None and not endpoint.ports:
        return port.port
    return number


class ZoneIndex:
    """Lowercased wire name → Node for one zone, kept in step with the snapshots."""

    OUT_OF_ZONE: Final = object()

    def __init__(self, domain: str, ttl: int, eager: bool = False,
                 ns_addresses: tuple[str, ...] = ()) -> None:
        self.apex = encode_name(domain)
        self.svc_wire = encode_labels("svc") + self.apex
        self.ttl = ttl
        self.eager = eager  # pack everything now rather than on first query
        self.version = -1
        self.names: dict[bytes, Node] = {}
        self.services: dict[ServiceKey, ServiceEntry] = {}
        self.headless: dict[bytes, ServiceEntry] = {}  # service wire → entry
        self._namespaces: dict[bytes, int] = {}  # namespace wire name → services in it
        self._unnamed: set[ServiceKey] = set()  # services without a name, logged once each
        self.names[self.apex] = self._apex_node(ns_addresses)
        self.names[encode_labels("dns") + self.apex] = EMPTY_NODE  # an empty non-terminal
        ns_sets: dict[int, list[bytes]] = {}
        _add_addresses(ns_sets, ns_addresses, ttl)
        self.names[NS_LABELS + self.apex] = Node(rrsets=_with_any(_pack(ns_sets)))
        self.names[self.svc_wire] = EMPTY_NODE
        self.names[encode_labels("dns-version") + self.apex] = Node(
            rrsets=_with_any({TXT: (1, rr(OWNER, TXT, DNS_VERSION_TTL, txt_rdata(DNS_VERSION)),
                                    None)})
        )
        self._fixed = dict(self.names)  # the names of no service, which a rebuild keeps

    def _apex_node(self, ns_addresses: tuple[str, ...]) -> Node:
        """NS at the apex, with the name server's addresses as additional data. No ANY
        record set: the apex's ANY answer holds the SOA too, which the responder packs."""
        # In an answer to the apex's NS question the NS record comes first, right after
        # the question: its RDATA, the name server's name, is where the glue points.
        ns_name_at = 12 + len(self.apex) + 4 + 2 + 10
        glue: Extra = {}
        _add_extra(glue, pointer(ns_name_at), ns_addresses, self.ttl)
        record = rr(OWNER, NS, self.ttl, NS_LABELS + OWNER)
        return Node(rrsets={NS: (1, record, _pack_additional(glue.values()) if glue else None)})

    # -- updates -----------------------------------------------------------------------
    def apply(self, snapshot: Snapshot) -> int:
        """Bring the index to `snapshot`; returns how many services were rebuilt."""
        if snapshot.version != self.version + 1 or self.version < 0:
            return self.rebuild(snapshot)
        for key in snapshot.changed:
            self._remove(key)
            svc = snapshot.services.get(key)
            if svc is not None:
                self._add(svc)
            else:
                self._unnamed.discard(key)  # should it come back unnamed, say so again
        self.version = snapshot.version
        return len(snapshot.changed)

    def rebuild(self, snapshot: Snapshot) -> int:
        """Forget every service, then add the snapshot's: after a version skipped, or when
        an update raised half-way and left the index in no known state."""
        self.version = -1  # should this raise too, the next snapshot starts over again
        self.names.clear()
        self.names.update(self._fixed)
        self.services.clear()
        self.headless.clear()
        self._namespaces.clear()
        self._unnamed = {key for key in self._unnamed if key in snapshot.services}
        for svc in snapshot.services.values():
            self._add(svc)
        self.version = snapshot.version
        return len(snapshot.services)

    def _remove(self, key: ServiceKey) -> None:
        entry = self.services.pop(key, None)
        if entry is None:
            return
        for name in entry.names:
            self.names.pop(name, None)
        self.headless.pop(entry.wire, None)
        ns_wire = entry.ns_wire
        left = self._namespaces[ns_wire] - 1
        if left:
            self._namespaces[ns_wire] = left
        else:
            del self._namespaces[ns_wire]
            self.names.pop(ns_wire, None)

    def _add(self, svc: ImportedService) -> None:
        try:
            ns_wire = dns_label(svc.key.namespace) + self.svc_wire
            wire = dns_label(svc.key.name) + ns_wire
            if len(wire) > 255:
                raise NameError_("service name too long")
        except NameError_ as exc:
            if svc.key not in self._unnamed:  # not again each time the service changes
                self._unnamed.add(svc.key)
                log.warning("service %s has no DNS name: %s", svc.key, exc)
            return
        entry = ServiceEntry(svc, ns_wire, wire, self.ttl)
        self.services[svc.key] = entry
        count = self._namespaces.get(ns_wire, 0)
        self._namespaces[ns_wire] = count + 1
        if not count:
            self.names[ns_wire] = EMPTY_NODE
        if svc.headless:
            if not entry.ready_addresses():
                return  # a headless service with nothing ready has no name (NXDOMAIN)
            self.headless[wire] = entry
        self._put(entry, wire, Node(entry.service_rrsets))
        protocols: set[str] = set()
        for port in svc.ports:
            if not port.name:
                continue  # SRV names exist only for named ports
            try:
                proto = encode_labels("_" + port.protocol.lower())
                prefix = encode_labels("_" + port.name) + proto
            except NameError_:
                continue
            if len(prefix) + len(wire) > 255:
                continue
            if port.protocol not in protocols:
                protocols.add(port.protocol)
                self._put(entry, proto + wire, EMPTY_NODE)  # _tcp.<svc>: an empty non-terminal

            def build(e: ServiceEntry = entry, n: int = len(prefix), name: str = port.name,
                      protocol: str = port.protocol) -> RRsets:
                return e.port_rrsets(n, name, protocol)

            self._put(entry, prefix + wire, Node(build))
        if self.eager:
            for name in entry.names:
                self.names[name].rrsets()
            if svc.headless:
                entry.endpoint_node(b"")

    def _put(self, entry: ServiceEntry, name: bytes, node: Node) -> None:
        self.names[name] = node
        entry.names.append(name)

    # -- lookups -----------------------------------------------------------------------
    def lookup(self, qname: bytes) -> Node | object | None:
        """The Node for a lowercased wire name, None (NXDOMAIN) or OUT_OF_ZONE."""
        node = self.names.get(qname)
        if node is not None:
            return node
        apex_at = len(qname) - len(self.apex)
        if apex_at < 0 or not qname.endswith(self.apex):
            return self.OUT_OF_ZONE
        offsets = label_offsets(qname)
        if apex_at not in offsets:
            return self.OUT_OF_ZONE  # the zone's bytes inside a label, not a suffix
        # <host>.<cluster...>.<svc>.<ns>.svc.<zone>: at least two labels before <svc>
        below = offsets.index(apex_at)
        if below >= 5:
            svc_at = offsets[below - 3]
            entry = self.headless.get(qname[svc_at:])
            if entry is not None:
                return entry.endpoint_node(qname[:svc_at])
        return None
