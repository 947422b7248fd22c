"""Member-cluster clients: one per cluster, behind one interface.

Two implementations slot in here: `directory` (a folder of YAML per cluster, reading
DIR/<cluster>/ and writing OUT/<cluster>/) and, later, `kube` (kubernetes-asyncio list +
watch). The controller only speaks this interface:

- reading: `objects` is the cluster's last good view (Namespaces, Services, member
  EndpointSlices, ServiceExports, Karmada MultiClusterServices) indexed by service key;
  `sync()` loads it once; `watch(notify)` keeps it current and calls `notify` with the
  service keys and namespaces that changed (and, where the client can see them, the
  managed objects someone else changed or removed); `connection` says whether the view
  is live or stale (the cluster stopped answering: its last view is kept, marked stale).
- writing: `read_published()` returns what the controller wrote before (ServiceImports,
  imported EndpointSlices, ServiceExports with status) so ClusterSetIPs and condition
  transition times survive restarts; `apply()` creates or replaces managed objects,
  `delete()` removes them, `update_export_status()` writes a ServiceExport's status.
  A kube implementation fills the ServiceImport uid into imported slices'
  ownerReferences at apply time (the reconcile cannot know it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controlplane.clusters.state import ClusterObjects
from controlplane.resources import ObjectRef
from mcsproxy.model import ServiceKey


class ClusterError(RuntimeError):
    """A member cluster cannot be read or written; the message says why."""


@dataclass(slots=True)
class ChangeSet:
    keys: set[ServiceKey] = field(default_factory=set)
    namespaces: set[str] = field(default_factory=set)  # a Namespace appeared or went
    connection: bool = False  # connected/stale flipped: every key of the cluster is dirty
    # Objects we manage as the cluster now holds them, after a change that was not our own
    # write (None: gone; of a ServiceExport only the status, the rest is the user's). The
    # controller writes again whatever differs from what it wrote (of a status, only the
    # conditions of our types count: conditions.py): drift repair.
    published: dict[ObjectRef, Mapping[str, Any] | None] = field(default_factory=dict)
    # The member's error (rejected input, a failing part) appeared, changed or cleared,
    # with nothing else changed: a file rejected whole keeps every object as it was, and
    # without this the change was never reported (member_input_error never set).
    error: bool = False

    def __bool__(self) -> bool:
        return bool(self.keys or self.namespaces or self.connection or self.published
                    or self.error)

    def update(self, other: ChangeSet) -> None:
        self.keys |= other.keys
        self.namespaces |= other.namespaces
        self.connection = self.connection or other.connection
        self.published.update(other.published)
        self.error = self.error or other.error


@dataclass(slots=True)
class Connection:
    connected: bool = False
    since: float = 0.0  # wall clock of the last flip
    error: str | None = None  # last read or write problem (input errors included)


Notify = Callable[[str, ChangeSet], None]

# A member is stale once its reads have failed this long with no success between.
STALE_AFTER_S = 5.0


class StaleGrace:
    """When a failing member goes stale: `stale_after_s` after its first failure with no
    success since, not at the first one. Marking a member stale rewrites every slice
    imported from it in every member, and again when it is back: an API server restart,
    a member folder away for one scan (`ln -sfn`, two renames, an NFS hiccup) is no
    outage. A member that was not connected when it started failing is stale at once.
    `on_over` is called when the grace runs out with the member still failing."""

    __slots__ = ("_failing_since", "_on_over", "_timer", "stale_after_s")

    def __init__(self, stale_after_s: float, on_over: Callable[[], None]) -> None:
        self.stale_after_s = stale_after_s
        self._on_over = on_over
        self._failing_since: float | None = None  # monotonic time of the first failure
        self._timer: asyncio.TimerHandle | None = None  # ends the grace

    def connected(self, failing: bool, was_connected: bool) -> bool:
        """Whether the member counts as connected now, `failing` or not."""
        if not failing:
            self._failing_since = None
            self.cancel()
            return True
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        left = self.stale_after_s - (now - self._failing_since)
        if not was_connected or left <= 0:
            self.cancel()
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(left, self._over)
        return True

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _over(self) -> None:
        self._timer = None
        self._on_over()


class ClusterClient(Protocol):
    cluster_id: str
    objects: ClusterObjects
    connection: Connection

    async def sync(self) -> ChangeSet:
        """Load the whole cluster once; ClusterError when it cannot be read."""

    async def watch(self, notify: Notify) -> None:
        """Keep `objects` current until cancelled, calling notify(cluster_id, changes)."""

    async def read_published(self) -> list[Mapping[str, Any]]:
        """Every object this controller manages in the cluster, as last written."""

    async def apply(self, objects: Sequence[Mapping[str, Any]]) -> None:
        """Create or replace managed ServiceImports and imported EndpointSlices."""

    async def delete(self, refs: Sequence[ObjectRef]) -> None:
        """Remove managed objects; a missing one is not an error."""

    async def update_export_status(self, export: Mapping[str, Any]) -> None:
        """Write `export["status"]` onto the ServiceExport `export` names. In a real
        cluster only its conditions of our types are ours: anyone else's stay."""

    async def close(self) -> None: ...


__all__ = ["STALE_AFTER_S", "ChangeSet", "ClusterClient", "ClusterError", "ClusterObjects",
           "Connection", "Notify", "StaleGrace"]
