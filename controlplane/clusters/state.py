"""One member cluster's objects, indexed by service key and updated in place.

Both cluster clients feed it (the directory client by files, a kube client by watch
events) and get back what changed, so the controller re-reconciles only those keys.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Protocol

from controlplane.resources import (
    KIND_EXPORT,
    KIND_MCS,
    KIND_NAMESPACE,
    KIND_SERVICE,
    KIND_SLICE,
    ExportInfo,
    McsInfo,
    NamespaceInfo,
    ObjectRef,
    Parsed,
    ServiceInfo,
    service_key_of,
)
from mcsproxy.manifests import SliceSpec
from mcsproxy.model import ServiceKey


class Changes(Protocol):
    keys: set[ServiceKey]
    namespaces: set[str]


class ClusterObjects:
    __slots__ = ("_by_ref", "_declared", "_in_namespace", "_terminating", "exports", "mcs",
                 "namespaces", "services", "slices")

    def __init__(self) -> None:
        self._by_ref: dict[ObjectRef, Parsed] = {}
        # A namespace exists where a Namespace object says so, or where a Service, an
        # EndpointSlice or a ServiceExport stands in it (Kubernetes admits none in a
        # namespace that does not exist; a directory may leave the Namespace out). A
        # MultiClusterService does not count: it stands for the clusterset, not for the
        # cluster whose folder holds it.
        self._declared: set[str] = set()
        self._in_namespace: Counter[str] = Counter()
        # Namespaces being deleted: absent whatever still stands in them, as the API server
        # refuses anything new there (our imports were written again and refused, 403, every
        # second for as long as the deletion took, for ever when a finalizer held it).
        self._terminating: set[str] = set()
        self.namespaces: set[str] = set()
        self.services: dict[ServiceKey, ServiceInfo] = {}
        self.exports: dict[ServiceKey, ExportInfo] = {}
        self.mcs: dict[ServiceKey, McsInfo] = {}
        self.slices: dict[ServiceKey, dict[str, SliceSpec]] = defaultdict(dict)

    def __len__(self) -> int:
        return len(self._by_ref)

    def refs(self) -> set[ObjectRef]:
        return set(self._by_ref)

    def slices_for(self, key: ServiceKey) -> tuple[SliceSpec, ...]:
        by_name = self.slices.get(key)
        if not by_name:
            return ()
        return tuple(by_name[name] for name in sorted(by_name))

    def service_keys(self) -> set[ServiceKey]:
        """Every key something in this cluster is about."""
        return set(self.services) | set(self.exports) | set(self.mcs) | {
            k for k, v in self.slices.items() if v
        }

    def upsert(self, ref: ObjectRef, parsed: Parsed, changes: Changes) -> None:
        """Store one object, noting in `changes` the keys and namespaces it touched."""
        old = self._by_ref.get(ref)
        if old == parsed:
            return
        if ref.kind not in (KIND_NAMESPACE, KIND_MCS):
            # Counted before the old version leaves, so a replaced object does not flip
            # its namespace out and back in.
            self._in_namespace[ref.namespace] += 1
        if old is not None:
            self._unindex(ref, old, changes)
        self._by_ref[ref] = parsed
        if ref.kind == KIND_NAMESPACE:
            self._declared.add(ref.name)
            if isinstance(parsed, NamespaceInfo) and parsed.terminating:
                self._terminating.add(ref.name)
            else:
                self._terminating.discard(ref.name)
            self._namespace_moved(ref.name, changes)
            return
        key = service_key_of(ref, parsed)
        assert key is not None
        changes.keys.add(key)
        if ref.kind != KIND_MCS:
            self._namespace_moved(ref.namespace, changes)
        if ref.kind == KIND_SERVICE:
            self.services[key] = parsed  # type: ignore[assignment]
        elif ref.kind == KIND_EXPORT:
            self.exports[key] = parsed  # type: ignore[assignment]
        elif ref.kind == KIND_MCS:
            self.mcs[key] = parsed  # type: ignore[assignment]
        elif ref.kind == KIND_SLICE:
            self.slices[key][ref.name] = parsed  # type: ignore[assignment]

    def remove(self, ref: ObjectRef, changes: Changes) -> None:
        old = self._by_ref.pop(ref, None)
        if old is not None:
            self._unindex(ref, old, changes)

    def _namespace_moved(self, namespace: str, changes: Changes) -> None:
        """Bring `namespaces` up to date for one namespace; note it when it flipped."""
        exists = (namespace in self._declared or self._in_namespace[namespace] > 0) and (
            namespace not in self._terminating)
        if exists != (namespace in self.namespaces):
            if exists:
                self.namespaces.add(namespace)
            else:
                self.namespaces.discard(namespace)
            changes.namespaces.add(namespace)

    def _unindex(self, ref: ObjectRef, old: Parsed, changes: Changes) -> None:
        if ref.kind == KIND_NAMESPACE:
            self._declared.discard(ref.name)
            self._terminating.discard(ref.name)
            self._namespace_moved(ref.name, changes)
            return
        key = service_key_of(ref, old)
        assert key is not None
        changes.keys.add(key)
        if ref.kind != KIND_MCS:
            self._in_namespace[ref.namespace] -= 1
            if not self._in_namespace[ref.namespace]:
                del self._in_namespace[ref.namespace]
            self._namespace_moved(ref.namespace, changes)
        if ref.kind == KIND_SERVICE:
            self.services.pop(key, None)
        elif ref.kind == KIND_EXPORT:
            self.exports.pop(key, None)
        elif ref.kind == KIND_MCS:
            self.mcs.pop(key, None)
        elif ref.kind == KIND_SLICE:
            by_name = self.slices.get(key)
            if by_name is not None:
                by_name.pop(ref.name, None)
                if not by_name:
                    del self.slices[key]

    def replace_all(self, objects: dict[ObjectRef, Parsed], changes: Changes) -> None:
        """Make `objects` the whole content, noting what changed."""
        for ref in [r for r in self._by_ref if r not in objects]:
            self.remove(ref, changes)
        for ref, parsed in objects.items():
            self.upsert(ref, parsed, changes)
