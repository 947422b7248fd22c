"""Kubernetes mode: one member cluster through its API server (kubernetes-asyncio).

Reading is list + watch per resource (Namespaces, Services, the member's own
EndpointSlices, ServiceExports, and Karmada MultiClusterServices when that CRD is
served), resumed by resourceVersion, with bookmarks; a 410 Gone relists and diffs. One
task per resource applies its events strictly in order to `objects`, and the controller
reconciles in a single loop, so the updates of one object are never reordered.

Connection state: a cluster is connected while every resource's last list/watch request
and the periodic /version probe succeed. A stream that just ends or breaks is reconnected
at once; only failing requests (refused, timed out, 5xx) with no success between them
for `stale_after_s` mark the cluster stale (a restart of its API server is no outage),
and its last view is kept (static stability) until it answers again.

Writing: ServiceImports and imported EndpointSlices carry our managed-by label; they are
compared with what the cluster holds and written only when they differ (create, or
replace with the resourceVersion read, re-reading on 409). Imported slices get the
ServiceImport's real uid as owner. Deletes touch only objects carrying our label, with
the uid as precondition. ServiceExport status goes through the status subresource: only
the conditions of our types are ours (conditions.py); the list written is the one last
seen with ours put in, sent with the resourceVersion it was seen at (a 409 reads again).

Drift: our own objects are watched too (label-selected), and relisted every
`resync_s` in case an event was lost. A change that is not the echo of our own write
(its resourceVersion is not one our writes got back) is reported to the controller,
which writes again whatever no longer matches what it wrote, and deletes what carries our
label but is not wanted there (the bookkeeping: kube_managed.py). Not seeing our own objects
stops only that repair: it is logged and retried, and never makes the member stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient

from controlplane.clusters import (
    STALE_AFTER_S,
    ChangeSet,
    ClusterError,
    Connection,
    Notify,
    StaleGrace,
)
from controlplane.clusters.kube_api import (
    MERGE_PATCH,
    KubeApi,
    KubeApiError,
    Obj,
    WatchExpired,
    WatchRefused,
    fenced,
)
from controlplane.clusters.kube_managed import (
    Kept,
    OwnObjects,
    Sent,
    is_ours,
    metadata_of,
    status_digest,
    without_status,
)
from controlplane.clusters.state import ClusterObjects
from controlplane.conditions import (
    EXPORT_CONDITION_TYPES,
    own_export_conditions,
    with_own_conditions,
)
from controlplane.resources import (
    CONTROLLER_MANAGER,
    KARMADA_DISPATCH_MANAGER,
    KIND_EXPORT,
    KIND_IMPORT,
    KIND_MCS,
    KIND_NAMESPACE,
    KIND_SERVICE,
    KIND_SLICE,
    LABEL_K8S_SERVICE_NAME,
    ObjectRef,
    parse_member_object,
)
from mcsproxy.backoff import Backoff, describe_error
from mcsproxy.kubeclient import KubeconfigDict, KubeconfigFile, new_client
from mcsproxy.manifests import (
    LABEL_MANAGED_BY,
    LABEL_SOURCE_CLUSTER,
    MCS_GROUP,
    MCS_VERSIONS,
    ManifestError,
)
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("controlplane.clusters.kube")

KARMADA_GROUP, KARMADA_VERSION = "networking.karmada.io", "v1alpha1"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={CONTROLLER_MANAGER}"
# Server-side filter for the member's own slices; parse_member_object checks again.
MEMBER_SLICE_SELECTOR = ",".join([
    LABEL_K8S_SERVICE_NAME, f"!{LABEL_SOURCE_CLUSTER}",
    f"{LABEL_MANAGED_BY}!={CONTROLLER_MANAGER}", f"{LABEL_MANAGED_BY}!={KARMADA_DISPATCH_MANAGER}",
])
CONFLICT_RETRIES = 4
PROBE = "probe"
SYNC = "sync"
_SHORT_WATCH_S = 1.0  # a watch that ends sooner without events counts as a failed attempt


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    selector: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
        path = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace:
            path += f"/namespaces/{quote(namespace, safe='')}"
        path += f"/{self.plural}"
        if name:
            path += f"/{quote(name, safe='')}"
        return f"{path}/{sub}" if sub else path


NAMESPACES = Resource(KIND_NAMESPACE, "", "v1", "namespaces", namespaced=False)
SERVICES = Resource(KIND_SERVICE, "", "v1", "services")
MEMBER_SLICES = Resource(KIND_SLICE, "discovery.k8s.io", "v1", "endpointslices",
                         selector=MEMBER_SLICE_SELECTOR)
SLICES = Resource(KIND_SLICE, "discovery.k8s.io", "v1", "endpointslices",
                  selector=MANAGED_SELECTOR)  # the imported slices we write


@dataclass(frozen=True, slots=True)
class KubeTimings:
    request_timeout_s: float = 10.0
    watch_timeout_s: float = 300.0  # the server ends a watch after 1-2x this (jittered)
    probe_interval_s: float = 5.0
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 30.0
    write_concurrency: int = 8
    resync_s: float = 1800.0  # our own objects are relisted this often (lost events)
    # A member is stale once its requests have failed this long with no success between
    # (an API server restart, one watch refused and relisted, does not count).
    stale_after_s: float = STALE_AFTER_S


# Where a condition of our types stands in a status as seen: only its type and place are
# used (ours take its place), and anyone else's stay as they stand.
_OWN_PLACES = {t: {"type": t} for t in EXPORT_CONDITION_TYPES}
_NO_STATUS = status_digest(None)


def _place(condition: Any) -> Any:
    found = condition.get("type") if isinstance(condition, Mapping) else None
    return _OWN_PLACES[found] if isinstance(found, str) and found in _OWN_PLACES else condition


class _SeenStatus(NamedTuple):
    """A ServiceExport's status as last seen, and the resourceVersion it was seen at: what
    our next status write is built on, and its precondition. Of the status: digests of
    it (a change) and of our conditions in it (whether ours need writing), and its
    conditions with ours cut to their place. Kept whole, each was a copy of what the
    controller holds: 5 KiB a service after a restart (3 members exporting it)."""

    whole: bytes
    ours: bytes
    conditions: tuple[Any, ...]
    rv: str | None

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> _SeenStatus:
        rv = metadata_of(raw).get("resourceVersion")
        status = raw.get("status")
        listed = status.get("conditions") if isinstance(status, Mapping) else None
        return cls(status_digest(status),
                   status_digest(own_export_conditions({"status": status})),
                   tuple(_place(c) for c in listed) if isinstance(listed, list) else (),
                   str(rv) if rv else None)


class _Informer:
    __slots__ = ("error", "managed", "refs", "resource", "resync_at", "rv")

    def __init__(self, resource: Resource, managed: bool = False) -> None:
        self.resource = resource
        self.rv: str | None = None  # None: list before watching
        self.refs: set[ObjectRef] = set()
        # Our own output (imports, imported slices), watched for drift, not the view.
        self.managed = managed
        self.error: str | None = None  # the last failure of a managed informer, logged once
        self.resync_at = 0.0  # monotonic time of its next relist (managed only)


class KubeClusterClient:
    """A member cluster's API server behind the ClusterClient interface."""

    def __init__(self, cluster_id: str, api_client: ApiClient,
                 timings: KubeTimings = KubeTimings()) -> None:
        self.cluster_id = cluster_id
        self.timings = timings
        self.api = KubeApi(api_client, cluster_id, timings.request_timeout_s)
        self.objects = ClusterObjects()
        self.connection = Connection()
        self._informers: list[_Informer] = []
        self._import_res: Resource | None = None
        self._export_res: Resource | None = None
        self._failing: dict[str, str] = {}  # informer plural / probe / sync → error
        self._grace = StaleGrace(timings.stale_after_s, self._grace_over)
        self._notify: Notify | None = None  # while watching: a flip to stale is told to it
        self._input_errors: dict[ObjectRef, str] = {}
        self._export_status: dict[ObjectRef, _SeenStatus] = {}
        self.own = OwnObjects()  # our imports and slices as the cluster holds them
        # Our imports and slices as the last sync listed them (rendered), and our
        # conditions of the ServiceExports: what read_published() hands the controller,
        # once (`own` and `_export_status` keep digests).
        self._listed: list[Mapping[str, Any]] | None = None
        self.writes = 0  # POST/PUT/PATCH/DELETE requests sent
        # Seconds writes may still be sent: the leader's lease (leader.py, fencing); no
        # limit without leader election.
        self.fence: Callable[[], float] | None = None
        # Told the resource of each watch that expired (410 Gone) and was listed again:
        # the controller's relists_gone counter (kube_app). An API server whose history
        # is too short for its watchers shows there, each relist a full list.
        self.on_relist_gone: Callable[[str], None] | None = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    async def from_kubeconfig(cls, cluster_id: str, path: str | Path | None,
                              context: str | None,
                              timings: KubeTimings = KubeTimings()) -> KubeClusterClient:
        try:
            client = await new_client(KubeconfigFile(path, context))
        except (kube_config.ConfigException, OSError, ValueError, KeyError) as exc:
            raise ClusterError(f"cluster {cluster_id}: kubeconfig context {context!r}: "
                               f"{exc}") from None
        return cls(cluster_id, client, timings)

    @classmethod
    async def from_kubeconfig_dict(cls, cluster_id: str, config_dict: Mapping[str, Any],
                                   timings: KubeTimings = KubeTimings()) -> KubeClusterClient:
        try:
            client = await new_client(KubeconfigDict(config_dict,
                                                     describe=f"cluster {cluster_id} kubeconfig"))
        except (kube_config.ConfigException, OSError, ValueError, KeyError,
                TypeError) as exc:
            raise ClusterError(f"cluster {cluster_id}: kubeconfig: {exc}") from None
        return cls(cluster_id, client, timings)

    async def close(self) -> None:
        self._grace.cancel()
        await self.api.client.close()

    # -- discovery -----------------------------------------------------------------------
    async def _served_versions(self, group: str) -> list[str]:
        try:
            found = await self.api.request("GET", f"/apis/{group}")
        except KubeApiError as exc:
            if exc.code == 404:
                return []
            raise
        return [str(v.get("version")) for v in found.get("versions") or ()
                if isinstance(v, Mapping)]

    async def _discover(self) -> None:
        versions = await self._served_versions(MCS_GROUP)
        mcs_version = next((v for v in MCS_VERSIONS if v in versions), None)
        if mcs_version is None:
            raise ClusterError(f"the {MCS_GROUP} CRDs (ServiceExport, ServiceImport) are not "
                               "served by this cluster")
        self._export_res = Resource(KIND_EXPORT, MCS_GROUP, mcs_version, "serviceexports")
        self._import_res = Resource(KIND_IMPORT, MCS_GROUP, mcs_version, "serviceimports",
                                    selector=MANAGED_SELECTOR)
        resources = [NAMESPACES, SERVICES, MEMBER_SLICES, self._export_res]
        if KARMADA_VERSION in await self._served_versions(KARMADA_GROUP):
            served = await self.api.request("GET", f"/apis/{KARMADA_GROUP}/{KARMADA_VERSION}")
            if any(isinstance(r, Mapping) and r.get("name") == "multiclusterservices"
                   for r in served.get("resources") or ()):
                resources.append(Resource(KIND_MCS, KARMADA_GROUP, KARMADA_VERSION,
                                          "multiclusterservices"))
        self._informers = [_Informer(r) for r in resources]
        self._informers += [_Informer(r, managed=True) for r in (self._import_res, SLICES)]
        log.info("cluster %s: watching %s and our own %s, %s", self.cluster_id,
                 ", ".join(f"{r.plural}.{r.api_version}" for r in resources),
                 self._import_res.plural, SLICES.plural)

    # -- the view ------------------------------------------------------------------------
    def _ref(self, res: Resource, raw: Mapping[str, Any]) -> ObjectRef | None:
        found = metadata_of(raw)
        name = found.get("name")
        if not isinstance(name, str) or not name:
            return None
        namespace = str(found.get("namespace") or "") if res.namespaced else ""
        return ObjectRef(res.kind, namespace, name)

    def _upsert(self, inf: _Informer, raw: Obj, changes: ChangeSet) -> ObjectRef | None:
        res = inf.resource
        # Items of built-in lists come without apiVersion/kind.
        raw.setdefault("apiVersion", res.api_version)
        raw.setdefault("kind", res.kind)
        ref = self._ref(res, raw)
        if ref is None:
            return None
        if res.kind == KIND_EXPORT and not self.own.is_echo(ref, raw):
            seen = self._export_status.get(ref)
            now = self._export_status[ref] = _SeenStatus.of(raw)  # a newer base for writes
            if now.whole != (seen.whole if seen else _NO_STATUS):
                # The controller tells drift (our conditions) from anyone else's.
                changes.published[ref] = {"status": raw.get("status")}
            self.own.changed_by_others(ref)
        try:
            parsed = parse_member_object(raw, self.cluster_id)
        except ManifestError as exc:
            if self._input_errors.get(ref) != str(exc):
                log.warning("cluster %s: rejected %s %s/%s (%s); keeping its last good state",
                            self.cluster_id, ref.kind, ref.namespace, ref.name, exc)
            self._input_errors[ref] = str(exc)
            return ref
        self._input_errors.pop(ref, None)
        if parsed is None:  # e.g. a slice that became someone's import: not ours to read
            self._remove(inf, ref, changes)
            return ref
        self.objects.upsert(ref, parsed[1], changes)
        inf.refs.add(ref)
        return ref

    def _remove(self, inf: _Informer, ref: ObjectRef, changes: ChangeSet) -> None:
        self.objects.remove(ref, changes)
        inf.refs.discard(ref)
        self._input_errors.pop(ref, None)
        self._export_status.pop(ref, None)
        self.own.forget_versions(ref)

    def _own_conditions(self, res: Resource, items: list[Obj]
                        ) -> dict[ObjectRef, list[Mapping[str, Any]]]:
        """Our conditions of each listed ServiceExport that has any."""
        found = {}
        for raw in items:
            ref, ours = self._ref(res, raw), own_export_conditions(raw)
            if ref is not None and ours:
                found[ref] = list(ours.values())
        return found

    def _replace(self, inf: _Informer, items: list[Obj], rv: str, changes: ChangeSet) -> None:
        """A fresh list is the whole truth for its resource: diff it against the view."""
        if inf.managed:
            self._replace_managed(inf, items, changes)
            inf.rv = rv
            return
        seen = {ref for raw in items if (ref := self._upsert(inf, raw, changes)) is not None}
        for ref in inf.refs - seen:
            self._remove(inf, ref, changes)
        for ref in [r for r in self._input_errors
                    if r.kind == inf.resource.kind and r not in seen]:
            del self._input_errors[ref]
        inf.rv = rv

    # -- our own objects, for drift ------------------------------------------------------
    def _managed_ref(self, res: Resource, raw: Obj) -> ObjectRef | None:
        raw.setdefault("apiVersion", res.api_version)  # built-in list items lack them
        raw.setdefault("kind", res.kind)
        return self._ref(res, raw)

    def _managed_event(self, inf: _Informer, kind: str, raw: Obj, changes: ChangeSet) -> None:
        """A watch event about one of our objects: reported unless it is our own echo."""
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        ref = self._managed_ref(inf.resource, raw)
        if ref is not None:
            self.own.on_event(ref, kind, raw, changes.published)

    def _replace_managed(self, inf: _Informer, items: list[Obj], changes: ChangeSet) -> None:
        """A fresh list of our objects: all of them go to the controller to compare."""
        res = inf.resource
        listed = {ref: raw for raw in items
                  if (ref := self._managed_ref(res, raw)) is not None and is_ours(raw)}
        self.own.on_list(res.kind, listed, changes.published)
        inf.resync_at = time.monotonic() + self.timings.resync_s

    def _informer_health(self, inf: _Informer, error: str | None, changes: ChangeSet) -> None:
        if not inf.managed:
            self._set_health(inf.resource.plural, error, changes)
            return
        # Not seeing our own objects stops only drift repair, not the member's endpoints.
        if error is not None and error != inf.error:
            log.warning("cluster %s: watching our %s failed (%s): what someone else changes "
                        "there is not repaired until it works again", self.cluster_id,
                        inf.resource.plural, error)
        elif error is None and inf.error is not None:
            log.info("cluster %s: watching our %s again", self.cluster_id, inf.resource.plural)
        inf.error = error

    # -- connection state ----------------------------------------------------------------
    def _set_health(self, part: str, error: str | None, changes: ChangeSet) -> None:
        if error is None:
            self._failing.pop(part, None)
            self._failing.pop(PROBE, None)  # the server just answered
        else:
            self._failing[part] = error
        self._update_connection(changes)

    def _update_connection(self, changes: ChangeSet) -> None:
        """Connected unless a request has failed for `stale_after_s` with no success
        since. Marking a member stale rewrites every slice imported from it in every
        member, and again when it answers: one API server restart, or one watch refused
        (504 after an etcd restore) with the relist answering at once, wrote 2 x services
        x members slices (40 per member at 20 services) though no endpoint changed."""
        connected = self._grace.connected(bool(self._failing), self.connection.connected)
        if connected != self.connection.connected or self.connection.since == 0.0:
            first = self.connection.since == 0.0
            flipped = connected != self.connection.connected
            self.connection.connected = connected
            self.connection.since = time.time()
            changes.connection = changes.connection or flipped
            if not connected:
                log.error("cluster %s not answering (%s): keeping its last state, stale",
                          self.cluster_id, "; ".join(sorted(set(self._failing.values()))))
            elif not first:
                log.info("cluster %s answering again", self.cluster_id)
        before = self.connection.error
        if self._failing:
            self.connection.error = "; ".join(sorted(set(self._failing.values())))
        elif self._input_errors:
            shown = sorted(f"{r.kind} {r.namespace}/{r.name}: {e}"
                           for r, e in self._input_errors.items())
            more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
            self.connection.error = "; ".join(shown[:3]) + more
        else:
            self.connection.error = None
        changes.error = changes.error or self.connection.error != before

    def _grace_over(self) -> None:
        """Still failing `stale_after_s` after the first failure: stale now."""
        changes = ChangeSet()
        self._update_connection(changes)
        if changes and self._notify is not None:
            self._notify(self.cluster_id, changes)

    async def _sync_into(self, changes: ChangeSet) -> None:
        try:
            if not self._informers:
                await self._discover()
            results = await asyncio.gather(
                *(self.api.list(inf.resource.path(), inf.resource.selector)
                  for inf in self._informers), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except ClusterError as exc:
            self._set_health(SYNC, f"cluster {self.cluster_id}: {exc}", changes)
            raise ClusterError(f"cluster {self.cluster_id}: {exc}") from None
        listed = ChangeSet()
        conditions: dict[ObjectRef, list[Mapping[str, Any]]] = {}
        for inf, result in zip(self._informers, results, strict=True):
            items, rv = result  # type: ignore[misc]
            if inf.resource.kind == KIND_EXPORT:
                conditions = self._own_conditions(inf.resource, items)
            self._replace(inf, items, rv, listed)
        self._listed = [obj for ref, obj in listed.published.items()
                        if ref.kind in (KIND_IMPORT, KIND_SLICE) and obj is not None]
        for key, export in self.objects.exports.items():
            ours = conditions.get(ObjectRef(KIND_EXPORT, *key))
            if ours:  # as we wrote it: anyone else's conditions are not ours to keep
                self._listed.append({**export.manifest, "status": {"conditions": ours}})
        changes.update(listed)
        self._failing.clear()
        self._set_health(SYNC, None, changes)

    async def sync(self) -> ChangeSet:
        changes = ChangeSet()
        await self._sync_into(changes)
        return changes

    # -- watching ------------------------------------------------------------------------
    async def watch(self, notify: Notify) -> None:
        self._listed = None  # read_published() comes before, if at all
        self._notify = notify
        try:
            await self._watch(notify)
        finally:
            self._notify = None
            self._grace.cancel()

    async def _watch(self, notify: Notify) -> None:
        backoff = Backoff(self.timings.backoff_base_s, self.timings.backoff_cap_s)
        while not self._informers or any(inf.rv is None for inf in self._informers):
            changes = ChangeSet()
            try:
                await self._sync_into(changes)
            except ClusterError:
                await asyncio.sleep(backoff.next())
            finally:
                if changes:
                    notify(self.cluster_id, changes)
        tasks = [spawn(self._run_informer(inf, notify),
                       name=f"watch {self.cluster_id} {inf.resource.plural}")
                 for inf in self._informers]
        tasks.append(spawn(self._probe(notify), name=f"probe {self.cluster_id}"))
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks)

    async def _run_informer(self, inf: _Informer, notify: Notify) -> None:
        res = inf.resource
        backoff = Backoff(self.timings.backoff_base_s, self.timings.backoff_cap_s)
        while True:
            changes = ChangeSet()
            delay = 0.0
            try:
                if inf.managed and time.monotonic() >= inf.resync_at:
                    inf.rv = None  # the periodic relist finds what a lost event hid
                if inf.rv is None:
                    await self._relist(inf, changes)
                    if changes:
                        notify(self.cluster_id, changes)
                        changes = ChangeSet()
                if not await self._watch_once(inf, notify):
                    delay = backoff.next()
                else:
                    backoff.reset()
            except WatchExpired:
                log.info("cluster %s: %s watch expired (410 Gone): relisting",
                         self.cluster_id, res.plural)
                inf.rv = None
                if self.on_relist_gone is not None:
                    self.on_relist_gone(res.plural)
            except ClusterError as exc:
                self._informer_health(inf, str(exc), changes)
                delay = backoff.next()
                if isinstance(exc, WatchRefused):
                    # The server answered the watch with an error: list again, as
                    # client-go does. Resuming from the same version looped for good on
                    # 504 "Too large resource version" (after an etcd restore, or from
                    # an API server lagging behind the one that served the list): the
                    # member stayed stale and none of its changes came in.
                    inf.rv = None
            except Exception as exc:
                # Unforeseen (a defect, an answer no check above expected): ending this
                # task ended the member's every watch for good while it still showed as
                # connected, none of its changes read again. Said, then listed anew.
                log.exception("cluster %s: %s watch failed; listing again", self.cluster_id,
                              res.plural)
                self._informer_health(inf, f"internal error: {describe_error(exc)}", changes)
                inf.rv = None
                delay = backoff.next()
            if changes:
                notify(self.cluster_id, changes)
            if delay:
                await asyncio.sleep(delay)

    async def _relist(self, inf: _Informer, changes: ChangeSet) -> None:
        """A list of one resource made the view. Its own frame: as a local of the
        informer's loop, the list (every object of the resource as the server sent it)
        was held for the whole watch after it, until the next relist (the managed ones
        relist every resync_s): 127 KiB a service at 500 services in 3 members."""
        items, rv = await self.api.list(inf.resource.path(), inf.resource.selector)
        self._replace(inf, items, rv, changes)
        self._informer_health(inf, None, changes)

    async def _watch_once(self, inf: _Informer, notify: Notify) -> bool:
        """One watch request; False when it ended at once with nothing (retry later)."""
        res = inf.resource
        assert inf.rv is not None
        loop = asyncio.get_running_loop()
        started, events = loop.time(), 0
        timeout_s = self.timings.watch_timeout_s * random.uniform(1.0, 2.0)
        if inf.managed:  # ends in time for the next relist
            timeout_s = max(1.0, min(timeout_s, inf.resync_at - time.monotonic()))
        stream = self.api.watch(res.path(), inf.rv, label_selector=res.selector,
                                timeout_s=timeout_s,
                                idle_s=timeout_s + self.timings.request_timeout_s)
        async with contextlib.aclosing(stream) as lines:
            async for event in lines:
                changes = ChangeSet()
                kind = event["type"]
                if kind == "OPEN":
                    self._informer_health(inf, None, changes)
                elif kind == "BROKEN":
                    log.debug("cluster %s: %s watch broke (%s)", self.cluster_id,
                              res.plural, event["error"])
                else:
                    events += 1
                    obj = event["object"]
                    if inf.managed:
                        self._managed_event(inf, kind, obj, changes)
                    elif kind == "DELETED":
                        ref = self._ref(res, obj)
                        if ref is not None:
                            self._remove(inf, ref, changes)
                    elif kind in ("ADDED", "MODIFIED"):
                        self._upsert(inf, obj, changes)
                    rv = metadata_of(obj).get("resourceVersion")
                    if rv:
                        inf.rv = str(rv)
                if changes:
                    notify(self.cluster_id, changes)
        return events > 0 or loop.time() - started >= _SHORT_WATCH_S

    async def _probe(self, notify: Notify) -> None:
        """Catch a server that stopped answering while its watches stay silently open."""
        while True:
            await asyncio.sleep(self.timings.probe_interval_s)
            changes = ChangeSet()
            try:
                await self.api.request("GET", "/version")
            except ClusterError as exc:
                self._set_health(PROBE, f"GET /version: {exc}", changes)
            else:
                self._set_health(PROBE, None, changes)
            if changes:
                notify(self.cluster_id, changes)

    # -- writing -------------------------------------------------------------------------
    def _write_resource(self, kind: str) -> Resource:
        if kind == KIND_SLICE:
            return SLICES
        res = self._import_res if kind == KIND_IMPORT else self._export_res
        if res is None:
            raise ClusterError(f"cluster {self.cluster_id}: not synced yet")
        return res

    def _to_cluster(self, res: Resource, desired: Mapping[str, Any]) -> Obj:
        meta = dict(desired["metadata"])
        meta["labels"] = {**(meta.get("labels") or {}), LABEL_MANAGED_BY: CONTROLLER_MANAGER}
        if res.kind == KIND_SLICE and meta.get("ownerReferences"):
            owners = []
            for o in meta["ownerReferences"]:
                if o.get("kind") == KIND_IMPORT:
                    uid = self.own.import_uid(meta["namespace"], o["name"])
                    if uid is None:
                        continue  # an owner that does not exist would get it collected
                    o = {**o, "apiVersion": self._write_resource(KIND_IMPORT).api_version,
                         "uid": uid}
                owners.append(o)
            if owners:
                meta["ownerReferences"] = owners
            else:
                meta.pop("ownerReferences")
        body = without_status(desired)
        body["apiVersion"] = res.api_version
        body["metadata"] = meta
        return body

    async def _get(self, res: Resource, namespace: str, name: str) -> Obj | None:
        try:
            return await self.api.request("GET", res.path(namespace, name))
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def _send(self, method: str, path: str, body: Any,
                    content_type: str | None = None) -> Obj:
        async with fenced(self.fence, f"cluster {self.cluster_id}: {method} {path}"):
            self.writes += 1
            return await self.api.request(method, path, body=body, content_type=content_type)

    def _refuse_foreign(self, ref: ObjectRef) -> None:
        log.warning("cluster %s: %s %s/%s exists and is not managed by us (%s=%s): left alone",
                    self.cluster_id, ref.kind, ref.namespace, ref.name, LABEL_MANAGED_BY,
                    CONTROLLER_MANAGER)

    async def _write_one(self, desired: Mapping[str, Any]) -> None:
        res = self._write_resource(str(desired["kind"]))
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        ref = ObjectRef(res.kind, ns, name)
        self.own.writing.add(ref)
        try:
            await self._write_attempts(res, ref, desired)
        finally:
            self.own.writing.discard(ref)
            self.own.overtaken.discard(ref)

    async def _write_attempts(self, res: Resource, ref: ObjectRef,
                              desired: Mapping[str, Any]) -> None:
        ns, name = ref.namespace, ref.name
        for _ in range(CONFLICT_RETRIES):
            kept = self.own.live.get(ref)
            sent: Sent | None = None
            try:
                if kept is None:
                    body = self._to_cluster(res, desired)
                    sent = Sent.of(body)
                    try:
                        kept = self.own.remember(ref, await self._send(
                            "POST", res.path(ns), body), sent)
                    except KubeApiError as exc:
                        if exc.code != 409:
                            raise
                        live = await self._get(res, ns, name)
                        if live is None:
                            continue
                        if not is_ours(live):
                            self._refuse_foreign(ref)
                            return
                        kept = self.own.keep(ref, live)
                body = self._to_cluster(res, desired)
                # Compared as it would be sent: a slice whose import does not exist (it
                # was refused) goes without that owner, and compared with `desired` it
                # was sent again, unchanged, at every retry.
                sent = Sent.of(body, sent)
                if kept.content != sent.content:
                    body["metadata"]["resourceVersion"] = kept.rv
                    kept = self.own.remember(ref, await self._send("PUT", res.path(ns, name),
                                                                   body), sent)
                wanted = desired.get("status")
                if wanted is not None and kept.status != status_digest(wanted):
                    kept = self.own.remember(ref, await self._send(
                        "PATCH", res.path(ns, name, "status"), {"status": wanted}, MERGE_PATCH),
                        sent)
                if ref not in self.own.overtaken:
                    return
                # Someone else's change came in meanwhile: our answer may be older than it.
                self.own.overtaken.discard(ref)
            except KubeApiError as exc:
                if exc.code not in (404, 409) or kept is None:
                    raise ClusterError(f"{ref.kind} {ns}/{name}: {exc}") from None
            # Someone changed or removed it since we read it: read again, then retry.
            fresh = await self._get(res, ns, name)
            if fresh is not None and not is_ours(fresh):
                self.own.forget(ref)
                self._refuse_foreign(ref)
                return
            if fresh is None:
                self.own.forget(ref)
            else:
                self.own.keep(ref, fresh)
        raise ClusterError(f"{ref.kind} {ns}/{name}: still conflicting after "
                           f"{CONFLICT_RETRIES} attempts")

    async def _bounded(self, calls: Iterable[Callable[[], Awaitable[None]]]) -> None:
        """`write_concurrency` workers take the calls in turn, each call made (its
        coroutine created) only once it runs: a batch cut short (the term ended) leaves
        no coroutine that was never awaited. A task a call, waiting its turn, held the
        loop 0.25 s to create for 30,000 slices (a member going stale at 10,000
        services), and their memory until the last was written."""
        pending = iter(calls)
        errors: list[BaseException] = []

        async def worker() -> None:
            for call in pending:
                try:
                    await call()
                except Exception as exc:  # every call is tried; the errors are sorted below
                    errors.append(exc)

        await asyncio.gather(*(worker() for _ in range(self.timings.write_concurrency)))
        for error in errors:
            if not isinstance(error, ClusterError):
                raise error
        if errors:
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ClusterError(f"cluster {self.cluster_id}: {errors[0]}{more}")

    async def apply(self, objects: Sequence[Mapping[str, Any]]) -> None:
        # Imports first: their uids become the slices' owner references. The slices are
        # written even when an import was refused: that import's own slices go without
        # an owner until it exists, every other service's arrive (all used to wait).
        refused: ClusterError | None = None
        try:
            await self._bounded(partial(self._write_one, o) for o in objects
                                if o["kind"] == KIND_IMPORT)
        except ClusterError as exc:
            refused = exc
        await self._bounded(partial(self._write_one, o) for o in objects
                            if o["kind"] != KIND_IMPORT)
        if refused is not None:
            raise refused

    async def _delete_one(self, ref: ObjectRef) -> None:
        res = self._write_resource(ref.kind)
        for _ in range(CONFLICT_RETRIES):
            found: Kept | Obj | None = self.own.forget(ref) or await self._get(
                res, ref.namespace, ref.name)
            if found is None:
                return
            if isinstance(found, Kept):
                uid = found.uid
            elif not is_ours(found):
                self._refuse_foreign(ref)
                return
            else:
                uid = metadata_of(found).get("uid")
            body = {"apiVersion": "v1", "kind": "DeleteOptions",
                    "preconditions": {"uid": uid}}
            try:
                await self._send("DELETE", res.path(ref.namespace, ref.name), body)
                return
            except KubeApiError as exc:
                if exc.code == 404:
                    return
                if exc.code != 409:  # 409: replaced meanwhile, look again
                    raise ClusterError(f"{ref.kind} {ref.namespace}/{ref.name}: {exc}") from None
        raise ClusterError(f"{ref.kind} {ref.namespace}/{ref.name}: delete kept conflicting")

    async def delete(self, refs: Sequence[ObjectRef]) -> None:
        # ServiceExports are the user's: the controller only ever writes their status.
        wanted = [r for r in refs if r.kind in (KIND_IMPORT, KIND_SLICE)]
        refused: ClusterError | None = None
        try:
            await self._bounded(partial(self._delete_one, r) for r in wanted
                                if r.kind == KIND_SLICE)
        except ClusterError as exc:  # the imports still go (and take their slices along)
            refused = exc
        await self._bounded(partial(self._delete_one, r) for r in wanted
                            if r.kind == KIND_IMPORT)
        if refused is not None:
            raise refused

    async def update_export_status(self, export: Mapping[str, Any]) -> None:
        meta = export["metadata"]
        ref = ObjectRef(KIND_EXPORT, meta["namespace"], meta["name"])
        wanted = export.get("status")
        if not isinstance(wanted, Mapping):
            return
        res = self._write_resource(KIND_EXPORT)
        self.own.writing.add(ref)
        try:
            await self._status_attempts(res, ref, wanted)
        except KubeApiError as exc:
            raise ClusterError(f"ServiceExport {ref.namespace}/{ref.name} status: {exc}") \
                from None
        finally:
            self.own.writing.discard(ref)
            self.own.overtaken.discard(ref)

    async def _status_attempts(self, res: Resource, ref: ObjectRef,
                               wanted: Mapping[str, Any]) -> None:
        ours = own_export_conditions({"status": wanted})
        ours_digest = status_digest(ours)
        seen = self._export_status.get(ref)
        for _ in range(CONFLICT_RETRIES):
            if seen is None:
                live = await self._get(res, ref.namespace, ref.name)
                if live is None:
                    return  # deleted meanwhile: the watch brings the removal
                seen = self._export_status[ref] = _SeenStatus.of(live)
            if seen.ours == ours_digest:
                return  # anyone else's conditions are no reason to write
            status = {**wanted, "conditions": with_own_conditions(
                list(seen.conditions), list(ours.values()))}
            body: Obj = {"status": status}
            if seen.rv:  # built on that version: refused (409) if anyone wrote since
                body["metadata"] = {"resourceVersion": seen.rv}
            try:
                live = await self._send("PATCH", res.path(ref.namespace, ref.name, "status"),
                                        body, MERGE_PATCH)
            except KubeApiError as exc:
                if exc.code == 404:
                    return
                if exc.code != 409:
                    raise
                seen = None  # someone wrote since: read it, build on that
                continue
            self.own.expect_echo(ref, live)
            if ref not in self.own.overtaken:  # else a newer status came in meanwhile
                self._export_status[ref] = _SeenStatus.of(live)
            return
        raise ClusterError(f"ServiceExport {ref.namespace}/{ref.name} status: still "
                           f"conflicting after {CONFLICT_RETRIES} attempts")

    async def read_published(self) -> list[Mapping[str, Any]]:
        # sync() listed our own objects too; else (or taken already) they are listed now.
        if self._listed is None:
            await self._sync_into(ChangeSet())
        found, self._listed = self._listed or [], None
        return found
