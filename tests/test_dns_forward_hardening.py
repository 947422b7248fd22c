"""--dns-upstream under abuse: a silent upstream does not flood the log, and its
timeouts are counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import dnslib
import pytest

from tests.dns_support import TIMEOUT_S, make_query, running_dns, udp_client


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers every name with 192.0.2.1, except silent.* (never answered)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dnslib.DNSRecord, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dnslib.DNSRecord.parse(data)
        self.seen.append((query, addr))
        name = str(query.q.qname)
        if name.startswith("silent."):
            return
        reply = query.reply()
        reply.add_answer(*dnslib.RR.fromZone(f"{name} 60 IN A 192.0.2.1"))
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[tuple[tuple[str, int], FakeUpstream]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        FakeUpstream, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[:2], proto
    finally:
        transport.close()


def rcode(raw: bytes) -> str:
    return str(dnslib.RCODE.get(dnslib.DNSRecord.parse(raw).header.rcode))


async def test_timeouts_are_counted_and_logged_at_most_once_a_second(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcsproxy.dns.forward")
    async with upstream() as (addr, _fake), running_dns(upstream=addr,
                                                         upstream_timeout_s=0.1) as dns:
        async with udp_client(dns.bound) as (transport, client):
            for i in range(50):
                transport.sendto(make_query(f"silent.q{i}.example."))
            answers = [await asyncio.wait_for(client.answers.get(), TIMEOUT_S)
                       for _ in range(50)]
        assert {rcode(a) for a in answers} == {"SERVFAIL"}
        warnings = [r for r in caplog.records if r.name == "mcsproxy.dns.forward"
                    and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "timeouts so far" in warnings[0].getMessage()
        assert dns.stats.forward_failures["timeout"] == 50
