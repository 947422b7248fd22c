"""TCP proxying with a pair of asyncio Protocols per connection.

The client side is accepted by a listener; the upstream side is connected to the host
the upstream set picks. Nothing is sent to the client before the upstream connect
succeeds, so a refused or timed-out connect is retried on another host (bounded by
`connect_attempts`) and the client never sees it. Bytes the client sends meanwhile are
held, up to EARLY_DATA_LIMIT, then its reading pauses.

Backpressure both ways: when one side's write buffer passes its high-water mark the
other side stops reading until it drains. Half-close is propagated (EOF from one side
becomes write_eof on the other; the pair closes when both directions are done), and so
is a reset (a side lost with an error closes the other with a RST, not a FIN). Idle
connections are expired by the manager's sweep, which only reads `idle` — the data
path resets one integer per chunk and never touches a timer.

Costs, measured with bench/tcp/callgrind.py: the connect coroutine is driven by hand
(no Task per connection, and no callback for its last step), connect timeouts share one
timer per listener (ConnectDeadlines), a direction that carries bulk data switches to a
BulkReader that reads into one shared buffer instead of a new bytes object per read, and
the 1 MiB write limits are set only on a side that queues or carries bulk data. Short
reads are forwarded through the listener's WriteBatch (mcsproxy/writebatch.py), after the
poll's other callbacks: every path here that half-closes or closes a transport flushes it
first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any, Final

from mcsproxy.proxy.context import ListenerContext
from mcsproxy.upstream import Host, UpstreamSet
from mcsproxy.upstream.upstream_set import CONNECT_VERDICT_DELAY_S

log = logging.getLogger("mcsproxy.proxy.tcp")

# Bytes queued towards the upstream before the client's reading pauses, and the reverse.
# 1 MiB, not uvloop's 64 KiB: measured (bench/tcp) 256 KiB gave ~0.6x tuned HAProxy on one
# stream because reading paused and resumed on nearly every chunk; 1 MiB gives >= 1x.
# Worst case a connection holds 2 MiB of buffered data. Set when a direction turns out to
# carry bulk data (BULK_READ_BYTES) or queues 64 KiB (raise_write_limits), not when the
# connection opens: short ones do neither.
UPSTREAM_WRITE_HIGH_WATER: Final = 1024 * 1024
CLIENT_WRITE_HIGH_WATER: Final = 1024 * 1024
# Bytes a client may send before the upstream connect completes (then reading pauses).
EARLY_DATA_LIMIT: Final = 64 * 1024
# A read at least this big says the direction carries bulk data: its reading moves to a
# BulkReader. Short exchanges stay on data_received, which costs fewer instructions per
# read (callgrind, 1600 short connections: 162k -> 179k per connection when every side
# was a BufferedProtocol) while bulk data gains most (4.3M -> 2.8M per MiB each way).
BULK_READ_BYTES: Final = 64 * 1024
# Bytes read from a socket at once, into the shared read buffer.
READ_BUFFER_BYTES: Final = 256 * 1024
# Read buffers given to write queues (ReadBuffer.detach) kept for reuse once drained.
SPARE_BUFFERS: Final = 8


class ReadBuffer:
    """The one receive buffer every bulk reader of the process reads into.

    A read hands the bytes to the other side's transport.write at once, in the same
    callback, so one buffer serves every connection: no bytes object is allocated and
    filled per read. When that transport could not send everything and queued the rest,
    the queue still points into this memory; `detach` gives it to the transport and
    takes another buffer for the next read (only under backpressure). Given-away buffers
    are kept (up to SPARE_BUFFERS) and taken again once their transport let go of them: a
    new 256 KiB bytearray costs the kernel 64 page faults and a zeroing, and one stream at
    ~17 Gbit/s detached ~340 times a second (iperf3: 21.7k minor faults/s against the
    bare relay's 3.8k).
    """

    __slots__ = ("buf", "given", "view")

    def __init__(self) -> None:
        self.buf = new_read_buffer()
        self.view = memoryview(self.buf)
        self.given: list[bytearray] = []

    def detach(self) -> None:
        # The transport's slices of the current buffer keep it exported (and so does the
        # read in progress, whose export uvloop releases after buffer_updated).
        given = self.given
        buf = None
        for i in range(len(given)):
            if not exported(given[i]):
                buf = given[i]
                given[i] = self.buf
                break
        if buf is None:
            if len(given) < SPARE_BUFFERS:
                given.append(self.buf)
            buf = new_read_buffer()
        self.buf = buf
        self.view = memoryview(buf)


def new_read_buffer() -> bytearray:
    """READ_BUFFER_BYTES long, with room for one byte more (see exported)."""
    buf = bytearray(READ_BUFFER_BYTES + 1)
    del buf[-1]
    return buf


def exported(buf: bytearray) -> bool:
    """Whether a memoryview of `buf` is still alive somewhere (a transport's write queue):
    CPython refuses to resize a bytearray while it is exported. The byte tried fits in
    what new_read_buffer allocated, so the test moves no memory."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


READ: Final = ReadBuffer()

# SO_LINGER on with a zero timeout: close() sends a RST instead of a FIN.
LINGER_RESET: Final = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a RST: one peer reset its connection, and the other must not take the
    end of the stream for an orderly one (a FIN) — a truncated upload or response would
    look complete. transport.abort() alone closes the socket with a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]  # every stream transport has it


def raise_write_limits(transport: asyncio.Transport, high: int) -> None:
    """A side that pauses (uvloop's default 64 KiB queued) before a bulk read set its
    limit gets `high` then. That pause still stops the other side's reading, so the
    transport's paused state and the reading agree, and it ends as soon as the queue is
    below the new low-water mark (high / 4): the next pauses come at `high`. Set again at
    each of them, which is harmless (the transport is paused already) and rare. Setting
    the limits when each connection opens cost ~1.5k instructions (callgrind, short
    connections)."""
    transport.set_write_buffer_limits(high)


class BulkReader(asyncio.BufferedProtocol):
    """Reads one side of a connection once it carries bulk data (set_protocol): straight
    into READ and on to the other side's transport; every other event goes to the side's
    own protocol as before."""

    __slots__ = ("client", "inner", "sink", "to_upstream")

    def __init__(self, inner: ClientSide | UpstreamSide, client: ClientSide,
                 sink: asyncio.Transport, to_upstream: bool) -> None:
        self.inner = inner
        self.client = client
        self.sink = sink
        self.to_upstream = to_upstream

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ.view

    def buffer_updated(self, nbytes: int) -> None:
        sink = self.sink
        sink.write(READ.view[:nbytes])
        if sink.get_write_buffer_size():
            READ.detach()
        client = self.client
        client.idle = 0
        if self.to_upstream:
            client.sent += nbytes
        else:
            client.received += nbytes

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


# What next() returns for a connect coroutine that has returned (see abandon_connect).
DONE: Final = object()


def finish_abandoned(coro: Coroutine[Any, Any, Any]) -> None:
    """The last step of a connect coroutine whose future was cancelled: it raises
    CancelledError (or, having connected just before, returns a transport it closes)."""
    try:
        coro.send(None)
    except StopIteration as done:
        done.value[0].abort()
        return
    except (asyncio.CancelledError, OSError):
        return
    coro.close()  # it waits on something else still: end it there


def finish_adopted(coro: Coroutine[Any, Any, Any]) -> None:
    """The last step of a connect coroutine whose transport was adopted: it returns the
    transport and protocol the connection already holds."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()


class UpstreamSide(asyncio.Protocol):
    """The connection to the chosen endpoint; forwards to the client side."""

    __slots__ = ("client", "client_transport", "transport")

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.client_transport = client.transport
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        client = self.client
        if client.attempt is not self:
            # A connect given up on (timed out, or its client gone) that completed anyway:
            # adopting it would count it under the retry's endpoint.
            transport.abort()  # type: ignore[attr-defined]
            return
        client.upstream_connected(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.ctx.writes.pass_on(client.loop, self.client_transport, data)
        client.idle = 0
        client.received += len(data)
        if len(data) >= BULK_READ_BYTES:
            self.client_transport.set_write_buffer_limits(CLIENT_WRITE_HIGH_WATER)
            self.transport.set_protocol(  # type: ignore[union-attr]
                BulkReader(self, client, self.client_transport, False))

    def eof_received(self) -> bool:
        return self.client.upstream_eof()

    def pause_writing(self) -> None:
        raise_write_limits(self.transport, UPSTREAM_WRITE_HIGH_WATER)  # type: ignore[arg-type]
        self.client_transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client.up is self.transport:  # not a connect that was given up on
            client.upstream_lost(exc)


class ClientSide(asyncio.Protocol):
    """One accepted client connection and, once connected, its upstream."""

    __slots__ = (
        "attempt",
        "attempts",
        "closed",
        "connect_timer",
        "connect_waiter",
        "connecting",
        "ctx",
        "early",
        "early_size",
        "got_client_eof",
        "got_upstream_eof",
        "host",
        "idle",
        "limit_key",
        "loop",
        "received",
        "sent",
        "started",
        "t_connect",
        "transport",
        "tried",
        "up",
        "upstream",
    )

    def __init__(self, ctx: ListenerContext,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.ctx = ctx
        # Handed over by the listener: asyncio.get_running_loop() makes a getpid system
        # call each time, one per connection.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.upstream: UpstreamSet = ctx.upstream
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.up: asyncio.Transport | None = None
        self.host: Host | None = None
        self.tried: list[Host] = []
        self.attempts = 0
        # The upstream connect in progress (a loop.create_connection coroutine); once its
        # transport is adopted, left at its last step until the connection ends.
        self.connecting: Coroutine[Any, Any, Any] | None = None
        self.connect_waiter: object = None  # the future `connecting` awaits
        self.attempt: UpstreamSide | None = None  # the protocol of the connect in progress
        # The connect timeout is in ctx.connect_deadlines; this is the verdict after it.
        self.connect_timer: asyncio.TimerHandle | None = None
        self.early: list[bytes] = []
        self.early_size = 0
        self.got_client_eof = False
        self.got_upstream_eof = False
        self.closed = False
        self.idle = 0
        self.limit_key: str | None = None  # counted by the listener's connection limits
        # Bytes relayed each way: folded into the cluster's counters when the upstream
        # side ends; until then the metrics collector reads them live.
        self.sent = 0
        self.received = 0
        self.started = 0.0
        self.t_connect = 0.0

    # -- client events ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        config = self.ctx.config
        if config.max_connections_per_listener or config.max_connections_per_client:
            self.limit_key = self.ctx.admit(transport)
            if self.limit_key is None:
                self.closed = True
                self.transport.abort()
                return
        self.ctx.conns.add(self)
        self.started = time.monotonic()
        self.connect_next()

    def data_received(self, data: bytes) -> None:
        up = self.up
        if up is not None:
            self.ctx.writes.pass_on(self.loop, up, data)
            self.idle = 0
            self.sent += len(data)
            if len(data) >= BULK_READ_BYTES:
                up.set_write_buffer_limits(UPSTREAM_WRITE_HIGH_WATER)
                self.transport.set_protocol(BulkReader(self, self, up, True))
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size >= EARLY_DATA_LIMIT:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.ctx.writes.flush()  # what the client sent goes before its EOF
        self.got_client_eof = True
        if self.up is not None:
            if self.got_upstream_eof:
                self.close_both()
                return False
            self.up.write_eof()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        raise_write_limits(self.transport, CLIENT_WRITE_HIGH_WATER)
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.limit_key is not None:
            self.ctx.leave(self.limit_key)
            self.limit_key = None
        elif self.closed and not self.started:
            return  # refused by a limit at accept: nothing began
        self.ctx.writes.flush()
        self.closed = True
        self.ctx.conns.discard(self)
        self.cancel_connect()
        if self.ctx.access_log is not None:
            self.log_access()
        up = self.up
        if up is not None:
            if exc is None:
                up.close()
            else:
                reset(up)

    # -- connecting, with retries -----------------------------------------------------
    def connect_next(self) -> None:
        upstream = self.upstream
        client_ip = None
        if upstream.affinity is not None:
            peer = self.transport.get_extra_info("peername")
            client_ip = peer[0] if peer else None
        tried = self.tried
        host = upstream.pick(client_ip, tried,
                             self.attempts + 1 >= self.ctx.config.connect_attempts)
        if host is None:
            if tried:
                tried[-1].stats.failed += 1
            else:
                upstream.stats.no_endpoint += 1
            self.ctx.give_up("no eligible endpoint" if not tried else
                             f"{len(tried)} connect attempts failed")
            self.transport.abort()
            return
        self.host = host
        attempts = self.attempts
        if attempts:
            upstream.stats.retries += 1
            self.t_connect = now = time.monotonic()
        else:  # the first attempt starts with the connection: one clock read fewer
            self.t_connect = now = self.started
        self.attempts = attempts + 1
        loop = self.loop
        # The coroutine is driven by hand (connect_step) rather than by a Task: a Task
        # costs an object, a context copy and two more trips through the loop per
        # connect, measured ~8 % of the proxy's instructions per short connection.
        self.connecting = loop.create_connection(self.make_upstream_side,
                                                 host.address, host.port)
        deadlines = self.ctx.connect_deadlines
        deadlines.pending[self] = now + deadlines.timeout_s
        if deadlines.timer is None:
            deadlines.arm(loop)
        self.connect_waiter = None
        self.connect_step(None)

    def connect_step(self, waited: object) -> None:
        """Resume the connect coroutine: at its start, and each time the future it
        waits on is done, until upstream_connected adopts its transport (or it fails)."""
        if waited is not self.connect_waiter:
            return  # an abandoned attempt's future: abandon_connect finishes that one
        coro = self.connecting
        if coro is None:
            return
        try:
            waiter = coro.send(None)
        except StopIteration:
            self.connecting = self.connect_waiter = None
            return
        except asyncio.CancelledError:
            self.connecting = self.connect_waiter = None  # the loop is shutting down
            return
        except Exception as exc:  # whatever the connect raised counts against the endpoint
            self.connecting = self.connect_waiter = None
            self.connect_error(exc)
            return
        self.connect_waiter = waiter
        if waiter is None:  # a bare yield (asyncio.sleep(0)): resume on the next turn
            self.loop.call_soon(self.connect_step, None)
        else:
            waiter.add_done_callback(self.connect_step)

    def abandon_connect(self) -> None:
        """Stop the connect in progress as Task.cancel would: cancel the future it waits
        on, so that the coroutine unwinds through its own cleanup (closing its socket,
        unregistering it from the loop), then drive it to its end."""
        coro, waiter = self.connecting, self.connect_waiter
        self.connecting = self.connect_waiter = None
        self.attempt = None
        if coro is None:
            return
        if self.up is not None:  # adopted: the coroutine was left at its last step
            if waiter is not None and not waiter.done():  # type: ignore[attr-defined]
                waiter.add_done_callback(  # type: ignore[attr-defined]
                    lambda _: finish_adopted(coro))
                return
            # finish_adopted, inlined: every connection comes here. uvloop's coroutines
            # are iterators, and next() takes their return (StopIteration) in C, where a
            # try/except around send() costs a traceback and this frame's exception
            # handling (callgrind: ~1k instructions per short connection). asyncio's
            # own loop returns native coroutines, which are not.
            if type(coro) is not CoroutineType:
                if next(coro, DONE) is not DONE:  # type: ignore[call-overload]
                    coro.close()
                return
            try:
                coro.send(None)
            except StopIteration:
                return
            coro.close()
            return
        if waiter is not None and waiter.cancel():  # type: ignore[attr-defined]
            waiter.add_done_callback(  # type: ignore[attr-defined]
                lambda _: finish_abandoned(coro))
        else:
            coro.close()

    def make_upstream_side(self) -> UpstreamSide:
        side = self.attempt = UpstreamSide(self)
        return side

    def connect_timeout(self) -> None:
        # A finished connect reaches connection_made through a few queued callbacks: the
        # verdict waits CONNECT_VERDICT_DELAY_S for the loop to catch up.
        if self.connecting is not None:
            self.connect_timer = self.loop.call_later(CONNECT_VERDICT_DELAY_S,
                                                      self.connect_timed_out)

    def connect_timed_out(self) -> None:
        self.connect_timer = None
        if self.connecting is not None and self.up is None:
            self.abandon_connect()
            self.connect_failed("timeout")

    def connect_error(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.cancel_connect()
            # Our own descriptors ran out: not the endpoint's fault, so no failure is
            # held against it (no ejection); this client is shed.
            self.ctx.shed()
            self.transport.abort()
            return
        self.connect_failed("connection refused" if isinstance(exc, ConnectionRefusedError)
                            else getattr(exc, "strerror", None) or type(exc).__name__)

    def connect_failed(self, reason: str) -> None:
        self.cancel_connect()
        host = self.host
        assert host is not None
        self.upstream.connect_failed(host, reason)
        self.tried.append(host)
        if self.closed:
            return
        if self.attempts >= self.ctx.config.connect_attempts:
            host.stats.failed += 1
            self.ctx.give_up(f"{self.attempts} connect attempts failed, last: {reason}")
            self.transport.abort()
            return
        self.connect_next()

    def cancel_connect(self) -> None:
        if self.up is None:  # else upstream_connected took it out
            self.ctx.connect_deadlines.pending.pop(self, None)
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        self.abandon_connect()

    def upstream_connected(self, up: asyncio.Transport) -> None:
        self.ctx.connect_deadlines.pending.pop(self, None)
        if self.connect_timer is not None:  # the verdict on a timeout
            self.connect_timer.cancel()
            self.connect_timer = None
        if self.closed:
            up.abort()
            return
        self.up = up
        waiter = self.connect_waiter
        if waiter is not None:
            # The coroutine's last step only returns (transport, protocol): it is taken
            # when the connection ends (abandon_connect), not in a callback of its own
            # scheduled now (callgrind: -1.4 % instructions per short connection).
            waiter.remove_done_callback(self.connect_step)  # type: ignore[attr-defined]
        host = self.host
        assert host is not None
        self.upstream.connect_ok(host, self)
        stats = host.stats
        stats.connections += 1
        stats.attempts["ok"] += 1
        stats.connect_time.observe(time.monotonic() - self.t_connect)
        if self.early:
            if self.early_size >= EARLY_DATA_LIMIT:
                # The client's reading, paused for early data, resumes below: this write
                # must not pause it too (past uvloop's default 64 KiB), or the resume
                # would leave the transport paused with the client still reading, and
                # nothing would stop the queue until its first write completes.
                up.set_write_buffer_limits(UPSTREAM_WRITE_HIGH_WATER)
            up.write(b"".join(self.early) if len(self.early) > 1 else self.early[0])
            self.early = []
            self.sent += self.early_size
            if self.early_size >= EARLY_DATA_LIMIT:
                self.transport.resume_reading()
            self.early_size = 0
        if self.got_client_eof:
            up.write_eof()

    # -- upstream events --------------------------------------------------------------
    def upstream_eof(self) -> bool:
        self.got_upstream_eof = True
        if self.got_client_eof:
            self.close_both()
            return False
        if not self.closed:
            # Forwarded after the events of this poll: a request-response client (an
            # HTTP/1.0 exchange, Connection: close) usually closes as the endpoint does,
            # and then close_both sends the FIN. A shutdown costs libuv an epoll
            # modification, a writable event, the shutdown call and another modification.
            self.loop.call_soon(self.forward_upstream_eof)
        return True

    def forward_upstream_eof(self) -> None:
        # Closed meanwhile (client EOF, idle expiry, the endpoint gone): nothing to forward,
        # and write_eof on a closed uvloop transport raises.
        if not (self.closed or self.got_client_eof or self.transport.is_closing()):
            self.ctx.writes.flush()
            self.transport.write_eof()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.ctx.writes.flush()
        host = self.host
        if host is not None:
            stats = host.stats
            stats.bytes_to_upstream += self.sent
            stats.bytes_to_client += self.received
            self.upstream.release(host, self)
        if self.closed:
            return
        if exc is None:
            self.transport.close()
        else:
            reset(self.transport)

    # -- ending -----------------------------------------------------------------------
    def close_both(self) -> None:
        self.ctx.writes.flush()
        self.transport.close()
        if self.up is not None:
            self.up.close()

    def abort(self) -> None:
        self.transport.abort()
        if self.up is not None:
            self.up.abort()

    def cluster_silent(self) -> None:
        """An established stream is left to its own idle timeout: unlike an HTTP request
        it cannot be replayed elsewhere, and a short partition may heal under it."""

    def log_access(self) -> None:
        host = self.host
        if self.up is not None:
            outcome = "ok"
        elif host is None:
            outcome = "no_endpoint"
        elif self.connecting is None and len(self.tried) >= self.attempts:
            outcome = "failed"
        else:
            outcome = "client_closed"
        peer = self.transport.get_extra_info("peername")
        assert self.ctx.access_log is not None
        self.ctx.access_log.record(
            kind="tcp", client=f"{peer[0]}:{peer[1]}" if peer else None,
            listener=self.ctx.name, upstream=self.upstream.name,
            cluster=host.cluster if host is not None else None,
            endpoint=f"{host.address}:{host.port}" if host is not None else None,
            outcome=outcome, attempts=self.attempts,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
            bytes_to_upstream=self.sent, bytes_to_client=self.received)

    def expire(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener %s: closing idle connection to %s", self.ctx.name, self.host)
        self.ctx.writes.flush()  # held bytes count as queued
        up = self.up
        if self.transport.get_write_buffer_size() or (
                up is not None and up.get_write_buffer_size()):
            # Idle with bytes still queued: that peer is not reading, and a close would
            # wait for it forever (the connection, and its limit slot, never released).
            self.abort()
        else:
            self.close_both()


class StreamFactory:
    """The Protocol of each connection a stream listener accepts, by what its port serves
    now: a port that gains or loses `appProtocol: http` keeps its socket (and every
    established connection), and the next connection is proxied the new way.

    Here rather than beside the listeners in manager.py: it runs for every accepted
    connection, and compiled it costs ~1.3k instructions fewer per short TCP connection
    than interpreted (callgrind through the gateway, 3000 connections: 71.4k against
    72.6-73.5k)."""

    __slots__ = ("ctx", "http", "http_factory", "loop")

    def __init__(self, ctx: ListenerContext, loop: asyncio.AbstractEventLoop,
                 http_factory: Callable[[], asyncio.Protocol], http: bool) -> None:
        self.ctx = ctx
        self.loop = loop
        self.http_factory = http_factory
        self.http = http

    def __call__(self) -> asyncio.Protocol:
        if self.http:
            return self.http_factory()
        return ClientSide(self.ctx, self.loop)
