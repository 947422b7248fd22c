"""The DNS listeners: UDP and TCP on one port, answering from the Responder.

UDP's hot path is in `batch.BatchedUdp` (Linux): queries read by recvmmsg, one dict lookup
on each query's bytes after its ID, the answer written over the query, all answers out
with one sendmmsg. Everything else (first sight of a question, bad input, forwarding, RRL)
goes through `UdpProtocol.datagram_received` and `Responder.respond`; without recvmmsg
UdpProtocol serves uvloop's datagram transport alone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from time import perf_counter
from typing import Final, cast

from mcsproxy.clientcounts import ClientCounts, client_share
from mcsproxy.config import DnsConfig
from mcsproxy.dns import batch
from mcsproxy.dns.forward import Forwarder, Reply
from mcsproxy.dns.guard import AllowList, ResponseRateLimit, parse_networks
from mcsproxy.dns.responder import Forward, Responder
from mcsproxy.model import Snapshot
from mcsproxy.observability.stats import DnsStats
from mcsproxy.store import SnapshotStore

log = logging.getLogger("mcsproxy.dns")

UDP_RCVBUF_BYTES: Final = 1 << 20  # absorbs bursts while the loop is busy elsewhere
TCP_WRITE_HIGH_WATER: Final = 64 * 1024  # stop reading queries while answers pile up
# Queries of one TCP connection at the forwarder at a time; beyond, its next queries wait
# unread. The high-water mark cannot hold forwarded answers back: they are written when
# the upstream answers, so a client that pipelined 300 TXT queries for big answers and
# read none had 13 MB queued for it (64 MB at its 1,024 pending), and as much again on
# each new connection. With this, at most 64 KiB more than 16 answers.
TCP_FORWARDS_PER_CONNECTION: Final = 16
TCP_BACKLOG: Final = 256
BIND_ATTEMPTS: Final = 10  # port 0: the UDP port picked may be taken for TCP
_NO_MEMO: Final[dict[bytes, bytes]] = {}


class UdpProtocol(asyncio.DatagramProtocol):
    __slots__ = (
        "hits",
        "memo_get",
        "respond",
        "rrl",
        "sendto",
        "server",
        "sock_sendto",
        "stats",
        "transport",
    )

    def __init__(self, server: DnsServer, sock: socket.socket) -> None:
        self.server = server
        self.memo_get = server.responder.memo.get
        self.respond = server.responder.respond
        # sendto on the socket itself: uvloop's transport turns the address tuple back
        # into a sockaddr through getaddrinfo on every call, a visible share of a query.
        self.sock_sendto = sock.sendto
        self.transport: asyncio.DatagramTransport | None = None
        self.stats = server.stats
        # Memo hits counted per answer (bytes hash once, cached): labels come at scrape time.
        self.hits = server.stats.memo_hits
        self.rrl = server.rrl

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's; the methods are what counts.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.sendto = self.server.udp_send

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        rrl = self.rrl
        if rrl is not None and not rrl.allow(addr[0]):
            limited = rrl.limited(data, self.server.responder.truncated)
            # Counted like any other answer or drop: the limit must not hide from
            # dns_queries_total the very queries it turns away.
            self.stats.count_answer("udp", limited)
            if limited is not None:
                self.sendto(limited, addr)
            return
        tail = self.memo_get(data[2:])
        if tail is not None:
            hits = self.hits
            hits[tail] = hits.get(tail, 0) + 1
            try:
                self.sock_sendto(data[:2] + tail, addr)
            except OSError:
                self.sendto(data[:2] + tail, addr)
            return
        started = perf_counter()
        try:
            answer = self.respond(data, False)
        except Exception:
            log.exception("dns: failed to answer a %d-byte query from %s", len(data), addr[0])
            answer = self.server.responder.server_failure(data, False)
        if isinstance(answer, Forward):
            if not self.server.allow.allows(addr[0]):
                answer = self.server.responder.refused(data, False)
            else:
                self.server.forward(data, answer, self._reply_to(addr), "udp", addr[0])
                return
        self.stats.count_answer("udp", answer)
        if answer is not None:
            self.sendto(answer, addr)
            self.stats.latency["built"].observe(perf_counter() - started)

    def _reply_to(self, addr: tuple[str, int]) -> Reply:
        def reply(answer: bytes) -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.sendto(answer, addr)

        return reply

    def error_received(self, exc: Exception) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dns udp error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class TcpProtocol(asyncio.Protocol):
    """One TCP client: 2-byte length framing, several queries, an idle timeout."""

    __slots__ = (
        "answering",
        "buffer",
        "eof",
        "forwarding",
        "last_active",
        "loop",
        "paused",
        "peer",
        "server",
        "timer",
        "transport",
    )

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        # When the last complete query arrived (or the connection opened): only whole
        # queries keep a connection alive, so a client dripping bytes is timed out too.
        self.last_active = self.loop.time()
        self.paused = False  # answers are piling up unread: no more are made
        self.forwarding = 0  # queries sent on to the forwarder, not answered yet
        self.answering = False  # _answer_buffered's loop is running
        self.eof = False  # the client half-closed: close once those are answered
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        if not self.server.admit(self):
            cast(asyncio.Transport, transport).abort()
            return
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)
        self.timer = self.loop.call_later(self.server.config.tcp_idle_timeout_s, self._idle)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._answer_buffered()

    def _answer_buffered(self) -> None:
        # Complete messages are answered until the answers back up (pause_writing) or
        # the forwarder holds TCP_FORWARDS_PER_CONNECTION of them: the rest waits in the
        # buffer, which then holds at most one read beyond that, and reading is paused
        # until the client takes its answers or the upstream gives them.
        if self.answering:
            # A forward answered at once (SERVFAIL: the forwarder is full) calls back in
            # here from the loop below, which goes on by itself: recursing would nest a
            # call per buffered query.
            return
        self.answering = True
        try:
            buffer = self.buffer
            while (len(buffer) >= 2 and not self.paused
                   and self.forwarding < TCP_FORWARDS_PER_CONNECTION):
                size = (buffer[0] << 8) | buffer[1]
                if len(buffer) < size + 2:
                    break
                message = bytes(buffer[2 : size + 2])
                del buffer[: size + 2]
                self.last_active = self.loop.time()
                self._answer(message)
                if self.transport is None:
                    return
        finally:
            self.answering = False

    def _answer(self, message: bytes) -> None:
        started = perf_counter()
        try:
            answer = self.server.responder.respond(message, True)
        except Exception:
            log.exception("dns: failed to answer a %d-byte TCP query", len(message))
            answer = self.server.responder.server_failure(message, True)
        if isinstance(answer, Forward):
            if not self.server.allow.allows(self.peer):
                answer = self.server.responder.refused(message, True)
            else:
                self.forwarding += 1
                if self.forwarding >= TCP_FORWARDS_PER_CONNECTION and self.transport:
                    self.transport.pause_reading()
                self.server.forward(message, answer, self._forwarded, "tcp", self.peer)
                return
        stats = self.server.stats
        stats.count_answer("tcp", answer)
        if answer is not None:
            self._send(answer)
            stats.latency["built"].observe(perf_counter() - started)

    def _send(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(answer).to_bytes(2, "big") + answer)

    def _forwarded(self, answer: bytes) -> None:
        self.forwarding -= 1
        self._send(answer)
        transport = self.transport
        if transport is None:
            return
        if self.eof and not self.forwarding:
            transport.close()
        elif self.forwarding == TCP_FORWARDS_PER_CONNECTION - 1 and not self.paused:
            transport.resume_reading()
            self._answer_buffered()

    def eof_received(self) -> bool:
        # A client may send its last query and half-close at once: answers still owed
        # by the forwarder go out before the close.
        self.eof = True
        return self.forwarding > 0

    def _idle(self) -> None:
        if self.transport is None:
            return
        left = self.last_active + self.server.config.tcp_idle_timeout_s - self.loop.time()
        if left > 0:
            self.timer = self.loop.call_later(left, self._idle)
        else:
            self.close()

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            if self.forwarding < TCP_FORWARDS_PER_CONNECTION:
                self.transport.resume_reading()
            self._answer_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        self.server.release(self)

    def close(self) -> None:
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # it does not read its answers: a close would wait forever
            else:
                self.transport.close()


def _listen_error(exc: OSError, where: str) -> OSError:
    """The bare errno text would not say which of the gateway's listeners failed."""
    return OSError(exc.errno, f"--dns-listen {where}: {exc.strerror}")


def _tcp_socket(udp: socket.socket, host: str, port: int) -> socket.socket:
    """The TCP listener beside the UDP socket, bound as it is. create_server(host, port)
    would bind every address a host name resolves to, and make a socket on `::` IPv6-only
    where the UDP one takes IPv4 too (Linux's default): IPv4 clients got UDP answers,
    truncated ones included, and were refused when they retried over TCP."""
    sock = socket.socket(udp.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if udp.family == socket.AF_INET6:
            v6only = udp.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class DnsServer:
    """The gateway component: listeners, responder, optional forwarder."""

    def __init__(self, config: DnsConfig, store: SnapshotStore) -> None:
        self.config = config
        self.store = store
        self.responder = Responder(config, store.loaded)
        self.stats = DnsStats()
        self.forwarder = (
            Forwarder(config.upstream, config.upstream_timeout_s, self.stats)
            if config.upstream
            else None
        )
        self.allow = AllowList(parse_networks(config.allow_from))
        self.rrl = ResponseRateLimit(config.rrl_qps) if config.rrl_qps > 0 else None
        self.bound: tuple[str, int] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_sock: socket.socket | None = None  # owned by self._udp once it exists
        self._batch: batch.BatchedUdp | None = None  # instead of self._udp where available
        self._tcp: asyncio.AbstractServer | None = None
        self._connections: set[TcpProtocol] = set()
        self._refused_logged = False
        self._per_client = ClientCounts()  # open TCP connections per client address
        self._refused_clients: set[str] = set()  # refusals logged (once per episode)
        self._subscribed = False

    # -- snapshots ---------------------------------------------------------------------
    def on_snapshot(self, snapshot: Snapshot) -> None:
        rebuilt = self.responder.apply(snapshot)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dns zone version=%d rebuilt=%d services", snapshot.version, rebuilt)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if not self._subscribed:
            self.store.subscribe(self.on_snapshot)
            self._subscribed = True
        if self.store.current.version:
            self.on_snapshot(self.store.current)
        if self.forwarder is not None:
            await self.forwarder.start()
        try:
            await self._bind()
        except BaseException:
            if self.forwarder is not None:
                await self.forwarder.stop()
            raise
        assert self.bound is not None
        log.info(
            "dns listening on %s:%d domain=%s", self.bound[0], self.bound[1], self.config.domain
        )

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.listen
        for attempt in range(BIND_ATTEMPTS):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise _listen_error(exc, f"{host}:{port}/udp") from None
            sock.setblocking(False)
            self._udp_sock = sock
            udp: asyncio.DatagramTransport | batch.BatchedUdp
            if batch.AVAILABLE:
                protocol = UdpProtocol(self, sock)
                # RRL comes before the memo: with it on, every query takes the full path.
                memo_get = protocol.memo_get if self.rrl is None else _NO_MEMO.get
                udp = self._batch = batch.BatchedUdp(
                    loop, sock, memo_get, protocol.hits, protocol.datagram_received
                )
                protocol.connection_made(udp)  # type: ignore[arg-type]
            else:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda sock=sock: UdpProtocol(self, sock),  # type: ignore[misc]
                    sock=sock,
                )
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF_BYTES)
            except OSError as exc:
                log.debug("dns: cannot enlarge the UDP receive buffer: %s", exc)
            bound_port = sock.getsockname()[1]
            try:
                self._tcp = await loop.create_server(
                    lambda: TcpProtocol(self),
                    sock=_tcp_socket(sock, host, bound_port),
                    backlog=TCP_BACKLOG,
                )
            except OSError as exc:
                udp.close()
                self._batch = None
                if port == 0 and exc.errno == errno.EADDRINUSE and attempt + 1 < BIND_ATTEMPTS:
                    continue
                raise _listen_error(exc, f"{host}:{bound_port}/tcp") from None
            if self._batch is None:
                self._udp = cast(asyncio.DatagramTransport, udp)
            self.bound = (host, bound_port)
            return

    async def stop(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
        for conn in list(self._connections):
            conn.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None
        if self._batch is not None:
            self._batch.close()
            self._batch = None
            self._udp_sock = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
            self._udp_sock = None
        if self.forwarder is not None:
            await self.forwarder.stop()
        # Let the transports' close callbacks run before the loop goes away.
        await asyncio.sleep(0)

    # -- used by the protocols ---------------------------------------------------------
    def udp_send(self, answer: bytes, addr: tuple[str, int]) -> None:
        if self._batch is not None:
            self._batch.sendto(answer, addr)
            return
        if self._udp_sock is None:
            return
        try:
            self._udp_sock.sendto(answer, addr)
        except BlockingIOError:
            if self._udp is not None:
                self._udp.sendto(answer, addr)  # queued by the transport until writable
        except OSError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dns: cannot answer %s: %s", addr[0], exc)

    def admit(self, conn: TcpProtocol) -> bool:
        limit = self.config.tcp_max_connections
        if len(self._connections) >= limit:
            if not self._refused_logged:
                log.warning("dns: %d TCP connections open, refusing more", len(self._connections))
                self._refused_logged = True
            return False
        # One address never holds every slot: a quarter of them at most.
        if not self._per_client.take(conn.peer, client_share(limit)):
            if conn.peer not in self._refused_clients:
                self._refused_clients.add(conn.peer)
                log.warning(
                    "dns: %s holds %d TCP connections, refusing more from it",
                    conn.peer,
                    self._per_client[conn.peer],
                )
            return False
        self._connections.add(conn)
        return True

    def release(self, conn: TcpProtocol) -> None:
        if conn not in self._connections:
            return  # refused at accept
        self._connections.discard(conn)
        if not self._per_client.give(conn.peer):
            self._refused_clients.discard(conn.peer)
        if len(self._connections) < self.config.tcp_max_connections:
            self._refused_logged = False

    def forward(
        self, query: bytes, forward: Forward, reply: Reply, transport: str, client: str
    ) -> None:
        assert self.forwarder is not None
        started = perf_counter()
        stats = self.stats

        def counted(answer: bytes) -> None:
            stats.count_answer(transport, answer)
            stats.latency["forwarded"].observe(perf_counter() - started)
            reply(answer)

        self.forwarder.forward(
            query, forward.question, counted, client, transport == "tcp", forward.opt
        )
