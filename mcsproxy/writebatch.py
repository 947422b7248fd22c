"""Short writes held until the loop has run every callback of its current poll.

A write to a socket wakes the task reading the other end (wrk, nginx, a client, an
endpoint). Written at once, from inside each read callback, the writes of one poll are
spread over all the Python work between them, so the reader on the other core sleeps and
is woken again between two of them: each wake of a sleeping task on another CPU is an
inter-processor interrupt, dear in a VM. Made together, after the poll's callbacks, they
wake it once. Measured (2 cores, load on core 0, the gateway on core 1, 6 repetitions
each): short TCP connections +4.5 to +6.6 % per second at 3.7 to 4.9 % less CPU each, the
reschedule interrupts core 0 took per connection 0.72 -> 0.21 (HAProxy: 0.23); with
bench/tcp/run.py --fresh, 1.056x connections per second, 0.951x CPU each. HTTP
keep-alive 100 B requests: +4.9 % per second and -4.7 % CPU in the scratch A/B, within
noise (1.011x, 0.992x) with bench/http/run.py --fresh. Bulk transfers do not go through
here: they write from a shared read buffer that the next read reuses.

Whoever holds a write here must flush before anything that ends or half-closes the same
transport (write_eof, close): `flush` writes everything held, so order per transport is
kept. A transport closed meanwhile gets nothing (its connection is gone); a write that
raises aborts that transport, so a peer never takes a cut stream for a whole one.

One batch per proxy manager, used from the one loop that manager runs in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, Protocol

log = logging.getLogger("mcsproxy.writebatch")

# Reads shorter than this are held; longer ones (a body or a stream in bulk) are written at
# once, so that the receiver's backpressure (pause_writing) stops the sender's next read.
# uvloop reads a stream again within one poll only after a read that filled its 256 KiB
# buffer, so what is held is at most one short read per connection (held too, the 100 MB
# test bodies piled up 7 MB).
HOLD_BELOW: Final = 64 * 1024


class DeferredFlush(Protocol):
    """A connection with output of its own to write once the poll's callbacks are done."""

    def flush_deferred(self) -> None: ...
    def abort(self) -> None: ...


class WriteBatch:
    __slots__ = ("flushers", "scheduled_on", "writes")

    def __init__(self) -> None:
        self.writes: list[Any] = []  # transport, data, transport, data, ...
        self.flushers: list[DeferredFlush] = []
        # The loop a flush callback is pending on (None: none is). A loop that ended with
        # one pending (tests run one loop after another) never runs it: a write held for
        # another loop schedules its own.
        self.scheduled_on: asyncio.AbstractEventLoop | None = None

    def pass_on(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                data: bytes) -> None:
        """What a read brought, towards `transport`: held if short, else written at once
        after everything held."""
        if len(data) < HOLD_BELOW:
            self.write(loop, transport, data)
        else:
            self.flush()
            transport.write(data)

    def write(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
              data: bytes) -> None:
        self.schedule(loop)
        writes = self.writes
        writes.append(transport)
        writes.append(data)

    def later(self, loop: asyncio.AbstractEventLoop, flusher: DeferredFlush) -> None:
        self.schedule(loop)
        self.flushers.append(flusher)

    def schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.scheduled_on is not loop:
            self.scheduled_on = loop
            loop.call_soon(self.flush_scheduled)

    def flush_scheduled(self) -> None:
        self.scheduled_on = None
        self.flush()

    def flush(self) -> None:
        """Everything held, now (a flush callback still pending then finds less or nothing)."""
        writes = self.writes
        if writes:
            self.writes = []
            for i in range(0, len(writes), 2):
                transport: asyncio.Transport = writes[i]
                if transport.is_closing():
                    continue
                try:
                    transport.write(writes[i + 1])
                except Exception:  # one connection's fault: the others' writes go on
                    log.exception("held write to %r failed; connection aborted", transport)
                    transport.abort()
        flushers = self.flushers
        if flushers:
            self.flushers = []
            for flusher in flushers:
                try:
                    flusher.flush_deferred()
                except Exception:
                    log.exception("held output of %r failed; connection aborted", flusher)
                    flusher.abort()
