"""Bulk data through the TCP proxy keeps every byte, on uvloop and on asyncio's own loop.

The bulk path reads into one shared buffer and hands it to the other side's transport;
a payload that never repeats, and a client that reads slowly so that the transports
queue, would show any byte the buffer's reuse overwrote — also when a buffer given to a
write queue is taken back (ReadBuffer.detach).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from mcsproxy.model import ServicePort
from mcsproxy.proxy.tcp import READ_BUFFER_BYTES, SPARE_BUFFERS, ReadBuffer
from tests.proxy_fixtures import Backend, Clusterset, endpoint, free_port

WEB = ServicePort("web", "TCP", 80)
PAYLOAD_BYTES = 8 * 1024 * 1024
CHUNK = 300_000  # not a multiple of the read buffer, so reads straddle writes


async def echo_through_proxy(net: int) -> None:
    host = f"127.{net}.1.1"
    backend = await Backend("east-1", host, free_port(host), "east").start()
    cs = Clusterset("east")
    ip = f"127.240.{net}.1"
    cs.publish("bulk", ip, [WEB], [endpoint(host, "east", backend.port)])
    proxy = await cs.proxy()
    payload = os.urandom(PAYLOAD_BYTES)
    try:
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection(ip, 80)

            async def send() -> None:
                for start in range(0, len(payload), CHUNK):
                    writer.write(payload[start:start + CHUNK])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.ensure_future(send())
            got = bytearray()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                got += data
                if len(got) % 7 == 0:
                    await asyncio.sleep(0.001)  # a slow reader: the proxy's queues fill
            await sender
            writer.close()
            await writer.wait_closed()
        expected = b"east-1\n" + payload + b"bye"
        assert len(got) == len(expected)
        assert bytes(got) == expected
    finally:
        await proxy.stop()
        await backend.stop()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_bulk_echo_keeps_every_byte(loop: str) -> None:
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(echo_through_proxy(61 if loop == "uvloop" else 62))


def identities(buffers: list[bytearray]) -> list[int]:
    """Which buffers, not what they hold: fresh ones are all zeros, so == cannot tell."""
    return [id(b) for b in buffers]


def test_a_read_buffer_is_taken_back_only_once_no_queue_holds_it() -> None:
    reads = ReadBuffer()
    first = reads.buf
    queued = reads.view[:10]  # what a transport's write queue keeps of a read
    reads.detach()
    second = reads.buf
    assert second is not first and identities(reads.given) == [id(first)]
    reads.detach()  # the first is still queued: not reused
    third = reads.buf
    assert third is not first and third is not second
    assert identities(reads.given) == [id(first), id(second)]
    del queued  # that write completed
    reads.detach()
    assert reads.buf is first and identities(reads.given) == [id(third), id(second)]
    assert len(reads.view) == READ_BUFFER_BYTES
    reads.view[:3] = b"abc"  # writable, and the whole buffer again
    assert bytes(first[:3]) == b"abc" and len(first) == READ_BUFFER_BYTES


def test_read_buffers_kept_for_reuse_are_bounded() -> None:
    reads = ReadBuffer()
    queued = []
    for _ in range(SPARE_BUFFERS + 5):
        queued.append(reads.view[:1])
        reads.detach()
    assert len(set(identities(reads.given))) == len(reads.given) == SPARE_BUFFERS
