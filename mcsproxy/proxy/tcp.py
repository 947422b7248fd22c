"""TCP proxying on the loop's socket readiness: our own non-blocking sockets, no transports.

A stream listener accepts connections off its socket itself (StreamListener); each
becomes a TcpConnection holding two Sides, the client's socket and, once a connect
succeeded, the endpoint's, each registered for reading and, while the kernel takes less
than we offer, for writing, with the manager's Poller: an epoll of our own, nested in the
loop's (mcsproxy/proxy/poller.py says why). Measured against a pair of
asyncio Protocols on uvloop transports (the textbook relay, bench/tcp/bare_relay.py),
the same relay on raw sockets made 1.2-1.35x its short connections per second at about
0.75x its CPU each, near HAProxy's rate: a uvloop transport costs two getsockname /
getpeername calls, a weak registry entry and a Protocol's callbacks, twice per connection.

Nothing is sent to the client before the upstream connect succeeds, so a refused or
timed-out connect is retried on another host (bounded by `connect_attempts`) and the
client never sees it; bytes it sends meanwhile are held, up to EARLY_DATA_LIMIT, then
its reading pauses. A non-blocking connect is asked again at once: over loopback, and to
a pod on the same node, the handshake is done by then and the connection is used without
a wait for writability; otherwise the connect waits for it, under the listener's shared
connect timeout (ConnectDeadlines).

Backpressure both ways: bytes the kernel did not take are queued on their Side; past
WRITE_HIGH_WATER the other side's reading pauses until the queue is under
WRITE_LOW_WATER. Half-close is propagated (an EOF becomes a shutdown of the other side
once what was queued for it is sent; the pair closes when both directions are done), and
so is a reset (a side whose socket fails closes the other with a RST, not a FIN), and a
peer gone silent: both sockets carry TCP keepalive (the client's inherited from the
listening socket) and the endpoint's TCP_USER_TIMEOUT, so its socket fails in bounded
time. A stream the gateway cuts (abort) is reset both ways. Idle connections are expired
by the manager's sweep, which only reads `idle`.

Short reads are held until the loop has run every callback of its poll (the manager's
WriteBatch, mcsproxy/writebatch.py) and then written; reads of HOLD_BELOW bytes or more
are written at once from the shared read buffer (ReadBuffer).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from mcsproxy.proxy.context import ListenerContext
from mcsproxy.upstream import Host, UpstreamSet
from mcsproxy.upstream.upstream_set import CONNECT_VERDICT_DELAY_S
from mcsproxy.writebatch import HOLD_BELOW

log = logging.getLogger("mcsproxy.proxy.tcp")

# Bytes queued towards one side before the other side's reading pauses, and the level its
# reading resumes under. 1 MiB: measured (bench/tcp) 256 KiB gave ~0.6x tuned HAProxy on
# one stream because reading paused and resumed on nearly every chunk. Worst case a
# connection holds 2 MiB plus one read each way.
WRITE_HIGH_WATER: Final = 1024 * 1024
WRITE_LOW_WATER: Final = WRITE_HIGH_WATER // 4
# Bytes a client may send before the upstream connect completes (then reading pauses).
EARLY_DATA_LIMIT: Final = 64 * 1024
# Bytes read from a socket at once, into the shared read buffer.
READ_BUFFER_BYTES: Final = 256 * 1024
# Read buffers given to write queues (ReadBuffer.detach) kept for reuse once drained.
SPARE_BUFFERS: Final = 8
# Reads of a bulk direction per readiness event while each fills the read buffer and is
# written whole, as libuv reads a stream (up to 32): fewer trips through the loop's poll.
BULK_READS_PER_EVENT: Final = 16
# Queued pieces handed to one sendmsg (the kernel's IOV_MAX is 1024).
SEND_PIECES: Final = 256
# Connections accepted per readiness event of a listener (HAProxy's tune.maxaccept).
ACCEPT_BATCH: Final = 64
# struct tcp_info of a listening socket: tcpi_unacked is the length of its accept queue
# (what `ss -l` shows as Recv-Q), a u32 in native byte order after 8 bytes and 4 u32s.
ACCEPT_QUEUE_OFFSET: Final = 24
LITTLE_ENDIAN: Final = sys.byteorder == "little"
TCP_INFO_HEAD: Final = 32
# A listener that hit the descriptor limit stops accepting this long (the connections wait
# in its backlog): level-triggered readiness would otherwise spin on the failing accept.
ACCEPT_PAUSE_S: Final = 0.1
ACCEPT_ERROR_LOG_INTERVAL_S: Final = 1.0
OUT_OF_DESCRIPTORS: Final = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
LISTEN_BACKLOG: Final = 4096
# The socket and errno constants of the per-connection path, as compiled statics: each
# `socket.X` or `errno.X` there was a module attribute look-up, 13 a connection (~2.3k
# instructions; the gateway alone under callgrind).
AF_INET: Final = int(socket.AF_INET)
AF_INET6: Final = int(socket.AF_INET6)
SOCK_STREAM: Final = int(socket.SOCK_STREAM)
SOCK_STREAM_NONBLOCK: Final = int(socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
IPPROTO_TCP: Final = int(socket.IPPROTO_TCP)
TCP_NODELAY: Final = int(socket.TCP_NODELAY)
TCP_INFO: Final = int(socket.TCP_INFO)
SHUT_WR: Final = int(socket.SHUT_WR)
EINPROGRESS: Final = errno.EINPROGRESS
EALREADY: Final = errno.EALREADY
EISCONN: Final = errno.EISCONN
# SO_LINGER on with a zero timeout: close() sends a RST instead of a FIN.
LINGER_RESET: Final = struct.pack("ii", 1, 0)


def accept_queue_length(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue, from TCP_INFO."""
    info: bytes = sock.getsockopt(IPPROTO_TCP, TCP_INFO, TCP_INFO_HEAD)
    # Put together from its bytes: compiled, a bytes index is native, where
    # Struct.unpack_from was a generic method call (~640 instructions a readiness event).
    i = ACCEPT_QUEUE_OFFSET
    if LITTLE_ENDIAN:
        return info[i] | info[i + 1] << 8 | info[i + 2] << 16 | info[i + 3] << 24
    return info[i + 3] | info[i + 2] << 8 | info[i + 1] << 16 | info[i] << 24


class ReadBuffer:
    """The one receive buffer every connection of the process reads into.

    A read is written on at once, in the same callback, so one buffer serves every
    connection: no bytes object is allocated and filled per bulk read. When the kernel
    took less than all of it, the rest stays queued as a view into this memory; `detach`
    leaves the buffer to that queue and takes another for the next read (only under
    backpressure). Given-away buffers are kept (up to SPARE_BUFFERS) and taken again once
    no queue holds a view of them: a new 256 KiB bytearray costs the kernel 64 page faults
    and a zeroing, and one stream at ~17 Gbit/s detached ~340 times a second (iperf3:
    21.7k minor faults/s against the bare relay's 3.8k).
    """

    __slots__ = ("buf", "given", "view")

    def __init__(self) -> None:
        self.buf = new_read_buffer()
        self.view = memoryview(self.buf)
        self.given: list[bytearray] = []

    def detach(self) -> None:
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
    """Whether a memoryview of `buf` is still alive somewhere (a write queue): CPython
    refuses to resize a bytearray while it is exported. The byte tried fits in what
    new_read_buffer allocated, so the test moves no memory."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


READ: Final = ReadBuffer()


def close_with_reset(sock: _socket.socket) -> None:
    """One peer reset its connection, and the other must not take the end of the stream
    for an orderly one (a FIN): a truncated upload or response would look complete."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


class Side:
    """One socket of a proxied connection and what is queued towards it.

    The socket is the C type, `_socket.socket`, not its subclass `socket.socket`, whose
    `__init__` and `close()` are interpreted code: two sockets a connection cost 6k
    instructions more (callgrind of the gateway alone). Nothing here uses what the
    subclass adds (makefile, dup, context manager)."""

    __slots__ = ("bulk", "eof_due", "fd", "got_eof", "out", "queued", "reading", "shut", "sock",
                 "writing")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out: list[Any] = []  # bytes-like pieces not yet written, in order
        self.queued = 0  # their total length
        self.reading = False  # registered with the poller for reading
        self.writing = False  # registered for writability: the kernel took less than offered
        self.got_eof = False  # its peer sent a FIN
        self.eof_due = False  # the other side's FIN, to pass on once `out` is written
        self.shut = False  # that FIN was passed on (or the socket closed)
        self.bulk = False  # what is read from it is written at once, never held


class TcpConnection:
    """One accepted client connection and, once connected, its upstream."""

    __slots__ = (
        "attempts",
        "client",
        "closed",
        "connect_timer",
        "connected",
        "ctx",
        "early",
        "early_size",
        "held",
        "host",
        "idle",
        "limit_key",
        "loop",
        "peer",
        "poller",
        "received",
        "sent",
        "started",
        "t_connect",
        "tried",
        "up",
        "upstream",
    )

    def __init__(self, ctx: ListenerContext, loop: asyncio.AbstractEventLoop,
                 sock: _socket.socket, peer: Any) -> None:
        self.ctx = ctx
        self.loop = loop
        self.poller = ctx.poller_for(loop)
        self.upstream: UpstreamSet = ctx.upstream
        self.client = Side(sock)
        self.peer = peer  # the client's (address, port) from accept
        self.up: Side | None = None  # the endpoint's socket, from the first connect attempt
        self.connected = False
        self.host: Host | None = None
        self.tried: list[Host] = []
        self.attempts = 0
        # The connect timeout is in ctx.connect_deadlines; this is the verdict after it.
        self.connect_timer: asyncio.TimerHandle | None = None
        self.early: list[Any] = []  # what the client sent before the connect completed
        self.early_size = 0
        self.held = False  # waiting in the WriteBatch for the end of the poll
        self.closed = False
        self.idle = 0
        self.limit_key: str | None = None  # counted by the listener's connection limits
        # Bytes relayed each way: folded into the cluster's counters when the connection
        # ends; until then the metrics collector reads them live.
        self.sent = 0
        self.received = 0
        self.started = 0.0
        self.t_connect = 0.0

    def start(self) -> None:
        sock = self.client.sock
        ctx = self.ctx
        try:
            sock.setblocking(False)
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        except OSError:  # gone already
            self.closed = True
            sock.close()
            return
        if ctx.limited:
            self.limit_key = ctx.admit(self.peer)
            if self.limit_key is None:
                self.closed = True
                sock.close()
                return
        ctx.conns.add(self)
        self.started = time.monotonic()
        self.client.reading = True
        self.poller.add_reader(self.client.fd, self.client_readable)
        self.connect_next()

    # -- readiness callbacks ----------------------------------------------------------
    def client_readable(self) -> None:
        self.relay(self.client, self.up if self.connected else None, True)

    def upstream_readable(self) -> None:
        up = self.up
        assert up is not None
        self.relay(up, self.client, False)

    def client_writable(self) -> None:
        self.push(self.client, self.up)

    def upstream_writable(self) -> None:
        up = self.up
        assert up is not None
        self.push(up, self.client)

    # -- relaying ---------------------------------------------------------------------
    def relay(self, src: Side, dst: Side | None, to_upstream: bool,
              rounds: int = BULK_READS_PER_EVENT) -> None:
        """Read once from `src` and pass it on towards `dst` (None: still connecting);
        again while a bulk read fills the buffer and is written whole, at most `rounds`."""
        buf = READ.buf
        try:
            n = src.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.finish(src)
            return
        if n == 0:
            self.eof_from(src, dst)
            return
        self.idle = 0
        if to_upstream:
            self.sent += n
        else:
            self.received += n
        if dst is None:
            self.early.append(buf[:n])
            self.early_size += n
            if self.early_size >= EARLY_DATA_LIMIT:
                self.pause(src)
            return
        if n < HOLD_BELOW and not src.bulk:
            dst.out.append(buf[:n])
            dst.queued += n
            if dst.queued >= WRITE_HIGH_WATER:
                self.pause(src)
            if not (dst.writing or self.held):
                self.held = True
                self.ctx.writes.later(self.loop, self)
            return
        # A bulk read: written now, straight from the shared buffer. The direction stays
        # bulk: on a busy stream many reads come in under HOLD_BELOW, and each would be
        # copied and held (8 iperf3 streams: 0.86x the Gbit/s).
        src.bulk = True
        if dst.out:
            dst.out.append(READ.view[:n])
            dst.queued += n
            READ.detach()
            if not dst.writing:
                self.push(dst, src)
            elif dst.queued >= WRITE_HIGH_WATER:
                self.pause(src)
            return
        try:
            sent = dst.sock.send(READ.view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.finish(dst)
            return
        if sent < n:
            dst.out.append(READ.view[sent:n])
            dst.queued += n - sent
            READ.detach()
            self.wait_writable(dst)
            if dst.queued >= WRITE_HIGH_WATER:
                self.pause(src)
        elif n == len(buf) and rounds > 1:
            self.relay(src, dst, to_upstream, rounds - 1)

    def push(self, dst: Side, src: Side | None) -> None:
        """Write what is queued towards `dst`; `src` feeds it (resumed once under the low
        water mark)."""
        out = dst.out
        try:
            if len(out) == 1:
                sent = dst.sock.send(out[0])
            else:
                sent = dst.sock.sendmsg(out[:SEND_PIECES] if len(out) > SEND_PIECES else out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.finish(dst)
            return
        dst.queued -= sent
        done = 0
        while sent:
            piece = out[done]
            size = len(piece)
            if sent < size:
                out[done] = memoryview(piece)[sent:]
                break
            sent -= size
            done += 1
        if done:
            del out[:done]
        if out:
            self.wait_writable(dst)
        elif dst.writing:
            dst.writing = False
            self.poller.remove_writer(dst.fd)
        if src is not None and not src.reading and dst.queued < WRITE_LOW_WATER:
            self.resume(src)
        if not out and dst.eof_due:
            self.shut(dst)

    def flush_deferred(self) -> None:
        """The WriteBatch's call at the end of the poll: write what the reads held."""
        self.held = False
        if self.closed:
            return
        client = self.client
        up = self.up
        if client.out and not client.writing:
            self.push(client, up)
        if up is not None and self.connected and up.out and not up.writing and not self.closed:
            self.push(up, client)

    def wait_writable(self, dst: Side) -> None:
        if not dst.writing:
            dst.writing = True
            self.poller.add_writer(dst.fd, self.client_writable if dst is self.client
                                   else self.upstream_writable)

    def pause(self, src: Side) -> None:
        if src.reading:
            src.reading = False
            self.poller.remove_reader(src.fd)

    def resume(self, src: Side) -> None:
        if not (src.reading or src.got_eof or self.closed):
            src.reading = True
            self.poller.add_reader(src.fd, self.client_readable if src is self.client
                                   else self.upstream_readable)

    def eof_from(self, src: Side, dst: Side | None) -> None:
        src.got_eof = True
        self.pause(src)
        if dst is None:
            return  # the client's EOF goes upstream once connected (upstream_connected)
        dst.eof_due = True
        if dst.out:
            if not dst.writing:
                self.push(dst, src)  # what is held goes first; push passes the EOF on
        else:
            self.shut(dst)

    def shut(self, dst: Side) -> None:
        dst.eof_due = False
        dst.shut = True
        other = self.up if dst is self.client else self.client
        if other is not None and other.shut:
            self.finish(None)  # both directions done: close() sends the FIN
            return
        try:
            dst.sock.shutdown(SHUT_WR)
        except OSError:
            self.finish(dst)

    # -- connecting, with retries -----------------------------------------------------
    def connect_next(self) -> None:
        upstream = self.upstream
        client_ip = None
        if upstream.affinity is not None:
            client_ip = self.peer[0] if self.peer else None
        tried = self.tried
        host = upstream.pick(client_ip, tried,
                             self.attempts + 1 >= self.ctx.connect_attempts)
        if host is None:
            if tried:
                tried[-1].stats.failed += 1
            else:
                upstream.stats.no_endpoint += 1
            self.ctx.give_up("no eligible endpoint" if not tried else
                             f"{len(tried)} connect attempts failed")
            self.finish(None)
            return
        self.host = host
        attempts = self.attempts
        if attempts:
            upstream.stats.retries += 1
            self.t_connect = now = time.monotonic()
        else:  # the first attempt starts with the connection: one clock read fewer
            self.t_connect = now = self.started
        self.attempts = attempts + 1
        address = host.key
        try:
            # Non-blocking from the start: no ioctl to make it so (CPython then treats
            # it as setblocking(False) would).
            sock = _socket.socket(AF_INET6 if ":" in host.address else AF_INET,
                                  SOCK_STREAM_NONBLOCK)
        except OSError as exc:
            self.connect_error(exc)
            return
        up = self.up = Side(sock)
        try:
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            # Keepalive and TCP_USER_TIMEOUT: an endpoint whose cluster falls silent (a
            # cut link sends no RST) fails the socket in bounded time, and finish()
            # resets the client, which can reconnect to a live endpoint.
            for level, option, value in self.ctx.endpoint_options:
                sock.setsockopt(level, option, value)
            err = sock.connect_ex(address)
            if err == EINPROGRESS:
                # Asked again: over loopback the handshake has completed inside the first
                # call (the SYN-ACK is processed as it returns), and then the connection
                # is used now instead of after a poll for writability.
                err = sock.connect_ex(address)
        except OSError as exc:
            self.connect_error(exc)
            return
        if err == 0 or err == EISCONN:
            self.upstream_connected()
            return
        if err != EALREADY and err != EINPROGRESS:
            self.connect_error(OSError(err, os.strerror(err)))
            return
        up.writing = True
        self.poller.add_writer(up.fd, self.connect_done)
        deadlines = self.ctx.connect_deadlines
        deadlines.pending[self] = now + deadlines.timeout_s
        if deadlines.timer is None:
            deadlines.arm(self.loop)

    def connect_done(self) -> None:
        """The connect in progress ended (the socket polled writable)."""
        up = self.up
        if up is None or self.connected or self.closed:
            return
        up.writing = False
        self.poller.remove_writer(up.fd)
        self.stop_connect_timeout()
        err = up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_error(OSError(err, os.strerror(err)))
        else:
            self.upstream_connected()

    def connect_timeout(self) -> None:
        # A finished connect reaches connect_done through a poll: the verdict waits
        # CONNECT_VERDICT_DELAY_S for the loop to catch up after a stall.
        if self.up is not None and not (self.connected or self.closed):
            self.connect_timer = self.loop.call_later(CONNECT_VERDICT_DELAY_S,
                                                      self.connect_timed_out)

    def connect_timed_out(self) -> None:
        self.connect_timer = None
        if self.up is not None and not (self.connected or self.closed):
            self.connect_failed("timeout")

    def connect_error(self, exc: OSError) -> None:
        if exc.errno in OUT_OF_DESCRIPTORS:
            # Our own descriptors ran out: not the endpoint's fault, so no failure is
            # held against it (no ejection); this client is shed.
            self.ctx.shed()
            self.finish(None)
            return
        self.connect_failed("connection refused" if exc.errno == errno.ECONNREFUSED
                            else exc.strerror or type(exc).__name__)

    def connect_failed(self, reason: str) -> None:
        self.cancel_connect()
        host = self.host
        assert host is not None
        self.upstream.connect_failed(host, reason)
        self.tried.append(host)
        if self.closed:
            return
        if self.attempts >= self.ctx.connect_attempts:
            host.stats.failed += 1
            self.ctx.give_up(f"{self.attempts} connect attempts failed, last: {reason}")
            self.finish(None)
            return
        self.connect_next()

    def stop_connect_timeout(self) -> None:
        self.ctx.connect_deadlines.pending.pop(self, None)
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None

    def cancel_connect(self) -> None:
        """Give up the connect in progress, if any: its socket is closed."""
        self.stop_connect_timeout()
        up = self.up
        if up is not None and not self.connected:
            self.up = None
            if up.writing:
                self.poller.remove_writer(up.fd)
            up.sock.close()

    def upstream_connected(self) -> None:
        up = self.up
        host = self.host
        assert up is not None and host is not None
        self.connected = True
        self.upstream.connect_ok(host, self)
        stats = host.stats
        stats.connections += 1
        stats.attempts["ok"] += 1
        stats.connect_time.observe(time.monotonic() - self.t_connect)
        up.reading = True
        self.poller.add_reader(up.fd, self.upstream_readable)
        client = self.client
        if self.early:
            up.out = self.early
            up.queued = self.early_size
            self.early = []
            self.early_size = 0
            if client.got_eof:
                up.eof_due = True
            self.push(up, client)
        elif client.got_eof:
            self.shut(up)

    # -- ending -----------------------------------------------------------------------
    def finish(self, broken: Side | None, cut: bool = False) -> None:
        """End the connection: both sockets closed. `broken` is a side whose socket
        failed (a reset, a broken pipe): the other one is closed with a RST. `cut`: the
        gateway ends a stream neither peer ended, and both are closed with a RST."""
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        if self.limit_key is not None:
            ctx.leave(self.limit_key)
            self.limit_key = None
        ctx.conns.discard(self)
        up = self.up
        if not self.connected:
            self.cancel_connect()
            up = None
        # Side by side rather than a loop over a tuple of both: compiled, the loop builds
        # the tuple and iterates it generically (~330 instructions a connection).
        client = self.client
        self.close_side(client, cut or (broken is not None and client is not broken))
        if up is not None:
            self.close_side(up, cut or (broken is not None and up is not broken))
        host = self.host
        if up is not None and host is not None:
            stats = host.stats
            stats.bytes_to_upstream += self.sent
            stats.bytes_to_client += self.received
            self.upstream.release(host, self)
        if ctx.access_log is not None:
            self.log_access()

    def close_side(self, side: Side, reset: bool) -> None:
        # Flags cleared with the registrations: a pause or push that runs on after a
        # failed write (in the same callback) finds nothing left to unregister.
        poller = self.poller
        if side.reading:
            side.reading = False
            poller.remove_reader(side.fd)
        if side.writing:
            side.writing = False
            poller.remove_writer(side.fd)
        if reset:
            close_with_reset(side.sock)
        else:
            side.sock.close()

    def abort(self) -> None:
        """Cut by the gateway (the drain grace of a removed endpoint over, a shutdown past
        its drain timeout): with a RST both ways, as a FIN would pass the truncated
        download and upload off as complete ones."""
        self.finish(None, True)

    def cluster_silent(self, waited_s: float = 0.0) -> None:
        """An established stream is left alone: unlike an HTTP request it cannot be
        replayed elsewhere, and a short partition may heal under it. A silence that lasts
        fails its socket through keepalive or TCP_USER_TIMEOUT (--tcp-keepalive,
        --tcp-user-timeout), and finish() resets the client."""

    def expire(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener %s: closing idle connection to %s", self.ctx.name, self.host)
        if self.held:  # read in this poll: written first, as the end of the poll would
            self.flush_deferred()
        self.finish(None)

    def log_access(self) -> None:
        host = self.host
        if self.connected:
            outcome = "ok"
        elif host is None:
            outcome = "no_endpoint"
        elif len(self.tried) >= self.attempts:
            outcome = "failed"
        else:
            outcome = "client_closed"
        peer = self.peer
        assert self.ctx.access_log is not None
        self.ctx.access_log.record(
            kind="tcp", client=f"{peer[0]}:{peer[1]}" if peer else None,
            listener=self.ctx.name, upstream=self.upstream.name,
            cluster=host.cluster if host is not None else None,
            endpoint=f"{host.address}:{host.port}" if host is not None else None,
            outcome=outcome, attempts=self.attempts,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
            bytes_to_upstream=self.sent, bytes_to_client=self.received)


class StreamListener:
    """A stream port's listening socket. While the port is a TCP stream, connections are
    accepted here, straight off the socket; while it serves HTTP, an asyncio server
    accepts on a duplicate of the socket instead (HTTP connections are uvloop
    transports). A port that gains or loses `appProtocol: http` keeps its socket, its
    backlog and every established connection, and the next connection is proxied the
    new way."""

    __slots__ = ("accepting", "closed", "ctx", "family", "http", "http_factory",
                 "last_error_log", "loop", "resume_timer", "server", "sock")

    def __init__(self, ctx: ListenerContext, loop: asyncio.AbstractEventLoop,
                 sock: socket.socket, http_factory: Callable[[], asyncio.Protocol],
                 http: bool) -> None:
        self.ctx = ctx
        self.loop = loop
        self.sock = sock  # bound and listening, non-blocking
        self.family = int(sock.family)
        self.http_factory = http_factory
        self.http = http
        self.server: asyncio.Server | None = None  # while serving HTTP
        self.accepting = False
        self.closed = False
        self.resume_timer: asyncio.TimerHandle | None = None
        self.last_error_log = 0.0

    async def start(self) -> None:
        if self.http:
            await self.serve_http()
        else:
            self.accept_here()

    async def set_http(self, http: bool) -> None:
        if http == self.http or self.closed:
            return
        self.http = http
        if http:
            self.stop_accepting()
            await self.serve_http()
        else:
            server, self.server = self.server, None
            if server is not None:
                server.close()
            self.accept_here()

    async def serve_http(self) -> None:
        dup = self.sock.dup()
        try:
            self.server = await self.loop.create_server(self.http_factory, sock=dup,
                                                        backlog=LISTEN_BACKLOG)
        except BaseException:
            dup.close()
            raise

    def accept_here(self) -> None:
        if not (self.accepting or self.closed):
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self.accept_ready)

    def stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
        if self.resume_timer is not None:
            self.resume_timer.cancel()
            self.resume_timer = None

    def accept_ready(self) -> None:
        sock = self.sock
        ctx = self.ctx
        loop = self.loop
        family = self.family
        # Accepting until accept() fails costs the failing call and its BlockingIOError
        # (~5 us in Python) on every readiness event; the listener's queue length costs
        # one getsockopt (~0.9 us). Who comes meanwhile is seen next poll.
        try:
            waiting = accept_queue_length(sock)
        except OSError:
            waiting = 1
        for _ in range(min(max(waiting, 1), ACCEPT_BATCH)):
            try:
                # Typed, the pair is taken apart by index: unpacked untyped, compiled code
                # iterates it generically (~270 instructions a connection).
                accepted: tuple[int, Any] = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self.out_of_descriptors(exc)
                    return
                continue  # that client alone (ECONNABORTED and the like)
            # Not sock.accept(): it converts the listener's family and type to enums
            # each time (~1.4 us per connection here).
            conn = _socket.socket(family, SOCK_STREAM, 0, accepted[0])
            TcpConnection(ctx, loop, conn, accepted[1]).start()

    def out_of_descriptors(self, exc: OSError) -> None:
        """The connections wait in the backlog while descriptors are short."""
        self.stop_accepting()
        self.resume_timer = self.loop.call_later(ACCEPT_PAUSE_S, self.resume_accepting)
        now = time.monotonic()
        if now - self.last_error_log >= ACCEPT_ERROR_LOG_INTERVAL_S:
            self.last_error_log = now
            log.warning("listener %s: cannot accept (%s); pausing for %.1f s",
                        self.ctx.name, exc.strerror, ACCEPT_PAUSE_S)

    def resume_accepting(self) -> None:
        self.resume_timer = None
        if not self.http:
            self.accept_here()

    def close(self) -> None:
        """Stop accepting and close the socket; accepted connections carry on."""
        if self.closed:
            return
        self.stop_accepting()
        self.closed = True
        if self.server is not None:
            self.server.close()
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()
