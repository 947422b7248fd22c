"""The controller loop: member clusters report changed keys, only those keys are
reconciled, only objects that differ are written, and gateway streams get the delta.

Every member cluster is a ClusterClient (directory today, Kubernetes later). One task per
client watches it; one task (this loop) reconciles dirty keys in batches, so a burst of
changes costs one pass and ordering per key is trivially kept. Each cluster has its own
writer task: a member that is slow or hung delays only its own writes, and what is
reconciled meanwhile is merged into its next write.

Drift: a client reports our objects that someone else changed or removed (a kube client
watches them). What no longer matches what we wrote is queued for that cluster's writer
as it is: nothing to reconcile, nothing new for the streams, and written after whatever
that writer is writing now, so against the cluster's latest state. The echoes of our own
writes match what we wrote and are left alone: no loop. An object with our label that we
did not write there (left by an earlier controller, made by hand) has its service
reconciled again and is deleted unless that wants it: at once, not at the next term.

Unread members: a member that did not answer when the controller started (Kubernetes mode
starts a term with the members that answer) is kept, tried again in the background and
adopted once it answers, as one that joins. Until then its exports are unknown, and a
member not read would look like one without exports: every key it may export is frozen,
its ServiceImport, export statuses and the unread member's slices left as last written
(_reconcile_frozen), only the slices of members that were read following them. Those
keys are the ones whose ServiceImport read back from a member lists it in
`status.clusters`, or that have an imported EndpointSlice sourced from it, and those a
Karmada MultiClusterService no read member holds may have made imported
(_freeze_unseen_mcs): they wait on every unread member, as the MultiClusterService may
stand in any of them. While no read member holds one, the slices of a read member without
a ServiceExport of the key (such a provider's) stay as last written too. Every other key is
reconciled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from controlplane.allocator import DEFAULT_CIDR, ClusterSetIPAllocator, parse_cidrs
from controlplane.clusters import ChangeSet, ClusterClient, ClusterError
from controlplane.conditions import conditions_by_type, own_export_conditions
from controlplane.holds import Hold, HoldStore
from controlplane.metrics import ControllerMetrics
from controlplane.reconcile import (
    Obj,
    Prior,
    ServiceInputs,
    assign_ips,
    keys_to_reconcile,
    member_input,
    render,
    resolve,
)
from controlplane.resources import KIND_EXPORT, KIND_IMPORT, KIND_SLICE, ObjectRef
from mcsproxy.backoff import Backoff
from mcsproxy.gc_pause import collector_paused
from mcsproxy.manifests import LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER
from mcsproxy.model import EMPTY_MAPPING, ServiceKey
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("controlplane.controller")

WRITE_RETRY_S = 1.0  # the first retry of a failed write; each next one waits twice as long
WRITE_RETRY_MAX_S = 30.0
BULK_KEYS = 500  # a flush this large reconciles with the cyclic collector paused
# A flush reconciles for at most this long (one key at least) before the loop runs again.
FLUSH_PART_S = 0.02
WAITING_SHOWN = 5  # keys named in the log line saying which wait on an unread member


class Publisher:
    """Where a batch goes besides the member clusters (the gateway stream)."""

    def publish(self, cluster: str, upserts: Mapping[ObjectRef, Obj],
                deletes: Iterable[ObjectRef], observed: float | None) -> None: ...

    def set_members(self, members: Mapping[str, Mapping[str, Any]]) -> None: ...

    def attach(self, cluster: str, objects: Mapping[ObjectRef, Obj]) -> None:
        """A member read after the start: `objects` is what it holds (filled in place)."""


class _FlushReport:
    """One flush's keys, reported in the metrics once every cluster's write is done."""

    __slots__ = ("done", "pending", "seen", "started")

    def __init__(self, started: float, seen: Iterable[float], pending: int) -> None:
        self.started, self.seen, self.pending = started, list(seen), pending
        self.done = asyncio.Event()


@dataclass(slots=True)
class _Batch:
    """What a cluster's writer has still to write."""

    upserts: dict[ObjectRef, Obj] = field(default_factory=dict)
    deletes: set[ObjectRef] = field(default_factory=set)
    reports: list[_FlushReport] = field(default_factory=list)

    def merge(self, upserts: Mapping[ObjectRef, Obj], deletes: set[ObjectRef],
              report: _FlushReport | None) -> None:
        # The later flush wins per object: its upsert cancels a queued delete and back.
        for ref in deletes:
            self.upserts.pop(ref, None)
        self.deletes.difference_update(upserts)
        self.deletes |= deletes
        self.upserts.update(upserts)
        if report is not None:  # a drift repair or a retry is no flush of ours
            self.reports.append(report)


def _merge_part(upserts: dict[ObjectRef, Obj], deletes: set[ObjectRef],
                part_up: Mapping[ObjectRef, Obj], part_del: set[ObjectRef]) -> None:
    """A part of a flush into the whole: each key is in one part, so its refs are too."""
    upserts.update(part_up)
    deletes |= part_del


def rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def drifted(wanted: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """The cluster holds `live` where we wrote `wanted`: does it need writing again?"""
    if live is None:
        return True
    if wanted.get("kind") == KIND_EXPORT:  # only its conditions of our types are ours
        return own_export_conditions(live) != own_export_conditions(wanted)
    return live != wanted


def service_key_of_output(obj: Mapping[str, Any]) -> ServiceKey | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    namespace = str(meta.get("namespace") or "default")
    if obj.get("kind") == KIND_SLICE:
        labels = meta.get("labels")
        name = labels.get(LABEL_SERVICE_NAME) if isinstance(labels, Mapping) else None
        if not name:  # a damaged file of ours: tie it to its own name so it gets removed
            name = meta.get("name")
        return ServiceKey(namespace, str(name))
    return ServiceKey(namespace, str(meta.get("name")))


def slice_source(obj: Mapping[str, Any]) -> str | None:
    """The source-cluster label of an imported EndpointSlice as written (None if none)."""
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    source = labels.get(LABEL_SOURCE_CLUSTER) if isinstance(labels, Mapping) else None
    return source if isinstance(source, str) else None


class Controller:
    def __init__(
        self,
        clients: Iterable[ClusterClient],
        *,
        cidrs: str = DEFAULT_CIDR,
        cluster_cidrs: Mapping[str, str] = EMPTY_MAPPING,
        metrics: ControllerMetrics | None = None,
        publisher: Publisher | None = None,
        now: Callable[[], str] = rfc3339_now,
        holds: HoldStore | None = None,
        unread: Iterable[ClusterClient] = (),
        retry: tuple[float, float] = (0.2, 30.0),
    ) -> None:
        self.clients: dict[str, ClusterClient] = {c.cluster_id: c for c in clients}
        # Members not read yet, tried again with backoff (`retry`: base and cap, seconds)
        # until they answer, and the keys frozen until they are: key → whom it waits on.
        self.unread: dict[str, ClusterClient] = {c.cluster_id: c for c in unread}
        self._retry = retry
        self._frozen: dict[ServiceKey, set[str]] = {}
        self.allocator = ClusterSetIPAllocator(parse_cidrs(cidrs))
        # KEP-1645 lets each consumer have its own ClusterSetIPs; a range per cluster is
        # what lets several clusters' gateways share one host (the local demo).
        self.cluster_allocators = {
            c: ClusterSetIPAllocator(parse_cidrs(cidr)) for c, cidr in cluster_cidrs.items()
        }
        members = {*self.clients, *self.unread}
        for cluster in sorted(set(cluster_cidrs) - members):
            # A mistyped cluster ID gave that consumer the clusterset range without a word.
            log.warning("--cluster-cidr %s=%s: no member cluster %s (members: %s); the "
                        "range is used once a member of that ID joins", cluster,
                        cluster_cidrs[cluster], cluster, ", ".join(sorted(members)) or "none")
        # Released addresses held back, kept across restarts (holds.py).
        self.holds = holds
        self._holds_saved: tuple[int, ...] = ()  # each allocator's held_changes, as saved
        self.metrics = metrics or ControllerMetrics()
        self.publisher = publisher
        self._now = now
        # What each cluster holds now (read back, then as we wrote it) and, per key, which
        # refs in which cluster belong to it: the base every diff is taken against.
        self.written: dict[str, dict[ObjectRef, Obj]] = {}
        self._refs: dict[ServiceKey, dict[str, set[ObjectRef]]] = {}
        # Per cluster, refs whose write failed: queued again, as they are wanted by then.
        self._rewrite: dict[str, set[ObjectRef]] = {}
        self._imported: set[ServiceKey] = set()
        # ClusterSetIP services no address was free for (imported nowhere), and whether a
        # reconcile since the last flush released addresses they could now have.
        self._unallocated: set[ServiceKey] = set()
        self._released = False
        # key → cluster → our-labelled objects seen there that `written` lacked.
        self._unwanted: dict[ServiceKey, dict[str, set[ObjectRef]]] = {}
        self._dirty: dict[ServiceKey, float] = {}  # key → when the change was first seen
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        # Per member, the tasks reading a new client of it (Controller.reconnect), and
        # those taking over now (not cut short by a newer one).
        self._reconnects: dict[str, list[asyncio.Task[Any]]] = {}
        self._swapping: set[asyncio.Task[Any]] = set()
        self._queued: dict[str, _Batch] = {}  # per cluster, waiting for its writer
        self._writers: dict[str, asyncio.Task[Any]] = {}
        self._writer_error: BaseException | None = None
        self.failed_clusters: set[str] = set()  # whose last write failed (--once exits 1)
        # Per cluster whose writes fail: an object it keeps refusing (a webhook, a quota)
        # was retried, and logged as an error, every second for as long as it refused.
        self._write_backoff: dict[str, Backoff] = {}
        self.batches = 0
        self.synced = asyncio.Event()
        # key → (reason, message) of each conflict between its exports, for /status.
        self.conflicts: dict[ServiceKey, tuple[tuple[str, str], ...]] = {}

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every member, take back earlier output, reconcile everything once (but
        the keys that wait on an unread member)."""
        try:
            if self.holds is not None:  # before anything is allocated
                self._restore_holds(await self.holds.load())
            for client in self.clients.values():
                await self._adopt(client)
            self._freeze_unseen_mcs()
            for cluster in sorted(self.unread):
                self.metrics.member_connected.labels(cluster).set(0)
                self._report_waiting(cluster)
            # Feeds start from the full state (their snapshot), not from a first giant delta.
            await self.flush(publish=False)
        except BaseException:
            # A start cut short (the term ended: a stop, a lost lease) or failed (retried
            # with a new controller) takes its writers along. They used to write on, past
            # the term and into clients closed under them (AssertionError in aiohttp,
            # "Connector is closed"), as only run() and close() stop them and neither
            # runs for a controller that never started; the holds' writer retried for
            # good a write the fence refused, one more task per term ended so.
            await cancel_and_wait(list(self._writers.values()))
            if self.holds is not None:
                await self.holds.close()
            raise
        self._publish_members()
        self.synced.set()

    async def _adopt(self, client: ClusterClient, synced: bool = False) -> None:
        if not synced:
            await client.sync()
        cluster = client.cluster_id
        prior = Prior()
        # Filled in place: a stream feed may already hold this dict.
        written = self.written.setdefault(cluster, {})
        for obj in await client.read_published():
            key = service_key_of_output(obj)
            if key is None:
                continue
            meta = obj["metadata"]
            ref = ObjectRef(str(obj.get("kind")), key.namespace, str(meta.get("name")))
            written[ref] = obj
            self._refs.setdefault(key, {}).setdefault(cluster, set()).add(ref)
            self._dirty.setdefault(key, time.monotonic())
            prior.add(cluster, obj)
            if self.unread and (waits := self._waits_on(obj)):
                self._frozen.setdefault(key, set()).update(waits)
        allocator = self.cluster_allocators.get(cluster, self.allocator)
        for key, ips in sorted(prior.ips.items()):
            if not allocator.get(key):
                allocator.reserve(key, ips)
        self.clients[cluster] = client
        self._mark(keys_to_reconcile({cluster: client.objects}))
        self._mark_cluster_namespaces(cluster)
        self.metrics.member_connected.labels(cluster).set(int(client.connection.connected))
        self._set_input_error_gauge(cluster)  # 0 from the start, not absent until a change

    def _set_input_error_gauge(self, cluster: str) -> None:
        connection = self.clients[cluster].connection
        self.metrics.member_input_error.labels(cluster).set(
            int(bool(connection.error) and connection.connected))

    def _waits_on(self, obj: Mapping[str, Any]) -> set[str]:
        """The unread members that a published object says export its key: those its
        ServiceImport lists, the source of its imported slice."""
        found: set[str] = set()
        if obj.get("kind") == KIND_SLICE:
            source = slice_source(obj)
            if source is not None:
                found.add(source)
        elif obj.get("kind") == KIND_IMPORT:
            found |= self._listed(obj)
        return found & self.unread.keys()

    def _freeze_unseen_mcs(self) -> None:
        """Keys a MultiClusterService in an unread member may have made imported: an
        import lists a read member as exporting the key, that member has no ServiceExport
        of it, and no read member holds a MultiClusterService of it. Such a provider's
        import says nothing of where its MultiClusterService stands (any member's), so
        the key waits on every unread member. Before, those imports were deleted
        everywhere at the start of a term with the member down, as never exported."""
        if not self.unread:
            return
        for key, by_cluster in self._refs.items():
            if any(key in cl.objects.mcs for cl in self.clients.values()):
                continue
            ref = ObjectRef(KIND_IMPORT, *key)
            listed = set().union(*(self._listed(self.written[c][ref])
                                   for c, refs in by_cluster.items() if ref in refs))
            if any(c in self.clients and key not in self.clients[c].objects.exports
                   for c in listed):
                self._frozen.setdefault(key, set()).update(self.unread)

    @staticmethod
    def _listed(obj: Mapping[str, Any]) -> set[str]:
        """The exporting clusters a ServiceImport names in `status.clusters`."""
        status = obj.get("status")
        listed = status.get("clusters") if isinstance(status, Mapping) else None
        return {entry["cluster"] for entry in (listed if isinstance(listed, list) else ())
                if isinstance(entry, Mapping) and isinstance(entry.get("cluster"), str)}

    def waiting(self, cluster: str) -> list[ServiceKey]:
        """The keys frozen until the unread member `cluster` is read."""
        return sorted(k for k, on in self._frozen.items() if cluster in on)

    def _report_waiting(self, cluster: str) -> None:
        keys = self.waiting(cluster)
        error = self.unread[cluster].connection.error or "not answering"
        if keys:
            more = f" (+{len(keys) - WAITING_SHOWN} more)" if len(keys) > WAITING_SHOWN else ""
            log.warning("cluster %s not read (%s): %d service(s) it may export wait on it "
                        "(their imports and its slices left as last written, the other "
                        "members' slices updated) until it answers: %s%s", cluster, error,
                        len(keys),
                        ", ".join(str(k) for k in keys[:WAITING_SHOWN]), more)
        else:
            log.warning("cluster %s not read (%s): no service imported elsewhere waits on "
                        "it; it joins when it answers", cluster, error)
        # What we last imported from it, for the stale gauge: its endpoints are not known.
        self.metrics.stale_endpoints.labels(cluster).set(max(
            (sum(len(o.get("endpoints") or ()) for o in written.values()
                 if o.get("kind") == KIND_SLICE and self._waits_on(o) == {cluster})
             for written in self.written.values()), default=0))

    async def _join(self, client: ClusterClient) -> None:
        """An unread member: read with backoff until it answers, then adopted (its keys
        reconciled again) and watched."""
        cluster = client.cluster_id
        backoff = Backoff(*self._retry)
        error = client.connection.error
        while True:
            before = {u: len(self.waiting(u)) for u in self.unread}
            try:
                await self._adopt(client)
                break
            except (ClusterError, OSError):
                if client.connection.error != error:  # the client logs the failure
                    error = client.connection.error
                    self._publish_members()
                await asyncio.sleep(backoff.next())
        del self.unread[cluster]
        self._update_stale_gauge(cluster)
        for other in sorted(self.unread):  # it imported more of theirs
            if len(self.waiting(other)) != before[other]:
                self._report_waiting(other)
        waited = [k for k, on in self._frozen.items() if cluster in on]
        for key in waited:
            on = self._frozen[key]
            on.discard(cluster)
            if not on:
                del self._frozen[key]
        self._mark(waited)
        log.info("cluster %s read: the %d service(s) that waited on it are reconciled",
                 cluster, len(waited))
        if self.publisher is not None:
            self.publisher.attach(cluster, self.written[cluster])
        self._publish_members()
        self._wake.set()
        await client.watch(self.on_change)

    def _allocators(self) -> list[tuple[str | None, ClusterSetIPAllocator]]:
        return [(None, self.allocator), *sorted(self.cluster_allocators.items())]

    def _restore_holds(self, holds: list[Hold]) -> None:
        for cluster, allocator in self._allocators():
            allocator.restore_held((h.ip, h.service, h.released) for h in holds
                                   if h.cluster == cluster)
        self._holds_saved = tuple(a.held_changes for _, a in self._allocators())

    def _save_holds(self) -> None:
        """Hand the holds to the store when they changed: it writes them in the
        background, so a slow or failing store never holds up reconciling."""
        if self.holds is None:
            return
        changes = tuple(a.held_changes for _, a in self._allocators())
        if changes == self._holds_saved:
            return
        self._holds_saved = changes
        self.holds.save([Hold(cluster, ip, key, when) for cluster, a in self._allocators()
                         for ip, key, when in a.held()])

    def reconnect(self, client: ClusterClient) -> None:
        """A member's connection made anew (its kubeconfig changed: rotated credentials,
        a moved API server): `client` replaces the member's client once it has read the
        member, the old one serving until then; no other member is touched. Before, the
        controller was rebuilt: every member listed again, every service reconciled,
        the gateway streams given a new epoch (a full snapshot each)."""
        cluster = client.cluster_id
        earlier = self._reconnects.setdefault(cluster, [])
        for task in earlier:
            if task not in self._swapping:
                task.cancel()  # still reading its client, which this one replaces
        earlier.append(spawn(self._reconnect(client, list(earlier)),
                             name=f"reconnect cluster {cluster}"))

    async def _reconnect(self, client: ClusterClient, earlier: list[asyncio.Task[Any]]) -> None:
        cluster = client.cluster_id
        this = asyncio.current_task()
        assert this is not None
        swapped = False
        try:
            if earlier:  # cancelled, or swapping in their client (not cut short): done first
                await asyncio.wait(earlier)
            if cluster in self.unread:  # never read: the new client is tried instead
                self._swapping.add(this)
                old = self.unread[cluster]
                await cancel_and_wait([t for t in [self._tasks.pop(cluster, None)] if t])
                self.unread[cluster] = client
                swapped = True
                self._tasks[cluster] = spawn(self._join(client), name=f"join cluster {cluster}")
                await old.close()
                return
            backoff = Backoff(*self._retry)
            while True:
                try:
                    await client.sync()
                    break
                except (ClusterError, OSError):
                    await asyncio.sleep(backoff.next())
            self._swapping.add(this)
            old_task = self._tasks.pop(cluster, None)
            old = self.clients[cluster]
            await cancel_and_wait([old_task] if old_task else [])
            try:
                await self._adopt(client, synced=True)  # its keys reconciled: written if changed
            except (ClusterError, OSError) as exc:
                log.error("cluster %s: its new kubeconfig cannot be used (%s): keeping the "
                          "old connection", cluster, exc)
                self._tasks[cluster] = spawn(old.watch(self.on_change),
                                             name=f"watch cluster {cluster}")
                return
            swapped = True
            self._tasks[cluster] = spawn(client.watch(self.on_change),
                                         name=f"watch cluster {cluster}")
            self._publish_members()
            self._wake.set()
            log.info("cluster %s reconnected with its new kubeconfig", cluster)
            await old.close()
        finally:
            self._swapping.discard(this)
            if not swapped:
                await client.close()
            tasks = self._reconnects.get(cluster, [])
            if this in tasks:
                tasks.remove(this)
            if not tasks:
                self._reconnects.pop(cluster, None)

    def _reconnecting(self) -> list[asyncio.Task[Any]]:
        return [t for tasks in self._reconnects.values() for t in tasks]

    async def add_cluster(self, client: ClusterClient) -> None:
        """A member that joined while running (a new folder, a new context)."""
        await self._adopt(client)
        self._tasks[client.cluster_id] = spawn(
            client.watch(self.on_change), name=f"watch cluster {client.cluster_id}")
        self._publish_members()
        self._wake.set()

    # -- change intake -------------------------------------------------------------------
    def _mark(self, keys: Iterable[ServiceKey], seen: float | None = None) -> None:
        seen = time.monotonic() if seen is None else seen
        for key in keys:
            self._dirty.setdefault(key, seen)

    def _mark_cluster_namespaces(self, cluster: str) -> None:
        namespaces = self.clients[cluster].objects.namespaces
        self._mark(k for k in self._known_keys() if k.namespace in namespaces)

    def _known_keys(self) -> set[ServiceKey]:
        keys = set(self._refs)
        for client in self.clients.values():
            keys.update(client.objects.exports)
            keys.update(client.objects.mcs)
        return keys

    def on_change(self, cluster: str, changes: ChangeSet) -> None:
        seen = time.monotonic()
        self._mark(changes.keys, seen)
        if changes.namespaces:
            self._mark((k for k in self._known_keys() if k.namespace in changes.namespaces), seen)
        if changes.connection:
            client = self.clients[cluster]
            self._mark(client.objects.service_keys(), seen)
            self.metrics.member_connected.labels(cluster).set(int(client.connection.connected))
            self._update_stale_gauge(cluster)
            self._publish_members()
        elif changes.error:
            self._publish_members()  # each member's error is in the members message
        self._set_input_error_gauge(cluster)
        if changes.published:
            self._repair(cluster, changes.published)
        self._wake.set()

    def _repair(self, cluster: str, live: Mapping[ObjectRef, Mapping[str, Any] | None]) -> None:
        """Our objects someone else changed or removed: what differs is written again."""
        written = self.written.get(cluster, {})
        upserts: dict[ObjectRef, Obj] = {}
        for ref, obj in live.items():
            wanted = written.get(ref)
            if wanted is None:
                if obj is not None and ref.kind in (KIND_IMPORT, KIND_SLICE):
                    self._found_unwanted(cluster, ref, obj)
                continue  # not (or no longer) ours to hold there
            if not drifted(wanted, obj):
                continue  # as we wrote it
            key = service_key_of_output(wanted)
            assert key is not None
            log.info("cluster %s: %s %s/%s %s by someone else: writing it again", cluster,
                     ref.kind, ref.namespace, ref.name, "removed" if obj is None else "changed")
            self.metrics.drift_repairs.labels(cluster).inc()
            upserts[ref] = wanted
            if ref.kind == KIND_IMPORT and obj is None:
                # The new import gets a new uid: its slices must name it as their owner.
                upserts.update((r, written[r]) for r in self._refs.get(key, {}).get(cluster, ())
                               if r.kind == KIND_SLICE and r in written)
        if upserts:
            self._queue(cluster, upserts, set(), None)

    def _found_unwanted(self, cluster: str, ref: ObjectRef, obj: Mapping[str, Any]) -> None:
        """An object with our label that we did not write there (left by an earlier
        controller or a term that ended mid-write, made by hand): its key is reconciled
        again and it is deleted unless that finds it wanted. Not decided here: `written`
        may be about to change for a key already dirty, and an object our own queued or
        in-flight writes create is in `written` from the moment its batch is reconciled."""
        key = service_key_of_output(obj)
        if key is None:
            return
        self._unwanted.setdefault(key, {}).setdefault(cluster, set()).add(ref)
        self._mark((key,))

    @property
    def imported_count(self) -> int:
        return len(self._imported)

    def members(self) -> dict[str, dict[str, Any]]:
        found = {
            c: {"connected": cl.connection.connected, "stale": not cl.connection.connected,
                "since": cl.connection.since, "error": cl.connection.error}
            for c, cl in sorted(self.clients.items())
        }
        for c, cl in self.unread.items():  # not read yet: stale whatever it says now
            found[c] = {"connected": False, "stale": True, "since": cl.connection.since,
                        "error": cl.connection.error or "not read yet", "unread": True,
                        "services_waiting": len(self.waiting(c))}
        return dict(sorted(found.items()))

    def _publish_members(self) -> None:
        if self.publisher is not None:
            self.publisher.set_members(self.members())

    # -- reconcile -----------------------------------------------------------------------
    def _inputs(self, key: ServiceKey, clusters: list[str]) -> ServiceInputs:
        return ServiceInputs(key, tuple(
            member_input(
                key, c, self.clients[c].objects,
                stale=not self.clients[c].connection.connected,
                previous_conditions=conditions_by_type(
                    self.written[c].get(ObjectRef(KIND_EXPORT, *key), EMPTY_MAPPING)),
            )
            for c in clusters
        ))

    def _reconcile_key(
        self, key: ServiceKey, clusters: list[str], now: str
    ) -> dict[str, dict[ObjectRef, Obj]]:
        inputs = self._inputs(key, clusters)
        res = resolve(inputs)
        if res.conflicts:
            self.conflicts[key] = res.conflicts
        else:
            self.conflicts.pop(key, None)
        had_ips = any(a.get(key) for _, a in self._allocators())
        res, ips, cluster_ips = assign_ips(res, self.allocator, self.cluster_allocators)
        if had_ips and not ips:
            self._released = True
        self._note_unallocated(key, res.unallocated)
        if res.imported:
            self._imported.add(key)
        else:
            self._imported.discard(key)
        result = render(res, inputs, ips, now, cluster_ips)
        return {c: result.objects_for(c) for c in clusters}

    def _note_unallocated(self, key: ServiceKey, reason: str | None) -> None:
        if reason is None:
            if key in self._unallocated:
                self._unallocated.discard(key)
                log.info("service %s/%s has its ClusterSetIP now", *key)
        elif key not in self._unallocated:
            self._unallocated.add(key)
            log.error("service %s/%s is not imported: %s", key.namespace, key.name, reason)

    def _retry_unallocated(self) -> None:
        """Services no address was free for are tried again once one was released."""
        if self._released and self._unallocated:
            self._mark(self._unallocated)
            self._wake.set()
        self._released = False

    def _reconcile_frozen(
        self, key: ServiceKey, clusters: list[str], now: str
    ) -> dict[str, dict[ObjectRef, Obj]]:
        """A key an unread member may export: only the slices of the members that were
        read follow them; the ServiceImport, the export statuses and the unread member's
        slices stay as last written, and so do its addresses. Frozen whole, a service
        exported by a and by the unread c (the failover case) took none of a's endpoint
        changes until c answered."""
        inputs = self._inputs(key, clusters)
        res = resolve(inputs)
        ips = self.allocator.get(key)
        own = {c: a.get(key) for c, a in self.cluster_allocators.items()}
        rendered = render(res, inputs, ips, now, own)
        refs = self._refs.get(key, {})
        import_ref = ObjectRef(KIND_IMPORT, *key)
        unseen_mcs = not any(key in cl.objects.mcs for cl in self.clients.values())
        # A member that joined since (a new member Secret) gets the import and the unread
        # member's slices as another member holds them: the same objects in every
        # consumer, but where a cluster has addresses of its own (--cluster-cidr).
        model = next((c for c in clusters if import_ref in self.written[c]
                      and c not in self.cluster_allocators), None)
        desired: dict[str, dict[ObjectRef, Obj]] = {}
        for c in clusters:
            written = self.written[c]
            source = c
            if (import_ref not in written and model is not None
                    and key.namespace in self.clients[c].objects.namespaces
                    and c not in self.cluster_allocators):
                source = model
            held = self.written[source]
            kept = {r: held[r] for r in refs.get(source, ()) if r in held
                    and (r.kind != KIND_EXPORT or source == c)
                    and not self._follows(key, r, held[r], unseen_mcs)}
            if import_ref in kept or import_ref in written:
                kept.update((r, o) for r, o in rendered.objects_for(c).items()
                            if self._follows(key, r, o, unseen_mcs))
            desired[c] = kept
        return desired

    def _follows(self, key: ServiceKey, ref: ObjectRef, obj: Mapping[str, Any],
                 unseen_mcs: bool) -> bool:
        """An imported slice of a frozen key taken as rendered now: one whose source
        member was read. Not an unread member's, nor, while no read member holds a
        MultiClusterService of the key, one of a read member without a ServiceExport of
        it: it was imported as a provider of a MultiClusterService an unread member may
        hold, and rendering without that would delete it. Both stay as last written."""
        if ref.kind != KIND_SLICE:
            return False
        client = self.clients.get(slice_source(obj) or "")
        return client is not None and (not unseen_mcs or key in client.objects.exports)

    async def flush(self, publish: bool = True, wait: bool = True) -> int:
        """Reconcile every dirty key and write what changed; returns keys reconciled.

        Reconciled in parts of at most FLUSH_PART_S, the loop running between them; each
        part goes to the streams as it is done, the writes once all are. A key changed
        meanwhile is dirty again, for the next flush. The writes go to each cluster's
        writer; `wait=False` returns without waiting for them (the run loop: a hung
        cluster must not hold up the next flush)."""
        if not self._dirty:
            return 0
        started = time.perf_counter()
        dirty, self._dirty = self._dirty, {}
        clusters = sorted(self.clients)
        now = self._now()
        observed_wall = time.time() - (time.monotonic() - min(dirty.values()))
        upserts: dict[str, dict[ObjectRef, Obj]] = {c: {} for c in clusters}
        deletes: dict[str, set[ObjectRef]] = {c: set() for c in clusters}
        keys = sorted(dirty)
        done = 0
        while done < len(keys):
            if done:
                # Between parts the loop runs: a full resync of 10,000 services held it
                # for seconds (health probes, member watches, stream heartbeats waited).
                await asyncio.sleep(0)
                if sorted(self.clients) != clusters:
                    # A member adopted meanwhile: the rest is reconciled with it, next.
                    self._mark_again({k: dirty.pop(k) for k in keys[done:]})
                    break
            part_up: dict[str, dict[ObjectRef, Obj]] = {c: {} for c in clusters}
            part_del: dict[str, set[ObjectRef]] = {c: set() for c in clusters}
            # Frozen objects are handed back to the collector at a start only (where the
            # last term's controller is garbage): while running, that pass over the whole
            # heap held the loop for seconds at 10,000 services.
            with collector_paused(len(dirty) >= BULK_KEYS, unfreeze=not self.synced.is_set()):
                end = self._reconcile_into(keys, done, clusters, now, part_up, part_del)
            if self.publisher is not None and publish:
                self._stream(clusters, part_up, part_del, observed_wall,
                             [dirty[k] for k in keys[done:end]])
            for c in clusters:
                _merge_part(upserts[c], deletes[c], part_up[c], part_del[c])
            done = end
        self._retry_unallocated()
        self._save_holds()
        unwanted = self._take_unwanted(dirty)
        self.metrics.services_reconciled.inc(len(dirty))
        writing = [c for c in clusters if upserts[c] or deletes[c] or unwanted.get(c)]
        report = _FlushReport(started, dirty.values(), len(writing))
        for c in writing:
            # Unwanted objects were never in the streams: their deletes are not streamed.
            self._queue(c, upserts[c], deletes[c] | unwanted.get(c, set()), report)
        if not writing:
            self._flushed(report)
        self.metrics.imports.set(len(self._imported))
        self.metrics.unallocated.set(len(self._unallocated))
        self.metrics.set_conflicts(self.conflicts)  # type: ignore[arg-type]
        for c in clusters:
            objects = self.clients[c].objects
            self.metrics.exports.labels(c).set(len(objects.exports) + len(objects.mcs))
        self.batches += 1
        if wait:
            await report.done.wait()
            if self._writer_error is not None:
                raise self._writer_error
        return len(dirty)

    def _flushed(self, report: _FlushReport) -> None:
        done, histogram = time.monotonic(), self.metrics.propagation.labels("written")
        for seen in report.seen:
            histogram.observe(done - seen)
        self.metrics.reconcile.observe(time.perf_counter() - report.started)
        report.done.set()

    def _queue(self, cluster: str, upserts: Mapping[ObjectRef, Obj], deletes: set[ObjectRef],
               report: _FlushReport | None) -> None:
        self._queued.setdefault(cluster, _Batch()).merge(upserts, deletes, report)
        if cluster not in self._writers:
            self._writers[cluster] = spawn(self._writer(cluster),
                                           name=f"write cluster {cluster}")

    async def _writer(self, cluster: str) -> None:
        """Writes the cluster's queued batches, one at a time, until none is left."""
        try:
            while (batch := self._queued.pop(cluster, None)) is not None:
                try:
                    await self._write(cluster, batch.upserts, batch.deletes)
                except Exception as exc:
                    self._writer_error = exc  # a bug, not a cluster failing: stop the loop
                    self._wake.set()
                    raise
                finally:
                    for report in batch.reports:
                        report.pending -= 1
                        if not report.pending:
                            self._flushed(report)
        finally:
            self._writers.pop(cluster, None)

    def _stream(self, clusters: list[str], upserts: Mapping[str, Mapping[ObjectRef, Obj]],
                deletes: Mapping[str, set[ObjectRef]], observed_wall: float,
                seen: list[float]) -> None:
        """One part of a flush to the gateway streams: a delta per cluster it changed."""
        assert self.publisher is not None
        for c in clusters:
            if upserts[c] or deletes[c]:
                self.publisher.publish(c, upserts[c], deletes[c], observed_wall)
        streamed, histogram = time.monotonic(), self.metrics.propagation.labels("streamed")
        for when in seen:
            histogram.observe(streamed - when)

    def _mark_again(self, keys: Mapping[ServiceKey, float]) -> None:
        for key, seen in keys.items():
            self._dirty[key] = min(seen, self._dirty.get(key, seen))
        self._wake.set()

    def _reconcile_into(self, keys: list[ServiceKey], start: int, clusters: list[str],
                        now: str, upserts: dict[str, dict[ObjectRef, Obj]],
                        deletes: dict[str, set[ObjectRef]]) -> int:
        """Reconcile keys[start:] for at most FLUSH_PART_S (one key at least); collect per
        cluster what to write and delete. Returns the index of the first key not done."""
        deadline = time.perf_counter() + FLUSH_PART_S
        for index in range(start, len(keys)):
            if index > start and time.perf_counter() >= deadline:
                return index
            key = keys[index]
            if key in self._frozen:
                desired = self._reconcile_frozen(key, clusters, now)
                # Still imported where it was: counted (the gauge and /status said 0 for
                # every service that waited on an unread member).
                if any(ObjectRef(KIND_IMPORT, *key) in d for d in desired.values()):
                    self._imported.add(key)
                else:
                    self._imported.discard(key)
            else:
                desired = self._reconcile_key(key, clusters, now)
            refs_by_cluster = self._refs.get(key, {})
            for c in clusters:
                written = self.written[c]
                new = desired[c]
                old_refs = refs_by_cluster.get(c, set())
                for ref in old_refs - new.keys():
                    deletes[c].add(ref)
                    written.pop(ref, None)
                for ref, obj in new.items():
                    if written.get(ref) != obj:
                        upserts[c][ref] = obj
                    # Equal too: this render is shared by every consumer, what was read
                    # back of it is each member's own copy (3 at 3 members).
                    written[ref] = obj
                if new:
                    refs_by_cluster[c] = set(new)
                else:
                    refs_by_cluster.pop(c, None)
            if refs_by_cluster:
                self._refs[key] = refs_by_cluster
            else:
                self._refs.pop(key, None)
        return len(keys)

    def _take_unwanted(self, dirty: Iterable[ServiceKey]) -> dict[str, set[ObjectRef]]:
        """Per cluster, the unwanted objects of the keys just reconciled that nothing
        wants there now: to delete."""
        found: dict[str, set[ObjectRef]] = {}
        if not self._unwanted:
            return found
        for key in dirty:
            for c, refs in self._unwanted.pop(key, {}).items():
                written = self.written.get(c)
                if written is None or c not in self.clients:
                    continue
                for ref in sorted(refs - written.keys()):
                    log.info("cluster %s: %s %s/%s carries our label but is not wanted "
                             "there: deleting it", c, ref.kind, ref.namespace, ref.name)
                    found.setdefault(c, set()).add(ref)
                    self.metrics.unwanted_removed.labels(c).inc()
        return found

    def _update_stale_gauge(self, cluster: str) -> None:
        client = self.clients[cluster]
        objects = client.objects
        # Of exported services only: a member's other Services are not served anywhere.
        stale = 0 if client.connection.connected else sum(
            len(s.endpoints) for key in objects.exports.keys() | objects.mcs.keys()
            for s in objects.slices.get(key, {}).values())
        self.metrics.stale_endpoints.labels(cluster).set(stale)

    async def _write(self, cluster: str, upserts: Mapping[ObjectRef, Obj],
                     deletes: set[ObjectRef]) -> None:
        """Every step of the batch is tried even when one fails: a single object the
        cluster refuses (a namespace being deleted, an admission webhook, a quota) used
        to end the batch there, and as the retry carries it again, no ServiceExport
        status and no delete of that cluster was written for as long as it refused.
        A member that stopped answering ends the batch at its first failure."""
        client = self.clients[cluster]
        # Imports before the slices that point at them; slices gone before imports.
        steps: list[Callable[[], Awaitable[None]]] = [partial(client.apply, (
            [o for r, o in upserts.items() if r.kind == KIND_IMPORT]
            + [o for r, o in upserts.items() if r.kind == KIND_SLICE]))]
        steps += [partial(client.update_export_status, upserts[ref])
                  for ref in sorted(r for r in upserts if r.kind == KIND_EXPORT)]
        steps.append(partial(client.delete,
                             sorted(deletes, key=lambda r: (r.kind == KIND_IMPORT, r))))
        errors: list[ClusterError | OSError] = []
        for step in steps:
            if errors and not client.connection.connected:
                break
            try:
                await step()
            except (ClusterError, OSError) as exc:
                errors.append(exc)
        if errors:
            self.failed_clusters.add(cluster)
            self.metrics.write_errors.labels(cluster).inc()
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            delay = self._write_backoff.setdefault(
                cluster, Backoff(WRITE_RETRY_S, WRITE_RETRY_MAX_S)).step()
            log.error("writing to cluster %s failed (%s%s); retrying in %.0fs",
                      cluster, errors[0], more, delay)
            asyncio.get_running_loop().call_later(delay, self._retry_later, cluster,
                                                  set(upserts) | deletes)
            return
        self.failed_clusters.discard(cluster)
        self._write_backoff.pop(cluster, None)
        self.metrics.objects_written.labels(cluster).inc(len(upserts))
        self.metrics.objects_deleted.labels(cluster).inc(len(deletes))

    def _retry_later(self, cluster: str, refs: set[ObjectRef]) -> None:
        self._rewrite.setdefault(cluster, set()).update(refs)
        self._wake.set()

    def _write_again(self) -> None:
        """Queue the failed writes again, as wanted now: not by reconciling their keys
        again, which finds nothing to write (what we wrote is what is wanted), nor from
        the failed batch, which a later flush may have changed or undone meanwhile."""
        rewrite, self._rewrite = self._rewrite, {}
        for cluster, refs in rewrite.items():
            written = self.written.get(cluster)
            if written is None or cluster not in self.clients:
                continue  # a cluster that failed to join
            self._queue(cluster, {r: written[r] for r in refs if r in written},
                        {r for r in refs if r not in written}, None)

    # -- run -----------------------------------------------------------------------------
    async def run(self) -> None:
        """start() must have run. Watches every member and reconciles until cancelled."""
        for cluster, client in self.clients.items():
            if cluster not in self._tasks:
                self._tasks[cluster] = spawn(client.watch(self.on_change),
                                             name=f"watch cluster {cluster}")
        for cluster, client in self.unread.items():
            if cluster not in self._tasks:
                self._tasks[cluster] = spawn(self._join(client), name=f"join cluster {cluster}")
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._writer_error is not None:
                    raise self._writer_error
                self._write_again()
                await self.flush(wait=False)
        finally:
            await cancel_and_wait([*self._reconnecting(), *self._tasks.values(),
                                   *self._writers.values()])
            self._tasks.clear()

    async def close(self) -> None:
        await cancel_and_wait([*self._reconnecting(), *self._tasks.values(),
                               *self._writers.values()])
        self._tasks.clear()
        if self.holds is not None:
            await self.holds.close()
        for client in [*self.clients.values(), *self.unread.values()]:
            await client.close()
        self.metrics.end_term([*self.clients, *self.unread])
