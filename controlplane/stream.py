"""The gateway stream: versioned object sets per consumer cluster, as newline-delimited
JSON over one long HTTP response.

GET /v1/stream?cluster=ID&epoch=E&version=V
  → one JSON message per line:
  {"type": "snapshot", "epoch", "version", "objects": [...], "more"}  full resync,
                                                 in parts until "more" is false
  {"type": "delta", "epoch", "from", "version", "upsert": [...],
   "delete": [{"kind", "namespace", "name"}], "observed": unix-time}
  {"type": "members", "members": {cluster: {"connected", "stale", "since", "error"}}}
  {"type": "heartbeat", "epoch", "version", "time"}

A gateway that reconnects with the epoch and version it has gets only the deltas after
it, while they are still in the bounded history; otherwise (first connect, a controller
restart = new epoch, too old, or it fell behind and its queue overflowed) a snapshot.
Messages are encoded once per change and shared by every subscriber of the cluster.

What the controller holds for one gateway is bounded: its queue (SUBSCRIBER_QUEUE messages
and StreamLimits.queue_bytes, --stream-queue-bytes; beyond either the queue is dropped and
the gateway gets one snapshot instead, which coalesces everything it missed) and at most
one message or snapshot part in the socket's buffer. A gateway that stops reading (a stuck
process, a black-holed path with the TCP connection still up) makes a write wait: after
StreamLimits.write_timeout_s (--stream-write-timeout) its connection is aborted and counted
(stream_dropped_total); when it comes back it resumes from its version or gets a snapshot.
Publishing never waits for a gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane.metrics import ControllerMetrics
from controlplane.resources import ObjectRef
from mcsproxy.loglimit import LogLimit
from mcsproxy.sources.controlplane import HEARTBEAT_HEADER

log = logging.getLogger("controlplane.stream")

HISTORY_VERSIONS = 1024  # deltas kept per cluster for resuming gateways
# ... and bytes of them. A member going stale and back is a delta of every imported
# slice it exports: 6.3-6.7 MB each for 10,000 services, so 1024 of them were up to
# 6.9 GB a feed (measured: +58 MB of controller RSS a flap of one member, never given
# back). Deltas beyond this cost more to replay than the snapshot a gateway gets instead.
HISTORY_BYTES = 32 * 1024 * 1024
SUBSCRIBER_QUEUE = 256  # messages a slow gateway may lag before it gets a resync
SUBSCRIBER_QUEUE_BYTES = 16 * 1024 * 1024  # ... or bytes of them
# A write (one message or snapshot part) not taken by the gateway in this time ends its
# stream. Far above the gateway's own read timeout (3 heartbeats), so a gateway that
# reads, however slowly, is not dropped for a large snapshot part on a slow link.
WRITE_TIMEOUT_S = 30.0
HEARTBEAT_S = 5.0
SNAPSHOT_CHUNK = 1000  # objects per snapshot message

Obj = Mapping[str, Any]


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """How long a write to one gateway may wait and how much may queue for it
    (--stream-write-timeout, --stream-queue-bytes)."""

    write_timeout_s: float = WRITE_TIMEOUT_S
    queue_bytes: int = SUBSCRIBER_QUEUE_BYTES

    def __post_init__(self) -> None:
        if not math.isfinite(self.write_timeout_s) or self.write_timeout_s <= 0:
            raise ValueError("--stream-write-timeout must be a finite number of seconds > 0, "
                             f"not {self.write_timeout_s:g}")
        # One message always goes into an empty queue, so any size > 0 works; at the
        # smallest every delta that finds another one queued turns into a snapshot.
        if self.queue_bytes < 1:
            raise ValueError(f"--stream-queue-bytes must be at least 1, not {self.queue_bytes}")


class StreamStalled(Exception):
    """The gateway did not take a write within the write timeout."""


class Subscriber:
    __slots__ = ("lagging", "max_bytes", "queue", "queued_bytes")

    def __init__(self, max_bytes: int = SUBSCRIBER_QUEUE_BYTES) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.lagging = False

    def offer(self, message: bytes) -> None:
        if self.lagging:
            return
        # One message is always taken into an empty queue, however large.
        if self.queue.full() or (self.queued_bytes
                                 and self.queued_bytes + len(message) > self.max_bytes):
            # Dropping deltas would leave a hole; the writer sends a snapshot instead.
            self.lagging = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queued_bytes = 0
            # Wakes the writer, which resyncs now: with the queue empty and further offers
            # dropped, it slept until the next heartbeat (5 s) while changes went unsent.
            self.queue.put_nowait(b"")
            return
        self.queue.put_nowait(message)
        self.queued_bytes += len(message)

    async def next(self) -> bytes:
        message = await self.queue.get()
        self.queued_bytes -= len(message)
        return message


class Feed:
    """One consumer cluster: its objects (the controller's live view), version, history."""

    __slots__ = ("_snapshot", "cluster", "epoch", "history", "history_bytes", "objects",
                 "subscribers", "version")

    def __init__(self, cluster: str, epoch: str, objects: Mapping[ObjectRef, Obj]) -> None:
        self.cluster = cluster
        self.epoch = epoch
        self.objects = objects
        self.version = 0
        self.history: deque[tuple[int, bytes]] = deque(maxlen=HISTORY_VERSIONS)
        self.history_bytes = 0
        self.subscribers: set[Subscriber] = set()
        self._snapshot: SnapshotParts | None = None

    def publish(self, upserts: Mapping[ObjectRef, Obj], deletes: Iterable[ObjectRef],
                observed: float | None) -> None:
        self.version += 1
        message = encode({
            "type": "delta", "epoch": self.epoch, "from": self.version - 1,
            "version": self.version,
            "upsert": list(upserts.values()),
            "delete": [{"kind": r.kind, "namespace": r.namespace, "name": r.name}
                       for r in deletes],
            "observed": observed,
        })
        self._remember(message)
        for sub in self.subscribers:
            sub.offer(message)

    def _remember(self, message: bytes) -> None:
        """Into the history, bounded in versions (the deque's maxlen) and in bytes; the
        newest delta is always kept."""
        history = self.history
        if history.maxlen is not None and len(history) == history.maxlen:
            self.history_bytes -= len(history[0][1])  # the append below drops it
        history.append((self.version, message))
        self.history_bytes += len(message)
        while len(history) > 1 and self.history_bytes > HISTORY_BYTES:
            self.history_bytes -= len(history.popleft()[1])

    def snapshot(self) -> bytes:
        found = self.snapshot_parts()
        return b"".join(found.part(i) for i in range(found.count))

    def snapshot_parts(self) -> SnapshotParts:
        """The whole set at this version as snapshot messages of SNAPSHOT_CHUNK objects
        each (every line stays small enough to parse comfortably, and each is written,
        and waited for, on its own), shared by the gateways that resync at it."""
        if self._snapshot is None or self._snapshot.version != self.version:
            self._snapshot = SnapshotParts(self.epoch, self.version,
                                           list(self.objects.values()))
        return self._snapshot

    def since(self, epoch: str | None, version: int) -> list[bytes] | None:
        """The deltas after `version`, or None when only a snapshot will do."""
        if epoch != self.epoch or version > self.version:
            return None
        if version == self.version:
            return []
        if not self.history or self.history[0][0] > version + 1:
            return None
        return [m for v, m in self.history if v > version]


class SnapshotParts:
    """A snapshot's messages, each encoded when first asked for: all of them at once held
    the loop 0.78 s at 10,000 services (50,000 objects, 59 MB), once a version a cluster.
    The objects are taken when it is made: the controller replaces an object it changes,
    never edits it, so later parts are still of this version."""

    __slots__ = ("_objects", "_parts", "count", "epoch", "version")

    def __init__(self, epoch: str, version: int, objects: list[Obj]) -> None:
        self.epoch, self.version = epoch, version
        self._objects = objects
        self.count = max(1, -(-len(objects) // SNAPSHOT_CHUNK))
        self._parts: list[bytes] = []

    def ready(self, index: int) -> bool:
        return index < len(self._parts)

    def part(self, index: int) -> bytes:
        """Part `index` (all but the last say "more": true); the ones before it first."""
        while len(self._parts) <= index:
            start = len(self._parts) * SNAPSHOT_CHUNK
            self._parts.append(encode({
                "type": "snapshot", "epoch": self.epoch, "version": self.version,
                "objects": self._objects[start:start + SNAPSHOT_CHUNK],
                "more": start + SNAPSHOT_CHUNK < len(self._objects),
            }))
        if len(self._parts) == self.count:
            self._objects = []  # every part encoded: the list is not needed any more
        return self._parts[index]


class StreamHub:
    """The controller's Publisher for gateways, and the aiohttp handler serving them."""

    def __init__(self, metrics: ControllerMetrics | None = None,
                 heartbeat_s: float = HEARTBEAT_S,
                 limits: StreamLimits = StreamLimits()) -> None:
        self.epoch = uuid.uuid4().hex
        self.heartbeat_s = heartbeat_s
        self.write_timeout_s = limits.write_timeout_s
        self.queue_bytes = limits.queue_bytes
        self.metrics = metrics
        self.feeds: dict[str, Feed] = {}
        self._members = encode({"type": "members", "members": {}})
        self._closing = asyncio.Event()
        # Every gateway holds a stream, so a network blip or a new leader makes each of
        # them come (and go) at once: one line a second of each kind, the rest counted
        # into it and logged at DEBUG (stream_subscribers has the number at any time).
        self._connected_log = LogLimit()
        self._gone_log = LogLimit()
        self._stalled_log = LogLimit()
        self._behind_log = LogLimit()

    def attach(self, cluster: str, objects: Mapping[ObjectRef, Obj]) -> None:
        if cluster not in self.feeds:
            self.feeds[cluster] = Feed(cluster, self.epoch, objects)

    # -- Publisher -----------------------------------------------------------------------
    def publish(self, cluster: str, upserts: Mapping[ObjectRef, Obj],
                deletes: Iterable[ObjectRef], observed: float | None) -> None:
        feed = self.feeds.get(cluster)
        if feed is not None:
            feed.publish(upserts, deletes, observed)

    def set_members(self, members: Mapping[str, Mapping[str, Any]]) -> None:
        message = encode({"type": "members", "members": members})
        if message == self._members:
            return
        self._members = message
        for feed in self.feeds.values():
            for sub in feed.subscribers:
                sub.offer(message)

    # -- serving -------------------------------------------------------------------------
    def close(self) -> None:
        """Make every open stream end, so the server can stop without waiting."""
        self._closing.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cluster = request.query.get("cluster", "")
        feed = self.feeds.get(cluster)
        if feed is None:
            return web.json_response(
                {"error": f"unknown cluster {cluster!r}", "clusters": sorted(self.feeds)},
                status=404)
        try:
            version = int(request.query.get("version", "0"))
        except ValueError:
            version = -1
        if version < 0:
            # -1 with the right epoch was served every delta in the history as if they
            # followed version -1, with none of the objects they were made on.
            return web.json_response({"error": "version must be an integer >= 0"}, status=400)
        headers = {
            "Content-Type": "application/x-ndjson",
            "Cache-Control": "no-store",
            HEARTBEAT_HEADER: str(self.heartbeat_s),
        }
        if request.method == "HEAD":  # it streamed the snapshot and counted a subscriber
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        sub = Subscriber(self.queue_bytes)
        feed.subscribers.add(sub)  # before reading the version: no delta can slip between
        self._count()
        _log_limited(self._connected_log, logging.INFO,
                     "gateway of cluster %s connected from %s (epoch=%s version=%d)",
                     cluster, request.remote, request.query.get("epoch"), version)
        try:
            backlog = feed.since(request.query.get("epoch"), version)
            if backlog is None:
                await self._resync(response, feed)
            else:
                for message in backlog:
                    await self._write(response, message)
            await self._write(response, self._members)
            await self._pump(response, feed, sub)
        except StreamStalled:
            _log_limited(self._stalled_log, logging.WARNING,
                         "gateway of cluster %s at %s took no data for %.1fs: stream closed",
                         cluster, request.remote, self.write_timeout_s)
            if self.metrics is not None:
                self.metrics.stream_dropped.inc()
            # Not close(): it would wait, for ever, for the unsent bytes to go.
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionResetError, ConnectionError):
            _log_limited(self._gone_log, logging.INFO, "gateway of cluster %s at %s went away",
                         cluster, request.remote)
        finally:
            feed.subscribers.discard(sub)
            self._count()
        return response

    async def _resync(self, response: web.StreamResponse, feed: Feed) -> None:
        if self.metrics is not None:
            self.metrics.stream_resyncs.inc()
        parts = feed.snapshot_parts()
        for index in range(parts.count):
            if not parts.ready(index):
                await asyncio.sleep(0)  # one part encoded at a time, the loop between
            await self._write(response, parts.part(index))

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """Write, waiting at most write_timeout_s for the gateway to take it (aiohttp
        waits for the socket to drain once more than 64 KiB are pending)."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await response.write(data)
        except TimeoutError:
            raise StreamStalled from None

    async def _pump(self, response: web.StreamResponse, feed: Feed, sub: Subscriber) -> None:
        closing = asyncio.ensure_future(self._closing.wait())
        getter: asyncio.Future[Any] | None = None
        try:
            while not self._closing.is_set():
                if sub.lagging:
                    sub.lagging = False
                    _log_limited(self._behind_log, logging.WARNING,
                                 "gateway of cluster %s fell behind: resync", feed.cluster)
                    await self._resync(response, feed)
                    # The members messages queued went with the rest: the latest one now,
                    # as after a connect's resync.
                    await self._write(response, self._members)
                    continue
                getter = asyncio.ensure_future(sub.next())
                done, _ = await asyncio.wait({getter, closing}, timeout=self.heartbeat_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    if message := getter.result():  # b"": a wake-up (Subscriber.offer)
                        await self._write(response, message)
                    continue
                getter.cancel()
                if closing in done:
                    break
                await self._write(response, encode({
                    "type": "heartbeat", "epoch": feed.epoch, "version": feed.version,
                    "time": time.time(),
                }))
        finally:
            # Cancelled while waiting (the gateway went, the server stops): the pending
            # getter would be left behind, one task per stream.
            closing.cancel()
            if getter is not None:
                getter.cancel()

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.stream_subscribers.set(
                sum(len(f.subscribers) for f in self.feeds.values()))


def _log_limited(limit: LogLimit, level: int, message: str, *args: object) -> None:
    """`message` at `level` at most once a second (counting those held back into it),
    the others at DEBUG."""
    held = limit.take(time.monotonic())
    if held < 0:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(message, *args)
        return
    if held:
        message += "; %d more such lines held back since the last one (one a second)"
        args = (*args, held)
    log.log(level, message, *args)
