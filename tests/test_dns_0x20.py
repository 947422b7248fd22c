"""DNS 0x20 on --dns-upstream: the forwarded question's letters go in a random case, an
answer must echo that case exactly (a forger must guess it too), and the client gets its
own case back."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import dnslib
import pytest

from tests.dns_support import (
    fake_upstream,
    make_query,
    running_dns,
    tcp_exchange,
    udp_exchange,
)

UPSTREAM_IP = "127.203.0.1"
NAME = "Service.Long-Name-For-Case.Example.ORG."  # the client's own case


def question_of(packet: bytes) -> bytes:
    """The question section of a message with one uncompressed question."""
    end = packet.index(b"\x00", 12) + 5
    return packet[12:end]


class Upstream(asyncio.DatagramProtocol):
    """Records each question as it arrived. Answers 192.0.2.1; to forged.* first sends a
    forged answer (the right ID, the question in another case, 203.0.113.66), the real one
    20 ms later; to big.* over UDP a truncated answer (TC=1), over TCP the full one."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []  # questions over UDP, case as received
        self.seen_tcp: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append(question_of(data))
        query = dnslib.DNSRecord.parse(data)
        name = str(query.q.qname).lower()
        reply = query.reply()  # echoes the question as it came
        if name.startswith("big."):
            reply.header.tc = 1
            self.transport.sendto(reply.pack(), addr)
            return
        reply.add_answer(*dnslib.RR.fromZone(f"{name} 60 IN A 192.0.2.1"))
        if name.startswith("forged."):
            forged = dnslib.DNSRecord.parse(reply.pack())
            forged.q.qname = dnslib.DNSLabel(str(query.q.qname).swapcase())
            forged.rr[0].rdata = dnslib.A("203.0.113.66")
            self.transport.sendto(forged.pack(), addr)
            asyncio.get_running_loop().call_later(0.02, self.transport.sendto, reply.pack(), addr)
            return
        self.transport.sendto(reply.pack(), addr)

    async def serve_tcp(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
            self.seen_tcp.append(question_of(data))
            reply = dnslib.DNSRecord.parse(data).reply()
            reply.add_answer(*dnslib.RR.fromZone(f"{reply.q.qname} 60 IN A 192.0.2.7"))
            answer = reply.pack()
            writer.write(len(answer).to_bytes(2, "big") + answer)
            await writer.drain()
        finally:
            writer.close()


def upstream() -> contextlib.AbstractAsyncContextManager[tuple[tuple[str, int], Upstream]]:
    return fake_upstream(Upstream, UPSTREAM_IP, tcp=lambda proto: proto.serve_tcp)


async def test_the_forwarded_case_is_random_and_the_client_gets_its_own_back() -> None:
    async with upstream() as (addr, fake), running_dns(upstream=addr,
                                                        upstream_timeout_s=1.0) as dns:
        for _ in range(8):
            query = make_query(NAME)
            raw = await udp_exchange(dns.bound, query)
            assert question_of(raw) == question_of(query)  # byte for byte, case included
            assert [str(r.rdata) for r in dnslib.DNSRecord.parse(raw).rr] == ["192.0.2.1"]
        sent = question_of(make_query(NAME))
        assert [q.lower() for q in fake.seen] == [sent.lower()] * 8
        # 32 letters, 8 draws: the same case every time has odds of 2^-224.
        assert len(set(fake.seen)) > 1, fake.seen
        assert any(q != sent for q in fake.seen)
        assert dns.stats.forward_mismatches == {"question": 0, "case": 0}


async def test_an_answer_echoing_another_case_is_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    """The right ID, port and name but not the case that was sent: forged (or from an
    upstream that does not keep case), so dropped and counted; the real answer wins."""
    caplog.set_level(logging.WARNING, logger="mcsproxy.dns.forward")
    async with upstream() as (addr, _fake), running_dns(upstream=addr,
                                                         upstream_timeout_s=1.0) as dns:
        query = make_query("forged.Example.COM.")
        raw = await udp_exchange(dns.bound, query)
        assert [str(r.rdata) for r in dnslib.DNSRecord.parse(raw).rr] == ["192.0.2.1"]
        assert question_of(raw) == question_of(query)
        assert dns.stats.forward_mismatches == {"question": 0, "case": 1}
        assert any("another letter case" in r.getMessage() for r in caplog.records)


async def test_the_tcp_retry_asks_the_same_case_as_udp() -> None:
    async with upstream() as (addr, fake), running_dns(upstream=addr,
                                                        upstream_timeout_s=1.0) as dns:
        query = make_query("big.Some-Long-Name.Example.NET.")
        raw = (await tcp_exchange(dns.bound, query))[0]
        reply = dnslib.DNSRecord.parse(raw)
        assert not reply.header.tc and [str(r.rdata) for r in reply.rr] == ["192.0.2.7"]
        assert question_of(raw) == question_of(query)
        assert fake.seen_tcp == fake.seen and len(fake.seen) == 1
        assert dns.forwarder is not None and not dns.forwarder.pending
