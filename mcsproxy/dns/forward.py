"""Forwarding names outside the zone to one upstream (`--dns-upstream`), over UDP.

Only queries the responder has parsed and found outside its zone come here, so the
gateway never relays anything but plain questions. IDs are remapped (a client cannot
collide with another client's ID or guess ours), the upstream's answer must echo the
question we sent, every query has a timeout, and the table of pending queries is
bounded: when it is full, or when the client's address already holds a quarter of it
(one client pipelining thousands of queries must not starve the others), the client
gets SERVFAIL at once. Those refusals and timeouts are counted and logged at most once a
second: a dead upstream must not turn every query into a log line.

Against off-path spoofing (RFC 5452) a forged answer must guess the source port as well
as the ID: IDs come from `secrets`, and queries leave through a small pool of connected
UDP sockets, each on a port the kernel picked at random; an answer counts only on the
socket its query left from. Each socket is replaced after a few dozen queries or
seconds, so the ports keep moving; a socket per query would cost ~20 us more per query
and a file descriptor per pending query. Replacements are opened off the query's path,
the old socket serving until its successor is ready.

DNS 0x20 adds a guess more: the question goes upstream with the case of its letters
drawn at random (one bit of secret per letter), and the answer's question must echo it
byte for byte. The client gets its own case back in the question; the records keep the
upstream's. An upstream that does not preserve case (rare) fails that check like a forgery
does: its answers are dropped and counted as mismatched (`case`), with a warning at most
once a second, and its queries time out.

A client that asked over TCP cannot retry a truncated answer (TC=1) anywhere: when the
upstream truncates, the gateway asks it again over TCP, within the same timeout, and
hands on that answer (the truncated one if the upstream does not take TCP).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Final, cast

from mcsproxy.clientcounts import ClientCounts, client_share
from mcsproxy.dns.wire import (
    ECHOED_FLAGS,
    FLAG_QR,
    FLAG_TC,
    HEADER_TAIL,
    NOERROR,
    NXDOMAIN,
    SERVFAIL,
)
from mcsproxy.observability.stats import DnsStats
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("mcsproxy.dns.forward")

MAX_PENDING: Final = 4096
LOG_INTERVAL_S: Final = 1.0
POOL_SIZE: Final = 8  # sockets in use at a time, a query goes out on a random one
ROTATE_AFTER_QUERIES: Final = 32  # a socket is replaced after carrying this many queries
ROTATE_AFTER_S: Final = 10.0  # ... or after this long, so quiet times do not pin ports
# Replaced sockets stay open until their queries are answered or time out; with them, no
# more than this many are open (over it, rotation waits).
MAX_SOCKETS: Final = 64
MAX_TCP_RETRIES: Final = 64  # truncated answers asked again over TCP at a time
Reply = Callable[[bytes], None]
LONE_ADDITIONAL: Final = b"\x00\x00\x00\x00\x00\x01"  # an, ns, ar counts: one additional
ROOT_OPT: Final = b"\x00\x00\x29"  # a record owned by the root, of type OPT
# 0x20 where a byte is an ASCII letter, 0 elsewhere: the bits 0x20 may flip. Label lengths
# (at most 63) are below "A" (65), so only the letters of a wire name are touched.
_LETTER_BITS: Final = bytes(
    0x20 if chr(b).isascii() and chr(b).isalpha() else 0 for b in range(256)
)


def servfail(query: bytes, question: bytes, opt: bytes) -> bytes:
    """SERVFAIL with the client's question and, for a query with EDNS, our OPT record
    (RFC 6891 6.1.1: an answer to an EDNS query carries one; a client that gets none may
    take the server for one without EDNS and ask again without it)."""
    flags = FLAG_QR | (((query[2] << 8) | query[3]) & ECHOED_FLAGS) | SERVFAIL
    return query[:2] + HEADER_TAIL.pack(flags, 1, 0, 0, 1 if opt else 0) + question + opt


def encode_0x20(question: bytes) -> bytes:
    """`question` with the case of each letter of its name drawn at random (~1 us: two
    big-int operations rather than a loop over the bytes)."""
    name = question[:-4]
    size = len(name)
    flips = int.from_bytes(name.translate(_LETTER_BITS), "big") & secrets.randbits(8 * size)
    return (int.from_bytes(name.lower(), "big") ^ flips).to_bytes(size, "big") + question[-4:]


class _Socket(asyncio.DatagramProtocol):
    """A UDP socket connected to the upstream (the kernel drops datagrams from elsewhere).

    A datagram transport rather than add_reader on a bare socket: uvloop stops watching
    a socket for good once an ICMP error is pending on it (a down upstream)."""

    __slots__ = ("forwarder", "opened", "replacing", "retired", "sent", "transport", "waiting")

    def __init__(self, forwarder: Forwarder, opened: float) -> None:
        self.forwarder = forwarder
        self.opened = opened
        self.sent = 0
        self.waiting = 0  # pending queries sent on it
        self.replacing = False  # its successor is being opened
        self.retired = False  # out of the pool: closed once nothing waits on it
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's; the methods are what counts.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.forwarder.on_answer(data, self)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the pending queries will time out.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("upstream error: %s", exc)


class _Pending:
    __slots__ = (
        "asked",
        "client",
        "opt",
        "packet",
        "query",
        "question",
        "reply",
        "retry",
        "tcp",
        "timer",
        "via",
    )

    def __init__(
        self,
        query: bytes,
        question: bytes,
        packet: bytes,
        asked: bytes,
        reply: Reply,
        timer: asyncio.TimerHandle,
        via: _Socket,
        client: str,
        tcp: bool,
        opt: bytes,
    ) -> None:
        self.query = query
        self.question = question  # as the client asked it, its case restored in the answer
        self.packet = packet  # as it went upstream: our ID, the 0x20 question
        self.asked = asked  # the 0x20 question, which the answer must echo exactly
        self.reply = reply
        self.timer = timer
        self.via = via
        self.client = client
        self.tcp = tcp  # the client asked over TCP
        self.opt = opt  # our OPT record for a SERVFAIL of ours (b"" without EDNS)
        self.retry: asyncio.Task[None] | None = None  # asking again over TCP


class Forwarder:
    def __init__(
        self,
        upstream: tuple[str, int],
        timeout_s: float,
        stats: DnsStats,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.failures = stats.forward_failures
        self.mismatches = stats.forward_mismatches
        self._last_timeout_log = 0.0
        self._last_refusal_log = 0.0
        self._last_mismatch_log = 0.0
        self.pending: dict[int, _Pending] = {}
        self.by_client = ClientCounts()  # pending queries per client address
        self.tcp_retries = 0
        self.pool: list[_Socket] = []
        self.sockets: set[_Socket] = set()  # the pool and retired sockets still awaited
        self._opening: set[asyncio.Task[None]] = set()  # successors being opened
        self._family = socket.AF_INET
        self._address: tuple[str, int] | tuple[str, int, int, int] = upstream
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        family, _, _, _, address = (await loop.getaddrinfo(*self.upstream, type=socket.SOCK_DGRAM))[
            0
        ]
        self._family, self._address = family, address
        try:
            for _ in range(POOL_SIZE):
                self.pool.append(await self._open())
        except OSError:
            await self.stop()
            raise
        log.info("dns forwarding names outside the zone to %s:%d", *self.upstream)

    async def stop(self) -> None:
        retries = []
        for entry in self.pending.values():
            entry.timer.cancel()
            if entry.retry is not None:
                retries.append(entry.retry)
        self.pending.clear()
        self.by_client.clear()
        await cancel_and_wait([*retries, *self._opening])
        for conn in list(self.sockets):
            self._close(conn)
        self.pool = []

    async def _open(self) -> _Socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # No bind: connect picks the local port, at random among the free ones (Linux
            # and the BSDs randomise UDP ephemeral ports, RFC 6056).
            sock.connect(self._address)
            _, conn = await loop.create_datagram_endpoint(
                lambda: _Socket(self, loop.time()), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self.sockets.add(conn)
        return conn

    def _close(self, conn: _Socket) -> None:
        self.sockets.discard(conn)
        if conn.transport is not None:
            conn.transport.close()

    def _pick(self) -> _Socket:
        pool = self.pool
        i = secrets.randbelow(len(pool))
        conn = pool[i]
        assert self._loop is not None
        if (
            not conn.replacing
            and (
                conn.sent >= ROTATE_AFTER_QUERIES
                or self._loop.time() - conn.opened >= ROTATE_AFTER_S
            )
            and len(self.sockets) + len(self._opening) < MAX_SOCKETS
        ):
            conn.replacing = True
            task = spawn(self._replace(i, conn), "dns-forward-socket")
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        return conn

    async def _replace(self, i: int, old: _Socket) -> None:
        try:
            fresh = await self._open()
        except OSError as exc:  # out of file descriptors, say: keep the port a while longer
            if log.isEnabledFor(logging.DEBUG):
                log.debug("cannot open a socket to the upstream: %s", exc)
            assert self._loop is not None
            old.replacing, old.sent, old.opened = False, 0, self._loop.time()
            return
        if i >= len(self.pool) or self.pool[i] is not old:
            self._close(fresh)  # stopped meanwhile
            return
        self.pool[i] = fresh
        old.retired = True
        if not old.waiting:
            self._close(old)

    def forward(
        self,
        query: bytes,
        question: bytes,
        reply: Reply,
        client: str,
        tcp: bool = False,
        opt: bytes = b"",
    ) -> None:
        """Ask the upstream; `opt` is the OPT record our own SERVFAIL carries (b"" for a
        query without EDNS)."""
        if not self.pool:
            reply(servfail(query, question, opt))
            return
        if len(self.pending) >= self.max_pending:
            self._refuse(
                query,
                question,
                opt,
                reply,
                "pending_full",
                f"{len(self.pending)} forwards pending",
            )
            return
        if not self.by_client.take(client, client_share(self.max_pending)):
            self._refuse(
                query,
                question,
                opt,
                reply,
                "client_limit",
                f"{client} has {self.by_client[client]} forwards pending",
            )
            return
        while True:
            new_id = secrets.randbits(16)
            if new_id not in self.pending:
                break
        end = 12 + len(question)
        if query[12:end] == question:
            asked = encode_0x20(question)
            packet = new_id.to_bytes(2, "big") + query[2:12] + asked + query[end:]
        else:
            # Only a query dnslib read with its name compressed (a pointer into the
            # header): where the name ends in it is unknown, so it goes as it came.
            asked = question
            packet = new_id.to_bytes(2, "big") + query[2:]
        conn = self._pick()
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, new_id)
        self.pending[new_id] = _Pending(
            query, question, packet, asked, reply, timer, conn, client, tcp, opt
        )
        conn.sent += 1
        conn.waiting += 1
        if conn.transport is not None:
            conn.transport.sendto(packet)

    def _refuse(
        self, query: bytes, question: bytes, opt: bytes, reply: Reply, outcome: str, why: str
    ) -> None:
        self.failures[outcome] += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= LOG_INTERVAL_S:
            self._last_refusal_log = now
            log.warning(
                "dns forward: %s, answering SERVFAIL; %d so far", why, self.failures[outcome]
            )
        reply(servfail(query, question, opt))

    def _done(self, entry: _Pending) -> None:
        entry.timer.cancel()
        self.by_client.give(entry.client)
        conn = entry.via
        conn.waiting -= 1
        if conn.retired and not conn.waiting and conn in self.sockets:
            self._close(conn)

    def _expire(self, new_id: int) -> None:
        entry = self.pending.pop(new_id, None)
        if entry is not None:
            self._done(entry)
            if entry.retry is not None:
                entry.retry.cancel()
            self.failures["timeout"] += 1
            now = time.monotonic()
            if now - self._last_timeout_log >= LOG_INTERVAL_S:
                self._last_timeout_log = now
                log.warning(
                    "upstream %s:%d did not answer within %.1fs; %d timeouts so far",
                    *self.upstream,
                    self.timeout_s,
                    self.failures["timeout"],
                )
            entry.reply(servfail(entry.query, entry.question, entry.opt))

    def on_answer(self, data: bytes, via: _Socket) -> None:
        if len(data) < 12 or not data[2] & 0x80:
            return
        new_id = (data[0] << 8) | data[1]
        entry = self.pending.get(new_id)
        if entry is None or entry.via is not via or entry.retry is not None:
            return  # late (already answered), not ours (wrong port), or asked over TCP
        asked = entry.asked
        if not _answers(data, asked):
            # Not the answer to what we asked, case included: keep waiting for the real one.
            self._mismatched(data, asked)
            return
        if entry.tcp and data[2] & (FLAG_TC >> 8) and self.tcp_retries < MAX_TCP_RETRIES:
            entry.retry = spawn(self._retry_tcp(new_id, entry, data), "dns-forward-tcp")
            return
        del self.pending[new_id]
        self._done(entry)
        entry.reply(_for_client(entry, data))

    def _mismatched(self, answer: bytes, asked: bytes) -> None:
        """An answer with a pending query's ID (and port) but not its question: forged, or
        from an upstream that does not keep the case of the question (`case`)."""
        echoed = answer[12 : 12 + len(asked)]
        reason = "case" if echoed.lower() == asked.lower() else "question"
        self.mismatches[reason] += 1
        now = time.monotonic()
        if now - self._last_mismatch_log >= LOG_INTERVAL_S:
            self._last_mismatch_log = now
            why = (
                "its question in another letter case (an upstream that does not "
                "preserve case defeats DNS 0x20)"
                if reason == "case"
                else "another question (forged?)"
            )
            log.warning(
                "dns forward: dropped an answer from %s:%d with %s; %d so far",
                *self.upstream,
                why,
                self.mismatches[reason],
            )

    async def _retry_tcp(self, new_id: int, entry: _Pending, truncated: bytes) -> None:
        self.tcp_retries += 1
        answer = truncated  # if the upstream does not take TCP, the best there is
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(*self._address[:2])
            packet = entry.packet  # the same ID and 0x20 question as over UDP
            writer.write(len(packet).to_bytes(2, "big") + packet)
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
            asked = entry.asked
            if len(data) >= 12 and data[:2] == packet[:2]:
                if _answers(data, asked):
                    answer = data
                else:
                    self._mismatched(data, asked)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("upstream's TCP answer does not match the query")
        except (OSError, asyncio.IncompleteReadError) as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("cannot ask the upstream over TCP: %s", exc)
        finally:
            self.tcp_retries -= 1
            if writer is not None:
                writer.close()
        # Still ours: not timed out (that cancels this task) nor stopped.
        if self.pending.get(new_id) is entry:
            del self.pending[new_id]
            self._done(entry)
            entry.reply(_for_client(entry, answer))


def _answers(answer: bytes, asked: bytes) -> bool:
    """Whether an upstream answer (of at least a header) may answer the question `asked`:
    it echoes it byte for byte, or it is an error without a question section, as servers
    send FORMERR (an upstream that cannot read EDNS: the client's cue to ask without it)
    or REFUSED. That has nothing to echo; dnsdist takes it on ID and port alone too, and
    dropping it left the client waiting for the timeout's SERVFAIL and logged a forgery."""
    if answer[12 : 12 + len(asked)] == asked:
        return True
    return answer[4:6] == b"\x00\x00" and answer[3] & 0x0F not in (NOERROR, NXDOMAIN)


def _for_client(entry: _Pending, answer: bytes) -> bytes:
    """The upstream's answer, which echoes `entry.asked`, with the client's ID and its
    question as the client wrote it (the same length: only the case differs).

    An error without a question gets the client's: Go's stub resolver ignores a UDP
    answer without its question and waits out its timeout. What followed the header is
    kept only when it is a lone OPT record, which names nothing a pointer could reach
    (inserting the question would move whatever a pointer points at)."""
    if answer[4:6] == b"\x00\x00":
        counts, rest = answer[6:12], answer[12:]
        if counts != LONE_ADDITIONAL or rest[:3] != ROOT_OPT or len(rest) < 11:
            counts, rest = bytes(6), b""
        return entry.query[:2] + answer[2:4] + b"\x00\x01" + counts + entry.question + rest
    end = 12 + len(entry.question)
    return entry.query[:2] + answer[2:12] + entry.question + answer[end:]
