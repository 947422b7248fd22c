"""Every row of the DNS table in mcs-spec.md, over real UDP and TCP sockets.

Expected answers are zone-file lines, as in CoreDNS's plugin tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dnslib
import pytest

from mcsproxy.dns.responder import own_addresses
from mcsproxy.observability.stats import answer_labels
from tests.dns_support import (
    BIG_ADDRESSES,
    NS_LINE,
    SOA_LINE,
    WEB_PORTS,
    exchange,
    import_yaml,
    make_query,
    running_dns,
    slice_yaml,
    tcp_exchange,
    udp_exchange,
    zone_lines,
)

Z = "clusterset.local."
T = "test.svc.clusterset.local."


@dataclass
class Case:
    qname: str
    qtype: str
    rcode: str = "NOERROR"
    answer: list[str] = field(default_factory=list)
    ns: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # the additional section, OPT aside


NODATA = [SOA_LINE]
NXDOMAIN = [SOA_LINE]
MYSERVICE_A = [f"myservice.{T} 5 IN A 127.240.0.10"]
DUAL_ADDRESSES = [f"dual.{T} 5 IN A 127.240.0.11", f"dual.{T} 5 IN AAAA fd00::11"]
HEADLESS_ENDPOINTS = [
    f"web-0.cluster-a.headless.{T} 5 IN A 10.4.0.5",
    f"web-1.cluster-a.headless.{T} 5 IN A 10.4.0.6",
    f"10-4-0-7.cluster-b.headless.{T} 5 IN A 10.4.0.7",
]
PARTIAL_A = f"10-8-0-1.cluster-a.partial.{T} 5 IN A 10.8.0.1"
PARTIAL_B = f"10-8-0-2.cluster-b.partial.{T} 5 IN A 10.8.0.2"

CASES = [
    # dns-version
    Case(f"dns-version.{Z}", "TXT", answer=[f'dns-version.{Z} 28800 IN TXT "1.0.0"']),
    Case(f"dns-version.{Z}", "A", ns=NODATA),
    # ClusterSetIP: A / AAAA from spec.ips
    Case(f"myservice.{T}", "A", answer=[f"myservice.{T} 5 IN A 127.240.0.10"]),
    Case(f"myservice.{T}", "AAAA", ns=NODATA),
    Case(f"myservice.{T}", "TXT", ns=NODATA),
    # SRV per named port; the unnamed port has none. The targets' addresses come in the
    # additional section (KEP-1645 DNS specification 2.3.2 and 2.4.2 allow them)
    Case(f"_https._tcp.myservice.{T}", "SRV",
         answer=[f"_https._tcp.myservice.{T} 5 IN SRV 10 100 443 myservice.{T}"],
         extra=MYSERVICE_A),
    Case(f"_https._udp.myservice.{T}", "SRV", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"_tcp.myservice.{T}", "SRV", ns=NODATA),  # empty non-terminal
    Case(f"_https._tcp.myservice.{T}", "A", ns=NODATA),
    # bare SRV: one per distinct (target, port), unnamed ports included
    Case(f"myservice.{T}", "SRV", answer=[
        f"myservice.{T} 5 IN SRV 10 100 443 myservice.{T}",
        f"myservice.{T} 5 IN SRV 10 100 8080 myservice.{T}",
    ], extra=MYSERVICE_A),
    Case(f"dual.{T}", "SRV", answer=[f"dual.{T} 5 IN SRV 10 100 80 dual.{T}"],
         extra=DUAL_ADDRESSES),
    # cluster-targeted names: reserved, NXDOMAIN for both service types
    Case(f"cluster-a.myservice.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"cluster-b.myservice.{T}", "AAAA", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"cluster-a.headless.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    # headless: ready endpoints of all clusters, the same subset for A and AAAA
    Case(f"headless.{T}", "A", answer=[
        f"headless.{T} 5 IN A 10.4.0.5",
        f"headless.{T} 5 IN A 10.4.0.6",
        f"headless.{T} 5 IN A 10.4.0.7",
    ]),
    Case(f"headless.{T}", "AAAA", ns=NODATA),
    Case(f"headless6.{T}", "A", answer=[f"headless6.{T} 5 IN A 10.6.0.1"]),
    Case(f"headless6.{T}", "AAAA", answer=[f"headless6.{T} 5 IN AAAA fd00::6:1"]),
    # per-endpoint names: hostname, else the dashed IP
    Case(f"web-0.cluster-a.headless.{T}", "A",
         answer=[f"web-0.cluster-a.headless.{T} 5 IN A 10.4.0.5"]),
    Case(f"web-1.cluster-a.headless.{T}", "A",
         answer=[f"web-1.cluster-a.headless.{T} 5 IN A 10.4.0.6"]),
    Case(f"web-0.cluster-a.headless.{T}", "AAAA", ns=NODATA),
    Case(f"10-4-0-7.cluster-b.headless.{T}", "A",
         answer=[f"10-4-0-7.cluster-b.headless.{T} 5 IN A 10.4.0.7"]),
    Case(f"fd00--6-1.cluster-a.headless6.{T}", "AAAA",
         answer=[f"fd00--6-1.cluster-a.headless6.{T} 5 IN AAAA fd00::6:1"]),
    Case(f"10-4-0-8.cluster-b.headless.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),  # not ready
    Case(f"web-0.cluster-b.headless.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),  # wrong cluster
    Case(f"web-0.cluster-a.myservice.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),  # not headless
    # headless SRV: one per ready endpoint and named port, target the per-endpoint name
    Case(f"_https._tcp.headless.{T}", "SRV", answer=[
        f"_https._tcp.headless.{T} 5 IN SRV 10 100 443 web-0.cluster-a.headless.{T}",
        f"_https._tcp.headless.{T} 5 IN SRV 10 100 443 web-1.cluster-a.headless.{T}",
        f"_https._tcp.headless.{T} 5 IN SRV 10 100 443 10-4-0-7.cluster-b.headless.{T}",
    ], extra=HEADLESS_ENDPOINTS),
    Case(f"_dns._udp.headless.{T}", "SRV", answer=[
        f"_dns._udp.headless.{T} 5 IN SRV 10 100 53 web-0.cluster-a.headless.{T}",
        f"_dns._udp.headless.{T} 5 IN SRV 10 100 53 web-1.cluster-a.headless.{T}",
        f"_dns._udp.headless.{T} 5 IN SRV 10 100 53 10-4-0-7.cluster-b.headless.{T}",
    ], extra=HEADLESS_ENDPOINTS),
    # a port goes only to clusters whose Service exposes it (mcs-spec, Export and import 7)
    Case(f"_metrics._tcp.partial.{T}", "SRV", answer=[
        f"_metrics._tcp.partial.{T} 5 IN SRV 10 100 9090 10-8-0-1.cluster-a.partial.{T}",
    ], extra=[PARTIAL_A]),
    Case(f"_web._tcp.partial.{T}", "SRV", answer=[
        f"_web._tcp.partial.{T} 5 IN SRV 10 100 8080 10-8-0-1.cluster-a.partial.{T}",
        f"_web._tcp.partial.{T} 5 IN SRV 10 100 8080 10-8-0-2.cluster-b.partial.{T}",
    ], extra=[PARTIAL_A, PARTIAL_B]),
    Case(f"partial.{T}", "SRV", answer=[
        f"partial.{T} 5 IN SRV 10 100 8080 10-8-0-1.cluster-a.partial.{T}",
        f"partial.{T} 5 IN SRV 10 100 9090 10-8-0-1.cluster-a.partial.{T}",
        f"partial.{T} 5 IN SRV 10 100 8080 10-8-0-2.cluster-b.partial.{T}",
    ], extra=[PARTIAL_A, PARTIAL_B]),
    # a slice that names no port: its endpoints keep the service port
    Case(f"_web._tcp.portless.{T}", "SRV", answer=[
        f"_web._tcp.portless.{T} 5 IN SRV 10 100 8080 10-9-0-1.cluster-a.portless.{T}",
    ], extra=[f"10-9-0-1.cluster-a.portless.{T} 5 IN A 10.9.0.1"]),
    # headless with no ready endpoint: the name does not exist
    Case(f"sleepy.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"_web._tcp.sleepy.{T}", "SRV", "NXDOMAIN", ns=NXDOMAIN),
    # unknown service, unknown namespace, malformed shapes under svc
    Case(f"nothing.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"myservice.nowhere.svc.{Z}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"nowhere.svc.{Z}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"a.b.c.d.e.web-0.cluster-a.headless.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"something.{Z}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"myservice.test.pod.{Z}", "A", "NXDOMAIN", ns=NXDOMAIN),
    # dual-stack ClusterSetIP
    Case(f"dual.{T}", "A", answer=[f"dual.{T} 5 IN A 127.240.0.11"]),
    Case(f"dual.{T}", "AAAA", answer=[f"dual.{T} 5 IN AAAA fd00::11"]),
    Case(f"_http._tcp.dual.{T}", "SRV",
         answer=[f"_http._tcp.dual.{T} 5 IN SRV 10 100 80 dual.{T}"], extra=DUAL_ADDRESSES),
    Case(f"_http-udp._udp.dual.{T}", "SRV",
         answer=[f"_http-udp._udp.dual.{T} 5 IN SRV 10 100 80 dual.{T}"],
         extra=DUAL_ADDRESSES),
    Case(f"prod.svc.{Z}", "A", ns=NODATA),
    Case(f"api.prod.svc.{Z}", "A", answer=[f"api.prod.svc.{Z} 5 IN A 127.240.1.1"]),
    # svc, namespace and apex exist and are empty
    Case(f"svc.{Z}", "A", ns=NODATA),
    Case(T, "A", ns=NODATA),
    Case(Z, "A", ns=NODATA),
    Case(Z, "SOA", answer=[SOA_LINE]),
    # NS at the apex (RFC 1034 4.2.1), the SOA's MNAME, with the address DNS listens on
    # (as CoreDNS's kubernetes plugin answers for its zone)
    Case(Z, "NS", answer=[NS_LINE], extra=[f"ns.dns.{Z} 5 IN A 127.0.0.1"]),
    Case(Z, "ANY", answer=[SOA_LINE, NS_LINE]),  # the apex's record sets, not NODATA
    Case(f"ns.dns.{Z}", "A", answer=[f"ns.dns.{Z} 5 IN A 127.0.0.1"]),
    Case(f"ns.dns.{Z}", "AAAA", ns=NODATA),
    Case(f"dns.{Z}", "A", ns=NODATA),
    Case(f"svc.{Z}", "NS", ns=NODATA),  # no delegation below the apex
    # outside the zone
    Case("example.com.", "A", "REFUSED"),
    Case("local.", "A", "REFUSED"),
    Case("xclusterset.local.", "A", "REFUSED"),
]


@pytest.fixture
async def dns():
    async with running_dns() as server:
        yield server


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_dns_table(dns, transport: str) -> None:
    await check_cases(dns.bound, transport, CASES)


async def check_cases(bound: tuple[str, int], transport: str, cases: list[Case]) -> None:
    failures = []
    for case in cases:
        packet = make_query(case.qname, case.qtype)
        reply = dnslib.DNSRecord.parse(await exchange(transport, bound, packet))
        extra = [r for r in reply.ar if r.rtype != dnslib.QTYPE.OPT]
        got = (dnslib.RCODE.get(reply.header.rcode), zone_lines(reply.rr), zone_lines(reply.auth),
               zone_lines(extra))
        want = (case.rcode, sorted(case.answer), sorted(case.ns), sorted(case.extra))
        if got != want:
            failures.append(f"{case.qname} {case.qtype}: got {got}, want {want}")
        assert reply.header.id == dnslib.DNSRecord.parse(packet).header.id
        assert reply.header.qr and not reply.header.tc
        assert reply.header.aa == (case.rcode != "REFUSED")
        assert [str(q.qname) for q in reply.questions] == [case.qname]
    assert not failures, "\n".join(failures)


# mcs-spec "Export and import" 14: a cluster ID may be `name.extra`; a headless
# endpoint's name then has two labels between its hostname and the service.
DOTTED_ZONE = import_yaml("hd", "Headless", WEB_PORTS) + "\n---\n" + slice_yaml(
    "hd", "east.prod", "IPv4", ["10.13.0.1", "10.13.0.2"], WEB_PORTS,
    hostnames=["web-0", ""])
DOTTED_WEB_0 = f"web-0.east.prod.hd.{T} 5 IN A 10.13.0.1"
DOTTED_DASHED = f"10-13-0-2.east.prod.hd.{T} 5 IN A 10.13.0.2"
DOTTED_CASES = [
    Case(f"web-0.east.prod.hd.{T}", "A", answer=[DOTTED_WEB_0]),
    Case(f"10-13-0-2.east.prod.hd.{T}", "A", answer=[DOTTED_DASHED]),
    Case(f"_web._tcp.hd.{T}", "SRV", answer=[
        f"_web._tcp.hd.{T} 5 IN SRV 10 100 8080 web-0.east.prod.hd.{T}",
        f"_web._tcp.hd.{T} 5 IN SRV 10 100 8080 10-13-0-2.east.prod.hd.{T}",
    ], extra=[DOTTED_WEB_0, DOTTED_DASHED]),
    # the cluster-targeted shapes stay NXDOMAIN, the ID's last label alone too
    Case(f"east.prod.hd.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"prod.hd.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"web-0.prod.hd.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"web-0.east.hd.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_headless_names_under_a_dotted_cluster_id(transport: str) -> None:
    async with running_dns(texts={"hd.yaml": DOTTED_ZONE}) as server:
        await check_cases(server.bound, transport, DOTTED_CASES)


# Odd but valid slices. A hostname on a ClusterSetIP service's endpoint names nothing
# (MCS DNS: per-endpoint names are for headless services only). An endpoint of several
# addresses answers with all of them, as CoreDNS does; an FQDN slice adds nothing; the
# same endpoint in two slices (the source moving it) answers once.
ODD_ZONE = "\n---\n".join([
    import_yaml("vip", "ClusterSetIP", WEB_PORTS, '["127.240.14.1"]'),
    slice_yaml("vip", "cluster-a", "IPv4", ["10.14.0.1"], WEB_PORTS, hostnames=["web-0"]),
    import_yaml("multi", "Headless", WEB_PORTS),
    slice_yaml("multi", "cluster-a", "IPv4", ["10.14.1.1"], WEB_PORTS, hostnames=["web-0"])
    .replace('["10.14.1.1"]', '["10.14.1.1", "10.14.1.9"]'),
    slice_yaml("multi", "cluster-a", "IPv4", ["10.14.1.1"], WEB_PORTS, hostnames=["web-0"])
    .replace("name: multi-cluster-a-ipv4", "name: multi-moved"),
    slice_yaml("multi", "cluster-a", "FQDN", ["multi.example.com"], WEB_PORTS),
])
MULTI_WEB_0 = [f"web-0.cluster-a.multi.{T} 5 IN A 10.14.1.1",
               f"web-0.cluster-a.multi.{T} 5 IN A 10.14.1.9"]
ODD_CASES = [
    Case(f"vip.{T}", "A", answer=[f"vip.{T} 5 IN A 127.240.14.1"]),
    Case(f"web-0.cluster-a.vip.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"multi.{T}", "A", answer=[f"multi.{T} 5 IN A 10.14.1.1",
                                    f"multi.{T} 5 IN A 10.14.1.9"]),
    Case(f"web-0.cluster-a.multi.{T}", "A", answer=MULTI_WEB_0),
    Case(f"_web._tcp.multi.{T}", "SRV", answer=[
        f"_web._tcp.multi.{T} 5 IN SRV 10 100 8080 web-0.cluster-a.multi.{T}"],
        extra=MULTI_WEB_0),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_odd_but_valid_slices(transport: str) -> None:
    async with running_dns(texts={"odd.yaml": ODD_ZONE}) as server:
        await check_cases(server.bound, transport, ODD_CASES)


# Endpoints named by what Kubernetes would refuse: a hostname that is not an RFC 1123
# label, a cluster ID that is not an RFC 1123 name. They stay in the service's answer but
# have no name of their own: `Web-0` would be web-0's name, `a.b` in cluster-a that of `a`
# in cluster `b.cluster-a`.
UNNAMED_ZONE = "\n---\n".join([
    import_yaml("hu", "Headless", WEB_PORTS),
    slice_yaml("hu", "cluster-a", "IPv4", ["10.15.0.1", "10.15.0.2", "10.15.0.3"], WEB_PORTS,
               hostnames=["web-0", "Web-1", "a.b"]),
    slice_yaml("hu", "East", "IPv4", ["10.15.0.4"], WEB_PORTS),
])
UNNAMED_WEB_0 = f"web-0.cluster-a.hu.{T} 5 IN A 10.15.0.1"
UNNAMED_CASES = [
    Case(f"hu.{T}", "A", answer=[f"hu.{T} 5 IN A 10.15.0.{i}" for i in range(1, 5)]),
    Case(f"web-0.cluster-a.hu.{T}", "A", answer=[UNNAMED_WEB_0]),
    Case(f"_web._tcp.hu.{T}", "SRV", answer=[
        f"_web._tcp.hu.{T} 5 IN SRV 10 100 8080 web-0.cluster-a.hu.{T}"], extra=[UNNAMED_WEB_0]),
    Case(f"web-1.cluster-a.hu.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"10-15-0-2.cluster-a.hu.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"a.b.cluster-a.hu.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
    Case(f"10-15-0-4.east.hu.{T}", "A", "NXDOMAIN", ns=NXDOMAIN),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_endpoints_without_a_valid_hostname_or_cluster_have_no_name(
        transport: str) -> None:
    async with running_dns(texts={"hu.yaml": UNNAMED_ZONE}) as server:
        await check_cases(server.bound, transport, UNNAMED_CASES)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_answer_keeps_the_question_case(dns, transport: str) -> None:
    for qname in ("MyService.TEST.svc.ClusterSet.LOCAL.", "myservice.test.svc.clusterset.local.",
                  "mYsErViCe.test.SVC.clusterset.local."):
        reply = dnslib.DNSRecord.parse(await exchange(transport, dns.bound, make_query(qname)))
        assert str(reply.q.qname) == qname
        assert [str(r.rname) for r in reply.rr] == [qname]
        assert [str(r.rdata) for r in reply.rr] == ["127.240.0.10"]
    reply = dnslib.DNSRecord.parse(
        await exchange(transport, dns.bound, make_query("NOTHING.TEST.svc.clusterset.local."))
    )
    assert dnslib.RCODE.get(reply.header.rcode) == "NXDOMAIN"
    assert str(reply.auth[0].rname) == "clusterset.local."


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_class_any_is_answered_from_the_in_records(dns, transport: str) -> None:
    # QCLASS * (255) as Knot and BIND answer it: the IN records, the question's class
    # echoed. It got NOTIMP, a failure for a name that exists.
    for qname, rcode, answer, ns in (
        (f"myservice.{T}", "NOERROR", MYSERVICE_A, []),
        (f"nothing.{T}", "NXDOMAIN", [], NXDOMAIN),
        (f"myservice.{T}", "NOERROR", MYSERVICE_A, []),  # the memoised answer is the same
    ):
        q = dnslib.DNSRecord.question(qname)
        q.q.qclass = 255
        reply = dnslib.DNSRecord.parse(await exchange(transport, dns.bound, q.pack()))
        got = (dnslib.RCODE.get(reply.header.rcode), zone_lines(reply.rr), zone_lines(reply.auth))
        assert got == (rcode, answer, ns), qname
        assert reply.header.aa and [q.qclass for q in reply.questions] == [255]
    q = dnslib.DNSRecord.question(f"myservice.{T}")
    q.q.qclass = 3  # CHAOS: not a class the zone has
    reply = dnslib.DNSRecord.parse(await exchange(transport, dns.bound, q.pack()))
    assert dnslib.RCODE.get(reply.header.rcode) == "NOTIMP" and reply.rr == []


async def test_rd_and_cd_are_echoed(dns) -> None:
    q = dnslib.DNSRecord.question(f"myservice.{T}")
    q.header.rd = 0
    q.header.cd = 1
    reply = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, q.pack()))
    assert (reply.header.rd, reply.header.cd, reply.header.ra) == (0, 1, 0)


async def test_servfail_before_the_first_snapshot() -> None:
    async with running_dns(load=False) as server:
        for transport in ("udp", "tcp"):
            reply = dnslib.DNSRecord.parse(
                await exchange(transport, server.bound, make_query(f"myservice.{T}"))
            )
            assert dnslib.RCODE.get(reply.header.rcode) == "SERVFAIL"
            outside = dnslib.DNSRecord.parse(
                await exchange(transport, server.bound, make_query("example.com."))
            )
            assert dnslib.RCODE.get(outside.header.rcode) == "REFUSED"


async def test_edns_is_answered_with_our_payload_size(dns) -> None:
    reply = dnslib.DNSRecord.parse(
        await udp_exchange(dns.bound, make_query(f"myservice.{T}", edns=4096, flags="do"))
    )
    assert zone_lines(reply.rr) == [f"myservice.{T} 5 IN A 127.240.0.10"]
    opts = [r for r in reply.ar if r.rtype == dnslib.QTYPE.OPT]
    assert len(opts) == 1 and opts[0].rclass == 1232
    assert opts[0].ttl & 0x8000  # DO echoed
    plain = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, make_query(f"myservice.{T}")))
    assert plain.ar == []


async def test_edns_version_other_than_0_is_badvers(dns) -> None:
    reply = dnslib.DNSRecord.parse(
        await udp_exchange(dns.bound, make_query(f"myservice.{T}", edns=1232, version=1))
    )
    opt = next(r for r in reply.ar if r.rtype == dnslib.QTYPE.OPT)
    assert (opt.ttl >> 24) << 4 | reply.header.rcode == 16  # BADVERS
    assert reply.rr == []
    # Its rcode's high bits travel in the OPT record: the metric label read the header's
    # low four bits alone, and counted BADVERS as NOERROR.
    assert answer_labels(bytes(reply.pack())[2:]) == ("A", "BADVERS")


BIG_LINES = sorted(f"big.{T} 5 IN A {a}" for a in BIG_ADDRESSES)


async def test_big_headless_is_truncated_over_udp_and_whole_over_tcp(dns) -> None:
    for edns in (None, 1232, 4096):
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(dns.bound, make_query(f"big.{T}", edns=edns))
        )
        assert reply.header.tc and reply.rr == [], edns
        assert str(reply.q.qname) == f"big.{T}"
    [raw] = await tcp_exchange(dns.bound, make_query(f"big.{T}"))
    reply = dnslib.DNSRecord.parse(raw)
    assert not reply.header.tc
    assert zone_lines(reply.rr) == BIG_LINES
    # SRV: answers that do not fit are truncated with or without their additional records
    srv = make_query(f"_web._tcp.big.{T}", "SRV", edns=1232)
    reply = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, srv))
    assert reply.header.tc and reply.rr == []
    assert [r.rtype for r in reply.ar] == [dnslib.QTYPE.OPT]
    reply = dnslib.DNSRecord.parse((await tcp_exchange(dns.bound, srv))[0])
    assert not reply.header.tc and len(reply.rr) == 200
    assert sorted(str(r.rdata) for r in reply.ar if r.rtype == dnslib.QTYPE.A) == sorted(
        BIG_ADDRESSES)


async def test_the_name_server_is_the_address_dns_listens_on() -> None:
    async with running_dns(listen=("::1", 0)) as server:
        for transport in ("udp", "tcp"):
            reply = dnslib.DNSRecord.parse(
                await exchange(transport, server.bound, make_query(Z, "NS", edns=1232)))
            assert zone_lines(reply.rr) == [NS_LINE]
            assert zone_lines([r for r in reply.ar if r.rtype != dnslib.QTYPE.OPT]) == [
                f"ns.dns.{Z} 5 IN AAAA ::1"]
            reply = dnslib.DNSRecord.parse(
                await exchange(transport, server.bound, make_query(f"ns.dns.{Z}", "AAAA")))
            assert zone_lines(reply.rr) == [f"ns.dns.{Z} 5 IN AAAA ::1"]
    # Listening on every address, or on a host name: the name server has no address of
    # its own to give (NS answered alone, ns.dns.<zone> NODATA).
    assert own_addresses("0.0.0.0") == own_addresses("::") == own_addresses("gw.local") == ()
    assert own_addresses("10.1.2.3") == ("10.1.2.3",)


async def test_additional_records_give_way_first_and_never_set_tc() -> None:
    # 6 endpoints: their SRV records fit in 512 bytes (targets uncompressed, RFC 2782),
    # their addresses do not as well. RFC 2181 9: additional records are left out before
    # answers, without TC.
    addresses = [f"10.12.0.{i}" for i in range(1, 7)]
    zone = import_yaml("ten", "Headless", WEB_PORTS) + "\n---\n" + slice_yaml(
        "ten", "cluster-a", "IPv4", addresses, WEB_PORTS)
    targets = {f"{a.replace('.', '-')}.cluster-a.ten.{T}": a for a in addresses}
    async with running_dns(texts={"ten.yaml": zone}) as server:
        name = f"_web._tcp.ten.{T}"
        for transport, edns, room in (("udp", None, 512), ("udp", 1232, 1232),
                                      ("tcp", None, 65535)):
            raw = await exchange(transport, server.bound, make_query(name, "SRV", edns=edns))
            reply = dnslib.DNSRecord.parse(raw)
            assert len(raw) <= room and not reply.header.tc
            assert sorted(str(r.rdata.target) for r in reply.rr) == sorted(targets)
            # each target in full, not a pointer into the question (RFC 2782)
            assert raw.count(b"\x03ten\x04test\x03svc\x0aclusterset") == 1 + len(reply.rr)
            extra = {str(r.rname): str(r.rdata) for r in reply.ar
                     if r.rtype != dnslib.QTYPE.OPT}
            assert extra.items() <= targets.items(), extra
            if edns is None and transport == "udp":
                assert 0 < len(extra) < len(targets), len(raw)
                assert len(raw) + 36 > 512  # an address record here: 36 or 37 bytes
            else:
                assert extra == targets


FOUR_PORTS = "[" + ", ".join(f"{{name: p{i}, protocol: TCP, port: {8000 + i}}}"
                             for i in range(4)) + "]"
HUGE_ADDRESSES = [f"10.10.{i // 250}.{i % 250 + 1}" for i in range(450)]


async def test_an_answer_beyond_64k_keeps_over_tcp_the_records_that_fit() -> None:
    # 450 endpoints x 4 ports: ~128 kB of bare SRV records (targets uncompressed, RFC 2782),
    # more than a TCP message holds.
    # TCP is the last resort: an empty TC answer there leaves the name unresolvable.
    huge = import_yaml("huge", "Headless", FOUR_PORTS) + "\n---\n" + slice_yaml(
        "huge", "cluster-a", "IPv4", HUGE_ADDRESSES, FOUR_PORTS)
    async with running_dns(texts={"huge.yaml": huge}) as server:
        [raw] = await tcp_exchange(server.bound, make_query(f"huge.{T}", "SRV", edns=1232))
        assert 65535 - 60 < len(raw) <= 65535
        reply = dnslib.DNSRecord.parse(raw)
        assert reply.header.tc and len(reply.rr) == reply.header.a > 900
        assert all(r.rtype == dnslib.QTYPE.SRV and str(r.rdata.target).endswith(f".huge.{T}")
                   for r in reply.rr)
        assert [r.rtype for r in reply.ar] == [dnslib.QTYPE.OPT]
        # the A records all fit; over UDP the client is still sent to TCP
        [raw] = await tcp_exchange(server.bound, make_query(f"huge.{T}"))
        assert sorted(str(r.rdata) for r in dnslib.DNSRecord.parse(raw).rr) == sorted(
            HUGE_ADDRESSES)
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(server.bound, make_query(f"huge.{T}", "SRV")))
        assert reply.header.tc and reply.rr == []


async def test_an_edns_cap_of_65535_never_makes_an_answer_too_big_to_send() -> None:
    # 4091 A records: 65515 bytes, past the 65507 a UDP datagram can carry over IPv4.
    # It used to fail at sendto and the client heard nothing; now it is sent to TCP.
    addresses = [f"10.11.{i // 250}.{i % 250 + 1}" for i in range(4091)]
    zone = import_yaml("huge", "Headless", FOUR_PORTS) + "\n---\n" + slice_yaml(
        "huge", "cluster-a", "IPv4", addresses, FOUR_PORTS)
    async with running_dns(texts={"huge.yaml": zone}, edns_max_payload=65535) as server:
        [raw] = await tcp_exchange(server.bound, make_query(f"huge.{T}", edns=65535))
        assert 65507 < len(raw) <= 65535 and not dnslib.DNSRecord.parse(raw).header.tc
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(server.bound, make_query(f"huge.{T}", edns=65535)))
        assert reply.header.tc and reply.rr == []
        assert next(r for r in reply.ar if r.rtype == dnslib.QTYPE.OPT).rclass == 65507


async def test_a_bigger_edns_cap_lets_more_through_udp() -> None:
    async with running_dns(edns_max_payload=4096) as server:
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(server.bound, make_query(f"big.{T}", edns=4096))
        )
        assert not reply.header.tc and zone_lines(reply.rr) == BIG_LINES
        # without EDNS the 512-byte limit still holds
        reply = dnslib.DNSRecord.parse(await udp_exchange(server.bound, make_query(f"big.{T}")))
        assert reply.header.tc


async def test_tcp_answers_several_queries_per_connection_in_order(dns) -> None:
    names = [f"myservice.{T}", f"headless.{T}", f"nothing.{T}", f"big.{T}"] * 5
    packets = [make_query(n) for n in names]
    answers = await tcp_exchange(dns.bound, *packets)
    for packet, raw in zip(packets, answers, strict=True):
        q, a = dnslib.DNSRecord.parse(packet), dnslib.DNSRecord.parse(raw)
        assert a.header.id == q.header.id and a.q.qname == q.q.qname
