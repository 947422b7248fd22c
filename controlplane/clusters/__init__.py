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


__all__ = ["ChangeSet", "ClusterClient", "ClusterError", "ClusterObjects", "Connection",
           "Notify"]
