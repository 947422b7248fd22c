"""Object storage, resourceVersions, the event history and watchers: no HTTP here."""

from __future__ import annotations

import asyncio
import collections
import copy
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# NAMESPACE_FINALIZER holds a namespace while its content is deleted; kept in
# metadata.finalizers here, where the API server keeps it in spec.finalizers.
from .collector import NAMESPACE_FINALIZER, GarbageCollector, finalizer_for
from .patches import PatchError, json_patch, merge_patch
from .selectors import Predicate

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Set only by the server: dropped from bodies on create, carried over on update.
SERVER_METADATA = ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                   "deletionGracePeriodSeconds", "resourceVersion", "managedFields", "selfLink")
BUILTIN_GROUPS = ("", "discovery.k8s.io", "coordination.k8s.io")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason, "code": code}
    if details:
        status["details"] = details
    return status


class ApiError(Exception):
    """An API error answered as a `kind: Status` body with the same HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        return status_object(self.code, self.reason, self.message, self.details)


@dataclass(slots=True)
class ResourceType:
    group: str
    plural: str
    kind: str
    namespaced: bool
    status: bool  # has a status subresource
    versions: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """`plural.group` as kubectl and error messages spell it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def present(self, obj: Obj, version: str) -> Obj:
        """The stored object as a client of `version` sees it (no conversion beyond this)."""
        return {"apiVersion": self.api_version(version), "kind": self.kind,
                **{k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}}

    def error(self, code: int, reason: str, name: str, message: str) -> ApiError:
        details = {"name": name, "group": self.group, "kind": self.plural}
        return ApiError(code, reason, message, details)


@dataclass(slots=True)
class Event:
    rv: int
    rtype: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None


class Watcher:
    """One open watch: pending events the HTTP handler drains, bounded like the API server's."""

    __slots__ = ("fields", "labels", "limit", "namespace", "pending", "rtype", "stop", "wakeup")

    def __init__(self, rtype: ResourceType, namespace: str | None, labels: Predicate,
                 fields: Predicate, limit: int):
        self.rtype, self.namespace, self.labels, self.fields = rtype, namespace, labels, fields
        self.pending: collections.deque[tuple[str, Obj]] = collections.deque()
        self.limit = limit
        self.stop: str | None = None  # "close" (clean end) or "abort" (connection reset)
        self.wakeup = asyncio.Event()

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels(obj) and self.fields(obj)

    def push(self, kind: str, obj: Obj) -> None:
        if len(self.pending) >= self.limit:
            self.end("close")  # a too slow watcher is closed, as the API server does
            return
        self.pending.append((kind, obj))
        self.wakeup.set()

    def offer(self, ev: Event) -> None:
        if ev.rtype is not self.rtype:
            return
        new_ok, old_ok = self.matches(ev.obj), self.matches(ev.old)
        if ev.type != "MODIFIED":
            if new_ok:
                self.push(ev.type, ev.obj)
        elif new_ok:
            self.push("MODIFIED" if old_ok else "ADDED", ev.obj)
        elif old_ok and ev.old is not None:  # left the selection: DELETED, old object, new RV
            old = {**ev.old, "metadata": {**ev.old["metadata"], "resourceVersion": str(ev.rv)}}
            self.push("DELETED", old)

    def end(self, mode: str) -> None:
        self.stop = self.stop or mode
        self.wakeup.set()


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class Store:
    def __init__(self, history: int = 1000, watch_queue: int = 10_000):
        self.rv = 0
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self.history: collections.deque[Event] = collections.deque(maxlen=history)
        self.compacted = 0  # resuming a watch from below this RV answers 410 Expired
        self.watchers: set[Watcher] = set()
        self.watch_queue = watch_queue
        self.lose_events = False  # changes no watch sees, open or resumed: only a list
        self.gc = GarbageCollector(self)  # ownerReferences, as kube-controller-manager's

    # -- types -------------------------------------------------------------------------
    def register(self, group: str, version: str, plural: str, kind: str, *,
                 namespaced: bool = True, status: bool = False) -> ResourceType:
        rtype = next((t for t in self.types.values() if (t.group, t.plural) == (group, plural)),
                     None) or ResourceType(group, plural, kind, namespaced, status)
        if version not in rtype.versions:
            rtype.versions.append(version)
        self.types[(group, version, plural)] = rtype
        self.objects.setdefault((group, plural), {})
        return rtype

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def by_name(self, name: str) -> ResourceType:
        """`services`, `endpointslices.discovery.k8s.io`, ..."""
        plural, _, group = name.partition(".")
        for rtype in self.types.values():
            if (rtype.group, rtype.plural) == (group, plural):
                return rtype
        raise KeyError(name)

    def by_kind(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        for (g, v, _), rtype in self.types.items():
            if (g, v, rtype.kind) == (group, version, kind):
                return rtype
        raise KeyError(f"{api_version} {kind}")

    # -- events ------------------------------------------------------------------------
    def _commit(self, rtype: ResourceType, kind: str, obj: Obj, old: Obj | None) -> Obj:
        self.rv += 1
        obj = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        obj["metadata"] = {**obj["metadata"], "resourceVersion": str(self.rv)}
        bucket = self.objects[(rtype.group, rtype.plural)]
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if kind == "DELETED":
            del bucket[key]
        else:
            bucket[key] = obj
        self.gc.changed(rtype, kind, obj, old)
        if self.lose_events:
            return obj
        if len(self.history) == self.history.maxlen:
            self.compacted = self.history[0].rv
        event = Event(self.rv, rtype, kind, obj, old)
        self.history.append(event)
        for watcher in list(self.watchers):
            watcher.offer(event)
        return obj

    def expire_history(self) -> None:
        """Forget all events: every resume from an RV handed out so far answers 410."""
        self.rv += 1
        self.compacted = self.rv
        self.history.clear()

    def watch(self, rtype: ResourceType, namespace: str | None, labels: Predicate,
              fields: Predicate, rv: str | None) -> Watcher:
        """Register a watcher with its backlog queued, synchronously, so nothing slips by."""
        if rv in (None, "", "0"):
            items = self.list(rtype, namespace, labels, fields)
            watcher = Watcher(rtype, namespace, labels, fields, len(items) + self.watch_queue)
            for obj in items:
                watcher.push("ADDED", obj)
        else:
            start = _parse_rv(rv)
            if start > self.rv:  # the API server after an etcd restore, or one lagging
                raise ApiError(504, "Timeout", f"Too large resource version: {start}, "
                               f"current: {self.rv}")
            if start < self.compacted:
                raise ApiError(410, "Expired",
                               f"too old resource version: {start} ({self.compacted})")
            backlog = [ev for ev in self.history if ev.rv > start]
            watcher = Watcher(rtype, namespace, labels, fields, len(backlog) + self.watch_queue)
            for ev in backlog:
                watcher.offer(ev)
        self.watchers.add(watcher)
        return watcher

    # -- reads -------------------------------------------------------------------------
    def get(self, rtype: ResourceType, namespace: str, name: str) -> Obj:
        obj = self.objects[(rtype.group, rtype.plural)].get((namespace, name))
        if obj is None:
            raise rtype.error(404, "NotFound", name, f'{rtype.name} "{name}" not found')
        return obj

    def list(self, rtype: ResourceType, namespace: str | None, labels: Predicate,
             fields: Predicate) -> list[Obj]:
        bucket = self.objects[(rtype.group, rtype.plural)]
        return [obj for (ns, _), obj in sorted(bucket.items())
                if (not namespace or ns == namespace) and labels(obj) and fields(obj)]

    # -- writes ------------------------------------------------------------------------
    def create(self, rtype: ResourceType, namespace: str, body: Any) -> Obj:
        meta = _metadata(body)
        for key in SERVER_METADATA:
            meta.pop(key, None)
        _check_namespace(rtype, meta, namespace)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise rtype.error(422, "Invalid", "",
                                  "metadata.name: Required value: name or generateName is required")
            suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            meta["name"] = meta["generateName"] + suffix
        name = meta["name"]
        if (namespace, name) in self.objects[(rtype.group, rtype.plural)]:
            raise rtype.error(409, "AlreadyExists", name, f'{rtype.name} "{name}" already exists')
        ns_obj = self.objects.get(("", "namespaces"), {}).get(("", namespace))
        if rtype.namespaced and ns_obj and ns_obj["metadata"].get("deletionTimestamp"):
            # As the API server: nothing new goes into a namespace being deleted.
            raise rtype.error(403, "Forbidden", name,
                              f'{rtype.name} "{name}" is forbidden: unable to create new '
                              f"content in namespace {namespace} because it is being terminated")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        obj = {**body, "metadata": meta}
        if rtype.status:
            obj.pop("status", None)  # status is written through the subresource only
        return self._commit(rtype, "ADDED", obj, None)

    def put(self, rtype: ResourceType, obj: Obj) -> Obj:
        """Direct injection for tests: keeps creationTimestamp, status, uid, generation as
        given. Over an existing object it is a change of that object: the uid and
        creationTimestamp not given are the existing object's (delete it first for a new
        object of the same name)."""
        obj = copy.deepcopy(obj)
        meta = _metadata(obj)
        if not rtype.namespaced:
            meta.pop("namespace", None)
        elif not meta.get("namespace"):
            meta["namespace"] = "default"
        key = (meta.get("namespace", ""), meta["name"])
        old = self.objects[(rtype.group, rtype.plural)].get(key)
        old_meta = old["metadata"] if old else {}
        meta.setdefault("uid", old_meta.get("uid") or str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", old_meta.get("creationTimestamp") or now_rfc3339())
        meta.setdefault("generation", 1)
        return self._commit(rtype, "MODIFIED" if old else "ADDED", {**obj, "metadata": meta}, old)

    def update(self, rtype: ResourceType, namespace: str, name: str, body: Any, *,
               status_only: bool = False) -> Obj:
        current = self.get(rtype, namespace, name)
        meta = _metadata(body)
        _check_namespace(rtype, meta, namespace)
        if meta.get("name", name) != name:
            raise rtype.error(400, "BadRequest", name, f"the name of the object ({meta['name']}) "
                              f"does not match the name on the URL ({name})")
        cur_meta = current["metadata"]
        if meta.get("resourceVersion") not in (None, "", cur_meta["resourceVersion"]):
            raise rtype.error(409, "Conflict", name,
                              f'Operation cannot be fulfilled on {rtype.name} "{name}": the '
                              "object has been modified; please apply your changes to the "
                              "latest version and try again")
        if status_only:
            new = {k: v for k, v in current.items() if k != "status"}
            if "status" in body:
                new["status"] = body["status"]
        else:
            meta.update({k: cur_meta[k] for k in SERVER_METADATA if k in cur_meta})
            meta["name"] = name
            new = {**body, "metadata": meta}
            if rtype.status:
                new.pop("status", None)
                if "status" in current:
                    new["status"] = current["status"]
            if _spec_part(new) != _spec_part(current):
                meta["generation"] = cur_meta.get("generation", 1) + 1
        if _strip_rv(new) == _strip_rv(current):
            return current  # a no-op write: no new resourceVersion, no event
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._commit(rtype, "DELETED", new, current)
        return self._commit(rtype, "MODIFIED", new, current)

    def patch(self, rtype: ResourceType, namespace: str, name: str, content_type: str,
              patch: Any, *, status_only: bool = False) -> Obj:
        current = self.get(rtype, namespace, name)
        try:
            if content_type in (MERGE_PATCH, STRATEGIC_PATCH):
                if not isinstance(patch, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                patched = merge_patch(current, patch)
            elif content_type == JSON_PATCH:
                if not isinstance(patch, list):
                    raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go "
                                   "value of type []handlers.jsonPatchOp")
                patched = json_patch(current, patch)
            else:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - "
                               f"accepted media types include: {JSON_PATCH}, {MERGE_PATCH}, "
                               f"{STRATEGIC_PATCH}")
        except PatchError as e:
            raise rtype.error(422, "Invalid", name, str(e)) from e
        return self.update(rtype, namespace, name, patched, status_only=status_only)

    def delete(self, rtype: ResourceType, namespace: str, name: str,
               options: Any = None) -> tuple[bool, Obj]:
        """Returns (deleted now, object); objects with finalizers only get deletionTimestamp."""
        current = self.get(rtype, namespace, name)
        cur_meta = current["metadata"]
        pre = (options or {}).get("preconditions") or {}
        for key in ("resourceVersion", "uid"):
            if pre.get(key) not in (None, cur_meta.get(key)):
                raise rtype.error(409, "Conflict", name, f"Precondition failed: {key} in "
                                  f"precondition: {pre[key]}, {key} in object meta: "
                                  f"{cur_meta.get(key)}")
        if (rtype.group, rtype.plural) == ("", "namespaces") and self.gc.enabled:
            return self._terminate(rtype, current)
        # Orphan or Foreground: the garbage collector's finalizer holds the object (collector.py).
        policy = finalizer_for(options)
        if policy and not cur_meta.get("deletionTimestamp"):
            cur_meta = {**cur_meta, "finalizers": [
                *(f for f in cur_meta.get("finalizers") or () if f != policy), policy]}
        if cur_meta.get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return False, current
            meta = {**cur_meta, "deletionTimestamp": now_rfc3339(),
                    "deletionGracePeriodSeconds": 0}
            return False, self._commit(rtype, "MODIFIED", {**current, "metadata": meta}, current)
        return True, self._commit(rtype, "DELETED", current, current)

    def _terminate(self, rtype: ResourceType, namespace: Obj) -> tuple[bool, Obj]:
        """A namespace deleted: Terminating, held by the namespace controller's finalizer
        until its content is gone (collector.py)."""
        meta = namespace["metadata"]
        if not meta.get("deletionTimestamp"):
            meta = {**meta, "deletionTimestamp": now_rfc3339(), "deletionGracePeriodSeconds": 0,
                    "finalizers": [*(meta.get("finalizers") or ()), NAMESPACE_FINALIZER]}
            namespace = self._commit(rtype, "MODIFIED", {
                **namespace, "metadata": meta,
                "status": {**(namespace.get("status") or {}), "phase": "Terminating"}},
                namespace)
        self.gc.namespace_deleted(meta["name"])
        return False, namespace


def _parse_rv(rv: str) -> int:
    try:
        return int(rv)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid resource version: {rv!r}") from None


def _metadata(body: Any) -> Obj:
    if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
        raise ApiError(400, "BadRequest", "the request body must be a JSON object")
    return copy.deepcopy(body.get("metadata") or {})


def _check_namespace(rtype: ResourceType, meta: Obj, namespace: str) -> None:
    if not rtype.namespaced:
        meta.pop("namespace", None)
    elif meta.setdefault("namespace", namespace) != namespace:
        raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                       "the namespace sent on the request")


def _strip_rv(obj: Obj) -> Obj:
    """The object without what a no-op write may still differ in."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return {**{k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}, "metadata": meta}
