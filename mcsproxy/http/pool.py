"""Upstream side: one keep-alive connection to an endpoint, and the idle pool per endpoint.

An `UpstreamConn` parses responses with llhttp (strict) and hands them to the `Exchange`
bound to it; between requests it sits in its endpoint's `EndpointPool`. A pooled
connection is checked before reuse (closed, said anything, or idle too long: dropped) and
the pool is bounded: beyond `pool_max_idle` a returning connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from itertools import islice
from typing import TYPE_CHECKING, Any, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from mcsproxy.http.wire import (
    CONNECTION,
    CONTENT_LENGTH,
    DROP,
    PLAIN_CONNECTION,
    RESPONSE_FIELDS,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    FieldLines,
    chunked_unlike_llhttp,
    connection_tokens,
    response_fields_at,
    status_of,
    tail_bytes,
    transfer_codings,
    trimmed,
)
from mcsproxy.upstream.upstream_set import SILENT_WAIT
from mcsproxy.writebatch import HOLD_BELOW

if TYPE_CHECKING:
    from mcsproxy.http.engine import HttpEngine
    from mcsproxy.http.server import Exchange
    from mcsproxy.upstream import Host, UpstreamSet

log = logging.getLogger("mcsproxy.http")

# Request bytes queued towards an endpoint before the client's reading pauses.
UPSTREAM_WRITE_HIGH_WATER: Final = 256 * 1024
# Linux only; elsewhere the delayed-ACK stall below is left as it is.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
# Linux's struct tcp_info up to tcpi_last_ack_recv (UpstreamConn.unacked_ms).
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
TCP_INFO_LEN: Final = 60
# SO_LINGER on, 0 s: closing sends RST (ClientConnection.reset and cut, UpstreamConn.abort).
RESET_LINGER: Final = struct.pack("ii", 1, 0)
# What a connection the gateway cut itself (UpstreamConn.abort) reports as lost with: a
# reset, so no peer takes the cut stream for a complete one.
CUT_BY_GATEWAY: Final = ConnectionAbortedError("cut by the gateway")


class StopParsing(Exception):
    """Raised from a parser callback to stop parsing a response nobody asked for."""


class UpstreamConn(asyncio.Protocol):
    """One connection to an endpoint; at most one request in flight on it."""

    __slots__ = (
        "began",
        "chunked",
        "codings",
        "conn_close",
        "conn_tokens",
        "cut",
        "dated",
        "dead",
        "discarding",
        "exchange",
        "fields",
        "head_parts",
        "idle_since",
        "interim",
        "keep_alive",
        "length",
        "parser",
        "plain",
        "pool",
        "read",
        "received",
        "reused",
        "sent",
        "sock",
        "status",
        "tail",
        "te",
        "transport",
        "tunnel",
        "upgrade",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.sock: Any = None  # for setsockopt
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.tunnel: Any = None  # the client connection once upgraded
        self.idle_since = 0.0
        self.dead = False
        self.cut = False  # ended by abort(): lost as a reset, whatever the transport says
        self.discarding = False  # reading the rest of a response no one wants (retried)
        self.interim = False
        # Taken from the pool (not opened for this request), and whether any byte of the
        # current response arrived: a reused connection that ends before it is the
        # keep-alive race (the endpoint closed it idle), not a failure of the endpoint.
        self.reused = False
        self.began = False
        self.keep_alive = False
        self.fields = FieldLines()  # the field lines to forward
        # The read being parsed until a response ends in it (b"" otherwise): a response
        # that begins in it begins at its start (see on_message_begin).
        self.read = b""
        # The status code as read at the start of `read` (-1: not there; see status_of).
        self.status = -1
        # The head keeps its connection as llhttp decides without asking it (see
        # on_headers_complete): `HTTP/1.1` read at its place, and no field that could
        # close it (Connection, or a hop-by-hop one: llhttp takes Proxy-Connection for
        # Connection).
        self.plain = False
        self.length: bytes | None = None
        self.chunked = False
        self.te: bytes | None = None  # Transfer-Encoding as received
        self.codings: bytes | None = None  # its codings other than a final chunked
        self.conn_tokens: list[bytes] | None = None
        self.conn_close = False  # a plain `Connection: close` (token lists: conn_tokens)
        self.upgrade: bytes | None = None
        self.dated = False  # the response has a Date field (see Exchange.response_head)
        # Of a chunked response: how many of `fields.parts` are its head's (those after are its
        # trailer fields; set by Exchange.response_head, which joins the head from them).
        # And the bytes read while a head or a trailer section may be under way, which
        # llhttp holds until it ends (see on_message_begin and on_chunk_header; -1: not now).
        self.head_parts = 0
        self.tail = -1
        # Bytes written to and read from the endpoint since the last fold (the metrics
        # read them live while the connection serves a request or a tunnel).
        self.sent = 0
        self.received = 0

    # -- transport events -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(UPSTREAM_WRITE_HIGH_WATER)
        sock = self.sock = transport.get_extra_info("socket")
        # Keepalive and TCP_USER_TIMEOUT: a pooled connection, a response under way or a
        # tunnel to an endpoint whose cluster fell silent (no RST comes) ends in bounded
        # time instead of at the idle timeout; what it served is cut as for a reset.
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already: connection_lost follows
                for level, option, value in self.pool.engine.http.endpoint_options:
                    sock.setsockopt(level, option, value)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.idle = 0
            tunnel.transport.write(data)
            return
        ex = self.exchange
        if ex is None and not self.discarding:
            # An idle pooled connection must stay silent; anything else desynchronises it.
            self.dead = True
            self.transport.abort()
            return
        client = ex.client if ex is not None else None
        self.read = data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            ex = self.exchange
            if ex is not None:
                ex.upgraded(self, data[exc.args[0]:])
        except HttpParserError as exc:
            self.fail(f"malformed response ({exc})")
        self.read = b""
        if self.tail >= 0:
            self.count_tail(len(data))
        if self.began and self.exchange is not None:
            self.ack_now()
        if self.discarding:  # the unwanted response did not end within this read
            self.discarding = False
            self.dead = True
            self.transport.abort()
        if client is not None:
            client.idle = 0
            if client.out:
                if len(data) < HOLD_BELOW:  # see mcsproxy/writebatch.py
                    client.flush_soon()
                else:
                    client.flush()

    def fold(self) -> tuple[int, int]:
        """Add the bytes since the last fold to the cluster's counters; (sent, received)."""
        sent, received = self.sent, self.received
        if sent or received:
            stats = self.pool.host.stats
            stats.bytes_to_upstream += sent
            stats.bytes_to_client += received
            self.sent = self.received = 0
        return sent, received

    def ack_now(self) -> None:
        """A response is under way and this read did not end it: acknowledge now.

        On a request-response connection Linux delays its ACK up to 40 ms, hoping to send
        it with the next request. An endpoint that holds a response's short last segment
        until the bytes sent before it are acknowledged (Nagle's rule: nginx with sendfile
        and tcp_nopush, whose keep-alive connections are uncorked without TCP_NODELAY)
        would wait for that ACK: measured here, about 0.3 % of 64 KiB responses came
        40-50 ms late and wrk's p99 was 33 ms instead of 8 ms. One setsockopt per read
        that leaves a response unfinished; a response read whole costs nothing."""
        if TCP_QUICKACK is not None and self.sock is not None:
            # Closing under us (OSError): nothing is waiting for this ACK any more.
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)

    def unacked_ms(self) -> int:
        """How long what was sent here has gone unacknowledged, in ms (0: all of it was
        acknowledged), from TCP_INFO (tcpi_unacked, tcpi_last_ack_recv). An endpoint that
        is slow to answer still acknowledges the request; a blackholed one does not."""
        sock = self.sock
        if sock is None or TCP_INFO is None:
            return 0
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LEN)
        except OSError:
            return 0
        if len(info) < TCP_INFO_LEN:
            return 0
        unacked, = struct.unpack_from("I", info, 24)
        last_ack_recv, = struct.unpack_from("I", info, 56)
        return int(last_ack_recv) if unacked else 0

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            return self.tunnel.tunnel_upstream_eof()  # type: ignore[no-any-return]
        return False  # close; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if exc is None and self.cut:
            # Aborted transports report a clean close: a body delimited by the close
            # would end as complete, and a tunnel's client get a FIN.
            exc = CUT_BY_GATEWAY
        if self in self.pool.tunnels:
            self.pool.release_tunnel(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.upstream_closed(exc)
            return
        ex = self.exchange
        if ex is not None:
            ex.upstream_lost(self, exc)
        else:
            self.fold()  # the tail of a response being discarded
            self.pool.forget(self)

    def pause_writing(self) -> None:
        peer = self.tunnel if self.tunnel is not None else (
            self.exchange.client if self.exchange is not None else None)
        if peer is not None:
            peer.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        peer = self.tunnel if self.tunnel is not None else (
            self.exchange.client if self.exchange is not None else None)
        if peer is not None:
            peer.resume(PAUSE_UPSTREAM)

    def fail(self, why: str) -> None:
        ex = self.exchange
        if ex is not None:
            ex.upstream_failed(self, why)
        else:
            self.dead = True
            self.transport.abort()

    def abort(self) -> None:
        """End the connection now, with a RST (the upstream set's drain grace, the
        gateway's stop, a tunnel whose client reset): the endpoint must not take a cut
        upload or tunnel for a complete one, and what it served is cut as for its own
        reset (connection_lost)."""
        self.cut = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
        self.transport.abort()

    @property
    def closed_while_idle(self) -> bool:
        """Taken from the pool and ended before any byte of the answer: the keep-alive
        race (the endpoint closed it idle as the request went out), not its failure."""
        return self.reused and not self.began

    def cluster_silent(self, waited_s: float = 0.0) -> None:
        """The endpoint's cluster answered nothing for a whole connect timeout (see
        UpstreamSet.connect_failed): a request still waiting for its first response byte
        here would wait out its per-try timeout (15 s by default). It fails now and is
        retried elsewhere like one that timed out; a response under way is left alone, and
        so is a connection not read while its client does not read (Exchange.bind).
        `waited_s`: the silence was found through another endpoint of the cluster; only a
        request sent that long ago (its body whole) and unacknowledged as long fails, as
        a timeout of this one: an endpoint slow to answer has acknowledged it."""
        ex = self.exchange
        if ex is not None and not self.began and self.tunnel is None \
                and not ex.client.write_paused:  # (not read while its client is paused)
            if not waited_s:
                self.fail(f"no answer, {self.pool.host.cluster} silent")
            elif ex.try_deadline - self.pool.engine.http.per_try_timeout_s \
                    <= self.pool.engine.now - waited_s \
                    and self.unacked_ms() >= waited_s * 1000:
                # (TCP_INFO read only for a request already waiting that long.)
                self.fail(SILENT_WAIT)

    # -- response parser callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        if self.exchange is None and not self.discarding:
            # A second response in the read that ended ours: nobody asked for it, and a
            # connection that sent it is out of step. fail() drops it from the pool.
            raise StopParsing
        self.began = True
        # The head: counted from this read, whole (what came before it in the read is at
        # most an interim response), until on_headers_complete.
        self.tail = 1
        fields = self.fields
        fields.reset()
        read = self.read
        if read:
            # No response ended earlier in this read, so this one begins at its start
            # (the one before ended with the previous read): its lines are looked for
            # there, and its status code read there.
            fields.find_in(read, response_fields_at(read))
            status = self.status = status_of(read)
            self.plain = status >= 0 and read[5] == 49 and read[7] == 49
        else:
            self.status = -1
            self.plain = False
        self.length = None
        self.chunked = False
        self.te = self.codings = None
        self.conn_tokens = None
        self.conn_close = False
        self.upgrade = None
        self.dated = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every field of every response: kept short. Trailer fields (after a
        # chunked body) land here too, after the head went out: those kept in
        # `fields.parts` (after head_parts) are forwarded by Exchange.response_done; what the others
        # set is reset by on_message_begin before anyone reads it again.
        kind = RESPONSE_FIELDS.of(name)
        fields = self.fields
        if not kind:
            fields.take(name, value)  # joined once into the response head
            # Date, compared rather than a kind: a kind of its length costs every response
            # a look-up (+405 instructions, 1 %, bench/http/micro.py); this, ~40 for Date
            # and ~5 for a field of another length. A first byte other than d or D
            # spares the lowercased copy (Vary, ETag, Link).
            if len(name) == 4 and (name == b"Date" or (
                    name[0] | 32 == 100 and name.lower() == b"date")):
                self.dated = True
            return
        ex = self.exchange
        if kind == TRAILER and ex is not None and ex.http11:
            fields.take(name, value)
            return
        fields.skip(name, value)
        if kind == CONTENT_LENGTH:
            self.length = trimmed(value)  # sent on in our framing
        elif kind == DROP:
            self.plain = False  # Proxy-Connection among them (see on_headers_complete)
        elif kind == TRANSFER_ENCODING:
            self.te = value if self.te is None else self.te + b", " + value
        elif kind == CONNECTION:
            # keep-alive compared first: a look-up in the set hashes each new value (~320
            # instructions a response, bench/http/micro.py), a compare costs ~40.
            if value == b"keep-alive" or value in PLAIN_CONNECTION:
                if value[0] in b"cC":
                    self.conn_close = True
                return
            if self.conn_tokens is None:
                self.conn_tokens = []
            self.conn_tokens.append(value)
        elif kind == UPGRADE:
            self.upgrade = trimmed(value)

    def on_headers_complete(self) -> None:
        self.tail = -1
        self.fields.end()
        ex = self.exchange
        if ex is None:
            return
        # The head as a whole, held to the limits of a request head.
        over = self.over_limits(0)
        if over is not None:
            self.too_large(over)
            return
        parser = self.parser
        # get_status_code is a generic call from compiled code (~160 instructions a
        # response, bench/http/micro.py): asked only when the head did not begin a read.
        status = self.status if self.status >= 0 else parser.get_status_code()
        if self.plain and self.length is not None and self.te is None \
                and self.conn_tokens is None and not self.conn_close:
            # What llhttp's should_keep_alive answers here, without the generic call
            # (~170 instructions a response, bench/http/micro.py): HTTP/1.1 closes only
            # on a close token of Connection (or Proxy-Connection), and a response
            # framed by Content-Length and no Transfer-Encoding needs no EOF to end.
            self.keep_alive = True
        else:
            self.keep_alive = parser.should_keep_alive()
        if ex.is_head and not self.keep_alive:
            self.keep_alive = self.head_keeps_alive()
        if self.te is not None:
            # Only a final chunked frames the body; `gzip` alone runs until the close.
            self.chunked, self.codings = transfer_codings(self.te)
            if self.chunked and chunked_unlike_llhttp(self.te):
                # We would frame the body to the client as chunked, llhttp parse it as
                # running until the close: the client got the endpoint's chunk framing as
                # content, then, the endpoint keeping its connection, waited out the idle
                # timeout and a reset.
                self.chunked = False
                self.fail("malformed response (Transfer-Encoding llhttp reads otherwise)")
                return
            if self.chunked:
                # llhttp (strict) refuses Content-Length after chunked in the trailer
                # section as in a head, and so cut the whole response; in trailers it
                # frames nothing and is dropped (NOT_IN_TRAILERS). The head was checked
                # already; on_message_complete makes the parser strict again.
                parser.set_dangerous_leniencies(lenient_chunked_length=True)
        if status < 200 and status != 101:
            if status < 100:
                # llhttp takes any three digits; RFC 9110 15 knows 100-599 (above 599:
                # Exchange.response_head). 000 and 099 were forwarded as interim answers
                # (`HTTP/1.1 0 `), the client then left waiting for a 504.
                self.fail(f"malformed response (status {status})")
                return
            self.interim = True
            ex.interim(status, self)
            return
        self.interim = False
        ex.response_head(status, self)

    def head_keeps_alive(self) -> bool:
        """Whether an answer to HEAD leaves its connection open. llhttp takes an answer
        framed by neither Content-Length nor chunked for one whose body runs until the
        close, and so never keeps its connection; but an answer to HEAD ends with its head
        (RFC 9112 6.3), and the endpoint meant to keep the connection unless it said close.
        HTTP/1.0 answers stay closed: keeping one open needs a keep-alive we do not track."""
        if self.conn_close or self.parser.get_http_version() != "1.1":
            return False
        return self.conn_tokens is None or b"close" not in connection_tokens(self.conn_tokens)

    def over_limits(self, start: int) -> str | None:
        """The header limit that the field lines of `fields.parts` from `start` (the
        head's: 0; a trailer section's: head_parts, one line an item) exceed, if any. The
        count always; the size only when the bytes read since the request went out exceed
        the limit (the section is within them), which a small answer's never do."""
        http = self.pool.engine.http
        fields = self.fields
        parts = fields.parts
        if (fields.count if start == 0 else len(parts) - start) > http.max_headers:
            return f"{http.max_headers} fields"
        if self.received > http.max_header_bytes and \
                sum(map(len, islice(parts, start, None))) > http.max_header_bytes:
            return f"{http.max_header_bytes} bytes"
        return None

    def on_chunk_header(self) -> None:
        # After each chunk size line (chunked responses only): body bytes follow, or,
        # after the last one, the trailer section. llhttp holds a field until it ends,
        # so the section is bounded here, by the reads that bring no body (count_tail).
        self.tail = 0

    def on_chunk_complete(self) -> None:
        self.tail = -1

    def count_tail(self, n: int) -> None:
        """A read that ended inside a head, or after a chunk size line with no body since
        (the trailer section's)."""
        self.tail = tail_bytes(self.tail, n)
        limit = self.pool.engine.http.max_header_bytes
        if self.tail > limit:
            self.too_large(f"{limit} bytes")

    def too_large(self, over: str) -> None:
        """A head or trailer section over the header limits (`over`): never held whole.
        The endpoint connection is closed and upstream_failed treats it as any failure of
        the endpoint: before a response byte went out, 502 (or a retry, for a replayable
        request), blamed for outlier ejection; after (a trailer section), the response to
        the client is cut, as it must not look complete. The head and the trailer section
        of one response are told apart by `chunked`, set only once the head is over."""
        self.tail = -1
        what = "trailer section" if self.chunked else "response head"
        if log.isEnabledFor(logging.WARNING):
            log.warning("endpoint %s:%d: %s over %s: %s", self.pool.host.address,
                        self.pool.host.port, what, over,
                        "response cut" if self.chunked else "closed")
        self.fail(f"{what} too large")

    def on_body(self, body: bytes) -> None:
        if self.tail >= 0:
            self.tail = -1  # a chunk's data: not the trailer section
        ex = self.exchange
        if ex is not None:
            ex.response_body(body)
        elif not self.discarding:
            # Body bytes after a HEAD answer (the endpoint sent the body anyway, read by
            # the parser skip_body replaced): the connection is out of step.
            self.dead = True
            self.transport.abort()

    def skip_body(self) -> None:
        """The answer to a HEAD request ended with its head, whatever length or coding it
        announces. llhttp would wait for that body (httptools cannot tell it the request
        was HEAD), so the connection gets a fresh parser and stays reusable; the old one
        parses what is left of this read, which must be nothing (see on_body)."""
        self.parser = HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.read = b""  # a response after this one in the read begins inside it
        if self.interim:
            self.interim = False
            return
        if self.chunked:  # the next head is strict again (see on_headers_complete)
            self.parser.set_dangerous_leniencies(lenient_chunked_length=False)
        ex = self.exchange
        if ex is not None:
            ex.response_done(self)
        elif self.discarding:
            self.discarding = False
            if self.keep_alive:
                self.pool.put(self)
            else:
                self.transport.close()


PAUSE_UPSTREAM: Final = 4  # the client connection's pause reason: an endpoint's buffer is full


class EndpointPool:
    """Idle keep-alive connections to one endpoint, newest last (reused first)."""

    __slots__ = ("engine", "host", "idle", "tail", "tail_close", "tail_keep_alive", "tunnels",
                 "upstream")

    def __init__(self, engine: HttpEngine, host: Host, upstream: UpstreamSet) -> None:
        self.engine = engine
        self.host = host
        self.upstream = upstream
        self.idle: list[UpstreamConn] = []
        self.tunnels: set[UpstreamConn] = set()
        name = engine.http.cluster_header
        cluster_header = (f"{name}: {host.cluster}\r\n".encode() if name is not None else b"")
        # The end of every response head from this endpoint, built once: Via, the
        # cluster header, the Connection header if any, the empty line.
        tail = engine.via + cluster_header
        self.tail = tail + b"\r\n"
        self.tail_close = tail + b"Connection: close\r\n\r\n"
        self.tail_keep_alive = tail + b"Connection: keep-alive\r\n\r\n"  # to HTTP/1.0

    def take(self) -> UpstreamConn | None:
        idle = self.idle
        if not idle:
            return None
        limit = self.engine.now - self.engine.http.pool_idle_timeout_s
        while idle:
            up = idle.pop()
            if up.dead or up.transport.is_closing():
                continue
            if up.idle_since < limit:
                up.transport.close()
                continue
            up.reused = True
            up.began = False
            return up
        return None

    def put(self, up: UpstreamConn) -> None:
        # Not asked whether its transport is closing (a generic call, ~135 instructions a
        # request): put comes from the connection's own reads, after which only a
        # close of ours (dead set) ends it, or from a tick; one that a reset ended
        # meanwhile is passed over by take and dropped by connection_lost (forget).
        if up.dead or self.host.removed or len(self.idle) >= self.engine.http.pool_max_idle:
            up.transport.close()
            return
        up.idle_since = self.engine.now
        self.idle.append(up)

    def forget(self, up: UpstreamConn) -> None:
        if up in self.idle:
            self.idle.remove(up)

    def connect(self) -> asyncio.Task[Any]:
        loop = asyncio.get_running_loop()
        host = self.host
        return loop.create_task(loop.create_connection(self._make, host.address, host.port))

    def _make(self) -> UpstreamConn:
        return UpstreamConn(self)

    def hold_tunnel(self, up: UpstreamConn) -> None:
        self.tunnels.add(up)

    def release_tunnel(self, up: UpstreamConn) -> None:
        self.tunnels.discard(up)
        up.fold()
        self.upstream.release(self.host, up)

    def sweep(self, now: float) -> None:
        """Close connections idle longer than the pool's idle timeout (oldest are first)."""
        idle = self.idle
        limit = now - self.engine.http.pool_idle_timeout_s
        n = 0
        while n < len(idle) and idle[n].idle_since < limit:
            idle[n].transport.close()
            n += 1
        if n:
            del idle[:n]
        if self.host.removed:
            for up in idle:
                up.transport.close()
            idle.clear()

    def close(self) -> None:
        for up in self.idle:
            up.transport.abort()
        self.idle.clear()
        for up in list(self.tunnels):
            up.abort()
