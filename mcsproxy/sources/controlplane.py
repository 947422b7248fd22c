"""`--source controlplane:http://HOST:PORT`: the controller's stream for this cluster.

One long GET per connection, one JSON message per line (see controlplane/stream.py for
the server side). The source resumes with the epoch and version it has, so a reconnect
costs a few deltas, not a full resync. Objects go through mcsproxy.manifests like every
other source's; a message that does not parse or validate is rejected whole (the store
keeps what it had) and the source reconnects asking for a full snapshot; an HTTP error
answer (a standby replica's 503) brought no message, so the retry still resumes. While the
stream is down the store keeps serving the last snapshot; the source is marked disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Histogram

from mcsproxy.backoff import Backoff, describe_error
from mcsproxy.config import is_host
from mcsproxy.gc_pause import collector_paused
from mcsproxy.logsetup import exception_line
from mcsproxy.manifests import (
    ManifestError,
    object_kind,
    parse_endpoint_slice,
    parse_service_import,
)
from mcsproxy.sources.lines import LineTooLong, LineTooSlow, read_lines
from mcsproxy.store import ObjectId, SnapshotStore, SourceStatus, Spec
from mcsproxy.tokenfile import TokenFile

log = logging.getLogger("mcsproxy.sources.controlplane")

STREAM_PATH = "/v1/stream"
HEARTBEAT_HEADER = "X-Mcsproxy-Heartbeat"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a full snapshot of a large clusterset fits
# A snapshot's parts are held until the last one: a controller that never sends it (a
# defect, a man in the middle) grew a gateway by 1 GB in 20 s until the kernel killed it.
# 10,000 services of two clusters are 16 MB of parts; this is sixteen times that.
MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024
MAX_IGNORED_TYPES = 32  # unknown message types remembered (to log each once)
BULK_MESSAGE_BYTES = 64 * 1024  # parsed with the cyclic collector paused (gc_pause.py)
CONNECT_TIMEOUT_S = 5.0
# The controller answers a stream request at once; a peer (or proxy) that takes the
# connection and says nothing must not hold the source: reconnect instead. Covers the
# connect too, hence longer than CONNECT_TIMEOUT_S.
HEADERS_TIMEOUT_S = 10.0
# A message begun must be complete within this (or the read timeout, if longer): bytes
# trickling in, never a newline, passed every read timeout, and the source said connected
# with nothing applied for as long as the peer kept it up. Twice the controller's default
# write timeout: a snapshot part the controller still sends arrives within it.
MESSAGE_TIMEOUT_S = 60.0
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StreamProtocolError(ValueError):
    """The controller sent something this gateway cannot apply."""


class StreamRefused(Exception):
    """The controller answered the stream request with an HTTP error: a standby
    replica's 503 (behind one Service with the leader), an unknown cluster's 404. No
    message came, so what the gateway holds is still good: the retry resumes from it."""


def served_object(obj: Any, source: str) -> tuple[ObjectId, Spec] | None:
    """A stream object → (store id, spec); None for kinds a gateway does not serve."""
    if not isinstance(obj, Mapping):
        raise ManifestError("an object must be a mapping")
    kind = object_kind(obj)
    if kind is None:
        return None
    spec: Spec | None
    spec = parse_service_import(obj) if kind == "ServiceImport" else parse_endpoint_slice(obj)
    if spec is None:
        return None
    return ObjectId(source, kind, spec.key.namespace, str(obj["metadata"]["name"])), spec


def stream_base_url(url: str) -> str:
    """The controller's URL, checked as far as it can be without asking the network: one
    that can never be reached (no host, a port that is not 1-65535, a query that the
    stream path would land in) is a flag error at start (exit 2), not a gateway that
    retries with backoff for ever, not ready, with aiohttp's "InvalidUrlClientError"."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"controlplane source needs an http:// URL, not {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"controlplane source {url!r}: {exc}") from None
    if parts.username is not None or parts.password is not None:
        # Not echoed: the URL holds the password. The controller takes a bearer token
        # only, so the credentials served nothing but to be printed in the start line,
        # /config_dump and every connection error.
        raise ValueError("controlplane source URL carries credentials (user:password@), "
                         "which are logged and shown by /config_dump: put a bearer token "
                         "in --controlplane-token-file instead")
    host = parts.hostname or ""
    if not is_host(host):
        raise ValueError(f"controlplane source {url!r}: expected http://HOST:PORT, "
                         f"{host!r} is not an IP address or a host name")
    if port == 0:
        raise ValueError(f"controlplane source {url!r}: port 0 cannot be connected to")
    if parts.query or parts.fragment:  # the stream's path and query are appended
        raise ValueError(f"controlplane source {url!r}: expected http://HOST:PORT[/PATH], "
                         "without a query or fragment")
    return url.rstrip("/")


class ControlplaneSource:
    def __init__(
        self,
        url: str,
        cluster_id: str,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        headers_timeout_s: float = HEADERS_TIMEOUT_S,
        message_timeout_s: float = MESSAGE_TIMEOUT_S,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES,
        token: TokenFile | None = None,
    ) -> None:
        self.url = stream_base_url(url)
        self.cluster_id = cluster_id
        self.name = f"controlplane:{self.url}"
        self.connect_timeout_s = connect_timeout_s
        self.headers_timeout_s = headers_timeout_s
        self.message_timeout_s = message_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_snapshot_bytes = max_snapshot_bytes
        self.token = token  # sent as a bearer token on every connect, read afresh each time
        self.epoch: str | None = None
        self.version = 0
        self.members: dict[str, Any] = {}  # member clusters as the controller sees them
        # The parts of a snapshot so far: epoch, version, objects, bytes of their lines.
        self._partial: tuple[str, int, dict[ObjectId, Spec], int] | None = None
        self.connects = 0
        self.messages = 0  # valid messages applied (a snapshot once, whole), all sessions
        self.resyncs = 0
        # Message types ignored, each logged once: a newer controller's own message sent
        # with every heartbeat was a warning every 5 s on every gateway.
        self.ignored_types: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        self.propagation = Histogram(
            "mcsproxy_source_controlplane_propagation_seconds",
            "Change observed by the controller until applied by this gateway",
            buckets=LATENCY_BUCKETS, registry=self.registry)

    # -- connection loop -----------------------------------------------------------------
    async def run(self, store: SnapshotStore) -> None:
        status = store.register_source(self.name)
        status.connected = False
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
        # The last failure logged while not connected: a controller that cannot be
        # reached was never logged at all (a gateway started before it, or pointed at a
        # wrong address, said nothing); now each distinct failure is, once.
        logged: str | None = None
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                messages_before = self.messages
                try:
                    await self._session(session, store, status)
                    reason = "stream ended"
                except StreamRefused as exc:
                    # Logged below, once while it lasts. The epoch is kept: discarding it
                    # (as for a bad message) made every retry that met the standby cost
                    # a full snapshot from the leader after it.
                    reason = str(exc)
                except StreamProtocolError as exc:
                    reason = logged = str(exc)
                    log.error("controlplane stream: %s; reconnecting for a full resync", exc)
                    self.epoch = None
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    reason = describe_error(exc)
                except Exception as exc:
                    # Unforeseen (a defect, an input no check above expected): ending the
                    # task would leave the source silently stale while its status still
                    # said connected. What was being applied may be half done: resync.
                    reason = logged = describe_error(exc)
                    log.error("controlplane stream failed (%s); reconnecting for a full "
                              "resync", exception_line(exc))
                    self.epoch = None
                self._partial = None  # not held through the backoff: it may be large
                if status.connected:
                    log.warning("controlplane stream down (%s): serving the last snapshot "
                                "(version %d)", reason, self.version)
                    logged = reason
                elif reason != logged:
                    log.warning("controlplane stream %s not connected (%s): %s; retrying "
                                "with backoff", self.url, reason,
                                f"serving the last snapshot (version {self.version})"
                                if status.synced else "no snapshot yet, not ready")
                    logged = reason
                status.connected = False
                status.error = reason
                if self.messages != messages_before:
                    # That session worked (a resumed one sends no snapshot): start over.
                    backoff.reset()
                # Jitter keeps a fleet of gateways from reconnecting in step.
                await asyncio.sleep(backoff.next())

    async def _session(
        self, session: aiohttp.ClientSession, store: SnapshotStore, status: SourceStatus
    ) -> None:
        self._partial = None
        params = {"cluster": self.cluster_id, "version": str(self.version)}
        if self.epoch is not None:
            params["epoch"] = self.epoch
        headers = {"Authorization": self.token.authorization()} if self.token else None
        try:
            async with asyncio.timeout(self.headers_timeout_s):
                response = await session.get(self.url + STREAM_PATH, params=params,
                                             headers=headers)
        except TimeoutError:
            raise TimeoutError(f"no answer from the controller within "
                               f"{self.headers_timeout_s:g} s") from None
        async with response:
            if response.status != 200:
                async with asyncio.timeout(5.0):  # not wait_for: see lines.read_lines
                    body = (await response.content.read(512)).decode("utf-8", "replace")
                raise StreamRefused(f"HTTP {response.status} from controller: {body}")
            try:
                heartbeat = float(response.headers.get(HEARTBEAT_HEADER, "5"))
            except ValueError:
                heartbeat = 5.0
            if not math.isfinite(heartbeat):  # nan: the read timeout below failed every read
                heartbeat = 5.0
            # Three missed heartbeats: the controller (or the path to it) is gone.
            read_timeout = min(max(3 * heartbeat, 0.5), 120.0)
            try:
                await read_lines(response.content, lambda line: self._handle(line, store, status),
                                 max_bytes=MAX_MESSAGE_BYTES, read_timeout_s=read_timeout,
                                 line_timeout_s=max(read_timeout, self.message_timeout_s))
            except LineTooLong as exc:
                raise StreamProtocolError(str(exc)) from None
            except LineTooSlow:
                raise
            except TimeoutError:
                raise TimeoutError(f"nothing from the controller for {read_timeout:g} s, "
                                   "not even a heartbeat") from None

    # -- messages ------------------------------------------------------------------------
    def _handle(self, line: bytes, store: SnapshotStore, status: SourceStatus) -> None:
        with collector_paused(len(line) >= BULK_MESSAGE_BYTES):
            self._handle_message(line, store, status)

    def _handle_message(self, line: bytes, store: SnapshotStore, status: SourceStatus) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise StreamProtocolError(f"malformed message (not JSON): {exc}") from None
        if not isinstance(message, dict):
            raise StreamProtocolError("malformed message: not a JSON object")
        kind = message.get("type")
        if kind == "snapshot":
            if not self._apply_snapshot(message, store, len(line)):
                # A part of a snapshot applies nothing yet: it is not a session that
                # worked (a bad object in a later part would otherwise reset the backoff
                # and have the full snapshot fetched again every few hundred ms).
                return
        elif self._partial is not None:
            raise StreamProtocolError(f"{kind} message inside a snapshot")
        elif kind == "delta":
            self._apply_delta(message, store)
        elif kind == "members":
            members = message.get("members")
            if not isinstance(members, dict):
                raise StreamProtocolError("malformed members message")
            self._set_members(members)
        elif kind == "heartbeat":
            if message.get("epoch") != self.epoch:
                raise StreamProtocolError("heartbeat from another controller epoch")
        else:
            name = repr(kind)[:64]
            if name not in self.ignored_types and len(self.ignored_types) < MAX_IGNORED_TYPES:
                self.ignored_types.add(name)
                log.warning("controlplane stream: ignoring messages of unknown type %s "
                            "(a newer controller?); logged once", name)
            return
        if not status.connected:
            log.info("controlplane stream connected url=%s version=%d", self.url, self.version)
        status.connected = True
        status.error = None
        self.messages += 1

    def _parse_objects(self, raw: Any, what: str) -> dict[ObjectId, Spec]:
        if not isinstance(raw, list):
            raise StreamProtocolError(f"malformed {what}: objects must be a list")
        objects: dict[ObjectId, Spec] = {}
        for i, obj in enumerate(raw):
            try:
                parsed = served_object(obj, self.name)
            except ManifestError as exc:
                raise StreamProtocolError(f"{what}: object {i} rejected: {exc}") from None
            if parsed is not None:
                objects[parsed[0]] = parsed[1]
        return objects

    def _version(self, message: Mapping[str, Any], field: str) -> int:
        value = message.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StreamProtocolError(f"malformed {message.get('type')}: {field} {value!r}")
        return value

    def _apply_snapshot(self, message: Mapping[str, Any], store: SnapshotStore,
                        size: int) -> bool:
        """Collect snapshot parts (`size`: this one's bytes); apply them all at once when
        the last one arrives. False while parts are still to come."""
        version = self._version(message, "version")
        epoch = message.get("epoch")
        if not isinstance(epoch, str):
            raise StreamProtocolError("malformed snapshot: no epoch")
        objects = self._parse_objects(message.get("objects"), f"snapshot {version}")
        if self._partial is not None:
            if self._partial[:2] != (epoch, version):
                self._partial = None
                raise StreamProtocolError("snapshot parts from different versions")
            self._partial[2].update(objects)
            objects = self._partial[2]
            size += self._partial[3]
        if size > self.max_snapshot_bytes:
            self._partial = None
            raise StreamProtocolError(
                f"snapshot {version} is over {self.max_snapshot_bytes} bytes "
                f"({len(objects)} objects in the parts so far)")
        if message.get("more") is True:
            self._partial = (epoch, version, objects, size)
            return False
        self._partial = None
        store.replace_source(self.name, objects)
        self.epoch, self.version = epoch, version
        self.connects += 1
        self.resyncs += 1
        status = store.register_source(self.name)
        status.objects = len(objects)
        status.last_change = time.time()
        store.mark_synced(self.name)
        store.commit()
        return True

    def _apply_delta(self, message: Mapping[str, Any], store: SnapshotStore) -> None:
        start = self._version(message, "from")
        version = self._version(message, "version")
        if message.get("epoch") != self.epoch or start != self.version:
            raise StreamProtocolError(
                f"delta {start}→{version} does not follow version {self.version}")
        upserts = self._parse_objects(message.get("upsert"), f"delta {version}")
        deletes = message.get("delete")
        if not isinstance(deletes, list) or not all(
            isinstance(d, dict) and all(isinstance(d.get(f), str)
                                        for f in ("kind", "namespace", "name"))
            for d in deletes
        ):
            raise StreamProtocolError(f"malformed delta {version}: bad delete list")
        status = store.register_source(self.name)
        for d in deletes:
            status.objects -= store.delete(
                ObjectId(self.name, d["kind"], d["namespace"], d["name"]))
        for oid, spec in upserts.items():
            status.objects += store.upsert(oid, spec)
        self.version = version
        if self.connects == 0:
            self.connects = 1
        status.last_change = time.time()
        store.commit()
        observed = message.get("observed")
        if isinstance(observed, int | float) and not isinstance(observed, bool):
            self.propagation.observe(max(0.0, time.time() - observed))

    def _set_members(self, members: dict[str, Any]) -> None:
        stale, before = _stale(members), self.stale_clusters
        if stale != before:
            if stale:
                log.warning("member clusters stale (not answering the controller): %s; their "
                            "endpoints are kept while health checks pass", ",".join(stale))
            else:
                log.info("every member cluster answers the controller again")
        self.members = members

    @property
    def stale_clusters(self) -> list[str]:
        return _stale(self.members)


def _stale(members: Mapping[str, Any]) -> list[str]:
    return sorted(c for c, m in members.items() if isinstance(m, dict) and m.get("stale"))
