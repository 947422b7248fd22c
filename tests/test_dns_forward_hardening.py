"""--dns-upstream under abuse: a silent upstream does not flood the log, and its
timeouts are counted; forwards leave from changing random ports and only the port a
query left from takes its answer; one client cannot hold every pending slot; a TCP
client gets the whole answer the upstream truncated over UDP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import dnslib
import pytest
import uvloop

from mcsproxy.dns import forward
from tests.dns_support import (
    TIMEOUT_S,
    fake_upstream,
    make_query,
    running_dns,
    tcp_exchange,
    udp_client,
    udp_exchange,
)

BIG = 100  # records in the answer to big.*: more than 512 bytes


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers every name with 192.0.2.1, except silent.* (never answered), forged.*
    (first a forged answer, with the right ID, to each address in forge_to but the
    query's, then the real one 50 ms later) and big.*, big-stalled.* (over UDP truncated,
    TC=1 and no records)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dnslib.DNSRecord, tuple[str, int]]] = []
        self.forge_to: set[tuple[str, int]] = set()
        self.forged = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dnslib.DNSRecord.parse(data)
        self.seen.append((query, addr))
        name = str(query.q.qname).lower()  # DNS 0x20: the case is random
        if name.startswith("silent."):
            return
        if name.startswith(("big.", "big-stalled.")):
            reply = query.reply()
            reply.header.tc = 1
            self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]
            return
        reply = query.reply()
        reply.add_answer(*dnslib.RR.fromZone(f"{name} 60 IN A 192.0.2.1"))
        if name.startswith("forged."):
            fake = query.reply()
            fake.add_answer(*dnslib.RR.fromZone(f"{name} 60 IN A 203.0.113.66"))
            for other in self.forge_to - {addr}:
                self.transport.sendto(fake.pack(), other)  # type: ignore[attr-defined]
                self.forged += 1
            asyncio.get_running_loop().call_later(
                0.05, self.transport.sendto, reply.pack(), addr)  # type: ignore[attr-defined]
            return
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


def big_answer(query: dnslib.DNSRecord) -> bytes:
    reply = query.reply()
    for i in range(BIG):
        reply.add_answer(dnslib.RR(query.q.qname, rdata=dnslib.A(f"192.0.2.{i + 1}"), ttl=60))
    return bytes(reply.pack())


async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The upstream over TCP: big.* in full, big-stalled.* never; one query per
    connection."""
    try:
        size = int.from_bytes(await reader.readexactly(2), "big")
        query = dnslib.DNSRecord.parse(await reader.readexactly(size))
        if str(query.q.qname).lower().startswith("big-stalled."):
            await reader.read()  # until the gateway gives up and closes
            return
        answer = big_answer(query)
        writer.write(len(answer).to_bytes(2, "big") + answer)
        await writer.drain()
    finally:
        writer.close()


def upstream(tcp: bool = False,
             ) -> contextlib.AbstractAsyncContextManager[tuple[tuple[str, int], FakeUpstream]]:
    return fake_upstream(FakeUpstream, tcp=(lambda _proto: serve_tcp) if tcp else None)


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


async def test_forwards_leave_from_a_rotating_pool_of_ports() -> None:
    async with upstream() as (addr, fake), running_dns(upstream=addr,
                                                        upstream_timeout_s=1.0) as dns:
        assert dns.forwarder is not None
        for i in range(128):
            reply = dnslib.DNSRecord.parse(
                await udp_exchange(dns.bound, make_query(f"q{i}.example.")))
            assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"]
        # Even had every query drawn the same socket, it was replaced 3 times.
        ports = {source[1] for _, source in fake.seen}
        assert len(ports) >= 128 // 32, ports  # ROTATE_AFTER_QUERIES is 32
        assert len(dns.forwarder.sockets) <= forward.MAX_SOCKETS
        # Sockets replaced with nothing left to wait for are closed.
        assert len(dns.forwarder.sockets) == forward.POOL_SIZE


async def test_an_answer_to_another_port_of_the_pool_is_ignored() -> None:
    """The ID and question are right but the answer comes to another of our ports: it
    is not the answer to the query (a spoofer guessed the ID but not the port)."""
    async with upstream() as (addr, fake), running_dns(upstream=addr,
                                                        upstream_timeout_s=1.0) as dns:
        assert dns.forwarder is not None
        for i in range(24):
            await udp_exchange(dns.bound, make_query(f"warm{i}.example."))
        fake.forge_to = {source for _, source in fake.seen}
        reply = dnslib.DNSRecord.parse(
            await udp_exchange(dns.bound, make_query("forged.example.")))
        assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"]
        assert fake.forged, "the upstream should have seen other ports to send to"


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_forwarding_recovers_after_the_upstream_port_was_closed(
        run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """ICMP port unreachable comes back on the pool's sockets while the upstream is down:
    none of them stops taking answers once it is up again (uvloop stops watching a
    socket with a pending error for good)."""
    run(forward_after_port_unreachable())


async def forward_after_port_unreachable() -> None:
    loop = asyncio.get_running_loop()
    # An address of its own: a freed port of 127.0.0.1 may be taken again before the
    # upstream comes back (by the forwarder's own sockets, which leave from 127.0.0.1).
    probe, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.165.0.1", 0))
    addr = probe.get_extra_info("sockname")[:2]
    probe.close()  # nothing listens there now
    async with running_dns(upstream=addr, upstream_timeout_s=0.1) as dns:
        async with udp_client(dns.bound) as (transport, client):
            for i in range(40):
                transport.sendto(make_query(f"down{i}.example."))
                await asyncio.sleep(0.005)  # each ICMP error is seen before the next query
            answers = [await asyncio.wait_for(client.answers.get(), TIMEOUT_S)
                       for _ in range(40)]
        assert {rcode(a) for a in answers} == {"SERVFAIL"}
        up, _fake = await loop.create_datagram_endpoint(FakeUpstream, local_addr=addr)
        try:
            for i in range(20):
                reply = dnslib.DNSRecord.parse(
                    await udp_exchange(dns.bound, make_query(f"up{i}.example.")))
                assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"], i
        finally:
            up.close()


async def udp_ask_from(source: str, addr: tuple[str, int], packet: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Answers, local_addr=(source, 0), remote_addr=addr)
    try:
        transport.sendto(packet)
        return await asyncio.wait_for(proto.answers.get(), TIMEOUT_S)
    finally:
        transport.close()


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.answers.put_nowait(data)


async def read_answers(reader: asyncio.StreamReader, n: int, within_s: float) -> list[bytes]:
    """Up to n framed answers, those that come within within_s."""
    answers: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + within_s
    with contextlib.suppress(TimeoutError):
        while len(answers) < n:
            left = deadline - asyncio.get_running_loop().time()
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), left), "big")
            answers.append(await asyncio.wait_for(reader.readexactly(size), left))
    return answers


async def test_one_client_cannot_take_every_pending_slot() -> None:
    """A TCP client pipelines as many queries as the pending table holds, to an upstream
    that does not answer them: past its share it gets SERVFAIL at once, and a client
    at another address is still forwarded."""
    async with upstream() as (addr, _fake), running_dns(upstream=addr,
                                                         upstream_timeout_s=3.0) as dns:
        assert dns.forwarder is not None
        dns.forwarder.max_pending = 40  # a client's share: 10
        reader, writer = await asyncio.open_connection(*dns.bound, local_addr=("127.0.0.3", 0))
        try:
            writer.write(b"".join(len(q).to_bytes(2, "big") + q for q in (
                make_query(f"silent.h{i}.example.") for i in range(40))))
            refused = await read_answers(reader, 30, within_s=1.0)
            assert len(refused) == 30 and {rcode(a) for a in refused} == {"SERVFAIL"}
            reply = dnslib.DNSRecord.parse(await udp_ask_from(
                "127.0.0.4", dns.bound, make_query("other.example.")))
            assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"]
            assert dns.stats.forward_failures["client_limit"] == 30
            assert dns.forwarder.by_client == {"127.0.0.3": 10}
        finally:
            writer.close()


@pytest.mark.parametrize("upstream_tcp", [True, False])
async def test_a_tcp_client_gets_the_answer_truncated_over_udp(upstream_tcp: bool) -> None:
    """The upstream truncates over UDP: a TCP client's query is asked again over TCP and
    gets the whole answer; a UDP client gets the truncated one, to retry over TCP itself.
    An upstream without TCP: the TCP client gets the truncated answer, not a timeout."""
    async with upstream(tcp=upstream_tcp) as (addr, _fake), \
            running_dns(upstream=addr, upstream_timeout_s=3.0) as dns:
        started = asyncio.get_running_loop().time()
        reply = dnslib.DNSRecord.parse(
            (await tcp_exchange(dns.bound, make_query("big.example.")))[0])
        assert rcode(reply.pack()) == "NOERROR"
        if upstream_tcp:
            assert not reply.header.tc and len(reply.rr) == BIG
        else:
            assert reply.header.tc and not reply.rr
            assert asyncio.get_running_loop().time() - started < 1.0
        reply = dnslib.DNSRecord.parse(await udp_exchange(dns.bound, make_query("big.example.")))
        assert reply.header.tc and not reply.rr
        assert dns.forwarder is not None and not dns.forwarder.pending
        assert dns.forwarder.tcp_retries == 0


async def test_the_tcp_retry_is_bounded_by_the_timeout() -> None:
    async with upstream(tcp=True) as (addr, _fake), \
            running_dns(upstream=addr, upstream_timeout_s=0.3) as dns:
        reply = (await tcp_exchange(dns.bound, make_query("big-stalled.example.")))[0]
        assert rcode(reply) == "SERVFAIL"
        assert dns.stats.forward_failures["timeout"] == 1
        assert dns.forwarder is not None and not dns.forwarder.pending
        await asyncio.sleep(0.01)  # the cancelled retry closes its connection
        assert dns.forwarder.tcp_retries == 0
