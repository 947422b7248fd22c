"""UDP datagrams read and written in batches: one recvmmsg and one sendmmsg per wakeup.

Over loopback most of a query's cost is kernel time per system call, not per byte: uvloop's
datagram transport makes one recvfrom and the server one sendto per query. Here the
socket is read from a `loop.add_reader` callback with recvmmsg (Linux, through ctypes)
into fixed slots, each memoised answer is written over its query in the slot it came
in (the ID stays where it is), and the answers leave with one sendmmsg to the addresses
the queries came from, without ever turning them into Python tuples.

Anything but a memo hit goes to `UdpProtocol.datagram_received` with the data and the
address as uvloop would have passed them, so the rest of the DNS logic is shared.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import Final

log = logging.getLogger("mcsproxy.dns")

BATCH: Final = 32  # datagrams per system call: libuv's own read budget per wakeup
BATCHES_PER_WAKEUP: Final = 4  # then other callbacks (TCP, admin, timers) get their turn
SLOT: Final = 1 << 16  # above the largest UDP payload: a datagram is never truncated
SOCKADDR_MAX: Final = 28  # sizeof(struct sockaddr_in6)
MSG_DONTWAIT: Final = 0x40
RETRY: Final = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _load() -> tuple[Callable[..., int], Callable[..., int]] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_CALLS = _load()
AVAILABLE: Final = _CALLS is not None


def sockaddr_tuple(family: int, name: bytes) -> tuple[str, int] | tuple[str, int, int, int]:
    """A struct sockaddr as the socket module (and uvloop) spell it."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, name[4:8]), (name[2] << 8) | name[3]
    port, flowinfo = struct.unpack_from("!HI", name, 2)
    scope_id = int.from_bytes(name[24:28], sys.byteorder)
    return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flowinfo, scope_id


class BatchedUdp:
    """A bound non-blocking UDP socket served from the loop with recvmmsg/sendmmsg.

    `memo_get(query[2:])` gives the answer's bytes after the ID for a question seen
    before; `hits` counts them per answer; `slow(data, addr)` handles everything else
    (and sends through `send`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 memo_get: Callable[[bytes], bytes | None], hits: dict[bytes, int],
                 slow: Callable[[bytes, tuple], None]) -> None:  # type: ignore[type-arg]
        assert _CALLS is not None
        self._recvmmsg, self._sendmmsg = _CALLS
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        self.memo_get = memo_get
        self.hits = hits
        self.slow = slow
        self.closed = False
        self._pending: deque[tuple[bytes, tuple]] = deque()  # type: ignore[type-arg]
        namelen = 16 if sock.family == socket.AF_INET else SOCKADDR_MAX
        # Lazily mapped: only the pages datagrams actually reach are ever touched.
        self.slots = mmap.mmap(-1, BATCH * SLOT)
        slots_at = ctypes.addressof(ctypes.c_char.from_buffer(self.slots))
        self.names = bytearray(BATCH * SOCKADDR_MAX)
        names_at = ctypes.addressof(ctypes.c_char.from_buffer(self.names))
        # Headers and iovecs live in bytearrays so that Python reads the received lengths
        # and sets the answers' lengths through memoryviews, not ctypes attributes.
        self._recv_mem = bytearray(ctypes.sizeof(_MMsgHdr) * BATCH)
        self._send_mem = bytearray(ctypes.sizeof(_MMsgHdr) * BATCH)
        self._recv_iov_mem = bytearray(ctypes.sizeof(_IoVec) * BATCH)
        self._send_iov_mem = bytearray(ctypes.sizeof(_IoVec) * BATCH)
        recv = (_MMsgHdr * BATCH).from_buffer(self._recv_mem)
        send = (_MMsgHdr * BATCH).from_buffer(self._send_mem)
        recv_iov = (_IoVec * BATCH).from_buffer(self._recv_iov_mem)
        send_iov = (_IoVec * BATCH).from_buffer(self._send_iov_mem)
        for i in range(BATCH):
            recv_iov[i].iov_base = send_iov[i].iov_base = slots_at + i * SLOT
            recv_iov[i].iov_len = SLOT
            for hdrs, iov in ((recv, recv_iov), (send, send_iov)):
                hdr = hdrs[i].msg_hdr
                hdr.msg_name = names_at + i * SOCKADDR_MAX
                hdr.msg_namelen = namelen
                hdr.msg_iov = ctypes.addressof(iov) + i * ctypes.sizeof(_IoVec)
                hdr.msg_iovlen = 1
        self._recv_at = ctypes.addressof(recv)
        self._send_at = ctypes.addressof(send)
        self._hdr_size = ctypes.sizeof(_MMsgHdr)
        self._keep = (recv, send, recv_iov, send_iov)
        uint = ctypes.sizeof(ctypes.c_uint)
        self._lengths = memoryview(self._recv_mem).cast("I")
        self._length_at = tuple(
            (i * ctypes.sizeof(_MMsgHdr) + _MMsgHdr.msg_len.offset) // uint
            for i in range(BATCH))
        self._answer_lengths = memoryview(self._send_iov_mem).cast("N")
        self._answer_length_at = tuple(
            (i * ctypes.sizeof(_IoVec) + _IoVec.iov_len.offset) // ctypes.sizeof(ctypes.c_size_t)
            for i in range(BATCH))
        self._slot_at = tuple(i * SLOT for i in range(BATCH))
        # Per slot: its index, where its datagram starts, where recvmmsg writes the length
        # received, where sendmmsg reads the length to send.
        self._positions = tuple(zip(range(BATCH), self._slot_at, self._length_at,
                                    self._answer_length_at, strict=True))
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        recvmmsg = self._recvmmsg
        fd, recv_at, positions = self.fd, self._recv_at, self._positions
        slots, lengths, answer_lengths = self.slots, self._lengths, self._answer_lengths
        memo_get, hits = self.memo_get, self.hits
        for _ in range(BATCHES_PER_WAKEUP):
            n = recvmmsg(fd, recv_at, BATCH, MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0:
                    self._recv_failed(ctypes.get_errno())
                return
            start = 0  # answers in slots start..i-1 wait for one sendmmsg
            for i, at, length_at, answer_length_at in positions[:n]:
                tail = memo_get(slots[at + 2:at + lengths[length_at]])
                if tail is not None:
                    hits[tail] = hits.get(tail, 0) + 1
                    size = len(tail) + 2
                    slots[at + 2:at + size] = tail
                    answer_lengths[answer_length_at] = size
                    continue
                if start < i:
                    self._send(start, i)
                start = i + 1
                self._slow(i)
                if self.closed:
                    return
            if start < n:
                self._send(start, n)
            if n < BATCH or self._pending:
                return

    def _addr(self, i: int) -> tuple:  # type: ignore[type-arg]
        """Slot i's peer address as a tuple (only off the memo path)."""
        name = bytes(self.names[i * SOCKADDR_MAX:(i + 1) * SOCKADDR_MAX])
        return sockaddr_tuple(self.family, name)

    def _slow(self, i: int) -> None:
        at = self._slot_at[i]
        self.slow(self.slots[at:at + self._lengths[self._length_at[i]]], self._addr(i))

    def _send(self, start: int, end: int) -> None:
        while start < end and not self._pending:
            sent = self._sendmmsg(self.fd, self._send_at + start * self._hdr_size,
                                  end - start, 0)
            if sent > 0:
                start += sent
                continue
            code = ctypes.get_errno()
            if code in RETRY:
                break
            # This one datagram cannot go (no route, a firewall…): the others still can.
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dns: cannot answer a UDP query: %s", errno.errorcode.get(code, code))
            start += 1
        for i in range(start, end):  # the socket is full: keep them until it drains
            at = self._slot_at[i]
            size = self._answer_lengths[self._answer_length_at[i]]
            self._queue(self.slots[at:at + size], self._addr(i))

    def sendto(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        """One datagram from outside the batch (first answers, errors, forwarded replies)."""
        if self.closed:
            return
        if not self._pending:
            try:
                self.sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("dns: cannot answer %s: %s", addr[0], exc)
                return
        self._queue(data, addr)

    def _queue(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        if not self._pending:
            # Stop reading until the answers already made are out: queries wait in the
            # kernel's receive buffer meanwhile instead of answers piling up here.
            self.loop.remove_reader(self.fd)
            self.loop.add_writer(self.fd, self._writable)
        self._pending.append((data, addr))

    def _writable(self) -> None:
        pending = self._pending
        while pending:
            data, addr = pending[0]
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("dns: cannot answer %s: %s", addr[0], exc)
            pending.popleft()
        self.loop.remove_writer(self.fd)
        if not self.closed:
            self.loop.add_reader(self.fd, self._readable)

    def _recv_failed(self, code: int) -> None:
        if code not in RETRY and log.isEnabledFor(logging.DEBUG):
            # A queued ICMP error and the like: logged, and the socket reads on.
            log.debug("dns udp error: %s", errno.errorcode.get(code, code))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self._pending.clear()
        self.sock.close()
