"""Our own objects in one member cluster, for kube.py: the ServiceImports and imported
EndpointSlices we write (labelled managed-by us), and the resourceVersions our writes got
back, ServiceExport status patches included.

`live` is what the cluster holds of ours, as our writes got it back or as the watch and the
periodic relist of our objects show it: its uid and resourceVersion, and digests of the
rest to tell whether a write would change it (the objects themselves are the
controller's to hold, once). A watch event is our own echo when its
resourceVersion is one a write of ours got back (arriving after the answer, or after a
later write); anything else is someone else's change, reported to the controller as
`published` (drift). A change seen while a write of that object is in flight marks it
`overtaken`: the writer reads it again, since its answer may be older than the change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from controlplane.clusters.kube_api import Obj
from controlplane.reconcile import IMPORT_API_VERSION, owner_uid
from controlplane.resources import CONTROLLER_MANAGER, KIND_IMPORT, ObjectRef
from mcsproxy.manifests import LABEL_MANAGED_BY
from mcsproxy.model import ServiceKey

# Resource versions our latest writes of one object got back: their watch events are our
# own echo (arriving after the answer, or after a later write), not someone else's change.
OWN_VERSIONS = 8

Published = dict[ObjectRef, Mapping[str, Any] | None]


def metadata_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    found = obj.get("metadata")
    return found if isinstance(found, Mapping) else {}


def is_ours(obj: Mapping[str, Any]) -> bool:
    labels = metadata_of(obj).get("labels")
    return isinstance(labels, Mapping) and labels.get(LABEL_MANAGED_BY) == CONTROLLER_MANAGER


def without_status(obj: Mapping[str, Any]) -> Obj:
    return {k: v for k, v in obj.items() if k != "status"}


def _digest(value: Any) -> bytes:
    """Equal for equal JSON values (keys in any order)."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(encoded.encode(), digest_size=16).digest()


def comparable(obj: Mapping[str, Any]) -> Obj:
    """What a write of ours sets (apart from the status), as compared with what the
    cluster holds: rendered() without the server's fields, but with the owner uids as
    they stand, so it can be kept and compared later whatever uid an import has then (an
    import's served apiVersion aside: any served version is ours)."""
    return without_server_fields(obj, _import_owner_version, keep_status=False)


def _import_owner_version(owner: Obj) -> Obj:
    return {**owner, "apiVersion": IMPORT_API_VERSION} if owner.get("kind") == KIND_IMPORT \
        else owner


def without_server_fields(obj: Mapping[str, Any], owner: Callable[[Obj], Obj], *,
                          keep_status: bool) -> Obj:
    """`obj` as the reconcile renders a managed object: name, namespace, labels (less our
    managed-by label on imports), annotations, each ownerReference through `owner`, an
    import at the apiVersion we write, and every other top-level field (the status only
    when `keep_status`); no server-set metadata."""
    found = metadata_of(obj)
    kind = str(obj.get("kind"))
    meta: Obj = {"name": str(found.get("name")),
                 "namespace": str(found.get("namespace") or "")}
    labels = dict(found.get("labels") or {})
    if kind == KIND_IMPORT:
        labels.pop(LABEL_MANAGED_BY, None)
    if labels:
        meta["labels"] = labels
    if found.get("annotations"):
        meta["annotations"] = dict(found["annotations"])
    owners = found.get("ownerReferences")
    if owners:
        meta["ownerReferences"] = [owner(o) for o in owners]
    out: Obj = {"apiVersion": IMPORT_API_VERSION if kind == KIND_IMPORT
                else obj.get("apiVersion"), "kind": kind, "metadata": meta}
    skipped = ("apiVersion", "kind", "metadata") if keep_status else \
        ("apiVersion", "kind", "metadata", "status")
    out.update((k, v) for k, v in obj.items() if k not in skipped)
    return out


def status_digest(status: Any) -> bytes:
    return _digest(status)


class Sent(NamedTuple):
    """What a write sends, in the form compared and as its digest (made once a write)."""

    form: Obj  # comparable()
    content: bytes  # its digest

    @classmethod
    def of(cls, body: Mapping[str, Any], like: Sent | None = None) -> Sent:
        """`like`: an earlier Sent, taken when its form is the same (cheaper to compare
        than to digest again)."""
        form = comparable(body)
        return like if like is not None and like.form == form else cls(form, _digest(form))


class Kept(NamedTuple):
    """One of our objects as the cluster holds it: what is used of it, and digests of
    the rest. Kept whole (the endpoint lists above all), each member's read-back copy of
    an imported slice was its own, beside the controller's: 114 KiB per service after a
    restart (500 services, 3 members, 3 slices of 10 endpoints each) against 70 at a
    first start, where the copies were shared with what was sent."""

    uid: str | None
    rv: str | None
    content: bytes  # the digest of its comparable() form (Sent.content)
    status: bytes  # status_digest() of its status (of None when it has none)

    @classmethod
    def of(cls, live: Mapping[str, Any], sent: Sent | None = None) -> Kept:
        """`sent`: what the write that got `live` back sent; its digest is taken when
        `live` has the same form."""
        meta = metadata_of(live)
        uid, rv = meta.get("uid"), meta.get("resourceVersion")
        return cls(str(uid) if uid else None, str(rv) if rv else None,
                   Sent.of(live, sent).content, status_digest(live.get("status")))


class OwnObjects:
    __slots__ = ("_versions", "live", "overtaken", "writing")

    def __init__(self) -> None:
        self.live: dict[ObjectRef, Kept] = {}  # our objects as the cluster holds them
        self._versions: dict[ObjectRef, tuple[str, ...]] = {}
        self.writing: set[ObjectRef] = set()  # a write of it is in flight
        self.overtaken: set[ObjectRef] = set()  # someone else's change came in meanwhile

    # -- what our writes got back --------------------------------------------------------
    def expect_echo(self, ref: ObjectRef, live: Mapping[str, Any]) -> None:
        """`live` is what one of our writes got back: its watch event will be our echo."""
        rv = metadata_of(live).get("resourceVersion")
        if rv:
            self._versions[ref] = (*self._versions.get(ref, ()), str(rv))[-OWN_VERSIONS:]

    def remember(self, ref: ObjectRef, live: Mapping[str, Any], sent: Sent | None = None
                 ) -> Kept:
        """`live` is what one of our writes (of `sent`) got back: kept, and its watch
        event will be our echo."""
        self.expect_echo(ref, live)
        return self.keep(ref, live, sent)

    def keep(self, ref: ObjectRef, live: Mapping[str, Any], sent: Sent | None = None) -> Kept:
        """`live` as the cluster holds it now."""
        kept = self.live[ref] = Kept.of(live, sent)
        return kept

    def forget(self, ref: ObjectRef) -> Kept | None:
        self._versions.pop(ref, None)
        return self.live.pop(ref, None)

    def forget_versions(self, ref: ObjectRef) -> None:
        self._versions.pop(ref, None)

    def is_echo(self, ref: ObjectRef, raw: Mapping[str, Any]) -> bool:
        rv = metadata_of(raw).get("resourceVersion")
        return bool(rv) and str(rv) in self._versions.get(ref, ())

    def changed_by_others(self, ref: ObjectRef) -> None:
        if ref in self.writing:
            self.overtaken.add(ref)

    # -- as the controller wrote them ----------------------------------------------------
    def import_uid(self, namespace: str, name: str) -> str | None:
        kept = self.live.get(ObjectRef(KIND_IMPORT, namespace, name))
        return kept.uid if kept is not None else None

    def rendered(self, live: Mapping[str, Any]) -> Obj:
        """A managed object as the reconcile renders it: without server fields, our label
        on imports, or the real owner uid (when it is the current import's)."""
        namespace = str(metadata_of(live).get("namespace") or "")

        def owner(o: Obj) -> Obj:
            name = str(o.get("name"))
            if o.get("kind") == KIND_IMPORT and o.get("uid") == self.import_uid(namespace, name):
                return {**o, "apiVersion": IMPORT_API_VERSION,
                        "uid": owner_uid(ServiceKey(namespace, name))}
            return o

        return without_server_fields(live, owner, keep_status=True)

    # -- what the watch and the relist of our objects show -------------------------------
    def on_event(self, ref: ObjectRef, kind: str, raw: Obj, published: Published) -> None:
        """A watch event about one of our objects: reported unless it is our own echo."""
        current = self.live.get(ref)
        if current is not None and current.uid != metadata_of(raw).get("uid"):
            return  # an earlier object of that name, already replaced by one we wrote
        if kind == "DELETED" or not is_ours(raw):
            if current is None:
                return
            self.forget(ref)
            published[ref] = None
        elif self.is_echo(ref, raw) or (
                current is not None
                and current.rv == metadata_of(raw).get("resourceVersion")):
            return
        else:
            self.keep(ref, raw)
            published[ref] = self.rendered(raw)
        self.changed_by_others(ref)

    def on_list(self, kind: str, listed: Mapping[ObjectRef, Obj],
                published: Published) -> None:
        """A fresh list of our objects of one kind: all of them go to the controller to
        compare, but an echo of an older write of ours (what our later write got back
        is what the cluster holds, and what the controller wrote)."""
        for ref in [r for r in self.live if r.kind == kind and r not in listed]:
            self.forget(ref)
            published[ref] = None
        older: set[ObjectRef] = set()
        for ref, raw in listed.items():
            current = self.live.get(ref)
            rv = metadata_of(raw).get("resourceVersion")
            if current is not None and rv and current.rv == str(rv):
                continue  # unchanged since kept: its digest is not made again
            if current is None or not self.is_echo(ref, raw):
                self.keep(ref, raw)
            else:
                older.add(ref)
        for ref, raw in listed.items():  # rendered once every import's uid is in
            if ref not in older:
                published[ref] = self.rendered(raw)
