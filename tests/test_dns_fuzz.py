"""Fuzzing the query path: ≥ 100 000 random and mutated packets into the responder, a few
thousand over real sockets, then valid queries must still get exactly the right answer."""

from __future__ import annotations

import asyncio
import random

import dnslib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcsproxy.config import DnsConfig
from mcsproxy.dns.responder import MEMO_MAX_ENTRIES, Forward, Responder
from mcsproxy.store import SnapshotStore
from tests.dns_support import load_store, make_query, running_dns, tcp_exchange, udp_client

SEEDS = [
    make_query("myservice.test.svc.clusterset.local.", "A"),
    make_query("_https._tcp.headless.test.svc.clusterset.local.", "SRV", edns=1232),
    make_query("web-0.cluster-a.headless.test.svc.clusterset.local.", "A", edns=4096),
    make_query("big.test.svc.clusterset.local.", "A"),
    make_query("example.com.", "AAAA"),
    make_query("dns-version.clusterset.local.", "TXT"),
]
PACKETS_PER_EXAMPLE = 1000
EXAMPLES = 100


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[at % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1:  # random byte
            if data:
                data[at % len(data)] = rng.randrange(256)
        elif op == 2:  # truncate
            del data[at:]
        elif op == 3:  # insert junk
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # a compression pointer anywhere
            data[at:at + 2] = (0xC000 | rng.randrange(len(data) + 16)).to_bytes(2, "big")
        elif op == 5 and len(data) >= 12:  # counts
            data[4 + 2 * rng.randrange(4) + 1] = rng.choice((0, 1, 2, 255))
        elif op == 6 and len(data) >= 4:  # flags: QR, opcode, anything
            data[2] = rng.randrange(256)
        else:  # splice another seed's tail
            other = rng.choice(SEEDS)
            data[at:] = other[rng.randrange(len(other)):]
    return bytes(data)


def make_responder() -> Responder:
    store = SnapshotStore("cluster-a")
    load_store(store)
    responder = Responder(DnsConfig(), store.loaded)
    responder.apply(store.current)
    return responder


def check(responder: Responder, packet: bytes, deep: bool) -> None:
    for tcp in (False, True) if deep else (False,):
        answer = responder.respond(packet, tcp)
        if answer is None or isinstance(answer, Forward):
            continue
        assert isinstance(answer, bytes)
        assert len(answer) >= 12 and answer[:2] == packet[:2] and answer[2] & 0x80
        if deep:
            dnslib.DNSRecord.parse(answer)  # everything we send must be well-formed


def assert_still_correct(responder: Responder) -> None:
    assert len(responder.memo) <= MEMO_MAX_ENTRIES
    fresh = make_responder()
    for seed in SEEDS:
        assert responder.respond(seed, False) == fresh.respond(seed, False)
    reply = dnslib.DNSRecord.parse(responder.respond(SEEDS[0], False))  # type: ignore[arg-type]
    assert [str(r.rdata) for r in reply.rr] == ["127.240.0.10"]


def test_fuzz_100k_mutated_and_random_packets() -> None:
    responder = make_responder()
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1), base=st.sampled_from(SEEDS))
    def mutated(seed: int, base: bytes) -> None:
        nonlocal sent
        rng = random.Random(seed)
        for i in range(PACKETS_PER_EXAMPLE):
            packet = mutate(rng, base) if i % 10 else rng.randbytes(rng.randrange(64))
            check(responder, packet, deep=i % 50 == 0)
        sent += PACKETS_PER_EXAMPLE

    mutated()
    assert sent >= 100_000
    assert_still_correct(responder)


@settings(max_examples=2000, deadline=None, database=None)
@given(packet=st.binary(max_size=300) | st.builds(
    lambda head, labels, tail: head + b"".join(bytes([len(x)]) + x for x in labels) + tail,
    st.binary(min_size=12, max_size=12),
    st.lists(st.binary(min_size=0, max_size=70), max_size=6),
    st.binary(max_size=20),
))
def test_fuzz_structured_packets(packet: bytes) -> None:
    responder = _shared_responder()
    check(responder, packet, deep=True)


_RESPONDERS: list[Responder] = []


def _shared_responder() -> Responder:
    if not _RESPONDERS:
        _RESPONDERS.append(make_responder())
    return _RESPONDERS[0]


async def test_fuzz_over_real_sockets() -> None:
    rng = random.Random(1645)
    async with running_dns() as server:
        good = SEEDS[0]
        async with udp_client(server.bound) as (transport, proto):
            for i in range(3000):
                transport.sendto(mutate(rng, rng.choice(SEEDS)))
                if i % 100 == 99:
                    await asyncio.sleep(0)  # let the server's loop read what we sent
        # A fresh socket, so that no answer to the junk can be mistaken for this one. The
        # junk may have overflowed the socket buffer, and UDP drops: retry as a stub does.
        async with udp_client(server.bound) as (transport, proto):
            for _ in range(25):
                transport.sendto(good)
                try:
                    raw = await asyncio.wait_for(proto.answers.get(), 0.2)
                    break
                except TimeoutError:
                    continue
            reply = dnslib.DNSRecord.parse(raw)
            assert reply.header.id == dnslib.DNSRecord.parse(good).header.id
            assert [str(r.rdata) for r in reply.rr] == ["127.240.0.10"]
        frames = [mutate(rng, rng.choice(SEEDS)) for _ in range(300)]
        # Junk frames on a TCP connection: the server answers or drops each, never hangs
        # the connection for the frames after; a fresh connection works.
        _reader, writer = await asyncio.open_connection(*server.bound)
        writer.write(b"".join(len(f).to_bytes(2, "big") + f for f in frames))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        [raw] = await tcp_exchange(server.bound, good)
        assert [str(r.rdata) for r in dnslib.DNSRecord.parse(raw).rr] == ["127.240.0.10"]
