"""kube-controller-manager's garbage collector, as far as ownerReferences go.

Without it a test would show a cluster where deleting a ServiceImport leaves its imported
EndpointSlices behind, and a slice written with the uid of an owner that is gone lives on:
a real cluster deletes both. What is done, as in the garbage collector's attemptToDeleteItem
and its orphan/foreground finalizers:

- an object whose owners (matched by uid, in its own namespace or cluster-scoped) are all
  gone is deleted, in the background; one with some owners still there loses the
  references to the missing ones (a patch);
- DeleteOptions `propagationPolicy: Orphan` (or `orphanDependents: true`) gives the owner
  the `orphan` finalizer: its dependents lose their references to it, then it goes;
- `propagationPolicy: Foreground` gives it `foregroundDeletion`: its dependents are deleted,
  and it goes once none is left that has `blockOwnerDeletion: true`;
- `Background` (the default for every kind here): the owner goes at once, its dependents
  after.

Like the real one it runs after the write that caused it (on the event loop's next turn),
so a client sees its answer, and watches the owner's event, before the dependents change.

The namespace controller's part too: a namespace deleted is marked (deletionTimestamp,
phase Terminating), everything in it is deleted (an object with finalizers holds the
namespace until they are removed), then the namespace goes. Before, deleting a namespace
left its Services, ServiceExports and slices in place, which no cluster does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import ResourceType, Store

Obj = dict[str, Any]
ORPHAN = "orphan"
NAMESPACE_FINALIZER = "kubernetes"  # the namespace controller's
FOREGROUND = "foregroundDeletion"


def owner_refs(obj: Obj) -> list[Obj]:
    refs = obj["metadata"].get("ownerReferences") or []
    return [r for r in refs if isinstance(r, dict) and r.get("uid")]


def finalizer_for(options: Any) -> str | None:
    """The finalizer a DELETE's options put on the owner, if any."""
    if not isinstance(options, dict):
        return None
    policy = options.get("propagationPolicy")
    if policy == "Orphan" or (policy is None and options.get("orphanDependents") is True):
        return ORPHAN
    if policy == "Foreground":
        return FOREGROUND
    return None


class GarbageCollector:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.enabled = True
        self._pending: set[str] = set()  # uids of objects to look at
        self._scheduled = False
        # Every object by uid, and the uids that name each uid as an owner.
        self._where: dict[str, tuple[ResourceType, str, str]] = {}
        self._deps: dict[str, set[str]] = {}
        self._terminating: set[str] = set()  # namespaces whose content is being deleted

    def changed(self, rtype: ResourceType, kind: str, obj: Obj, old: Obj | None) -> None:
        """After each committed change: what the collector must look at again."""
        meta = obj["metadata"]
        uid = str(meta.get("uid"))
        if old is not None:
            for ref in owner_refs(old):
                self._deps.get(str(ref["uid"]), set()).discard(uid)
        if kind == "DELETED":
            self._where.pop(uid, None)
        else:
            self._where[uid] = (rtype, meta.get("namespace", ""), meta["name"])
            for ref in owner_refs(obj):
                self._deps.setdefault(str(ref["uid"]), set()).add(uid)
        if not self.enabled:
            return
        if kind == "DELETED" and meta.get("namespace") in self._terminating:
            self._schedule(force=True)  # perhaps the last object the namespace waits for
        if kind == "DELETED":
            self._pending.update(self._deps.get(uid, ()))
        elif owner_refs(obj) or {ORPHAN, FOREGROUND} & set(meta.get("finalizers") or ()):
            self._pending.add(uid)
        for ref in owner_refs(obj):  # a dependent going may let a foreground owner go
            self._pending.add(str(ref["uid"]))
        self._schedule()

    def namespace_deleted(self, name: str) -> None:
        """A namespace marked for deletion: its content goes, then it does."""
        self._terminating.add(name)
        self._schedule(force=True)

    def _schedule(self, *, force: bool = False) -> None:
        if self._scheduled or not (self._pending or force):
            return
        self._scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self.run)
        except RuntimeError:  # no loop (a test's direct injection): at once
            self.run()

    def run(self) -> None:
        self._scheduled = False
        while self._pending:
            found = self._by_uid(self._pending.pop())
            if found is not None:
                self._attempt(*found)
        for name in sorted(self._terminating):
            self._empty_namespace(name)

    def _empty_namespace(self, name: str) -> None:
        namespaces = self.store.by_name("namespaces")
        namespace = self.store.objects[("", "namespaces")].get(("", name))
        if namespace is None or not namespace["metadata"].get("deletionTimestamp"):
            self._terminating.discard(name)  # gone, or made again (a test's injection)
            return
        content = [(t, obj) for t in {id(t): t for t in self.store.types.values()
                                      if t.namespaced}.values()
                   for (ns, _), obj in list(self.store.objects[(t.group, t.plural)].items())
                   if ns == name]
        for content_type, obj in content:
            if not obj["metadata"].get("deletionTimestamp"):
                self._delete(content_type, obj)
        if any(ns == name for t in self.store.types.values() if t.namespaced
               for ns, _ in self.store.objects[(t.group, t.plural)]):
            return  # held by finalizers: looked at again as each object goes
        self._terminating.discard(name)
        self._drop_finalizer(namespaces, namespace, NAMESPACE_FINALIZER)

    # -- lookups -------------------------------------------------------------------------
    def _by_uid(self, uid: str) -> tuple[ResourceType, Obj] | None:
        where = self._where.get(uid)
        if where is None:
            return None
        rtype, namespace, name = where
        obj = self.store.objects[(rtype.group, rtype.plural)].get((namespace, name))
        return (rtype, obj) if obj is not None and obj["metadata"].get("uid") == uid else None

    def _dependents(self, uid: str) -> list[tuple[str, tuple[ResourceType, Obj]]]:
        return [(dep, found) for dep in sorted(self._deps.get(uid, ()))
                if (found := self._by_uid(dep)) is not None
                and any(r["uid"] == uid for r in owner_refs(found[1]))]

    def _owner(self, dependent: Obj, ref: Obj) -> Obj | None:
        """The object `ref` names, where the dependent may have an owner, if its uid matches."""
        found = self._by_uid(str(ref["uid"]))
        if found is None:
            return None
        rtype, obj = found
        if rtype.kind != ref.get("kind") or obj["metadata"]["name"] != ref.get("name"):
            return None
        if rtype.namespaced and (obj["metadata"].get("namespace")
                                 != dependent["metadata"].get("namespace")):
            return None
        return obj

    # -- one object ----------------------------------------------------------------------
    def _attempt(self, rtype: ResourceType, obj: Obj) -> None:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or ())
        if meta.get("deletionTimestamp") and ORPHAN in finalizers:
            self._orphan(str(meta["uid"]))
            self._drop_finalizer(rtype, obj, ORPHAN)
            return
        if meta.get("deletionTimestamp") and FOREGROUND in finalizers:
            self._foreground(rtype, obj)
            return
        if meta.get("deletionTimestamp") or not owner_refs(obj):
            return
        solid, gone, waiting = [], [], []
        for ref in owner_refs(obj):
            owner = self._owner(obj, ref)
            if owner is None:
                gone.append(ref)
            elif owner["metadata"].get("deletionTimestamp") and FOREGROUND in (
                    owner["metadata"].get("finalizers") or ()):
                waiting.append(ref)
            else:
                solid.append(ref)
        if solid:
            if gone or waiting:  # the references to those are dropped, the object stays
                self._update(rtype, obj, lambda m: m.__setitem__("ownerReferences", solid))
            return
        if gone or waiting:
            self._delete(rtype, obj)

    def _orphan(self, uid: str) -> None:
        for _, (rtype, dependent) in self._dependents(uid):
            kept = [r for r in owner_refs(dependent) if r["uid"] != uid]
            self._update(rtype, dependent, lambda m, kept=kept: (
                m.__setitem__("ownerReferences", kept) if kept else m.pop("ownerReferences")))

    def _foreground(self, rtype: ResourceType, owner: Obj) -> None:
        blocking = False
        for _, (dep_type, dependent) in self._dependents(str(owner["metadata"]["uid"])):
            if not dependent["metadata"].get("deletionTimestamp"):
                self._delete(dep_type, dependent)
            if self._by_uid(str(dependent["metadata"]["uid"])) is not None and any(
                    r["uid"] == owner["metadata"]["uid"] and r.get("blockOwnerDeletion")
                    for r in owner_refs(dependent)):
                blocking = True
        if not blocking:
            self._drop_finalizer(rtype, owner, FOREGROUND)

    # -- writes, as the collector's client makes them ------------------------------------
    def _delete(self, rtype: ResourceType, obj: Obj) -> None:
        meta = obj["metadata"]
        self.store.delete(rtype, meta.get("namespace", ""), meta["name"],
                          {"preconditions": {"uid": meta["uid"]}})

    def _drop_finalizer(self, rtype: ResourceType, obj: Obj, finalizer: str) -> None:
        self._update(rtype, obj, lambda m: m.__setitem__(
            "finalizers", [f for f in m.get("finalizers") or () if f != finalizer]))

    def _update(self, rtype: ResourceType, obj: Obj, edit: Callable[[Obj], Any]) -> None:
        meta = dict(obj["metadata"])
        edit(meta)
        self.store.update(rtype, meta.get("namespace", ""), meta["name"],
                          {**obj, "metadata": meta})
