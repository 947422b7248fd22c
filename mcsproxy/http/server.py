"""Downstream side: one `ClientConnection` Protocol per client, one `Exchange` per request.

The connection owns the llhttp request parser (strict: smuggling shapes are parse errors),
the limits (URI, header count and bytes), the pipeline queue and the pause reasons of its
reading. Parsed requests queue up as `Exchange`s; only the head of the queue talks to an
endpoint, so pipelined requests are answered in order. An exchange picks an endpoint per
request through the shared upstream set, borrows a pooled keep-alive connection (or
opens one), re-frames the request (our own Content-Length or chunked framing, never the
client's bytes verbatim), streams the body both ways with backpressure and decides about
retries: always after a failed connect; after 502/503/504, a reset or a per-try timeout
only for idempotent requests whose body is absent or small enough to replay, and only
within the route's retry budget (a replay over it waits for a slot). A reused keep-alive
connection that ends before any response byte is the keep-alive race: a replayable
request goes once more to the same endpoint on a new connection.

Everything written to the client goes through `out` and leaves in one write (writev)
per read event. Timeouts are checked by the engine's tick (`check`), so the data path only
stores numbers and never arms a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import sys
import termios
from collections import deque
from fcntl import ioctl
from math import inf as INF
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, NoReturn

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from mcsproxy.http.pool import PAUSE_UPSTREAM, RESET_LINGER, EndpointPool, UpstreamConn
from mcsproxy.http.wire import (
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    EXPECT,
    EXPECT_UNSUPPORTED,
    HEAD_TIMEOUT,
    HEADERS_TOO_LARGE,
    HOST,
    HTTP_VERSION,
    IDEMPOTENT,
    INVALID_HOST,
    LAST_CHUNK,
    MALFORMED,
    MAX_FORWARDS,
    MAX_FORWARDS_CAP,
    MAX_FORWARDS_REACHED,
    MAX_REQUEST_ID,
    NEVER_NOMINATED,
    NO_CONTENT,
    NOT_IN_TRAILERS,
    PLAIN_CONNECTION,
    REQUEST_FIELDS,
    RTSP_ONLY_METHODS,
    SHARED_METHODS,
    STATUS_LINES,
    TOO_MANY_HEADERS,
    TOO_MANY_PIPELINED,
    TRACE_METHOD,
    TRANSFER_CODING,
    TRANSFER_ENCODING,
    UNKNOWN_SERVICE,
    UPGRADE,
    URI_TOO_LONG,
    VALID_HOSTS,
    X_FORWARDED_FOR,
    X_REQUEST_ID,
    FieldLines,
    connection_tokens,
    drop_fields,
    host_is_valid,
    plain_request_line,
    request_fields_at,
    status_line,
    switches_as_offered,
    tail_bytes,
    trailer_section,
    trimmed,
)
from mcsproxy.upstream.upstream_set import CONNECT_VERDICT_DELAY_S, PER_TRY_TIMEOUT, SILENT_WAIT

if TYPE_CHECKING:
    from mcsproxy.http.engine import HttpEngine, HttpRoute, HttpSettings
    from mcsproxy.http.frontdoor import FrontDoor
    from mcsproxy.proxy.context import ListenerContext
    from mcsproxy.upstream import Host, UpstreamSet

log = logging.getLogger("mcsproxy.http")

# Pause reasons of a client connection's reading (a bit each).
PAUSE_PIPELINE: Final = 1  # too many requests queued behind the one in flight
PAUSE_UNSENT: Final = 2  # body bytes waiting for an endpoint connection
# PAUSE_UPSTREAM = 4 (pool.py): the endpoint connection's write buffer is full
PAUSE_TUNNEL: Final = 8  # the tunnelled peer's write buffer is full

# Ends of a tunnel seen (ClientConnection.tunnel_eofs); CLIENT_EOF also when a client
# half-closes outside a tunnel.
CLIENT_EOF: Final = 1
UPSTREAM_EOF: Final = 2
BOTH_EOF: Final = 3

# Why a request failed whose endpoint connection its drain grace cut (Exchange.upstream_lost).
CUT_BY_DRAIN: Final = "endpoint removed, its drain grace over"

MAX_PIPELINE: Final = 16  # queued requests at which reading pauses
MAX_QUEUED: Final = 128  # ... and beyond which one read's further requests are refused (429)
# While the gateway drains, a keep-alive connection idle this long is closed. Not at once:
# a client that just got an answer may have its next request on the way (an idle close
# races it), and every answer now says Connection: close anyway.
DRAIN_IDLE_S: Final = 0.5
LINGER_S: Final = 1.0
# A client that sent FIN after whole requests may have half-closed (it still reads: its
# answers are owed) or closed its socket (nothing will read them): the two look the same
# until data reaches it, when a closed socket answers RST. An answer not begun this long
# after the FIN is preceded by a 100 Continue (RFC 9110 15.2: an HTTP/1.1 client parses
# a 1xx it did not expect) to tell them apart; a quicker answer is its own test.
PROBE_AFTER_S: Final = 0.25
PROBE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# An HTTP/1.0 client must not get a 1xx (RFC 9110 15.2): it gets one byte of TCP urgent
# data instead. A closed socket answers it with RST as it would any data; a reading one
# takes it out of band, never into the stream it parses (nor is its socket woken for
# it) unless it asked for SO_OOBINLINE, which no HTTP client does.
URGENT_PROBE: Final = b"\n"
# Linux only: the state of our end, read without disturbing the socket (its first byte).
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
TCP_CLOSE: Final = 7  # the peer reset the connection
# Linux only: the bytes of our end's send queue not yet acknowledged (SIOCOUTQ).
OUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
UNSENT_HIGH_WATER: Final = 256 * 1024
SMALL_CHUNK: Final = 4096  # body chunks below this are joined per read (request) or framed in one
MAX_PIECES: Final = 16  # output pieces of one read written as they are; more are joined first
CLIENT_WRITE_HIGH_WATER: Final = 256 * 1024
RETRY_STATUSES: Final = frozenset({502, 503, 504})
NO_BODY_STATUSES: Final = frozenset({204, 304})

# An absolute-form request target: scheme, authority (no userinfo), path and query.
ABSOLUTE_FORM: Final = re.compile(rb"(?i)https?://([a-z0-9._~!$&'()*+,;=%:\[\]-]+)([/?][^#]*)?\Z")

# The queue of an idle connection (see ClientConnection.check): shared, and a tuple, so
# that a request appended to it would fail loudly instead of being lost.
NO_REQUESTS: Final[Any] = ()

# The method of most requests, recognised in the read (on_headers_complete): one object.
GET: Final = b"GET"

# time.monotonic as a compiled static: an imported name is looked up in the module's
# dict at every use from compiled code (~100 instructions), a Final one is not. Read
# twice a request (Exchange t0 and account).
MONOTONIC: Final = monotonic

# Response framing towards the client.
RAW: Final = 0
CHUNKED: Final = 1


# Outcome label of a request answered by an endpoint, by status // 100 (0, 6-9: other). A
# tuple: compiled, an index is a C call; a dict's get hashed a new int (~150 instructions).
# Made by a call: mypyc builds a Final tuple written as a literal anew at every use.
STATUS_CLASSES: Final = tuple(["other", "1xx", "2xx", "3xx", "4xx", "5xx",
                               "other", "other", "other", "other"])


def request_parser(protocol: object) -> HttpRequestParser:
    """llhttp's request parser calling back `protocol` (a ClientConnection), taking any
    HTTP-version of the form HTTP/d.d (RFC 9112 2.3). Strict, llhttp refuses all but 0.9,
    1.0, 1.1 and 2.0 alike (400): RFC 9110 wants 505 for a major version we do not speak
    (15.6.6) and 1.2-1.9 processed as 1.1 (2.5), as nginx does (ClientConnection
    on_headers_complete tells them apart). No other leniency comes with it: only the
    version check. Per parser, ~300 instructions (the keyword argument)."""
    parser = HttpRequestParser(protocol)
    parser.set_dangerous_leniencies(lenient_version=True)
    return parser


# What the request line's protocol is (ClientConnection.line_protocol).
NOT_HTTP: Final = 0  # RTSP/x.y or ICE/x.y, which llhttp parses too
HTTP_1: Final = 1  # HTTP/1.x, seen in the line's bytes
HTTP_ANY: Final = 2  # HTTP (not RTSP or ICE), its major version not looked at


class Closing(Exception):
    """Raised by on_message_begin to stop parsing a read once an answer in it closed the
    connection (see CLOSING)."""


# Built once: raised for every request a client sends after an answer that ends its
# connection, in the read that brought both.
CLOSING: Final = Closing()


class RequestError(Exception):
    """A request we refuse; raised inside parser callbacks, answered by data_received.
    `reason` is its label in mcsproxy_http_refused_total: one of REFUSAL_REASONS, never
    text from the request (the label set stays bounded)."""

    def __init__(self, status: int, text: str, reason: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.reason = reason


class ClientConnection(asyncio.Protocol):
    """One downstream connection: parsing, limits, the pipeline and flow control."""

    __slots__ = (
        "broken",
        "chunks",
        "client_ip",
        "closed",
        "conn_tokens",
        "current",
        "cutting",
        "engine",
        "expect",
        "fields",
        "flush_held",
        "front",
        "fwd",
        "has_request_id",
        "head_bytes",
        "head_since",
        "host",
        "hsize",
        "idle",
        "idle_since",
        "in_head",
        "keep_alive_asked",
        "last",
        "length",
        "limit_key",
        "line_at",
        "line_held",
        "lingering",
        "max_forwards",
        "may_close",
        "nheaders",
        "out",
        "owed",
        "parser",
        "paused",
        "probe_at",
        "queue",
        "read",
        "read_holder",
        "reading",
        "request_error",
        "route",
        "tail",
        "te",
        "transport",
        "tunnel",
        "tunnel_eofs",
        "upgrade",
        "upgrading",
        "url",
        "write_paused",
        "xff",
    )

    def __init__(self, engine: HttpEngine, route: HttpRoute | None,
                 front: FrontDoor | None = None) -> None:
        self.engine = engine
        self.route = route
        self.front = front
        self.flush_held = False  # flush_soon's call is waiting in engine.writes
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # The parser and the queue of an idle connection are dropped by check() and made
        # again by its next read: an empty deque alone holds a block of 64 slots (760 B).
        self.parser: HttpRequestParser | None = request_parser(self)
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None  # the request being parsed (its body)
        # The latest request parsed, until it is answered on a connection that stays
        # open: an idle keep-alive connection holds no request.
        self.last: Exchange | None = None
        self.out: list[bytes] = []
        # Small chunks of this read's request body (see on_body), made by the first one.
        self.chunks: list[bytes] | None = None
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.lingering = False  # answered and half-closed; reading what is left, then close
        self.cutting = False  # an answer broke off: RST once what was queued is sent (cut)
        self.broken: bytes | None = None  # an error answer owed after the queue drains
        self.request_error: RequestError | None = None
        self.tunnel: UpstreamConn | None = None
        self.tunnel_eofs = 0  # CLIENT_EOF | UPSTREAM_EOF once the ends half-close
        self.probe_at = INF  # when a client that sent FIN is probed (see PROBE_AFTER_S)
        self.upgrading: Exchange | None = None
        # Parsing a read, and the exchange whose request bytes wait for the rest of it
        # (Exchange.send).
        self.reading = False
        self.read_holder: Exchange | None = None
        # The read being parsed (b"" between reads: none is kept), and where in it the next
        # request line begins, when known: 0 when the read began between requests, until
        # its first head is parsed; else -1 (see line_protocol).
        self.read = b""
        self.line_at = -1
        # The reads of a head that did not end in them (None: the head under way, if any,
        # began in this read): its request line may be split over them (line_protocol).
        self.line_held: bytearray | None = None
        # An answer of ours held until the end of the read (Exchange.fail).
        self.owed: Exchange | None = None
        self.idle = 0
        self.in_head = True  # waiting for the first request's head from accept on
        self.head_since = engine.now
        self.idle_since = engine.now
        self.head_bytes = 0
        self.client_ip = b""
        self.fwd = b""
        self.limit_key: str | None = None  # counted by the listener's connection limits
        self.fields = FieldLines()
        self.tail = -1  # a chunked body's trailer section, as UpstreamConn.tail
        self._reset_head()

    def on_message_begin(self) -> None:
        if self.lingering:
            # An answer that closes the connection went out during this read (an error of
            # ours answered before the request body, which is read on and dropped): RFC 9112
            # 9.6, nothing after it is processed. The next request used to be parsed, sent
            # to an endpoint (a POST ran there unanswered) and its answer written after our
            # FIN: "Cannot call write() after write_eof()", logged as a fatal error.
            raise CLOSING
        self.in_head = True
        self.head_since = self.engine.now
        # Bytes of this head seen so far, counted per read (so approximate by one read),
        # and at least 1: a head that began is answered 408 when it times out.
        self.head_bytes = 1

    def _reset_head(self) -> None:
        """Once a head is made into a request (and before the first): what it left is
        dropped, not held while the connection waits for the next request. A head that
        fails ends the connection, so no head ever starts from another's leftovers."""
        self.url = b""
        self.fields.reset()
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.conn_tokens: list[bytes] | None = None
        self.keep_alive_asked = False  # a plain Connection: keep-alive (else conn_tokens)
        # A plain Connection: close, or a hop-by-hop field (llhttp takes Proxy-Connection
        # for Connection): what could make llhttp end the connection (on_headers_complete).
        self.may_close = False
        self.te: bytes | None = None
        self.length: bytes | None = None
        self.expect = False
        self.upgrade: bytes | None = None
        self.max_forwards: bytes | None = None
        self.has_request_id = False
        self.nheaders = 0
        self.hsize = 0

    # -- transport events -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        ctx = self.limits()
        if ctx.config.max_connections_per_listener or ctx.config.max_connections_per_client:
            self.limit_key = ctx.admit(peer)
            if self.limit_key is None:
                self.closed = True
                self.transport.abort()
                return
        self.transport.set_write_buffer_limits(CLIENT_WRITE_HIGH_WATER)
        self.client_ip, self.fwd = self.engine.client_headers(peer[0] if peer else "unknown")
        self.engine.clients.add(self)

    def limits(self) -> ListenerContext:
        """What counts this connection against the connection limits: its listener's
        context, or the front door's (whose connections have no route of their own)."""
        if self.route is not None:
            return self.route.ctx
        assert self.front is not None
        return self.front.ctx

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # after our last answer: read and dropped until the client closes
        self.idle = 0
        if self.tunnel is not None:
            self.tunnel.sent += len(data)
            self.tunnel.transport.write(data)
            return
        if self.upgrading is not None:
            self.upgrading.tunnel_data(data)
            return
        if self.in_head:
            self.line_at = -1 if self.head_bytes else 0  # a head under way, or the first
            self.head_bytes += len(data)
        else:
            self.line_at = -1 if self.current is not None else 0  # a body under way, or none
        parser = self.parser
        if parser is None:  # dropped while the connection was idle (check)
            parser = self.parser = request_parser(self)
            self.queue = deque()
        self.reading = True
        self.read = data
        try:
            parser.feed_data(data)
        except HttpParserUpgrade as exc:
            ex = self.last
            if ex is not None and not ex.upgrade and not ex.http11 and self.current is None:
                # An Upgrade we ignore (HTTP/1.0, see on_headers_complete): llhttp stopped
                # after the head all the same. Its body, if any, is read as an upgrade
                # request's (Exchange.tunnel_data); what follows is HTTP for a fresh parser
                # (http_again).
                self.parser = request_parser(self)
                rest = data[exc.args[0]:]
                if ex.upgrade_body:
                    self.upgrading = ex
                    if rest:
                        ex.tunnel_data(rest)
                else:
                    self.http_again(ex, rest)
                return
            if ex is None or not ex.upgrade:
                self.reject(RequestError(400, "unexpected protocol upgrade", MALFORMED))
                return
            if ex.finished:  # answered already (no endpoint): nothing to tunnel
                if ex.keep_alive:  # framed: what follows is HTTP again, as after a refusal
                    self.last = None
                    self.parser = request_parser(self)
                    self.data_received(data[exc.args[0]:])
                else:
                    self.close()
                return
            self.upgrading = ex
            rest = data[exc.args[0]:]
            if rest:
                ex.tunnel_data(rest)
        except HttpParserError as exc:
            self.chunks = None  # of a body that fails with its request
            if self.lingering:
                return  # stopped by CLOSING (on_message_begin), or a close meanwhile: dropped
            last = self.last
            if self.request_error is None and self.current is None and last is not None \
                    and not last.keep_alive:
                # Bytes after a request whose answer ends the connection (Connection:
                # close, HTTP/1.0): RFC 9112 9.6, no further request is processed, and no
                # answer may follow the one that says close. Dropped, as after close().
                self.pause(PAUSE_PIPELINE)
                return
            err = self.request_error or RequestError(400, f"malformed request: {exc}", MALFORMED)
            self.reject(err)
            return
        finally:
            self.reading = False
            self.read = b""
            holder = self.read_holder
            if holder is not None:  # a body that did not end in this read
                self.read_holder = None
                holder.release_read_held()
            owed = self.owed
            if owed is not None:
                self.owed = None
                owed.answer_owed()
        if self.chunks:
            self.send_chunks()
        if self.in_head:  # a head that did not end in this read
            if self.head_bytes > self.engine.http.max_header_bytes:
                self.reject(RequestError(431, "request header fields too large",
                                         HEADERS_TOO_LARGE))
                return
            # Kept for line_protocol, within the header limit: of the read the head began
            # in, no more than a head may hold (what came before it there is others');
            # the later reads are counted by head_bytes, checked above. A bytearray: a
            # client sending its head a byte a read would have each read copy all those
            # before it.
            held = self.line_held
            if held is None:
                self.line_held = bytearray(data[-self.engine.http.max_header_bytes:])
            else:
                held += data
        if self.tail >= 0:
            self.tail = tail_bytes(self.tail, len(data))
            if self.tail > self.engine.http.max_header_bytes:
                self.tail = -1
                self.reject(RequestError(431, "request trailer section too large",
                                         HEADERS_TOO_LARGE))
                return
        if self.out:
            self.flush()

    def eof_received(self) -> bool:
        # A client that half-closes after whole requests (`nc -N`, shutdown(SHUT_WR)) still
        # waits for their answers (RFC 9112 9.6 leaves half-close to the client): they are
        # sent, the last says Connection: close, then we close; one that closed its
        # socket instead is found out by the tick (check, gone). One that stops in the
        # middle of a request has given up on it: the connection and any endpoint
        # connection serving it are closed. Tunnels half-close.
        if self.flush_held:
            self.flush()  # an answer held for the end of the poll goes before any close
        self.tunnel_eofs |= CLIENT_EOF
        if self.tunnel is not None:
            if self.tunnel_eofs == BOTH_EOF:
                return False  # both ways done: close (connection_lost closes the other)
            self.tunnel.transport.write_eof()
            return True
        queue = self.queue
        if queue and self.current is None and self.upgrading is None and not self.lingering:
            queue[-1].keep_alive = False
            self.probe_at = self.engine.now + PROBE_AFTER_S
            return True
        return False

    def tunnel_upstream_eof(self) -> bool:
        """The tunnelled endpoint will send no more: half-close towards the client, which
        may still send (its eof_received ends the tunnel). True keeps the endpoint's
        connection open for that."""
        self.tunnel_eofs |= UPSTREAM_EOF
        if self.tunnel_eofs == BOTH_EOF:
            return False
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError):
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.limit_key is not None:
            self.limits().leave(self.limit_key)
            self.limit_key = None
        self.closed = True
        self.engine.clients.discard(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.tunnel = None
            # A client that reset: the endpoint gets a RST too (abort()), not a FIN.
            tunnel.transport.close() if exc is None else tunnel.abort()
        while self.queue:
            self.queue.popleft().abandon()
        if self.upgrading is not None:
            self.upgrading.abandon()
            self.upgrading = None

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.active_upstream()
        if up is not None:
            up.transport.pause_reading()
            if up.exchange is not None:
                up.exchange.paused_at = MONOTONIC()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.active_upstream()
        if up is not None:
            up.transport.resume_reading()
            ex = up.exchange
            if ex is not None and ex.paused_at:
                # The endpoint was not read meanwhile (its answer may be waiting in the
                # kernel): the time paused for the client is not the endpoint's.
                ex.try_deadline += MONOTONIC() - ex.paused_at
                ex.paused_at = 0.0

    def active_upstream(self) -> UpstreamConn | None:
        if self.tunnel is not None:
            return self.tunnel
        if self.queue:
            return self.queue[0].up
        return self.upgrading.up if self.upgrading is not None else None

    # -- flow control and output ------------------------------------------------------
    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def flush_soon(self) -> None:
        """flush, once the loop has run the rest of this poll's callbacks (see
        mcsproxy/writebatch.py). A flush() meanwhile writes it; so does every path that
        closes or half-closes, each of which flushes first."""
        engine = self.engine
        if engine.loop is None:  # not started (tests that drive a connection by hand)
            self.flush()
        elif self.out and not self.flush_held:
            self.flush_held = True
            engine.writes.later(engine.loop, self)

    def flush_deferred(self) -> None:
        self.flush_held = False
        self.flush()

    def flush(self) -> None:
        out = self.out
        if out:
            if not self.closed:
                if len(out) == 1:
                    self.transport.write(out[0])
                elif len(out) == 2 and len(out[0]) + len(out[1]) < SMALL_CHUNK:
                    # A head and a short body: copied into one write, as the cost of a
                    # writev of two pieces (uvloop's and the kernel's) is more than that.
                    self.transport.write(out[0] + out[1])
                elif len(out) <= MAX_PIECES:
                    # One writev of the pieces: joining them first would copy every body
                    # byte once more (a 64 KiB response is a head and a body piece).
                    self.transport.writelines(out)
                else:
                    # Many pieces (small chunks, many pipelined answers): uvloop would keep
                    # each with its buffer descriptors while the client is slow, far more
                    # memory than the bytes its write limit counts. One copy instead.
                    self.transport.write(b"".join(out))
            out.clear()

    def reject(self, err: RequestError) -> None:
        """A request we cannot parse or accept: answer it in turn, then close."""
        self.in_head = False
        ex = self.current
        if ex is not None and ex.started and not ex.finished:
            # The body of the request in flight is broken: that request fails, we close.
            self.current = None
            ex.keep_alive = False
            ex.fail(err.status, err.text)
            return
        if ex is not None and not ex.started:
            # A queued request whose own body is broken: it is never sent anywhere, and
            # this refusal is its answer, after those of the requests before it.
            self.current = None
            if self.queue and self.queue[-1] is ex:
                self.queue.pop()
        self.engine.count_refused(self.listener_kind(), str(err.status), err.reason)
        if self.log_enabled():
            held = self.engine.refusal_log.take(self.engine.now)
            if held >= 0:
                log.info("client %s: %d %s%s", self.client_ip.decode(), err.status, err.text,
                         f" ({held} more refused since the last line)" if held else "")
        answer = self.engine.errors.build(err.status, err.text, self.engine.date, close=True)
        if self.queue:
            self.broken = answer  # earlier requests are answered first
            self.pause(PAUSE_PIPELINE)
            return
        self.flush()
        self.out.append(answer)
        self.close()

    def listener_kind(self) -> str:
        """The listener_kind label of what this connection came in by."""
        return "listener" if self.front is None else "front_door"

    @staticmethod
    def log_enabled() -> bool:
        return log.isEnabledFor(logging.INFO)

    def close(self) -> None:
        """Lingering close: FIN after the last answer, drop the client's further bytes,
        close on its EOF or after a tick or two. Closing a socket with unread input sends
        RST, which would destroy the answer still on its way to the client."""
        self.flush()
        if self.closed or self.lingering:
            return
        self.lingering = True
        if self.tunnel_eofs & CLIENT_EOF:
            self.transport.close()  # the client half-closed: nothing left to linger for
            return
        self.idle = 0
        self.paused = 0
        try:
            self.transport.write_eof()
            self.transport.resume_reading()
        except (OSError, RuntimeError):
            self.transport.close()

    def abort(self) -> None:
        self.out.clear()
        if not self.closed:
            self.transport.abort()

    def cut(self) -> None:
        """An answer broke off after its first bytes were queued (the endpoint reset, sent
        a malformed chunk or trailer, closed early, went silent): what was queued still
        goes out, and then the connection ends with RST, not FIN, which would make a body
        delimited by the close (an HTTP/1.0 client's) look complete. The RST waits for
        those bytes to be acknowledged, up to LINGER_S (check). Nothing more is read or
        answered: the requests queued behind are abandoned when it is sent."""
        self.flush()
        if self.closed:
            return
        self.closed = self.lingering = self.cutting = True
        self.idle = 0
        with contextlib.suppress(OSError, RuntimeError):
            self.transport.pause_reading()

    def delivered(self) -> bool:
        """Has everything written reached the client (acknowledged, where Linux tells)?"""
        if self.transport.get_write_buffer_size():
            return False
        if OUTQ is None:
            return True
        try:
            fd = self.transport.get_extra_info("socket").fileno()
            return not struct.unpack("i", ioctl(fd, OUTQ, bytes(4)))[0]
        except (OSError, AttributeError):
            return True  # closed meanwhile: nothing left to wait for

    def reset(self) -> None:
        """End the connection with RST (SO_LINGER 0), dropping anything unsent."""
        with contextlib.suppress(OSError, AttributeError):
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
        self.out.clear()
        self.transport.abort()

    # -- request parser callbacks -----------------------------------------------------
    def on_url(self, url: bytes) -> None:
        # One callback for the whole target unless a read split it: taken as it is
        # (compiled, `+=` on a bytes attribute is a generic in-place add, 130-210
        # instructions a request more, bench/http/micro.py).
        self.url = url if not self.url else self.url + url
        if len(self.url) > self.engine.http.max_uri_bytes:
            self.request_error = RequestError(414, "request URI too long", URI_TOO_LONG)
            raise self.request_error

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailer fields of a chunked body too: counted against the same limits (the
        # counts start again after the head), then passed on by on_trailer.
        self.nheaders += 1
        self.hsize += len(name) + len(value) + 4
        http = self.engine.http
        if self.nheaders > http.max_headers:
            self._refuse(431, "too many header fields", TOO_MANY_HEADERS)
        if self.hsize > http.max_header_bytes:
            self._refuse(431, "request header fields too large", HEADERS_TOO_LARGE)
        if not self.in_head:
            self.on_trailer(name, value)
            return
        fields = self.fields
        if self.nheaders == 1 and self.line_at == 0:
            # The read began with this request: its lines are looked for there, and its
            # request line goes on from there too when it is what we would send.
            read = self.read
            at = request_fields_at(read, self.url)
            fields.find_in(read, at, at >= 0 and plain_request_line(read, at))
        kind = REQUEST_FIELDS.of(name)
        if not kind:
            fields.take(name, value)
            return
        if kind == HOST:
            if self.host is not None:
                self.request_error = RequestError(400, "more than one Host header", INVALID_HOST)
                raise self.request_error
            host = self.host = trimmed(value)
            if host is value:
                fields.take(name, value)
            else:
                fields.skip(name, value)
                fields.add(name, host)
            return
        if kind == X_REQUEST_ID:
            if len(value) <= MAX_REQUEST_ID and not self.has_request_id:
                self.has_request_id = True
                request_id = trimmed(value)
                if request_id is value:
                    fields.take(name, value)
                    return
                fields.skip(name, value)
                fields.add(name, request_id)
            else:
                fields.skip(name, value)
            return
        fields.skip(name, value)
        if kind == CONTENT_LENGTH:
            self.length = value  # llhttp rejects duplicates and anything but digits
        elif kind == TRANSFER_ENCODING:
            # Field lines of one name combine into one list (RFC 9110 5.3): `gzip` and
            # `chunked` on two lines are `gzip, chunked` (501), not `chunked`.
            self.te = value if self.te is None else self.te + b", " + value
        elif kind == X_FORWARDED_FOR:
            value = trimmed(value)
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif kind == CONNECTION:
            if value == b"keep-alive" or value in PLAIN_CONNECTION:  # (UpstreamConn.on_header)
                if value[0] in b"kK":
                    self.keep_alive_asked = True
                else:
                    self.may_close = True
                return
            if self.conn_tokens is None:
                self.conn_tokens = []
            self.conn_tokens.append(value)
        elif kind == EXPECT:
            # llhttp leaves trailing whitespace in a value, which is not part of it.
            if value.rstrip(b" \t").lower() != b"100-continue":
                self.request_error = RequestError(417, "only Expect: 100-continue is supported",
                                                  EXPECT_UNSUPPORTED)
                raise self.request_error
            self.expect = True
        elif kind == UPGRADE:
            self.upgrade = trimmed(value)
        elif kind == MAX_FORWARDS:
            self.max_forwards = value  # sent on by on_headers_complete, less one for OPTIONS
        else:  # DROP: hop-by-hop, or a header we set ourselves
            self.may_close = True

    def on_trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field goes on in the last chunk of the request's body (Exchange
        end_chunk) unless it must not (NOT_IN_TRAILERS)."""
        ex = self.current
        if ex is not None and name.lower() not in NOT_IN_TRAILERS:
            ex.end_chunk = b"".join((ex.end_chunk[:-2], name, b": ", value, CRLF, CRLF))

    def on_headers_complete(self) -> None:
        self.in_head = False
        fields = self.fields
        fields.end()
        parser: HttpRequestParser = self.parser  # type: ignore[assignment]  # parsing
        # The request line in the read as we would send it (plain_request_line): HTTP/1.1,
        # and a GET known by its first four bytes, without get_method (a generic call and
        # a new bytes object, ~250 instructions a request, bench/http/micro.py).
        line_kept = fields.line > 0
        # An HTTP/1.1 request is kept alive unless a close token came in Connection (or
        # Proxy-Connection), as llhttp's should_keep_alive answers (a generic call, ~170).
        keep_alive = (line_kept and not self.may_close and self.conn_tokens is None) \
            or parser.should_keep_alive()
        # llhttp (lenient: any HTTP/d.d) keeps a request alive unasked (no Connection:
        # keep-alive) when its major and minor versions are both 1 or more: with HTTP/1 in
        # its request line, it is 1.1 or later and served as 1.1 (RFC 9110 2.5), known
        # without get_http_version, which formats a string (2,200 instructions a request).
        unasked = keep_alive and not self.keep_alive_asked and self.conn_tokens is None
        version = "1.1" if unasked or line_kept else parser.get_http_version()
        read = self.read
        if line_kept and read[3] == 32 and read[0] == 71 and read[1] == 69 and read[2] == 84:
            method = GET
        else:
            method = parser.get_method()
        if line_kept:  # "HTTP/1.1" seen at its place
            self.line_at = -1  # (as line_protocol: the read's next line is further on)
            protocol = HTTP_1
        else:
            protocol = self.line_protocol(method)
        if not protocol:
            # llhttp parses RTSP and ICE request lines too: they went on as HTTP/1.1.
            self._refuse(400, "the request line is not HTTP's (RTSP or ICE)", HTTP_VERSION)
        if unasked and protocol != HTTP_1:
            version = parser.get_http_version()  # HTTP/2.1 is kept alive unasked too
        if version != "1.1" and version != "1.0":
            if version[0] != "1":
                # RFC 9110 15.6.6: a major version we do not speak (0.9 and 2.0 with a
                # version in the request line; 3.0 and others got 400).
                self._refuse(505, f"HTTP/{version} is not supported", HTTP_VERSION)
            version = "1.1"  # 1.2-1.9: as the highest minor version we speak (RFC 9110 2.5)
        http11 = version == "1.1"
        if method == b"CONNECT":
            # llhttp takes any CONNECT for a switch of protocols and parses nothing after
            # its head, not even the body it announces. `CONNECT /x` (origin-form) used to
            # go to the endpoint with its Content-Length and without its body, and the
            # pooled connection read the next client's request as that body.
            self._refuse(400, "CONNECT is not supported", MALFORMED)
        url = self.url
        # `in` with the byte's value (35, "#"): CPython's bytes `in` takes its operand as
        # an integer first, so this is a memchr, with no argument parsing (bytes.find
        # parses its arguments as a tuple: 750 instructions a request, bench/http/micro.py
        # under callgrind, against 75), and no TypeError formatted and cleared, which
        # `b"#" in url` costs (1,600).
        if 35 in url:
            # RFC 9112 3.2: a request target has no fragment (a client strips it). An
            # endpoint routing on the path would see one as part of it: refused, as nginx.
            self._refuse(400, "a fragment in the request target", MALFORMED)
        authority = None
        if url[:1] != b"/" and not (url == b"*" and method == b"OPTIONS"):
            url, authority = self._origin_form(url, method)
        host = self.host
        if host is None:
            if http11 or (self.route is None and authority is None):
                self._refuse(400, "missing Host header", INVALID_HOST)  # HTTP/1.1 requires it
            if authority is None:
                # HTTP/1.0 may leave it out (health checkers do), but what we send is 1.1:
                # the address the client reached, its ClusterSetIP:port, stands in.
                ip, port = self.transport.get_extra_info("sockname")[:2]
                fields.add(b"Host", (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}").encode())
        elif host != self.engine.valid_host:
            if host not in VALID_HOSTS and not host_is_valid(host):
                # RFC 9112 3.2: a MUST, even when an absolute-form target replaces it (as
                # nginx). Forwarded, `a b` or `u@h` would reach endpoints that trust Host.
                self._refuse(400, "invalid Host header", INVALID_HOST)
            self.engine.valid_host = host
        if authority is not None:
            if authority not in VALID_HOSTS and not host_is_valid(authority):
                self._refuse(400, "invalid authority in the request target", INVALID_HOST)
            # RFC 9112 3.2.2: the target's authority stands for any Host field received.
            self.host = authority
            fields.drop_line()  # the target rewritten in origin-form
            fields.parts = drop_fields(fields.parts, {b"host"})
            fields.add(b"Host", authority)
        chunked = False
        if self.te is not None:
            if not http11:
                self._refuse(400, "Transfer-Encoding in an HTTP/1.0 request", TRANSFER_CODING)
            if self.te.strip().lower() != b"chunked":
                self._refuse(501, "only the chunked transfer coding is supported", TRANSFER_CODING)
            chunked = True
            # llhttp (strict) refuses Content-Length in the trailer section as in a head:
            # a request with one got 400, while the same trailer of a response is dropped
            # (UpstreamConn.on_headers_complete). It frames nothing there: dropped here too
            # (NOT_IN_TRAILERS). The head was checked already; on_message_complete makes
            # the parser strict again for the next head.
            parser.set_dangerous_leniencies(lenient_chunked_length=True)
        length = 0 if self.length is None else int(self.length)
        # llhttp stops after the head of a request it takes for a switch of protocols
        # (Upgrade with Connection: upgrade, HTTP/1.0 too): the body its head announces
        # is parsed by us (Exchange.tunnel_data, upgrade_body).
        stops = self.upgrade is not None and parser.should_upgrade()
        # RFC 9110 7.8: a server MUST ignore Upgrade in an HTTP/1.0 request; it goes on as
        # a plain request (the Upgrade field is hop-by-hop: never forwarded unasked).
        upgrade = stops and http11
        if upgrade and chunked:
            # llhttp leaves an Upgrade request's body unparsed (see Exchange.tunnel_data):
            # a chunked one could only be passed on unchecked.
            self._refuse(501, "an Upgrade request with a chunked body is not supported",
                         TRANSFER_CODING)
        # An Upgrade the endpoint refuses (a final status, not 101) leaves the connection
        # HTTP/1.1 (see ClientConnection.upgrade_refused).
        error: tuple[int, str, str] | None = None
        route = self.route
        if route is None:
            # A front-door request without Host and without an authority was refused.
            assert self.front is not None and self.host is not None
            route, error = self.front.resolve(self.host)
        if method == b"TRACE":
            # RFC 9110 9.3.8: TRACE echoes the request as received, credentials and cookies
            # too (cross-site tracing), and 7.6.2 wants one with Max-Forwards: 0 answered by
            # us: it used to be forwarded either way. Refused, as nginx does.
            error = error or (405, "TRACE is not allowed", TRACE_METHOD)
        elif self.max_forwards is not None:
            forwards = self.max_forwards
            if method == b"OPTIONS":
                # RFC 9110 7.6.2: at 0 we are the final recipient; above, one less goes on.
                digits = forwards.strip(b" \t")
                if digits.isdigit():
                    digits = digits.lstrip(b"0")
                    if not digits:
                        error = error or (200, "OPTIONS answered by the proxy: Max-Forwards is 0",
                                          MAX_FORWARDS_REACHED)
                    forwards = b"%d" % (MAX_FORWARDS_CAP if len(digits) > 9
                                        else min(int(digits or b"1") - 1, MAX_FORWARDS_CAP))
            fields.add(b"Max-Forwards", forwards)
        parts = fields.parts
        if self.conn_tokens is not None:
            nominated = connection_tokens(self.conn_tokens) - NEVER_NOMINATED
            if nominated:
                fields.drop_line()  # (parts is fields.parts: changed in place)
                parts = drop_fields(parts, nominated)
        engine = self.engine
        fwd = self.fwd if self.xff is None else engine.forwarded_headers(
            self.xff + b", " + self.client_ip)
        if not http11:
            # Via names the protocol received (RFC 9110 7.6.3); fwd ends with 1.1's.
            fwd = fwd[:len(fwd) - len(engine.via)] + engine.via10
        if upgrade:
            parts.append(b"Connection: upgrade\r\nUpgrade: " + self.upgrade + CRLF)  # type: ignore[operator]
        if self.expect and http11:
            parts.append(b"Expect: 100-continue\r\n")
        if chunked:
            framing = b"Transfer-Encoding: chunked\r\n\r\n"
        elif self.length is not None and (length or method not in NO_CONTENT):
            framing = b"Content-Length: %d\r\n\r\n" % length
        else:
            framing = CRLF
        # The head joined from `parts` itself (replaced by _reset_head next): a new list
        # with `*parts` spread into it cost ~700 instructions more (bench/http/micro.py).
        if not fields.line:  # else the request line as read begins parts[0]
            parts.insert(0, method + b" " + url + b" HTTP/1.1\r\n")
        parts.append(fwd)
        if not self.has_request_id:
            parts.append(engine.ids.next_header())
        parts.append(framing)
        head = b"".join(parts)
        protocols = self.upgrade if upgrade else None
        self._reset_head()
        queue = self.queue
        if len(queue) >= MAX_QUEUED:
            # Pausing reads stops the next read, not the rest of this one: a read of tiny
            # pipelined requests would otherwise queue thousands of exchanges.
            self._refuse(429, "too many pipelined requests", TOO_MANY_PIPELINED)
        ex = Exchange(self, route, method, head, chunked, length, keep_alive, http11,
                      protocols, error)
        if stops and not upgrade:
            ex.upgrade_body = length  # an ignored Upgrade: llhttp stops all the same
        self.current = self.last = ex
        queue.append(ex)
        if len(queue) == 1:
            ex.start()
        elif len(queue) >= MAX_PIPELINE:
            self.pause(PAUSE_PIPELINE)

    def line_protocol(self, method: bytes) -> int:
        """The request line's protocol: NOT_HTTP, HTTP_1 or HTTP_ANY. llhttp takes RTSP/x.y
        (with GET, POST, OPTIONS and RTSP's own methods) and ICE/x.y (SOURCE) as well, and
        reports the same version for them; and, lenient (request_parser), any major
        version. The line's bytes tell: at a known offset when the read began with this
        request (two bytes compared, "H" and "1" of HTTP/1: the usual case), else by a
        search of the reads that brought the head (line_held: a line split over reads
        used to go on as HTTP, `GET / RTS` then `P/1.0`).

        The bytes at the offset are looked at first, whatever the method: a method
        compared first cost 50 instructions more a request (bench/http/micro.py)."""
        read = self.read
        if self.line_at == 0:
            self.line_at = -1  # the read's next request line is somewhere after this one
            at = len(method) + len(self.url) + 2
            # "H"TTP/1, not "R"TSP/ or "I"CE/, nor HTTP/2.1 (kept alive unasked as 1.1 is)
            if at + 5 < len(read) and read[at] == 72 and read[at + 5] == 49:
                return HTTP_1
            # Not at the offset: empty lines before the request line (RFC 9112 2.2), or
            # another version (on_headers_complete asks llhttp which).
        held = self.line_held
        if held is not None:  # the head began in an earlier read
            self.line_held = None
            held += read
            read = bytes(held)  # (compiled, a bytes local takes no bytearray)
        line = b" " + self.url + b" "
        if method == b"GET" or method in SHARED_METHODS:
            if read.find(line + b"RTSP/") >= 0 or read.find(line + b"ICE/") >= 0:
                return NOT_HTTP
        elif method in RTSP_ONLY_METHODS:
            return NOT_HTTP
        return HTTP_1 if read.find(line + b"HTTP/1.") >= 0 else HTTP_ANY

    def _origin_form(self, url: bytes, method: bytes) -> tuple[bytes, bytes]:
        """An absolute-form target (RFC 9112 3.2.2, which servers must accept): the
        origin-form we send and its authority, the Host of the request. The endpoint
        stays the route's (the front door routes by that Host, as by any): never an
        open proxy. Authority-form (CONNECT) and anything else is refused."""
        match = ABSOLUTE_FORM.match(url)
        if match is None:
            self._refuse(400, "only origin-form and absolute-form request targets are accepted",
                         MALFORMED)
        authority, path = match.group(1), match.group(2) or b""
        if not path:
            path = b"*" if method == b"OPTIONS" else b"/"  # RFC 9112 3.2.4
        elif path[:1] == b"?":
            path = b"/" + path
        return path, authority

    def _refuse(self, status: int, text: str, reason: str) -> NoReturn:
        self.request_error = RequestError(status, text, reason)
        raise self.request_error

    def on_chunk_header(self) -> None:
        self.tail = 0  # see UpstreamConn.on_chunk_header

    def on_chunk_complete(self) -> None:
        self.tail = -1

    def on_body(self, body: bytes) -> None:
        if self.tail >= 0:
            self.tail = -1  # a chunk's data: not the trailer section
        ex = self.current
        if ex is not None:
            if ex.chunked and len(body) < SMALL_CHUNK:
                if self.chunks is None:
                    self.chunks = [body]
                else:
                    self.chunks.append(body)
                return
            if self.chunks:
                self.send_chunks()
            ex.request_body(body)

    def send_chunks(self) -> None:
        """The small chunks of one read go on as one chunk. Each sent alone would be three
        bytes objects in the endpoint connection's write buffer, whose limit counts only
        their bytes: a body of 1-byte chunks to a slow endpoint held 12 MB there (26
        times the limit). Never held past the read: a streaming client is not delayed."""
        chunks: list[bytes] = self.chunks  # type: ignore[assignment]  # not empty
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        ex = self.current
        if ex is not None:
            ex.request_body(data)

    def on_message_complete(self) -> None:
        if self.chunks:
            self.send_chunks()
        ex = self.current
        self.current = None
        if ex is not None:
            if ex.chunked and self.parser is not None:  # strict again (on_headers_complete)
                self.parser.set_dangerous_leniencies(lenient_chunked_length=False)
            ex.request_done()

    # -- the pipeline -----------------------------------------------------------------
    def exchange_finished(self, ex: Exchange) -> None:
        queue = self.queue
        if queue:
            # Taken off, and put back in the rare case it is not this one: compiled, a
            # deque's `queue[0]` is a generic item look-up (~100 instructions a request).
            first = queue.popleft()
            if first is not ex:
                queue.appendleft(first)
        self.flush_soon()  # close() below, or the next answer's flush, writes it sooner
        if self.closed:
            return
        if not ex.keep_alive:
            if self.broken is not None:
                self.out.append(self.broken)
            self.close()
            return
        if ex.upgrade:
            # Refused (a final answer, no 101): the bytes held since are the next requests.
            # Not from inside the endpoint's parser, which pooled its connection already
            # with the rest of that read unparsed (see below).
            self.idle_since = self.engine.now
            if self.upgrading is ex:
                asyncio.get_running_loop().call_soon(self.upgrade_refused, ex)
            return  # else still in our parser: data_received goes on (HttpParserUpgrade)
        if self.last is ex:
            self.last = None
        if queue:
            if self.paused & PAUSE_PIPELINE and len(queue) < MAX_PIPELINE and \
                    self.broken is None:
                self.resume(PAUSE_PIPELINE)
            # Started once the callback that finished this one has returned: from inside
            # an endpoint's parser, the connection just pooled would be taken with the
            # rest of that read still unparsed (bytes after the response would answer
            # the next request), and requests answered at once would each start the
            # next one a call deeper, without end.
            asyncio.get_running_loop().call_soon(self.start_next)
            return
        self.idle_since = self.engine.now
        if self.broken is not None:
            self.out.append(self.broken)
            self.close()

    def start_next(self) -> None:
        queue = self.queue
        if queue and not queue[0].started and not self.closed:
            queue[0].start()

    def upgrade_refused(self, ex: Exchange) -> None:
        """The answer to an Upgrade request was final and framed, and the connection stays
        open (as nginx's and HAProxy's): what the client sent after the request, held
        from the endpoint until now (Exchange.tunnel_data), is parsed as HTTP by a fresh
        parser (llhttp stops for good at an upgrade), like any further request."""
        if self.upgrading is not ex or self.closed or self.lingering:
            return
        self.upgrading = None
        if self.last is ex:
            self.last = None
        held = ex.held
        ex.held = None
        self.resume(PAUSE_UNSENT)
        self.parser = request_parser(self)
        if held:
            self.data_received(bytes(held))

    def http_again(self, ex: Exchange, rest: bytes) -> None:
        """The request `ex`, whose Upgrade was ignored, was read whole, body too: what the
        client sent after it is HTTP again, or, after an answer that closes, dropped (RFC
        9112 9.6)."""
        if self.upgrading is ex:
            self.upgrading = None
        if self.closed or self.lingering:
            return
        if ex.keep_alive:
            if rest:
                self.data_received(rest)
        else:
            self.pause(PAUSE_PIPELINE)
            self.flush()

    def start_tunnel(self, up: UpstreamConn) -> None:
        self.upgrading = None
        self.tunnel = up
        if self.write_paused:
            up.transport.pause_reading()

    def upstream_closed(self, exc: Exception | None) -> None:
        """The tunnelled endpoint connection ended: end ours the same way (a reset with
        a RST: transport.abort() sends a FIN, and the client took the cut tunnel for
        one the endpoint ended)."""
        self.tunnel = None
        if exc is not None:
            self.reset()
        elif self.tunnel_eofs & CLIENT_EOF:
            self.transport.close()  # nothing more to read from the client: no lingering
        else:
            self.close()

    # -- timeouts (the engine's tick) ---------------------------------------------------
    def check(self, now: float, tick_s: float) -> None:
        self.idle += 1
        if self.lingering:
            if self.cutting:
                if self.idle * tick_s > LINGER_S or self.delivered():
                    self.reset()
            elif self.idle * tick_s > LINGER_S:
                self.transport.close()
            return
        http = self.engine.http
        if self.tunnel is not None:
            if self.idle * tick_s > http.idle_timeout_s > 0:
                self.abort_all()
            return
        queue = self.queue
        if not queue:
            if self.in_head:
                if now - self.head_since > http.header_timeout_s:
                    if self.head_bytes:  # a request began: say why it ends
                        self.out.append(self.engine.errors.build(
                            408, "timed out reading the request head", self.engine.date, True))
                    self.engine.count_refused(self.listener_kind(),
                                              "408" if self.head_bytes else "none", HEAD_TIMEOUT)
                    self.close()
                elif not self.head_bytes and self.leaving() and \
                        now - self.head_since > DRAIN_IDLE_S:
                    self.close()  # accepted just before the drain, never sent a byte
            elif now - self.idle_since > (DRAIN_IDLE_S if self.leaving()
                                          else http.keepalive_timeout_s):
                self.close()
            elif self.idle > 1 and self.current is None and self.upgrading is None:
                # Between requests and nothing read for a whole tick: the parser (0.9 KB
                # with its bound callbacks) and the queue (0.76 KB) are made again by the
                # next read (0.3 µs). Dropped at every tick that finds a connection between
                # requests instead, they cost 0.9 % more instructions per request in
                # bench/http/micro.py; made per request, more still.
                self.parser = None
                self.queue = NO_REQUESTS
            return
        if self.tunnel_eofs & CLIENT_EOF and self.gone(now):
            # Gone, not half-closed: nobody reads the answers. As nginx does (with
            # proxy_ignore_client_abort off), the endpoint connections serving them are
            # closed now, not at the request timeout, and nothing is retried: connection_lost
            # abandons every request (client_closed), at once, so no answer arriving before
            # the transport reports the abort is written to it (it runs again then: no-op).
            self.abort_all()
            self.connection_lost(None)
            return
        queue[0].check(now, self.idle * tick_s)

    def leaving(self) -> bool:
        """Answers say Connection: close, and the connection closes once idle for
        DRAIN_IDLE_S: the gateway drains, or the listener it came in on closed. A
        keep-alive client of a closed listener kept its service's old endpoints (none:
        503 for every request), even once the service was back on a new listener."""
        route = self.route
        return self.engine.draining or (route is not None and route.ctx.closed)

    def gone(self, now: float) -> bool:
        """A client that sent FIN with requests waiting: has it closed its socket?"""
        if TCP_INFO is None:
            return False
        try:
            state = self.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, TCP_INFO, 1)[0]
        except (OSError, AttributeError):
            # The transport closed meanwhile (no socket object to ask, or its descriptor
            # gone): not known to be gone here; connection_lost deals with that one.
            return False
        if state == TCP_CLOSE:  # it answered what we sent since its FIN with RST
            return True
        if now >= self.probe_at:
            self.probe_at = INF
            ex = self.queue[0]
            if ex.resp_started:
                return False  # its answer under way is the test
            if ex.http11:
                self.out.append(PROBE)
                self.flush()
            elif not self.transport.get_write_buffer_size():  # no answer it would be inside
                self.probe_urgent()
        return False

    def probe_urgent(self) -> None:
        """URGENT_PROBE, out of band: the transport has no call for it, so it is sent on
        the descriptor, borrowed (detached, never closed here)."""
        try:
            sock = socket.socket(fileno=self.transport.get_extra_info("socket").fileno())
        except (OSError, AttributeError):
            return  # closed meanwhile: connection_lost deals with it
        try:
            # Reset already (OSError): the next tick's TCP_INFO reads TCP_CLOSE anyway.
            with contextlib.suppress(OSError):
                sock.send(URGENT_PROBE, socket.MSG_OOB)
        finally:
            sock.detach()

    def abort_all(self) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.abort()
        self.abort()

    def reset_all(self) -> None:
        """Cut by the gateway (stopped past its drain timeout): a tunnel or an answer
        still under way ends with a RST both ways, as a FIN would pass it off as whole."""
        up = self.active_upstream()
        self.reset()
        # After the reset: this connection's loss is reported first and abandons its
        # requests, so the endpoint connection's (a cut) retries none of them.
        if up is not None:
            up.abort()


def resume_waiting(route: HttpRoute, http: HttpSettings) -> None:
    """Replays waiting for a retry budget slot go, as far as the budget allows."""
    waiting = route.waiting
    while waiting and route.has_budget(http):
        ex = waiting.popleft()
        if ex.finished:
            continue  # answered meanwhile (request timeout) or the client went away
        route.retries += 1
        ex.budgeted = True
        ex.attempt()
        ex.client.flush()
    if waiting and not route.retries:
        # The budget shrank to nothing (fewer requests in flight, no minimum): no slot
        # will free, so the rest are answered now rather than at their deadline.
        while waiting:
            ex = waiting.popleft()
            if not ex.finished:
                ex.fail(ex.fail_status, f"no endpoint answered (last: {ex.fail_why}; "
                        "retry budget exhausted)")
                ex.client.flush()


class Exchange:
    """One request: endpoint choice, attempts, body relay both ways, and its answer."""

    __slots__ = (
        "budgeted",
        "chunked",
        "client",
        "connect_deadline",
        "connect_t0",
        "connecting",
        "deadline",
        "end_chunk",
        "error",
        "fail_status",
        "fail_why",
        "finished",
        "fresh_retried",
        "held",
        "host",
        "http11",
        "idempotent",
        "is_head",
        "keep_alive",
        "method",
        "outcome",
        "owed_answer",
        "paused_at",
        "pool",
        "protocols",
        "read_held",
        "received",
        "replay",
        "req_done",
        "request_head",
        "resp_done",
        "resp_mode",
        "resp_started",
        "retries",
        "route",
        "sent",
        "started",
        "status",
        "t0",
        "timed_out",
        "tried",
        "try_deadline",
        "unsent",
        "unsent_size",
        "until_close",
        "up",
        "upgrade",
        "upgrade_body",
        "upstream",
    )

    def __init__(self, client: ClientConnection, route: HttpRoute | None, method: bytes,
                 head: bytes, chunked: bool, length: int, keep_alive: bool,
                 http11: bool, upgrade: bytes | None = None,
                 error: tuple[int, str, str] | None = None) -> None:
        # Built for every request: only what every request reads is set here. The
        # deadlines, connect_* and timed_out are set by start() and attempt() before use.
        self.client = client
        self.route = route
        self.method = method
        self.request_head = head
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.http11 = http11
        self.is_head = method == b"HEAD"
        # GET by a comparison, not a hash of a new bytes object and a set look-up.
        idempotent = self.idempotent = method == b"GET" or method in IDEMPOTENT
        no_body = self.req_done = not chunked and length == 0  # nothing more to read
        # The body is kept for a replay when it is small enough and the method idempotent.
        if no_body:
            self.replay: list[bytes] | tuple[()] | None = () if idempotent else None
        else:
            self.replay = ([] if idempotent and not chunked
                           and length <= client.engine.http.retry_buffer_bytes else None)
            # What ends a chunked body: the last chunk, and any trailer fields (on_trailer).
            self.end_chunk = LAST_CHUNK
        self.unsent: list[bytes] | None = None  # body bytes waiting for a connection
        self.unsent_size = 0
        self.upgrade = upgrade is not None
        self.protocols = upgrade  # the request's Upgrade: what a 101 may switch to
        # llhttp ends an Upgrade request with its head: the body its head announces comes
        # through tunnel_data, and only then is the request done. Set for an ignored
        # Upgrade too (ClientConnection.on_headers_complete).
        self.upgrade_body = length if upgrade else 0
        self.paused_at = 0.0  # when its endpoint stopped being read for the client (0: not)
        self.held: bytearray | None = None  # sent after a 101 only (tunnel_data)
        self.read_held: bytes | None = None  # see send()
        self.error = error
        self.owed_answer: tuple[int, str] | None = None  # see fail
        self.resp_started = self.resp_done = self.until_close = False
        self.finished = self.started = False
        self.resp_mode = RAW
        self.fail_status = 502  # what the client gets when no endpoint is left: 504 after timeouts
        self.fail_why = ""
        self.retries = 0
        self.budgeted = False  # holds a slot of the route's retry budget
        self.fresh_retried = False
        self.tried: tuple[Host, ...] = ()
        self.host: Host | None = None
        self.upstream: UpstreamSet | None = None
        self.pool: EndpointPool | None = None
        self.up: UpstreamConn | None = None
        self.connecting: asyncio.Task[Any] | None = None
        # For the metrics and the access log: the status sent, or how the request ended.
        self.status = 0
        self.outcome: str | None = None
        self.t0 = MONOTONIC()
        self.sent = self.received = 0  # bytes to and from endpoints, every attempt's

    # -- attempts ---------------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        if self.error is not None or self.route is None:
            status, text, reason = self.error or (404, "no such service", UNKNOWN_SERVICE)
            client = self.client
            client.engine.count_refused(client.listener_kind(), str(status), reason)
            self.fail(status, text)
            return
        self.route.active += 1
        engine = self.client.engine
        # The request and per-try timeouts measure the endpoints: they run from the end of
        # the request (as Envoy's), not while a client is still uploading its body.
        self.deadline = engine.now + engine.http.request_timeout_s if self.req_done else INF
        self.attempt()

    def attempt(self, again: Host | None = None, chosen: Host | None = None) -> None:
        """One try: a pooled or new connection to a chosen endpoint; `again`: a new
        connection to that endpoint (its reused one broke off before answering);
        `chosen`: the endpoint a retry already picked."""
        if again is not None:
            host: Host | None = again
        elif chosen is not None:
            host = chosen
        elif self.tried:
            host = self.choose_again()
        else:
            route = self.route
            assert route is not None  # start() answers a request without one
            # Typed locals, here and below: a method of a compiled class called on an
            # Optional attribute is a generic call (~200 instructions), on a local of its
            # class a C call.
            upstream: UpstreamSet = route.ctx.upstream
            self.upstream = upstream
            host = upstream.pick(self.client.client_ip.decode()
                                 if upstream.affinity is not None else None)
        if host is None:
            if self.tried:
                self.fail(self.fail_status, f"no endpoint answered (last: {self.fail_why})"
                          if self.fail_status == 502 else "upstream timeout")
            else:
                self.fail(503, "no healthy endpoint")
            return
        self.host = host
        engine = self.client.engine
        pool = self.pool = engine.pools.get(host) or engine.pool_for(
            host, self.upstream)  # type: ignore[arg-type]
        self.try_deadline = engine.now + engine.http.per_try_timeout_s if self.req_done else INF
        up = pool.take() if again is None else None
        if up is not None:
            self.bind(up)
            return
        self.timed_out = False
        # From the precise start, not the tick's clock: a connect must never time out
        # early (up to a tick late is fine), or the outlier rule for a silent cluster
        # (UpstreamSet.connect_failed) would judge from a shorter wait than it assumes.
        self.connect_t0 = MONOTONIC()
        self.connect_deadline = self.connect_t0 + engine.http.connect_timeout_s
        task = self.connecting = pool.connect()
        task.add_done_callback(self.connect_done)

    def choose_again(self, also: Host | None = None) -> Host | None:
        """A retry goes to another endpoint, in another cluster when a healthy one is left;
        `also`: the endpoint being left, not yet in `tried`."""
        route = self.route
        assert route is not None
        upstream = self.upstream = route.ctx.upstream
        tried = self.tried if also is None else (*self.tried, also)
        clusters = {h.cluster for h in tried}
        avoid = [h for h in upstream.hosts.values() if h.cluster in clusters]
        if len(avoid) < len(upstream.hosts):
            host = upstream.pick(None, avoid)
            if host is not None and host.healthy:
                return host
        return upstream.pick(None, tried)

    def connect_done(self, task: asyncio.Task[Any]) -> None:
        if task is not self.connecting:
            # Abandoned: a connection that opened anyway is closed, not leaked.
            if not task.cancelled() and task.exception() is None:
                task.result()[0].close()
            return
        self.connecting = None
        if task.cancelled():
            if not self.timed_out:
                return  # the client went away
            reason = "connect timeout"
        else:
            exc = task.exception()
            if exc is None:
                _, up = task.result()
                if self.host is not None:
                    stats = self.host.stats
                    stats.attempts["ok"] += 1
                    stats.connect_time.observe(MONOTONIC() - self.connect_t0)
                if self.finished:
                    up.transport.close()
                    return
                self.bind(up)
                self.client.flush()
                return
            reason = f"connect failed ({getattr(exc, 'strerror', None) or type(exc).__name__})"
        assert self.host is not None and self.upstream is not None
        self.upstream.connect_failed(self.host, reason)
        self.fail_why = reason
        if self.timed_out:
            self.fail_status = 504
        # Nothing was sent: a failed connect is retried whatever the method, and outside
        # the retry budget (see can_retry).
        if self.can_retry(replay=False):
            self.retry(replay=False)
        else:
            self.fail(504 if self.timed_out else 502, f"no endpoint answered ({reason})")
        self.client.flush()

    def connect_verdict(self, task: asyncio.Task[Any]) -> None:
        if task is self.connecting:  # still not connected: a timeout (connect_done says so)
            task.cancel()

    def bind(self, up: UpstreamConn) -> None:
        self.up = up
        up.exchange = self
        upstream, host = self.upstream, self.host
        assert upstream is not None and host is not None  # attempt() chose them
        upstream.connect_ok(host, up, False)
        client = self.client
        if client.write_paused:
            # Not read until the client drains its answers: the per-try timer stands still
            # meanwhile (check, ClientConnection.resume_writing).
            up.transport.pause_reading()
            self.paused_at = MONOTONIC()
        chunked = self.chunked
        bodies = self.replay if self.replay is not None else self.unsent
        if not bodies and not (chunked and self.req_done):
            self.send(up, self.request_head)  # no body (yet): the head alone
            return
        data = [self.request_head]
        for body in bodies or ():
            if chunked:
                data.append(b"%x\r\n" % len(body))
                data.append(body)
                data.append(CRLF)
            else:
                data.append(body)
        if self.unsent:
            self.unsent = None
            self.unsent_size = 0
            client.resume(PAUSE_UNSENT)
        if self.req_done and chunked:
            data.append(self.end_chunk)
        self.send(up, data[0] if len(data) == 1 else b"".join(data))

    def send(self, up: UpstreamConn, data: bytes) -> None:
        """The request's first bytes to the endpoint. A whole request (nothing of it left
        to come from the client) goes once the poll's callbacks are done (see
        mcsproxy/writebatch.py). The start of one whose body follows waits for the rest
        of the client's read (read_held): a short body read with its head goes in the
        same write (request_body, request_done; a chunked one's small chunks and last
        chunk too), not in a second write and a second TCP segment that wakes the
        endpoint again; a body still to come finds the head written when the read is
        done (ClientConnection.data_received), so it cannot overtake it. Upgrade
        requests start at once, as does a request whose connect completed after the
        read."""
        up.sent += len(data)
        client = self.client
        engine = client.engine
        if self.req_done and engine.loop is not None:
            engine.writes.write(engine.loop, up.transport, data)
        elif self.upgrade or not client.reading:
            up.transport.write(data)  # (a connect that completed later: no read to wait for)
        else:
            self.hold_for_read(data)

    def hold_for_read(self, data: bytes) -> None:
        """Request bytes for the endpoint, written with what follows them in this read or
        at its end (see send). Only while the client's read is being parsed."""
        client = self.client
        holder = client.read_holder
        if holder is not self:
            if holder is not None:
                holder.release_read_held()  # another exchange's, from earlier in this read
            client.read_holder = self
        held = self.read_held
        self.read_held = data if held is None else held + data

    def release_read_held(self) -> None:
        """What hold_for_read held, to the endpoint now (if still bound to one)."""
        data = self.read_held
        if data is not None:
            self.read_held = None
            up = self.up
            if up is not None:
                up.transport.write(data)

    def write_after_held(self, up: UpstreamConn, data: bytes) -> None:
        """`data` to the endpoint, in one write with what hold_for_read held before it."""
        held = self.read_held
        if held is None:
            up.transport.write(data)
            return
        self.read_held = None
        if len(data) < SMALL_CHUNK:
            up.transport.write(held + data)
        else:  # not copied: the held bytes and it in one writev
            up.transport.writelines((held, data))

    def can_retry(self, replay: bool = True) -> bool:
        """May the request be tried again (at most max_retries times)?

        The retry budget bounds replays only: a request sent again after its bytes went
        out (5xx, reset, per-try timeout) is extra work for the endpoints, and a storm of
        them is what the budget prevents. A retry after a failed connect is the request's
        first sending: it costs the endpoints nothing, and refusing it would turn one
        dead endpoint into errors whenever several requests meet it at once.

        A replay over the budget waits for a slot while replays are in flight (each ends
        within a per-try timeout): a burst of requests stuck on a blackholed endpoint
        times out in one tick and is then replayed a few at a time instead of answered
        504. With no replay in flight (a budget of 0) it is refused at once."""
        http = self.client.engine.http
        if self.retries >= http.max_retries or self.finished or self.client.closed:
            return False
        if not replay or self.budgeted:
            return True
        route = self.route
        assert route is not None
        if route.has_budget(http):
            route.retries += 1
            self.budgeted = True
            return True
        route.retries_refused += 1
        if self.upstream is not None:
            self.upstream.stats.retry_budget_exhausted += 1
        return route.retries > 0

    def replayable(self) -> bool:
        """After bytes went out: may the request be sent again elsewhere?"""
        return self.idempotent and self.replay is not None and not self.upgrade

    def retry(self, replay: bool = True, chosen: Host | None = None) -> None:
        """Try another endpoint (`chosen` when already picked); a replay without a budget
        slot waits for one (and then picks afresh)."""
        assert self.host is not None
        self.tried += (self.host,)
        self.retries += 1
        if self.upstream is not None:
            self.upstream.stats.retries += 1
        if replay and not self.budgeted:
            self.route.waiting.append(self)  # type: ignore[union-attr]
            return
        self.attempt(chosen=chosen)

    def retry_fresh(self, up: UpstreamConn) -> bool:
        """A reused connection that ended before any byte of the answer: the endpoint
        closed it while idle as the request went out (the keep-alive race), so the
        endpoint is not blamed, and a replayable request is sent once more on a new
        connection to it, outside max_retries and the budget (as nginx does)."""
        if (not up.closed_while_idle or self.resp_started or self.fresh_retried
                or not self.replayable() or self.finished or self.client.closed):
            return False
        self.fresh_retried = True
        self.detach(abort=True)
        self.attempt(self.host)
        return True

    def release_budget(self) -> None:
        """The request ends: its budget slot goes to the first replay waiting for one."""
        route = self.route
        assert route is not None
        self.budgeted = False
        route.retries -= 1
        if route.waiting:
            asyncio.get_running_loop().call_soon(
                resume_waiting, route, self.client.engine.http)

    # -- request body (from the client connection) ------------------------------------
    def request_body(self, data: bytes) -> None:
        if self.resp_done:
            return  # answered early: the rest of the body is read and dropped
        if self.replay is not None:
            self.replay.append(data)  # type: ignore[union-attr]
        up = self.up
        if up is not None:
            if self.chunked:
                n = len(data)
                if n < SMALL_CHUNK:  # one object, not three (see ClientConnection.send_chunks)
                    chunk = b"%x\r\n%b\r\n" % (n, data)
                    up.sent += len(chunk)
                    if self.client.reading:  # with the head and the last chunk, if they came
                        self.hold_for_read(chunk)
                    else:
                        up.transport.write(chunk)
                    return
                held = self.read_held  # see send
                self.read_held = None
                size = b"%x\r\n" % n
                up.sent += len(size) + n + 2
                up.transport.writelines((size, data, CRLF) if held is None else
                                        (held, size, data, CRLF))
            else:
                up.sent += len(data)
                self.write_after_held(up, data)  # with its head, if it came in the same read
        elif self.replay is None:
            if self.unsent is None:
                self.unsent = []
            self.unsent.append(data)
            self.unsent_size += len(data)
            if self.unsent_size > UNSENT_HIGH_WATER:
                self.client.pause(PAUSE_UNSENT)

    def request_done(self) -> None:
        if self.upgrade_body:
            return  # see tunnel_data
        self.req_done = True
        if self.finished:
            return
        if self.started:
            http = self.client.engine.http
            now = self.client.engine.now
            self.deadline = now + http.request_timeout_s
            self.try_deadline = now + http.per_try_timeout_s
        up = self.up
        if up is not None and self.chunked:
            up.sent += len(self.end_chunk)
            self.write_after_held(up, self.end_chunk)  # a chunked body that ended in this read

    def tunnel_data(self, data: bytes) -> None:
        """Bytes after an Upgrade request's head, before the endpoint agreed to switch:
        first the body its Content-Length announces, sent as any body (an endpoint that
        refuses the upgrade, or h2c's, reads it before answering); the rest is held for
        the tunnel. Never sent before a 101: an endpoint that refuses would read it as
        a further request on a connection we pool, one we never parsed (smuggled), its
        answer left for the next request to take. After the body of a request whose
        Upgrade we ignore (HTTP/1.0), the rest is HTTP again (ClientConnection
        http_again)."""
        left = self.upgrade_body
        if left:
            self.upgrade_body = max(0, left - len(data))
            self.request_body(data[:left])
            if not self.upgrade_body:
                self.request_done()
                if not self.upgrade:  # an ignored Upgrade (HTTP/1.0): a plain request
                    self.client.http_again(self, data[left:])
                    return
            data = data[left:]
            if not data:
                return
        if self.held is None:
            self.held = bytearray()
        self.held += data
        if len(self.held) > UNSENT_HIGH_WATER:
            self.client.pause(PAUSE_UNSENT)

    # -- the response (from the endpoint connection) ----------------------------------
    def interim(self, status: int, up: UpstreamConn) -> None:
        """A 1xx, to an HTTP/1.1 client only (RFC 9110 15.2), as any response: less the
        fields its Connection header names (RFC 9110 7.6.1), with our Via (7.6.3: in each
        message forwarded). A 103's `Connection: x` used to leave field x in."""
        if self.http11 and not self.resp_started:
            parts = up.fields.parts
            if up.conn_tokens is not None:
                parts = drop_fields(parts, connection_tokens(up.conn_tokens))
            self.client.out.append(b"".join((status_line(status), *parts,
                                             self.client.engine.via, CRLF)))

    def response_head(self, status: int, up: UpstreamConn) -> None:
        line = STATUS_LINES.get(status)
        if line is None:  # a code without a phrase: looked at only then
            if status > 599:  # RFC 9110 15: 100-599 (below 100: UpstreamConn)
                up.fail(f"malformed response (status {status})")
                return
            line = status_line(status)
        http10 = False
        if not up.keep_alive:
            # The version asked for only when the endpoint does not keep its connection
            # (get_http_version formats a string, 2,200 instructions), as HTTP/1.0
            # endpoints do unless asked to (Connection: keep-alive).
            version = up.parser.get_http_version()
            if version != "1.1" and version != "1.0":
                # llhttp takes HTTP/0.9 and 2.0 status lines too: `HTTP/2.0 200` went to
                # the client as HTTP/1.1's 200. Another major version is another syntax
                # (RFC 9110 2.5), nothing we can forward.
                up.fail(f"malformed response (HTTP/{version})")
                return
            http10 = version == "1.0"
        host, upstream = self.host, self.upstream
        assert host is not None and upstream is not None  # bound
        upstream.response_status(host, status)
        # Compared before the sets' look-ups (~100 instructions each): most are 200.
        if status >= 502 and status in RETRY_STATUSES and self.replayable():
            # Only with somewhere else to go: otherwise this answer (its body, its
            # Retry-After) is worth more to the client than a 502 of our own.
            following = self.choose_again(host)
            if following is not None and self.can_retry():
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: %d from %s, retrying", self.route.name, status, host)  # type: ignore[union-attr]
                self.fail_why = f"status {status}"
                self.detach(discard=True)
                self.retry(chosen=following)
                return
        self.status = status
        client = self.client
        parts = up.fields.parts
        if up.conn_tokens is not None:
            nominated = connection_tokens(up.conn_tokens) - {b"close", b"keep-alive", b"upgrade"}
            if nominated:
                parts = drop_fields(parts, nominated)
                if b"date" in nominated:
                    up.dated = False  # dropped: ours instead (below)
        length = up.length
        stop = False
        if status == 101:
            if not self.upgrade:
                up.fail("101 without an upgrade request")
                return
            if up.upgrade is None or up.conn_tokens is None \
                    or b"upgrade" not in connection_tokens(up.conn_tokens):
                # RFC 9110 7.8: a 101 names the protocol (Upgrade) and says the switch is
                # hop-by-hop (Connection: upgrade). llhttp takes one without the latter for
                # a plain message and then fails on what follows: the 101 had gone out,
                # and the client got it and a reset instead of a 502.
                up.fail("101 without Upgrade and Connection: upgrade")
                return
            if not switches_as_offered(up.upgrade, self.protocols):  # type: ignore[arg-type]
                # RFC 9110 7.8: a server MUST NOT switch to a protocol the client's Upgrade
                # did not name. Such a tunnel went on: the client then spoke a protocol
                # the endpoint did not, through us.
                up.fail("101 to a protocol the request did not offer")
                return
            framing = b"Connection: upgrade\r\nUpgrade: " + up.upgrade + CRLF
            up.interim = True  # llhttp ends the 101 message; the tunnel starts instead
        elif self.is_head or (status != 200 and status in NO_BODY_STATUSES):
            framing = b"Content-Length: " + length + CRLF \
                if length is not None and status != 204 else b""
            # llhttp would wait for the body a HEAD response announces: it ends here.
            stop = self.is_head and status not in NO_BODY_STATUSES and (
                length != b"0" or up.te is not None)
        elif length is not None and up.te is None:
            framing = b"Content-Length: " + length + CRLF
        elif self.http11:
            # Re-chunked by us; any other coding (gzip) still applies to what we forward.
            framing = b"Transfer-Encoding: chunked\r\n" if up.codings is None else \
                b"Transfer-Encoding: " + up.codings + b", chunked\r\n"
            self.resp_mode = CHUNKED
            self.until_close = not up.chunked
        else:
            if up.codings is not None:
                # RFC 9112 6.1: an HTTP/1.0 client knows no Transfer-Encoding, and we do
                # not decode: it used to get the gzip bytes as the content, no coding named.
                self.fail(502, "response transfer coding an HTTP/1.0 client cannot decode")
                return
            framing = b""
            self.keep_alive = False
            self.until_close = not up.chunked
        pool = self.pool
        assert pool is not None  # bound
        if status == 101:
            tail = pool.tail
        elif not self.keep_alive or not self.req_done or client.leaving() \
                or self.last_before_broken():
            # An answer before the whole request body (a final status instead of 100
            # Continue, an early 413): the connection closes after it (response_done),
            # and RFC 9110 10.1.1 wants the answer to say so.
            self.keep_alive = False
            tail = pool.tail_close
        else:
            tail = pool.tail if self.http11 else pool.tail_keep_alive
        if http10:
            # Via names the protocol received (RFC 9110 7.6.3): an HTTP/1.0 endpoint's
            # answer said 1.1. (One kept by Connection: keep-alive still says 1.1.)
            tail = tail.replace(client.engine.via, client.engine.via10, 1)
        if not up.dated:
            # RFC 9110 6.6.1: a recipient with a clock adds the Date a response it forwards
            # lacks (an origin without a clock sends none): ours, made once a second by the
            # engine's tick, as on our own answers.
            parts.append(client.engine.date)
        # Joined from `parts` itself, as the request head (ClientConnection
        # on_headers_complete); the trailer fields of a chunked response come after it.
        parts.insert(0, line)
        parts.append(framing)
        parts.append(tail)
        client.out.append(b"".join(parts))
        up.head_parts = len(up.fields.parts)
        self.resp_started = True
        if stop:
            up.skip_body()
            self.response_done(up)

    def response_body(self, data: bytes) -> None:
        out = self.client.out
        if self.resp_mode == CHUNKED:
            n = len(data)
            if n < SMALL_CHUNK:  # one object, not three (see ClientConnection.flush)
                out.append(b"%x\r\n%b\r\n" % (n, data))
                return
            out.append(b"%x\r\n" % n)
            out.append(data)
            out.append(CRLF)
        else:
            out.append(data)

    def response_done(self, up: UpstreamConn) -> None:
        if self.resp_mode == CHUNKED:
            if up.chunked and len(up.fields.parts) > up.head_parts:
                if not self.trailers(up):
                    return
            else:
                self.client.out.append(LAST_CHUNK)
        self.resp_done = True
        if not self.req_done:
            self.keep_alive = False  # the client is still sending a body no one will read
            self.detach()
        else:
            self.detach(up.keep_alive and not self.until_close)
        self.finish()

    def trailers(self, up: UpstreamConn) -> bool:
        """The last chunk with the endpoint's trailer fields (RFC 9112 7.1.2), within the
        limits of a head; False when over them (the response was cut)."""
        over = up.over_limits(up.head_parts)
        if over is not None:
            up.too_large(over)
            return False
        # Fields the Connection header names are hop-by-hop in trailers too (RFC 9110 7.6.1).
        self.client.out.append(trailer_section(
            up.fields.parts, up.head_parts,
            connection_tokens(up.conn_tokens) if up.conn_tokens else None))
        return True

    def upgraded(self, up: UpstreamConn, rest: bytes) -> None:
        """The endpoint switched protocols: both connections become one byte tunnel."""
        client = self.client
        assert self.pool is not None and self.host is not None and self.upstream is not None
        self.up = None
        up.exchange = None
        self.pool.hold_tunnel(up)  # still counted by the upstream set until it closes
        up.tunnel = client
        client.flush()
        if rest:
            client.transport.write(rest)
        if self.held:
            up.sent += len(self.held)
            up.transport.write(bytes(self.held))
            self.held = None
            client.resume(PAUSE_UNSENT)
        client.start_tunnel(up)
        self.resp_done = True
        self.finish(tunnel=True)

    def upstream_lost(self, up: UpstreamConn, exc: Exception | None) -> None:
        if self.until_close and self.resp_started and exc is None:
            up.keep_alive = False
            self.response_done(up)  # the end of a body delimited by the connection
            self.client.flush()
            return
        if up.cut:
            # The drain grace of its removed endpoint ran out (UpstreamConn.abort): not
            # the endpoint's failure, nor the keep-alive race (a request waiting on a
            # reused connection was sent again, on a new connection, to the removed
            # endpoint; the client waited out its timeout).
            self.upstream_failed(up, CUT_BY_DRAIN, blame=False)
        elif not self.retry_fresh(up):
            self.upstream_failed(up, "connection reset" if exc is not None else
                                 "connection closed before the response",
                                 blame=not up.closed_while_idle)
        self.client.flush()

    def upstream_failed(self, up: UpstreamConn, why: str, status: int = 502,
                        blame: bool = True) -> None:
        """The endpoint broke off (reset, malformed response, per-try timeout)."""
        self.detach(abort=True)
        if self.resp_started:
            if log.isEnabledFor(logging.WARNING) and self.host is not None:
                log.warning("endpoint %s:%d: response cut (%s): the client's connection "
                            "is reset", self.host.address, self.host.port, why)
            self.cut()
            return
        assert self.host is not None and self.upstream is not None
        if blame:
            self.upstream.connect_failed(self.host, why)
        self.fail_status = status
        self.fail_why = why
        if self.replayable() and self.can_retry():
            self.retry()
        else:
            self.fail(status, f"upstream {why}")

    def detach(self, reuse: bool = False, discard: bool = False, abort: bool = False) -> None:
        """Give the endpoint connection back: to the pool, to drain its answer, or closed."""
        up = self.up
        if up is None:
            return
        self.up = None
        self.read_held = None  # for this connection only (see send); a retry starts anew
        up.exchange = None
        sent, received = up.fold()
        self.sent += sent
        self.received += received
        upstream, host, pool = self.upstream, self.host, self.pool
        assert upstream is not None and host is not None and pool is not None  # bound
        upstream.release(host, up)
        client = self.client
        if client.write_paused:
            up.transport.resume_reading()
        if client.paused & PAUSE_UPSTREAM:
            client.resume(PAUSE_UPSTREAM)
        if abort or up.dead:
            up.dead = True
            up.transport.abort()
        elif discard:
            if not self.req_done:  # the endpoint still waits for the rest of the body
                up.dead = True
                up.transport.abort()
            elif self.is_head:  # nothing follows the head of an answer to HEAD
                up.skip_body()
                if up.keep_alive:
                    pool.put(up)
                else:
                    up.transport.close()
            else:
                up.discarding = True  # read the unwanted answer; reused if it ends now
        elif reuse:
            pool.put(up)
        else:
            up.transport.close()

    # -- endings ----------------------------------------------------------------------
    def fail(self, status: int, text: str) -> None:
        """Answer with an error of our own (before any response byte went out)."""
        self.detach(abort=True)
        self.cancel_connect()
        if self.resp_started:
            self.cut()
            return
        client = self.client
        if client.reading and not self.req_done and self.keep_alive and client.current is self \
                and not self.upgrade and not self.upgrade_body and client.owed is None:
            # Ours before the body was read (TRACE, an unknown front-door Host, no healthy
            # endpoint: from start(), in the read of the head). The rest of the read may
            # bring the whole body, and then the connection can stay open: it used to
            # close, and each POST to a service without a healthy endpoint cost its client
            # a new connection. So the answer waits for the end of the read (answer_owed);
            # the body that comes meanwhile is dropped (request_body).
            self.owed_answer = (status, text)
            self.resp_done = True
            client.owed = self
            return
        self.status = status
        self.outcome = "no_endpoint" if self.host is None else "failed"
        if log.isEnabledFor(logging.INFO) and status >= 500:
            route = self.route
            engine = self.client.engine
            held = (route.failure_log if route is not None else engine.failure_log).take(
                engine.now)
            if held >= 0:
                log.info("%s: %d %s%s", route.name if route else "front door", status, text,
                         f" ({held} more answered so since the last line)" if held else "")
        if not self.req_done or self.last_before_broken() or self.client.leaving():
            self.keep_alive = False
        engine = self.client.engine
        self.client.out.append(engine.errors.build(status, text, engine.date,
                                                   close=not self.keep_alive,
                                                   head_only=self.is_head,
                                                   http10=not self.http11))
        self.resp_started = True
        self.resp_done = True
        self.finish()

    def answer_owed(self) -> None:
        """The answer fail() held for the end of the client's read: with the body whole by
        now it keeps the connection open; else it closes it, as it did at once before,
        and nothing read after is processed."""
        owed = self.owed_answer
        if owed is not None and not self.finished:
            self.owed_answer = None
            self.resp_done = False
            self.fail(owed[0], owed[1])

    def cut(self) -> None:
        """The answer under way breaks off: a truncated response must not look complete
        (ClientConnection.cut: what was queued, then RST)."""
        self.outcome = "reset"
        self.client.cut()
        self.finish()

    def last_before_broken(self) -> bool:
        """A request we refused waits for its answer after this one, the last queued: this
        answer says Connection: close (the refusal follows it, then the close). Requests
        queued before the refused one are still all answered, in order."""
        client = self.client
        return client.broken is not None and len(client.queue) <= 1

    def finish(self, tunnel: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        route = self.route
        if route is not None and self.error is None:
            route.active -= 1
            if self.budgeted:
                self.release_budget()
        if not tunnel:
            self.client.exchange_finished(self)
        elif self.client.queue and self.client.queue[0] is self:
            self.client.queue.popleft()
        # Once exchange_finished has written the answer's last bytes to the client's
        # transport: the request duration ends there.
        self.account()

    def abandon(self) -> None:
        """The client went away."""
        self.cancel_connect()
        self.detach(abort=not (self.req_done and self.resp_done))
        if self.started and not self.finished:
            self.finished = True
            self.outcome = "client_closed"
            self.account()
            route = self.route
            if route is not None and self.error is None:
                route.active -= 1
                if self.budgeted:
                    self.release_budget()

    def account(self) -> None:
        """Count and time the request (service, cluster, outcome) and write its access log
        line. Timed from the end of its head (t0) to now: the last byte of the answer
        handed to the client's transport, or the request's end without one (reset,
        client_closed); requests no endpoint took (no_endpoint) are not timed."""
        upstream = self.upstream
        if upstream is None:
            return  # answered before a service was chosen (bad request, unknown host)
        elapsed = MONOTONIC() - self.t0
        status = self.status
        outcome = self.outcome or (
            STATUS_CLASSES[status // 100] if 0 <= status < 1000 else "other")
        host = self.host
        if host is not None and outcome != "no_endpoint":
            stats = host.stats
            counts = stats.requests
            stats.request_time.observe(elapsed)
        else:
            counts = upstream.stats.unrouted
        counts[outcome] = counts.get(outcome, 0) + 1
        route = self.route
        if route is None or route.access_log is None:
            return
        access_log = route.access_log
        target = self.request_head.split(b" ", 2)
        access_log.record(
            kind="http", client=self.client.client_ip.decode(), listener=route.name,
            upstream=upstream.name, cluster=host.cluster if host is not None else None,
            endpoint=f"{host.address}:{host.port}" if host is not None else None,
            method=self.method.decode(errors="replace"),
            path=target[1].decode(errors="replace") if len(target) > 1 else None,
            status=self.status or None, outcome=outcome, attempts=len(self.tried) + 1,
            duration_ms=round(elapsed * 1000, 3),
            bytes_to_upstream=self.sent, bytes_to_client=self.received)

    def cancel_connect(self) -> None:
        task = self.connecting
        if task is not None:
            self.connecting = None
            task.cancel()

    def check(self, now: float, idle_s: float) -> None:
        """Timeouts, from the engine's tick."""
        if self.resp_started:
            limit = self.client.engine.http.idle_timeout_s
            if limit and idle_s > limit:
                self.detach(abort=True)
                self.cut()
            return
        if not self.started or self.finished:
            return
        limit = self.client.engine.http.idle_timeout_s
        if not self.req_done and limit and idle_s > limit:
            # Still uploading: the client's silence is what can last too long here.
            self.fail(408, "timed out reading the request body")
        elif now > self.deadline:
            self.fail(504, "upstream timeout")
        elif self.connecting is not None:
            if now > self.connect_deadline and not self.timed_out:
                self.timed_out = True
                asyncio.get_running_loop().call_later(
                    CONNECT_VERDICT_DELAY_S, self.connect_verdict, self.connecting)
        elif self.up is not None and now > self.try_deadline and not self.client.write_paused:
            # (Paused for a client that does not read its answers, the endpoint connection
            # is not read either: that wait is the client's, never the endpoint's failure.)
            self.upstream_failed(self.up, PER_TRY_TIMEOUT, status=504)
        elif self.up is not None and not self.up.began and not self.client.write_paused:
            self.check_silence(now)
        self.client.flush()

    def check_silence(self, now: float) -> None:
        """A request sent on a pooled connection has no connect to time out: into a
        blackholed cluster it waited out its per-try timeout (15 s by default; every
        keep-alive client of a local-first service stalled until its own timeout, 14 of
        14 requests in flight). Between one and three connect timeouts into its wait,
        when the endpoint has not acknowledged what was sent for a whole connect timeout
        (a slow endpoint acknowledges, a blackholed one cannot) and nothing in its
        cluster answered for as long, the wait fails as a timeout would: retried
        elsewhere when it may be, and the cluster's endpoints ejected as by a connect
        timeout. Not on an endpoint max_ejection_percent keeps in (a sole endpoint's
        request waits for its answer), and never one the endpoint acknowledged: a slow
        endpoint's requests are not failed early. The cluster's silence is looked at
        before TCP_INFO: a slow endpoint among answering ones costs no system call."""
        up, host, upstream = self.up, self.host, self.upstream
        assert up is not None
        http = self.client.engine.http
        waited = now - (self.try_deadline - http.per_try_timeout_s)
        if not http.connect_timeout_s <= waited <= 3 * http.connect_timeout_s:
            return
        if host is None or upstream is None or not upstream.may_fail_silent(host):
            return
        if up.unacked_ms() >= http.connect_timeout_s * 1000:
            self.upstream_failed(up, SILENT_WAIT)
