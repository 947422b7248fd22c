"""Forwarding names outside the zone to one upstream (`--dns-upstream`), over UDP.

Only queries the responder has parsed and found outside its zone come here, so the
gateway never relays anything but plain questions. IDs are remapped (a client cannot
collide with another client's ID or guess ours), the upstream's answer must echo the
question we sent, every query has a timeout, and the table of pending queries is
bounded: when it is full, the client gets SERVFAIL at once. Timeouts are counted and
logged at most once a second: a dead upstream must not turn every query into a log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Final

from mcsproxy.dns.wire import ECHOED_FLAGS, FLAG_QR, HEADER_TAIL, SERVFAIL
from mcsproxy.observability.stats import DnsStats

log = logging.getLogger("mcsproxy.dns.forward")

MAX_PENDING: Final = 4096
LOG_INTERVAL_S: Final = 1.0
Reply = Callable[[bytes], None]


def servfail(query: bytes, question: bytes) -> bytes:
    flags = FLAG_QR | (((query[2] << 8) | query[3]) & ECHOED_FLAGS) | SERVFAIL
    return query[:2] + HEADER_TAIL.pack(flags, 1, 0, 0, 0) + question


class _Pending:
    __slots__ = ("query", "question", "reply", "timer")

    def __init__(self, query: bytes, question: bytes, reply: Reply,
                 timer: asyncio.TimerHandle) -> None:
        self.query = query
        self.question = question
        self.reply = reply
        self.timer = timer


class _UpstreamProtocol(asyncio.DatagramProtocol):
    __slots__ = ("forwarder",)

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.forwarder.on_answer(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the pending queries will time out.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("upstream error: %s", exc)


class Forwarder:
    def __init__(self, upstream: tuple[str, int], timeout_s: float, stats: DnsStats,
                 max_pending: int = MAX_PENDING) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.failures = stats.forward_failures
        self._last_timeout_log = 0.0
        self.pending: dict[int, _Pending] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._random = random.Random()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(self), remote_addr=self.upstream
        )
        log.info("dns forwarding names outside the zone to %s:%d", *self.upstream)

    async def stop(self) -> None:
        for entry in self.pending.values():
            entry.timer.cancel()
        self.pending.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def forward(self, query: bytes, question: bytes, reply: Reply) -> None:
        transport = self._transport
        if transport is None or len(self.pending) >= self.max_pending:
            reply(servfail(query, question))
            return
        while True:
            new_id = self._random.getrandbits(16)
            if new_id not in self.pending:
                break
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, new_id)
        self.pending[new_id] = _Pending(query, question, reply, timer)
        transport.sendto(new_id.to_bytes(2, "big") + query[2:])

    def _expire(self, new_id: int) -> None:
        entry = self.pending.pop(new_id, None)
        if entry is not None:
            self.failures["timeout"] += 1
            now = time.monotonic()
            if now - self._last_timeout_log >= LOG_INTERVAL_S:
                self._last_timeout_log = now
                log.warning("upstream %s:%d did not answer within %.1fs; %d timeouts so far",
                            *self.upstream, self.timeout_s, self.failures["timeout"])
            entry.reply(servfail(entry.query, entry.question))

    def on_answer(self, data: bytes) -> None:
        if len(data) < 12 or not data[2] & 0x80:
            return
        new_id = (data[0] << 8) | data[1]
        entry = self.pending.get(new_id)
        if entry is None:
            return  # late (already answered SERVFAIL) or not ours
        question = entry.question
        if data[12:12 + len(question)].lower() != question.lower():
            return  # not the answer to what we asked: keep waiting for the real one
        del self.pending[new_id]
        entry.timer.cancel()
        entry.reply(entry.query[:2] + data[2:])
