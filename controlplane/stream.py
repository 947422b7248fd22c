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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from controlplane.metrics import ControllerMetrics
from controlplane.resources import ObjectRef
from mcsproxy.sources.controlplane import HEARTBEAT_HEADER

log = logging.getLogger("controlplane.stream")

HISTORY_VERSIONS = 1024  # deltas kept per cluster for resuming gateways
SUBSCRIBER_QUEUE = 256  # messages a slow gateway may lag before it gets a resync
HEARTBEAT_S = 5.0
SNAPSHOT_CHUNK = 1000  # objects per snapshot message

Obj = Mapping[str, Any]


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Subscriber:
    __slots__ = ("lagging", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.lagging = False

    def offer(self, message: bytes) -> None:
        if self.lagging:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # Dropping deltas would leave a hole; the writer sends a snapshot instead.
            self.lagging = True
            while not self.queue.empty():
                self.queue.get_nowait()


class Feed:
    """One consumer cluster: its objects (the controller's live view), version, history."""

    __slots__ = ("_snapshot", "cluster", "epoch", "history", "objects", "subscribers",
                 "version")

    def __init__(self, cluster: str, epoch: str, objects: Mapping[ObjectRef, Obj]) -> None:
        self.cluster = cluster
        self.epoch = epoch
        self.objects = objects
        self.version = 0
        self.history: deque[tuple[int, bytes]] = deque(maxlen=HISTORY_VERSIONS)
        self.subscribers: set[Subscriber] = set()
        self._snapshot: tuple[int, bytes] | None = None

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
        self.history.append((self.version, message))
        for sub in self.subscribers:
            sub.offer(message)

    def snapshot(self) -> bytes:
        """The whole set as snapshot messages of SNAPSHOT_CHUNK objects each (every line
        stays small enough to parse comfortably); all but the last say "more": true."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            objects = list(self.objects.values())
            parts = []
            for start in range(0, max(len(objects), 1), SNAPSHOT_CHUNK):
                chunk = objects[start:start + SNAPSHOT_CHUNK]
                parts.append(encode({
                    "type": "snapshot", "epoch": self.epoch, "version": self.version,
                    "objects": chunk, "more": start + SNAPSHOT_CHUNK < len(objects),
                }))
            self._snapshot = (self.version, b"".join(parts))
        return self._snapshot[1]

    def since(self, epoch: str | None, version: int) -> list[bytes] | None:
        """The deltas after `version`, or None when only a snapshot will do."""
        if epoch != self.epoch or version > self.version:
            return None
        if version == self.version:
            return []
        if not self.history or self.history[0][0] > version + 1:
            return None
        return [m for v, m in self.history if v > version]


class StreamHub:
    """The controller's Publisher for gateways, and the aiohttp handler serving them."""

    def __init__(self, metrics: ControllerMetrics | None = None,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.epoch = uuid.uuid4().hex
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics
        self.feeds: dict[str, Feed] = {}
        self._members = encode({"type": "members", "members": {}})
        self._closing = asyncio.Event()

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
            return web.json_response({"error": "version must be an integer"}, status=400)
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson",
            "Cache-Control": "no-store",
            HEARTBEAT_HEADER: str(self.heartbeat_s),
        })
        await response.prepare(request)
        sub = Subscriber()
        feed.subscribers.add(sub)  # before reading the version: no delta can slip between
        self._count()
        log.info("gateway of cluster %s connected from %s (epoch=%s version=%d)",
                 cluster, request.remote, request.query.get("epoch"), version)
        try:
            backlog = feed.since(request.query.get("epoch"), version)
            if backlog is None:
                await self._resync(response, feed)
            else:
                for message in backlog:
                    await response.write(message)
            await response.write(self._members)
            await self._pump(response, feed, sub)
        except (ConnectionResetError, ConnectionError):
            log.info("gateway of cluster %s went away", cluster)
        finally:
            feed.subscribers.discard(sub)
            self._count()
        return response

    async def _resync(self, response: web.StreamResponse, feed: Feed) -> None:
        if self.metrics is not None:
            self.metrics.stream_resyncs.inc()
        await response.write(feed.snapshot())

    async def _pump(self, response: web.StreamResponse, feed: Feed, sub: Subscriber) -> None:
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while not self._closing.is_set():
                if sub.lagging:
                    sub.lagging = False
                    log.warning("gateway of cluster %s fell behind: resync", feed.cluster)
                    await self._resync(response, feed)
                    continue
                getter = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait({getter, closing}, timeout=self.heartbeat_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await response.write(getter.result())
                    continue
                getter.cancel()
                if closing in done:
                    break
                await response.write(encode({
                    "type": "heartbeat", "epoch": feed.epoch, "version": feed.version,
                    "time": time.time(),
                }))
        finally:
            closing.cancel()

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.stream_subscribers.set(
                sum(len(f.subscribers) for f in self.feeds.values()))
