"""DNS over TCP against clients that misbehave: never reading, dripping bytes, hoarding
connections, half-closing with a forwarded query outstanding. Also: a listener on the IPv6
wildcard serving IPv4 clients as an IPv4 one would (over TCP too, each /24 with its own
rate limit), and the queries that rate limit turns away still counted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import dnslib
import pytest

from mcsproxy.dns.server import TCP_FORWARDS_PER_CONNECTION, TCP_WRITE_HIGH_WATER
from tests.dns_support import exchange, fake_upstream, make_query, running_dns
from tests.proxy_fixtures import until
from tests.test_dns_forward import upstream

QUERY = make_query("myservice.test.svc.clusterset.local.")
FRAMED = len(QUERY).to_bytes(2, "big") + QUERY


async def open_from(
    addr: tuple[str, int],
    local_ip: str = "127.0.0.1",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(*addr, local_addr=(local_ip, 0)), 3)


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when a query on this connection gets its answer (False: closed or refused)."""
    try:
        writer.write(FRAMED)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3))
        return len(await asyncio.wait_for(reader.readexactly(size), 3)) == size
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


async def answered_on_a_new_connection(addr: tuple[str, int]) -> bool:
    reader, writer = await open_from(addr)
    try:
        return await answered(reader, writer)
    finally:
        writer.close()


async def test_a_client_that_never_reads_holds_bounded_answers_and_is_dropped() -> None:
    async with running_dns(tcp_idle_timeout_s=0.5, tcp_max_connections=4) as dns:
        sock = socket.create_connection(dns.bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        # Queries as fast as the server reads them, never reading an answer, until the
        # answers back up past every kernel buffer on the way (megabytes on loopback),
        # then 2 MB more (or 0.25 s more, within the idle timeout): a server that
        # answered everything it read would now hold megabytes of answers.
        loop = asyncio.get_running_loop()
        sent, pending = 0, b""
        deadline, backed_up = loop.time() + 10, None
        while backed_up is None or (sent < backed_up + (2 << 20) and loop.time() < deadline):
            assert loop.time() < deadline, "answers never backed up"
            with contextlib.suppress(BlockingIOError):
                while True:
                    pending = pending or FRAMED * 100
                    n = sock.send(pending)
                    sent += n
                    pending = pending[n:]
            await asyncio.sleep(0.005)
            if backed_up is None and any(
                c.transport is not None
                and c.transport.get_write_buffer_size() >= TCP_WRITE_HIGH_WATER
                for c in dns._connections
            ):
                backed_up, deadline = sent, loop.time() + 0.25
        [conn] = list(dns._connections)
        assert conn.transport is not None
        # Answers stop being made once they back up: one answer past the high-water mark.
        assert conn.transport.get_write_buffer_size() <= TCP_WRITE_HIGH_WATER + 1024
        assert sent > 10 * TCP_WRITE_HIGH_WATER
        # It sends nothing more: dropped at the idle timeout (a close would wait forever
        # for it to read), and its slot is free again.
        await until(lambda: not dns._connections, "the non-reader to be dropped", 3.0)
        sock.close()
        assert await answered_on_a_new_connection(dns.bound)


async def test_bytes_dripped_without_a_whole_query_do_not_keep_a_connection() -> None:
    async with running_dns(tcp_idle_timeout_s=0.5) as dns:
        reader, writer = await open_from(dns.bound)
        started = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionError):
            for byte in FRAMED * 10:  # one byte every 0.1 s: never a whole query in time
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
                if reader.at_eof():
                    break
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert asyncio.get_running_loop().time() - started < 0.5 + 0.5
        writer.close()


async def test_one_client_address_holds_at_most_a_quarter_of_the_connections() -> None:
    async with running_dns(tcp_max_connections=8) as dns:
        mine = [await open_from(dns.bound) for _ in range(3)]
        assert [await answered(*c) for c in mine] == [True, True, False]
        other = await open_from(dns.bound, "127.0.0.2")
        assert await answered(*other)
        mine[0][1].close()
        await until(lambda: len(dns._connections) == 2, "a connection to be released", 3.0)
        assert await answered_on_a_new_connection(dns.bound)  # a slot for it again
        for _, writer in (*mine, other):
            writer.close()


async def test_a_forwarded_query_is_answered_after_the_client_half_closes() -> None:
    async with (
        upstream() as (addr, _fake),
        running_dns(upstream=addr, upstream_timeout_s=1.0) as dns,
    ):
        reader, writer = await open_from(dns.bound)
        query = make_query("example.com.")
        writer.write(len(query).to_bytes(2, "big") + query)
        writer.write_eof()  # the last query: nothing more from this client
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3))
        reply = dnslib.DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), 3))
        assert [str(r.rdata) for r in reply.rr] == ["192.0.2.1"]
        assert await asyncio.wait_for(reader.read(), 3) == b""  # then it closes
        writer.close()


class Held(asyncio.DatagramProtocol):
    """An upstream that counts the queries it gets and holds them unanswered until
    release(); then it answers them, and any later one at once."""

    def __init__(self) -> None:
        self.seen = 0
        self.held: list[tuple[bytes, tuple[str, int]]] = []
        self.released = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        self.held.append((data, addr))
        if self.released:
            self.release()

    def release(self) -> None:
        self.released = True
        for data, addr in self.held:
            reply = dnslib.DNSRecord.parse(data).reply()
            self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]
        self.held.clear()


async def pipelined(writer: asyncio.StreamWriter, count: int) -> list[int]:
    """`count` queries for names outside the zone in one write; their IDs."""
    queries = [make_query(f"n{i}.example.com.") for i in range(count)]
    writer.write(b"".join(len(q).to_bytes(2, "big") + q for q in queries))
    return [int.from_bytes(q[:2], "big") for q in queries]


async def answers(reader: asyncio.StreamReader, count: int) -> list[dnslib.DNSRecord]:
    out = []
    for _ in range(count):
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5))
        out.append(dnslib.DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), 5)))
    return out


async def test_one_connection_has_at_most_16_queries_at_the_forwarder() -> None:
    """Forwarded answers are written when the upstream gives them, so the high-water mark
    could not hold them back: a client that pipelined 300 queries for 60 KB TXT answers
    and read none had 13 MB queued for it (1.05 MB now). Its further queries wait unread
    until forwards come back, and each still gets its answer."""
    async with (
        fake_upstream(Held) as (addr, fake),
        running_dns(upstream=addr, upstream_timeout_s=5.0) as dns,
    ):
        assert dns.forwarder is not None
        reader, writer = await open_from(dns.bound)
        ids = await pipelined(writer, 40)
        await until(lambda: fake.seen >= TCP_FORWARDS_PER_CONNECTION, "16 forwards", 3.0)
        await asyncio.sleep(0.1)  # time for more, if any would go
        assert len(dns.forwarder.pending) == fake.seen == TCP_FORWARDS_PER_CONNECTION
        fake.release()
        replies = await answers(reader, 40)
        assert sorted(r.header.id for r in replies) == sorted(ids)
        assert {dnslib.RCODE[r.header.rcode] for r in replies} == {"NOERROR"}
        assert fake.seen == 40
        writer.close()


async def test_forwards_refused_at_once_do_not_nest_a_call_per_query() -> None:
    """With the client's share of the forwarder full, each forward is answered SERVFAIL
    from inside the call that made it; resuming the connection's queries from there
    nested one call per buffered query (RecursionError past about a thousand)."""
    async with (
        fake_upstream(Held) as (addr, _fake),
        running_dns(upstream=addr, upstream_timeout_s=5.0) as dns,
    ):
        assert dns.forwarder is not None
        # One client's share, a quarter of the table, is full one query short of the
        # connection's limit: the 16th forward is refused from inside the call.
        dns.forwarder.max_pending = 4 * (TCP_FORWARDS_PER_CONNECTION - 1)
        reader, writer = await open_from(dns.bound)
        count = 3000
        await pipelined(writer, count)
        refused = await answers(reader, count - TCP_FORWARDS_PER_CONNECTION + 1)
        assert {dnslib.RCODE[r.header.rcode] for r in refused} == {"SERVFAIL"}
        writer.close()


def dual_stack_by_default() -> bool:
    """Whether a socket bound to `::` here takes IPv4 too (Linux: bindv6only 0)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    sysctl = Path("/proc/sys/net/ipv6/bindv6only")
    return not sysctl.exists() or sysctl.read_text().strip() == "0"


@pytest.mark.skipif(not dual_stack_by_default(), reason="no dual-stack IPv6 sockets here")
async def test_a_listener_on_the_ipv6_wildcard_answers_ipv4_over_tcp_as_over_udp() -> None:
    # `--dns-listen [::]:PORT`: the UDP socket takes IPv4 clients, and the TCP listener was
    # IPv6-only, so an IPv4 client's retry of a truncated answer was refused.
    async with running_dns(listen=("::", 0)) as server:
        assert server.bound is not None
        ipv4 = ("127.0.0.1", server.bound[1])
        query = make_query("big.test.svc.clusterset.local.")
        truncated = dnslib.DNSRecord.parse(await exchange("udp", ipv4, query))
        assert truncated.header.tc and not truncated.rr
        whole = dnslib.DNSRecord.parse(await exchange("tcp", ipv4, query))
        assert not whole.header.tc and len(whole.rr) == 200
        whole6 = dnslib.DNSRecord.parse(await exchange("tcp", ("::1", server.bound[1]), query))
        assert len(whole6.rr) == 200


async def rrl_answers(addr: tuple[str, int], source: str, count: int) -> list[bool]:
    """Send `count` queries from `source` at once; for each answer received within 0.3 s
    after the last, whether it was whole (False: truncated by RRL)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        for _ in range(count):
            await loop.sock_sendto(sock, QUERY, addr)
        answers = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                while True:
                    answer = dnslib.DNSRecord.parse(await loop.sock_recv(sock, 4096))
                    answers.append(not answer.header.tc)
        return answers


@pytest.mark.skipif(not dual_stack_by_default(), reason="no dual-stack IPv6 sockets here")
async def test_a_listener_on_the_ipv6_wildcard_rate_limits_each_ipv4_network_apart() -> None:
    # IPv4 clients come as ::ffff:a.b.c.d, whose /56 was all zeros: one flooding client
    # used up the budget of every IPv4 client.
    async with running_dns(listen=("::", 0), rrl_qps=0.01) as server:  # a burst of 1
        assert server.bound is not None and server.rrl is not None
        ipv4 = ("127.0.0.1", server.bound[1])
        assert (await rrl_answers(ipv4, "127.0.0.1", 4)).count(True) == 1
        assert await rrl_answers(ipv4, "127.0.9.1", 1) == [True]  # another /24
        assert len(server.rrl) == 2


async def test_rate_limited_queries_are_counted_as_dropped_or_answered() -> None:
    # They were in no dns_queries_total series: a client network RRL cut off looked idle.
    async with running_dns(rrl_qps=0.01) as server:  # a burst of 1
        assert server.bound is not None and server.rrl is not None
        answers = await rrl_answers(server.bound, "127.0.0.1", 6)
        assert answers.count(True) == 1 and server.rrl.dropped and server.rrl.slipped
        counts = server.stats.counts
        assert counts.get(("udp", "other", "dropped")) == server.rrl.dropped
        assert counts.get(("udp", "A", "NOERROR")) == 1 + server.rrl.slipped  # slipped: TC
        assert sum(counts.values()) == 6
