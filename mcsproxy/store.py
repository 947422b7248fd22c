"""The snapshot store: sources write objects in, consumers are handed whole snapshots.

Sources upsert and delete parsed objects; `commit()` rebuilds only the services those
objects touch, reuses every other ImportedService as it was, and swaps the new Snapshot
in whole. Consumers (DNS, proxy, admin) subscribe and get the new snapshot, with the set
of changed keys so they can update incrementally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from mcsproxy.manifests import ImportSpec, SliceSpec
from mcsproxy.model import EMPTY_SNAPSHOT, ImportedService, ServiceKey, Snapshot

log = logging.getLogger("mcsproxy.store")


class ObjectId(NamedTuple):
    source: str
    kind: str  # "ServiceImport" | "EndpointSlice"
    namespace: str
    name: str


Spec = ImportSpec | SliceSpec
Subscriber = Callable[[Snapshot], None]


@dataclass(slots=True)
class SourceStatus:
    synced: bool = False
    connected: bool = True
    error: str | None = None
    last_change: float = 0.0
    objects: int = 0


@dataclass
class SnapshotStore:
    cluster_id: str
    current: Snapshot = EMPTY_SNAPSHOT
    sources: dict[str, SourceStatus] = field(default_factory=dict)
    _objects: dict[ObjectId, Spec] = field(default_factory=dict)
    _imports_by_key: dict[ServiceKey, set[ObjectId]] = field(
        default_factory=lambda: defaultdict(set)
    )
    _slices_by_key: dict[ServiceKey, set[ObjectId]] = field(
        default_factory=lambda: defaultdict(set)
    )
    _dirty: set[ServiceKey] = field(default_factory=set)
    _subscribers: list[Subscriber] = field(default_factory=list)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)

    # -- sources ---------------------------------------------------------------------
    def register_source(self, name: str) -> SourceStatus:
        status = self.sources.setdefault(name, SourceStatus())
        return status

    def upsert(self, oid: ObjectId, spec: Spec) -> None:
        old = self._objects.get(oid)
        if old == spec:
            return
        if old is not None:
            self._unindex(oid, old)
        self._objects[oid] = spec
        index = self._imports_by_key if isinstance(spec, ImportSpec) else self._slices_by_key
        index[spec.key].add(oid)
        self._dirty.add(spec.key)

    def delete(self, oid: ObjectId) -> None:
        old = self._objects.pop(oid, None)
        if old is not None:
            self._unindex(oid, old)

    def replace_source(self, source: str, objects: dict[ObjectId, Spec]) -> None:
        """Make `objects` the whole content of `source`: what is missing is deleted."""
        for oid in [o for o in self._objects if o.source == source and o not in objects]:
            self.delete(oid)
        for oid, spec in objects.items():
            self.upsert(oid, spec)

    def source_ids(self, source: str) -> Iterable[ObjectId]:
        return [o for o in self._objects if o.source == source]

    def _unindex(self, oid: ObjectId, spec: Spec) -> None:
        index = self._imports_by_key if isinstance(spec, ImportSpec) else self._slices_by_key
        ids = index.get(spec.key)
        if ids is not None:
            ids.discard(oid)
            if not ids:
                del index[spec.key]
        self._dirty.add(spec.key)

    # -- snapshots -------------------------------------------------------------------
    def mark_synced(self, source: str) -> None:
        self.register_source(source).synced = True

    @property
    def all_synced(self) -> bool:
        return bool(self.sources) and all(s.synced for s in self.sources.values())

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    def commit(self) -> Snapshot:
        """Build and swap in a new snapshot if anything changed (or on the first sync)."""
        first = not self.loaded.is_set() and self.all_synced
        if not self._dirty and not first:
            return self.current
        started = time.perf_counter()
        services = dict(self.current.services)
        changed: set[ServiceKey] = set()
        for key in self._dirty:
            new = self._build_service(key)
            old = services.get(key)
            if new is None:
                if old is not None:
                    del services[key]
                    changed.add(key)
            elif new != old:
                services[key] = new
                changed.add(key)
        self._dirty.clear()
        if not changed and not first:
            return self.current
        snapshot = Snapshot(
            version=self.current.version + 1,
            services=MappingProxyType(services),
            changed=frozenset(changed),
            built_at=time.time(),
        )
        self.current = snapshot
        if self.all_synced:
            self.loaded.set()
        elapsed = time.perf_counter() - started
        log.info(
            "snapshot version=%d services=%d changed=%d build_ms=%.1f",
            snapshot.version, len(services), len(changed), elapsed * 1000,
        )
        for callback in self._subscribers:
            try:
                callback(snapshot)
            except Exception:
                # A consumer that fails must not stop the others from seeing the snapshot.
                log.exception("snapshot subscriber %r failed", callback)
        return snapshot

    def _build_service(self, key: ServiceKey) -> ImportedService | None:
        import_ids = self._imports_by_key.get(key)
        if not import_ids:
            return None
        # Several sources may carry the same import; the first by id wins, deterministically.
        spec = self._objects[min(import_ids)]
        assert isinstance(spec, ImportSpec)
        endpoints = []
        for oid in sorted(self._slices_by_key.get(key, ())):
            slice_spec = self._objects[oid]
            assert isinstance(slice_spec, SliceSpec)
            endpoints.extend(slice_spec.endpoints)
        return ImportedService(
            key=key,
            type=spec.type,  # type: ignore[arg-type]
            ips=spec.ips,
            ports=spec.ports,
            endpoints=tuple(endpoints),
            session_affinity=spec.session_affinity,  # type: ignore[arg-type]
            affinity_timeout_s=spec.affinity_timeout_s,
            traffic_distribution=spec.traffic_distribution,
            annotations=spec.annotations,
            clusters=spec.clusters,
        )
