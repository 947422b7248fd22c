"""The batched UDP path (mcsproxy/dns/batch.py): many queries read by one recvmmsg and
answered by one sendmmsg, each answer to its own sender with its own ID; the paths
around it (first sight of a question, IPv6 senders, a full socket buffer, no recvmmsg)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
from collections.abc import Callable

import dnslib
import pytest

from mcsproxy.config import DnsConfig
from mcsproxy.dns import batch
from mcsproxy.dns.server import DnsServer
from mcsproxy.store import SnapshotStore
from tests.dns_support import TIMEOUT_S, load_store, running_dns

T = "test.svc.clusterset.local."
NAMES = [f"myservice.{T}", f"web-0.cluster-a.headless.{T}", f"nothere.{T}", f"dual.{T}"]

pytestmark = pytest.mark.skipif(not batch.AVAILABLE, reason="no recvmmsg/sendmmsg here")


async def burst(
    addr: tuple[str, int], queries: list[bytes], family: int = socket.AF_INET, clients: int = 1
) -> dict[tuple[int, int], bytes]:
    """Send every query at once (round robin over `clients` sockets), read every answer:
    (client, ID) → answer."""
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(clients)]
    try:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.connect(addr)
        for i, query in enumerate(queries):
            socks[i % clients].send(query)  # blocking: all queued before the server reads
        for sock in socks:
            sock.setblocking(False)
        answers: dict[tuple[int, int], bytes] = {}
        async with asyncio.timeout(TIMEOUT_S):
            while len(answers) < len(queries):
                for c, sock in enumerate(socks):
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        continue
                    key = (c, int.from_bytes(data[:2], "big"))
                    assert key not in answers, "answered twice"
                    answers[key] = data
                await asyncio.sleep(0.001)
        return answers
    finally:
        for sock in socks:
            sock.close()


def queries_for(n: int) -> list[bytes]:
    """n queries with IDs 0..n-1, over a few names, some asked in upper case."""
    out = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        q = dnslib.DNSRecord.question(name.upper() if i % 3 == 0 else name, "A")
        q.header.id = i
        out.append(bytes(q.pack()))
    return out


def check(
    server: DnsServer, answers: dict[tuple[int, int], bytes], queries: list[bytes], clients: int = 1
) -> None:
    """Each answer byte for byte what the responder makes of its query, and a real one."""
    for i, query in enumerate(queries):
        answer = answers[(i % clients, i)]
        assert answer == server.responder.respond(query, False), i
        reply = dnslib.DNSRecord.parse(answer)
        assert reply.q.qname.label == dnslib.DNSRecord.parse(query).q.qname.label
        if b"nothere" in query.lower():
            assert reply.header.rcode == dnslib.RCODE.NXDOMAIN and not reply.rr
        else:
            assert reply.header.rcode == dnslib.RCODE.NOERROR and reply.rr, reply.q


async def test_a_burst_of_500_is_all_answered_each_to_its_id() -> None:
    async with running_dns() as server:
        assert server.bound is not None
        queries = queries_for(500)
        answers = await burst(server.bound, queries, clients=5)
        check(server, answers, queries, clients=5)
        # Twice: the second burst is memo hits only, answered in place in the slots.
        hits_before = sum(server.stats.memo_hits.values())
        answers = await burst(server.bound, queries, clients=5)
        check(server, answers, queries, clients=5)
        assert sum(server.stats.memo_hits.values()) - hits_before == 500


async def test_ipv6_senders_get_first_and_memoised_answers() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    store = SnapshotStore("cluster-a")
    load_store(store)
    server = DnsServer(DnsConfig(listen=("::1", 0)), store)
    await server.start()
    try:
        assert server.bound is not None and server._batch is not None
        queries = queries_for(64)
        for _ in range(2):  # first sight (sender's address decoded), then memo hits
            answers = await burst(server.bound, queries, socket.AF_INET6)
            check(server, answers, queries)
    finally:
        await server.stop()


async def test_a_full_send_buffer_keeps_answers_until_it_drains() -> None:
    async with running_dns() as server:
        assert server.bound is not None and server._batch is not None
        udp = server._batch
        real = udp._sendmmsg
        refused: list[int] = []

        def full_once(*args: object) -> int:
            if not refused:  # as the kernel says when the socket buffer is full
                refused.append(1)
                ctypes.set_errno(errno.EAGAIN)
                return -1
            return real(*args)

        udp._sendmmsg = full_once  # type: ignore[method-assign]
        queries = queries_for(200)
        await burst(server.bound, queries)  # memo filled
        answers = await burst(server.bound, queries)
        check(server, answers, queries)
        assert refused and not udp._pending


async def test_an_unsendable_answer_does_not_stop_the_others() -> None:
    async with running_dns() as server:
        assert server.bound is not None and server._batch is not None
        udp = server._batch
        real: Callable[..., int] = udp._sendmmsg
        failed: list[int] = []

        def first_fails(fd: int, at: int, count: int, flags: int) -> int:
            if not failed and count > 1:  # e.g. EPERM from a firewall for one address
                failed.append(count)
                ctypes.set_errno(errno.EPERM)
                return -1
            return real(fd, at, count, flags)

        queries = queries_for(100)
        await burst(server.bound, queries)  # memo filled
        udp._sendmmsg = first_fails  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(server.bound)
            for query in queries:
                sock.send(query)
            sock.setblocking(False)
            got = []
            try:
                async with asyncio.timeout(1.0):
                    while len(got) < len(queries) - 1:
                        got.append(await loop.sock_recv(sock, 65535))
            except TimeoutError:
                pass
        assert failed
        assert len(got) == len(queries) - 1  # exactly the one that could not go is lost


async def test_without_recvmmsg_the_datagram_transport_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch, "AVAILABLE", False)
    async with running_dns() as server:
        assert server.bound is not None and server._batch is None
        queries = queries_for(40)
        for _ in range(2):
            check(server, await burst(server.bound, queries), queries)


def test_sockaddr_tuple_spells_addresses_as_the_socket_module() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
            name = sock.getsockname()
            raw = (ctypes.c_char * 28)()
            length = ctypes.c_uint32(28)
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.getsockname(sock.fileno(), raw, ctypes.byref(length)) == 0
            assert batch.sockaddr_tuple(family, bytes(raw)) == name
