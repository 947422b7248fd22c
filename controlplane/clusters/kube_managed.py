"""Our own objects in one member cluster, for kube.py: the ServiceImports and imported
EndpointSlices we write (labelled managed-by us), and the resourceVersions our writes got
back, ServiceExport status patches included.

`live` is what the cluster holds of ours, as our writes got it back or as the watch and the
periodic relist of our objects show it. A watch event is our own echo when its
resourceVersion is one a write of ours got back (arriving after the answer, or after a
later write); anything else is someone else's change, reported to the controller as
`published` (drift). A change seen while a write of that object is in flight marks it
`overtaken`: the writer reads it again, since its answer may be older than the change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


# What of our objects' metadata is used (rendered(), is_ours(), uids and versions): the
# rest (managedFields above all, creationTimestamp, generation) is not kept.
KEPT_METADATA = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations",
                 "ownerReferences")


def slim(live: Obj, like: Mapping[str, Any] | None) -> Obj:
    """`live` as kept: its metadata cut to KEPT_METADATA, and every field equal to
    `like`'s (what we sent; else the object as kept before) taken from `like`. Each
    object the cluster sent back was held whole beside the copy the controller holds:
    62 KiB per service of write answers (3 members, 3 slices of 10 endpoints each)."""
    meta, like_meta = metadata_of(live), metadata_of(like or {})
    out: Obj = {k: v for k, v in live.items() if k != "metadata"}
    out["metadata"] = {k: like_meta[k] if like_meta.get(k) == meta[k] else meta[k]
                       for k in KEPT_METADATA if k in meta}
    if like is not None:
        for key, value in out.items():
            if key != "metadata" and key in like and like[key] == value:
                out[key] = like[key]
    return out


class OwnObjects:
    __slots__ = ("_versions", "live", "overtaken", "writing")

    def __init__(self) -> None:
        self.live: dict[ObjectRef, Obj] = {}  # our objects as the cluster holds them
        self._versions: dict[ObjectRef, tuple[str, ...]] = {}
        self.writing: set[ObjectRef] = set()  # a write of it is in flight
        self.overtaken: set[ObjectRef] = set()  # someone else's change came in meanwhile

    # -- what our writes got back --------------------------------------------------------
    def expect_echo(self, ref: ObjectRef, live: Obj) -> Obj:
        """`live` is what one of our writes got back: its watch event will be our echo."""
        rv = metadata_of(live).get("resourceVersion")
        if rv:
            self._versions[ref] = (*self._versions.get(ref, ()), str(rv))[-OWN_VERSIONS:]
        return live

    def remember(self, ref: ObjectRef, live: Obj, sent: Mapping[str, Any] | None = None) -> Obj:
        """`live` is what one of our writes (of `sent`) got back: kept, and its watch
        event will be our echo."""
        return self.expect_echo(ref, self.keep(ref, live, sent))

    def keep(self, ref: ObjectRef, live: Obj, sent: Mapping[str, Any] | None = None) -> Obj:
        """`live` as the cluster holds it now (slim: what we use, shared where it can)."""
        kept = self.live[ref] = slim(live, sent if sent is not None else self.live.get(ref))
        return kept

    def forget(self, ref: ObjectRef) -> Obj | None:
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
        live = self.live.get(ObjectRef(KIND_IMPORT, namespace, name))
        uid = metadata_of(live).get("uid") if live else None
        return str(uid) if uid else None

    def rendered(self, live: Mapping[str, Any]) -> Obj:
        """A managed object as the reconcile renders it: without server fields, our label
        on imports, or the real owner uid (when it is the current import's)."""
        found = metadata_of(live)
        kind = str(live.get("kind"))
        namespace, name = str(found.get("namespace") or ""), str(found.get("name"))
        out_meta: Obj = {"name": name, "namespace": namespace}
        labels = dict(found.get("labels") or {})
        if kind == KIND_IMPORT:
            labels.pop(LABEL_MANAGED_BY, None)
        if labels:
            out_meta["labels"] = labels
        if found.get("annotations"):
            out_meta["annotations"] = dict(found["annotations"])
        owners = found.get("ownerReferences")
        if owners:
            out_meta["ownerReferences"] = [
                {**o, "apiVersion": IMPORT_API_VERSION,
                 "uid": owner_uid(ServiceKey(namespace, str(o.get("name"))))}
                if o.get("kind") == KIND_IMPORT
                and o.get("uid") == self.import_uid(namespace, str(o.get("name"))) else o
                for o in owners]
        out: Obj = {"apiVersion": IMPORT_API_VERSION if kind == KIND_IMPORT
                    else live.get("apiVersion"), "kind": kind, "metadata": out_meta}
        out.update((k, v) for k, v in live.items()
                   if k not in ("apiVersion", "kind", "metadata"))
        return out

    # -- what the watch and the relist of our objects show -------------------------------
    def on_event(self, ref: ObjectRef, kind: str, raw: Obj, published: Published) -> None:
        """A watch event about one of our objects: reported unless it is our own echo."""
        current = self.live.get(ref)
        if current is not None and metadata_of(current).get("uid") != metadata_of(raw).get("uid"):
            return  # an earlier object of that name, already replaced by one we wrote
        if kind == "DELETED" or not is_ours(raw):
            if current is None:
                return
            self.forget(ref)
            published[ref] = None
        elif self.is_echo(ref, raw) or (
                current is not None and metadata_of(current).get("resourceVersion")
                == metadata_of(raw).get("resourceVersion")):
            return
        else:
            published[ref] = self.rendered(self.keep(ref, raw))
        self.changed_by_others(ref)

    def on_list(self, kind: str, listed: Mapping[ObjectRef, Obj],
                published: Published) -> None:
        """A fresh list of our objects of one kind: all of them go to the controller to
        compare."""
        for ref in [r for r in self.live if r.kind == kind and r not in listed]:
            self.forget(ref)
            published[ref] = None
        for ref, raw in listed.items():
            if not (ref in self.live and self.is_echo(ref, raw)):
                self.keep(ref, raw)  # else what our write got back, as new or newer
        for ref in listed:  # rendered once every import's uid is in
            published[ref] = self.rendered(self.live[ref])
