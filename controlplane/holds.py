"""Released ClusterSetIPs kept across controller restarts and leader changes.

The allocator holds a released address back from other services (mcsproxy.clustersetip)
while clients may still reach it: a cached DNS answer (TTL 5 s), a long-lived connection,
a member still holding the old ServiceImport. Held only in memory, a restart or a new
leader forgot them and could give a just-released address to the next new service (a /24
with 200 services, one released, one new: 4.2 % of 20,000 restarts did; 0 while running,
and 0 now). So the holds are saved: in directory mode as OUT/.clustersetip-holds.json, in
Kubernetes mode as the ConfigMap `mcsproxy-clustersetip-holds` in the controller's own
namespace (clusters/kube_holds.py); read at start, before the first reconcile allocates
anything.

At most PERSISTED_HOLDS (1,024) of the latest releases are saved, with their release
time: a hold matters for seconds to minutes after a release, so the latest ones are the
ones a restart must not lose, and 1,024 entries of at most ~200 bytes each keep the
document under 256 KiB, well within a ConfigMap's 1 MiB, though it is rewritten whole on
every change. The allocator itself keeps up to MAX_HELD (65,536) while running.

Saving never holds up reconciling: `save()` only records the latest document; a task
writes it, only when it differs from what was last read or written, and retries a failed
write with backoff, logging each failure. A document that cannot be read or parsed is
logged and ignored (it is replaced at the next write), never fatal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from controlplane.clusters import ClusterError
from mcsproxy.backoff import Backoff
from mcsproxy.model import ServiceKey
from mcsproxy.tasks import cancel_and_wait, in_daemon_thread, spawn

log = logging.getLogger("controlplane.holds")

PERSISTED_HOLDS = 1024
HOLDS_KIND = "ClusterSetIPHolds"
HOLDS_VERSION = 1
HOLDS_FILE = ".clustersetip-holds.json"  # a dotfile: OUT's readers all skip those
CLOSE_WAIT_S = 10.0  # for a write under way when the controller stops


class Hold(NamedTuple):
    cluster: str | None  # a consumer cluster's own range (--cluster-cidr); None: the clusterset's
    ip: str
    service: ServiceKey
    released: float  # wall-clock seconds


def _timestamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def encode(holds: Iterable[Hold]) -> bytes:
    """The latest PERSISTED_HOLDS holds, longest released first, as the saved document."""
    latest = sorted(holds, key=lambda h: h.released)[-PERSISTED_HOLDS:]
    entries = [{"cluster": h.cluster, "ip": h.ip, "service": str(h.service),
                "released": _timestamp(h.released)} for h in latest]
    return json.dumps({"kind": HOLDS_KIND, "version": HOLDS_VERSION, "holds": entries},
                      separators=(",", ":")).encode()


def _entry(item: Any) -> Hold:
    if not isinstance(item, dict):
        raise ValueError("an entry is not an object")
    cluster, ip, service = item.get("cluster"), item.get("ip"), item.get("service")
    released = item.get("released")
    if cluster is not None and not isinstance(cluster, str):
        raise ValueError("cluster is not a string")
    if not isinstance(ip, str) or not isinstance(service, str) or not isinstance(released,
                                                                                  str):
        raise ValueError("ip, service and released must be strings")
    namespace, sep, name = service.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"service {service!r} is not namespace/name")
    when = datetime.fromisoformat(released)
    if when.tzinfo is None:
        raise ValueError(f"released {released!r} has no time zone")
    return Hold(cluster, ip, ServiceKey(namespace, name), when.timestamp())


def decode(data: bytes) -> tuple[list[Hold], int]:
    """The holds of a saved document and how many entries were unusable; ValueError when
    the document is not one."""
    doc = json.loads(data)  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
    if not isinstance(doc, dict) or doc.get("kind") != HOLDS_KIND:
        raise ValueError(f"not a {HOLDS_KIND} document")
    if doc.get("version") != HOLDS_VERSION:
        raise ValueError(f"version {doc.get('version')!r}, not {HOLDS_VERSION}")
    items = doc.get("holds")
    if not isinstance(items, list):
        raise ValueError("holds is not a list")
    holds, bad = [], 0
    for item in items[-PERSISTED_HOLDS:]:
        try:
            holds.append(_entry(item))
        except (ValueError, TypeError, OverflowError):
            bad += 1
    return holds, bad


class HoldStore:
    """Where the holds are saved: `_read` and `_write` say how (a file, a ConfigMap)."""

    where = "holds"  # for messages

    def __init__(self, backoff_base_s: float = 0.2, backoff_cap_s: float = 30.0) -> None:
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._saved: bytes | None = None  # as last read or written
        self._pending: bytes | None = None  # to write
        self._writer: asyncio.Task[None] | None = None
        self._waiting = False  # the writer sleeps between attempts
        self._closing = False
        self.writes = 0
        self.write_failures = 0

    async def _read(self) -> bytes | None:
        """The saved document; None when there is none (or none usable, logged)."""
        raise NotImplementedError

    async def _write(self, data: bytes) -> None:
        """Save `data`; ClusterError or OSError when it failed (retried)."""
        raise NotImplementedError

    async def load(self) -> list[Hold]:
        data = await self._read()
        if data is None:
            return []
        try:
            holds, bad = decode(data)
        except ValueError as exc:
            log.warning("%s: not a usable record of held ClusterSetIPs (%s): ignored; it is "
                        "replaced at the next release", self.where, exc)
            return []
        if bad:
            log.warning("%s: %d unusable entries ignored", self.where, bad)
        self._saved = data
        log.info("%s: %d released ClusterSetIPs held from before", self.where, len(holds))
        return holds

    def save(self, holds: Iterable[Hold]) -> None:
        """Have `holds` written, unless they are what was last read or written."""
        data = encode(holds)
        if data == (self._saved if self._pending is None else self._pending):
            return
        self._pending = data
        if self._writer is None:
            self._writer = spawn(self._write_pending(), name=f"save {self.where}")

    async def _write_pending(self) -> None:
        backoff = Backoff(*self._backoff)
        try:
            while (data := self._pending) is not None:
                if data == self._saved:
                    self._pending = None
                    break
                if not await self._try_write(data):
                    if self._closing:
                        break
                    delay = backoff.next()
                    log.error("%s: retrying in %.1fs", self.where, delay)
                    self._waiting = True
                    try:
                        await asyncio.sleep(delay)
                    finally:
                        self._waiting = False
                    continue
                backoff.reset()
        finally:
            self._writer = None

    async def _try_write(self, data: bytes) -> bool:
        try:
            await self._write(data)
        except (ClusterError, OSError) as exc:
            self.write_failures += 1
            log.error("%s: saving the held ClusterSetIPs failed: %s", self.where, exc)
            return False
        self.writes += 1
        self._saved = data
        if self._pending is data:
            self._pending = None
        return True

    async def close(self) -> None:
        """Stop retrying; what is still unsaved gets one last try. A write under way is
        waited for, not cancelled: its thread would go on beside the last try's."""
        self._closing = True
        writer = self._writer
        if writer is None:
            return
        if not self._waiting:
            # It stops after this try, saved or not; a write hung past CLOSE_WAIT_S (a
            # filesystem that stopped answering) does not hold up shutdown.
            _, pending = await asyncio.wait([writer], timeout=CLOSE_WAIT_S)
            if pending:
                log.warning("%s: a write of the held ClusterSetIPs did not finish within "
                            "%.0f s; stopping without it", self.where, CLOSE_WAIT_S)
                await cancel_and_wait([writer])
            return
        await cancel_and_wait([writer])
        if self._pending is not None and self._pending != self._saved:
            await self._try_write(self._pending)


class DirectoryHoldStore(HoldStore):
    """OUT/.clustersetip-holds.json, replaced atomically as the other OUT files are."""

    def __init__(self, output_dir: Path) -> None:
        super().__init__()
        self.path = output_dir / HOLDS_FILE
        self.where = str(self.path)

    def _read_file(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory in its place, no permission: not fatal
            log.warning("%s: cannot read (%s): ignored", self.path, exc.strerror or exc)
            return None

    async def _read(self) -> bytes | None:
        return await in_daemon_thread(self._read_file, f"read {self.path}")

    def _write_file(self, data: bytes) -> None:
        tmp = self.path.with_name(f"{HOLDS_FILE}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    async def _write(self, data: bytes) -> None:
        await in_daemon_thread(partial(self._write_file, data), f"write {self.path}")
