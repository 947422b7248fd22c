"""--dns-upstream: names outside the zone go to the upstream, IDs remapped, with a timeout;
names inside never do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import dnslib

from tests.dns_support import exchange, make_query, running_dns, tcp_exchange, udp_exchange


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers example.com A with 192.0.2.1; stays silent for silent.example.; for
    spoof.example. first sends an answer to another question with the right ID; answers
    noedns.* with a header-only FORMERR, refused.* with REFUSED, an OPT and no question."""

    def __init__(self) -> None:
        self.seen: list[dnslib.DNSRecord] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dnslib.DNSRecord.parse(data)
        self.seen.append(query)
        name = str(query.q.qname).lower()  # DNS 0x20: the case is random
        if name == "silent.example.":
            return
        if name.startswith("noedns."):  # a server that cannot read EDNS: FORMERR, no question
            self.transport.sendto(data[:2] + b"\x80\x01" + bytes(8), addr)  # type: ignore[attr-defined]
            return
        if name.startswith("refused."):  # REFUSED, no question, an OPT record
            opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
            answer = data[:2] + b"\x80\x05" + b"\x00\x00\x00\x00\x00\x00\x00\x01" + opt
            self.transport.sendto(answer, addr)  # type: ignore[attr-defined]
            return
        if name == "spoof.example.":
            fake = dnslib.DNSRecord.question("other.example.").reply()
            fake.header.id = query.header.id
            fake.add_answer(*dnslib.RR.fromZone("other.example. 60 IN A 203.0.113.66"))
            self.transport.sendto(fake.pack(), addr)  # type: ignore[attr-defined]
        reply = query.reply()
        reply.add_answer(*dnslib.RR.fromZone(f"{name} 60 IN A 192.0.2.1"))
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[tuple[tuple[str, int], FakeUpstream]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        FakeUpstream, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[:2], proto
    finally:
        transport.close()


async def test_outside_names_are_forwarded_inside_names_are_not() -> None:
    async with (
        upstream() as (addr, fake),
        running_dns(upstream=addr, upstream_timeout_s=0.3) as dns,
    ):
        for transport in ("udp", "tcp"):
            query = make_query("example.com.")
            raw = (
                await udp_exchange(dns.bound, query)
                if transport == "udp"
                else (await tcp_exchange(dns.bound, query))[0]
            )
            reply = dnslib.DNSRecord.parse(raw)
            assert reply.header.id == dnslib.DNSRecord.parse(query).header.id
            assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"]
        # In the zone: answered here, never forwarded, even when it does not exist.
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(dns.bound, make_query("nothing.test.svc.clusterset.local."))
        )
        assert dnslib.RCODE.get(reply.header.rcode) == "NXDOMAIN"
        assert [str(q.q.qname).lower() for q in fake.seen] == ["example.com.", "example.com."]

        # An answer to another question is ignored; the real one gets through.
        reply = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, make_query("spoof.example.")))
        assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"]
        assert dns.stats.forward_mismatches == {"question": 1, "case": 0}
        # No answer: SERVFAIL after the timeout, and the pending table is empty again.
        reply = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, make_query("silent.example.")))
        assert dnslib.RCODE.get(reply.header.rcode) == "SERVFAIL"
        assert str(reply.q.qname) == "silent.example."
        assert dns.forwarder is not None and not dns.forwarder.pending


async def test_servfail_of_the_forwarder_carries_opt_for_an_edns_query() -> None:
    # RFC 6891 6.1.1: an answer to a query with an OPT record carries one. The forwarder's
    # own SERVFAIL (the upstream silent, the pending table full) had none, over UDP and
    # TCP, so a client could take the gateway for a server without EDNS.
    async with (
        upstream() as (addr, _fake),
        running_dns(upstream=addr, upstream_timeout_s=0.2) as dns,
    ):
        assert dns.forwarder is not None
        for transport in ("udp", "tcp"):
            for edns, flags, opts in (
                (None, "", []),
                (1232, "", [(dnslib.QTYPE.OPT, 1232, 0)]),
                (4096, "do", [(dnslib.QTYPE.OPT, 1232, 0x8000)]),
            ):
                query = make_query("silent.example.", edns=edns, flags=flags)
                reply = dnslib.DNSRecord.parse(await exchange(transport, dns.bound, query))
                assert dnslib.RCODE.get(reply.header.rcode) == "SERVFAIL"
                assert [str(q.qname) for q in reply.questions] == ["silent.example."]
                assert [(r.rtype, r.rclass, r.ttl & 0x8000) for r in reply.ar] == opts
        dns.forwarder.max_pending = 0  # full: refused at once
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(dns.bound, make_query("example.com.", edns=1232))
        )
        assert dnslib.RCODE.get(reply.header.rcode) == "SERVFAIL"
        assert [r.rtype for r in reply.ar] == [dnslib.QTYPE.OPT]


async def test_full_pending_table_answers_servfail_at_once() -> None:
    async with (
        upstream() as (addr, _fake),
        running_dns(upstream=addr, upstream_timeout_s=5.0) as dns,
    ):
        assert dns.forwarder is not None
        dns.forwarder.max_pending = 1
        first = asyncio.create_task(udp_exchange(dns.bound, make_query("silent.example.")))
        while not dns.forwarder.pending:
            await asyncio.sleep(0.01)
        reply = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, make_query("example.com.")))
        assert dnslib.RCODE.get(reply.header.rcode) == "SERVFAIL"
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first


async def test_an_error_without_a_question_is_handed_on_at_once() -> None:
    # It has no question to echo: it was dropped as a forgery, and the client (which
    # would ask again without EDNS on FORMERR) waited for the timeout's SERVFAIL. It
    # reaches the client with the client's question: Go's stub resolver ignores an
    # answer without its question over UDP and waits out its own timeout.
    async with (
        upstream() as (addr, _fake),
        running_dns(upstream=addr, upstream_timeout_s=3.0) as dns,
    ):
        for transport in ("udp", "tcp"):
            for name, rcode, additional in (
                ("noedns.Example.", "FORMERR", []),
                ("refused.Example.", "REFUSED", [dnslib.QTYPE.OPT]),
            ):
                query = make_query(name, edns=1232)
                async with asyncio.timeout(1.0):
                    raw = await exchange(transport, dns.bound, query)
                reply = dnslib.DNSRecord.parse(raw)
                asked = dnslib.DNSRecord.parse(query)
                assert reply.header.id == asked.header.id, (transport, name)
                assert dnslib.RCODE.get(reply.header.rcode) == rcode, (transport, name)
                assert reply.questions == asked.questions and reply.header.qr, (transport, name)
                assert [r.rtype for r in reply.ar] == additional, (transport, name)
        assert dns.stats.forward_mismatches == {"question": 0, "case": 0}
        assert dns.forwarder is not None and not dns.forwarder.pending


async def test_a_client_not_allowed_to_forward_gets_refused_with_its_question() -> None:
    # Go's stub resolver ignores an answer without its question over UDP and waits out its
    # timeout (5 s a try): the header-only REFUSED made a refusal a timeout.
    async with (
        upstream() as (addr, fake),
        running_dns(upstream=addr, allow_from=("10.0.0.0/8",)) as dns,
    ):
        for transport in ("udp", "tcp"):
            query = make_query("Example.COM.", "AAAA", edns=1232)
            reply = dnslib.DNSRecord.parse(await exchange(transport, dns.bound, query))
            assert dnslib.RCODE.get(reply.header.rcode) == "REFUSED", transport
            assert reply.questions == dnslib.DNSRecord.parse(query).questions, transport
            assert [r.rtype for r in reply.ar] == [dnslib.QTYPE.OPT], transport
        assert fake.seen == [] and dns.allow.refused == 2
