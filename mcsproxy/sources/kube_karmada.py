"""Karmada's cross-cluster services as imported services, for the kube source.

Karmada (`networking.karmada.io/v1alpha1` MultiClusterService, `types: [CrossCluster]`,
on the Karmada API server) propagates the Service to its provider and consumer clusters
and dispatches each provider's EndpointSlices into the consumers, named
`<providerCluster>-<origName>`, labelled `kubernetes.io/service-name=<svc>` and
`endpointslice.kubernetes.io/managed-by=endpointslice-dispatch-controller.karmada.io`,
annotated `endpointslice.karmada.io/provision-cluster=<providerCluster>`. The
MultiClusterService itself is not applied to the members (its Work to the providers is
`propagation.karmada.io/instruction: suppressed`), and a cluster's own slices are never
dispatched back to it. What a provider does get: the propagated Service carries Karmada's
claim, `resourcetemplate.karmada.io/claimed-by=MultiClusterService` (set on the Service
template by the MultiClusterService controller while the service is CrossCluster, removed
when it stops being one or is deleted; the binding controller copies the template's labels
verbatim into every provider and consumer). Karmada gives such a service no clusterset
name, no ClusterSetIP and no health checks; this module makes each one an imported
service like a ServiceImport would, from what a member really has:

- served while Karmada has dispatched at least one slice of that name into this cluster
  (an empty one too), or the local Service carries the claim and its native slices have
  held at least one endpoint since it was claimed (a provider: so the *only* provider,
  which gets no dispatched slice, serves the name too; the claim alone does not, as
  consumers carry it too), and no real ServiceImport of that name exists (a ServiceImport,
  written by an MCS controller, wins). A provider scaled to zero (its native slices empty
  or deleted) keeps the name, ports and ClusterSetIP, with no endpoints, as an import with
  no endpoints does (KEP-1645), until its Service is deleted or loses the claim; a gateway
  started while its provider has no endpoint cannot tell it from a consumer and serves the
  name once one appears. When neither holds any more, the service goes. Claimed Services
  are watched, label-selected, from the start; the first one starts the Services and
  native slices watches like a dispatched slice does;
- a MultiClusterService in this cluster is optional (some installs propagate it): while
  one of that name exists it decides instead, as before: served while it is CrossCluster
  and lists this cluster as a consumer (or lists none), even with no slice yet, and only
  its provider clusters' slices count (all when it lists none);
- endpoints: the dispatched slices, each endpoint tagged with its provider cluster, plus
  this cluster's own endpoints: the local Service's native slices (managed-by
  `endpointslice-controller.k8s.io`), tagged with `--cluster-id`, so that local-first
  (`trafficDistribution: PreferClose`) and failover between local and remote work when
  this cluster is also a provider. Without a MultiClusterService the provider list is
  unknown: a cluster whose own Service has endpoints is taken for a provider (a consumer
  that runs no backends has empty native slices, which add nothing). With one, the local
  endpoints count only when it lists this cluster as a provider (or lists none);
- ports, headlessness, session affinity, traffic distribution and IP families from the
  local Service of that name when there is one (Karmada propagates it to consumers),
  else the ports the slices carry; `mcsproxy.io/` annotations from the MultiClusterService
  when there is one, else from the Service. A service is served only once Services,
  native slices and MultiClusterServices have all been listed (the first two watches start
  with the first Karmada service; a cluster without the Karmada CRD lists no
  MultiClusterService, which is fine): while a list fails, Karmada's services wait and the
  error is in the source status, the rest is published;
- a ClusterSetIP per family allocated from `--clusterset-cidr`
  (mcsproxy.clustersetip, ranked: starts at a hash of namespace/name, probes past taken
  addresses, services ranked by the creationTimestamp of the MultiClusterService if
  there is one, else of the local Service, else of the oldest dispatched slice). Every
  gateway of a cluster allocates on its own and mcsproxy-dns answers from any of them, so
  the addresses are a function of the services that exist, never of the order they came
  in or of when the gateway started: each service, oldest first, takes the first free
  address from its hash. The services of one list (the first sync, a relist after 410,
  whichever watch lists last) are placed once it has been applied whole. A new service
  (ranked last) moves nothing. An older one that appears later (an old Service made
  cross-cluster) takes its slot from a newer one that hashes to it, and one that goes
  gives its slot to the next that hashes there: the newer service moves, in every
  gateway at once (it used to keep the slot until its gateway restarted, while gateways
  started meanwhile gave the slot to the older one: a name resolved by one gateway led
  to another service through the next). A released address is not held (a hold lives in
  one process only). The addresses every other import in the store holds (ServiceImports
  an MCS controller wrote from the same range, other sources' imports) are taken
  (`foreign_addresses`, by SnapshotStore.watch_addresses): a Karmada service on one moves
  on when it arrives, and back when it goes, as a fresh placement would give (a
  ServiceImport wins the address as it wins the name).

The import goes through mcsproxy.manifests like every other object, so a Service whose
ports do not validate is rejected with the same messages. Each change costs work for its
own service key only, but for the ClusterSetIPs of the services ranked after one that
arrives out of order, and of those that move when one goes or an import takes or frees
an address.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mcsproxy.clustersetip import AllocationError, ClusterSetIPAllocator
from mcsproxy.manifests import (
    LABEL_MANAGED_BY,
    LABEL_SERVICE_NAME,
    ManifestError,
    SliceSpec,
    parse_endpoint_slice,
    parse_service_import,
)
from mcsproxy.model import ServiceKey
from mcsproxy.sources.kube_watch import object_uid, recreated
from mcsproxy.store import ObjectId, SnapshotStore

log = logging.getLogger("mcsproxy.sources.kube")

KARMADA_GROUP = "networking.karmada.io"
KARMADA_MANAGER = "endpointslice-dispatch-controller.karmada.io"
KARMADA_SLICE_SELECTOR = f"{LABEL_MANAGED_BY}={KARMADA_MANAGER}"
ANNOTATION_PROVISION_CLUSTER = "endpointslice.karmada.io/provision-cluster"
LABEL_K8S_SERVICE_NAME = "kubernetes.io/service-name"
# The cluster's own slices, written by kube-controller-manager for Services with a selector.
NATIVE_MANAGER = "endpointslice-controller.k8s.io"
NATIVE_SLICE_SELECTOR = f"{LABEL_MANAGED_BY}={NATIVE_MANAGER}"
# Karmada's MultiClusterService controller claims the Service template of a CrossCluster
# MultiClusterService with this label (and removes it when the service stops being one);
# the template's labels are copied verbatim into each provider and consumer member.
LABEL_CLAIMED_BY = "resourcetemplate.karmada.io/claimed-by"
CLAIMED_BY_MCS = "MultiClusterService"
CLAIMED_SERVICE_SELECTOR = f"{LABEL_CLAIMED_BY}={CLAIMED_BY_MCS}"
# Of a Service's annotations (when no MultiClusterService carries them), only ours.
OWN_ANNOTATION_PREFIX = "mcsproxy.io/"
# Store ids of what this module writes; distinct kinds so they never collide with the
# ServiceImports and MCS-labelled slices of the same names.
KIND_IMPORT = "MultiClusterService"
KIND_SLICE = "KarmadaEndpointSlice"

Obj = Mapping[str, Any]


def _key(obj: Obj) -> tuple[ServiceKey, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise ManifestError("object has no metadata.name")
    ns = meta.get("namespace") or "default"
    return ServiceKey(str(ns), meta["name"]), str(meta.get("creationTimestamp") or "")


def _ns_name(obj: Obj) -> tuple[str, str]:
    """(namespace, name) as an object gives them, whether or not it validates."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name"))


def _cluster_names(value: Any, what: str) -> frozenset[str] | None:
    """providerClusters / consumerClusters: None (all clusters) when empty."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ManifestError(f"{what} must be a list")
    names = set()
    for item in value:
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{what} entries need a name")
        names.add(name)
    return frozenset(names) or None


@dataclass(frozen=True, slots=True)
class McsInfo:
    created: str
    cross_cluster: bool
    providers: frozenset[str] | None
    consumers: frozenset[str] | None
    annotations: Mapping[str, str]


def parse_mcs(obj: Obj) -> tuple[ServiceKey, McsInfo]:
    key, created = _key(obj)
    where = f"MultiClusterService {key}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ManifestError(f"{where}: spec must be a mapping")
    types = spec.get("types") or []
    if not isinstance(types, list):
        raise ManifestError(f"{where}: spec.types must be a list")
    try:
        providers = _cluster_names(spec.get("providerClusters"), "spec.providerClusters")
        consumers = _cluster_names(spec.get("consumerClusters"), "spec.consumerClusters")
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc.message}") from None
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return key, McsInfo(created, "CrossCluster" in types, providers, consumers,
                        dict(annotations) if isinstance(annotations, Mapping) else {})


def service_fields(obj: Obj) -> tuple[ServiceKey, dict[str, Any]]:
    """Only what a ServiceImport copies from a Service: a small copy per Service."""
    key, created = _key(obj)
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ManifestError(f"Service {key}: spec must be a mapping")
    if not isinstance(spec.get("ports", []), list):
        # Indexed per port when the import is made: refused here, where the Service is.
        raise ManifestError(f"Service {key}: spec.ports must be a list")
    kept = {f: spec[f] for f in ("ports", "sessionAffinity", "sessionAffinityConfig",
                                 "trafficDistribution", "ipFamilies") if f in spec}
    kept["headless"] = spec.get("clusterIP") == "None"
    kept["created"] = created
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if isinstance(annotations, Mapping):
        kept["annotations"] = {k: v for k, v in annotations.items()
                               if isinstance(k, str) and k.startswith(OWN_ANNOTATION_PREFIX)}
    return key, kept


def _claimed(obj: Obj) -> bool:
    """Whether a Service carries the claim (the watch selects on it; checked again so an
    object that reaches us without it, whatever the server, is never taken for one)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return isinstance(labels, Mapping) and labels.get(LABEL_CLAIMED_BY) == CLAIMED_BY_MCS


def _raise(obj: Obj, exc: Exception) -> None:
    raise exc


def _one_list(replace: Callable[[KarmadaServices, Sequence[Obj]], None],
              ) -> Callable[[KarmadaServices, Sequence[Obj]], None]:
    """A (re)list's handler: the refreshes it causes are deferred and made at its end,
    oldest first (KarmadaServices._refresh_deferred), so new services get their
    ClusterSetIPs in that order whatever order the objects and the watches' lists came
    in. A key that has an address keeps it."""
    @functools.wraps(replace)
    def applied_whole(self: KarmadaServices, objects: Sequence[Obj]) -> None:
        self._deferred = set()
        try:
            replace(self, objects)
        finally:
            self._refresh_deferred()
    return applied_whole


class KarmadaServices:
    """Dispatched slices, local Services, native slices and (optional) MultiClusterServices
    → store objects."""

    def __init__(self, store: SnapshotStore, source: str, cluster_id: str,
                 allocator: ClusterSetIPAllocator, *, changed: Callable[[], None],
                 reject: Callable[[str], None],
                 failed: Callable[[Obj, Exception], None] | None = None) -> None:
        self.store = store
        self.source = source
        self.cluster_id = cluster_id
        self.allocator = allocator
        self.changed = changed
        self.reject = reject
        # A listed object whose handling raised unexpectedly: skipped, its last good
        # version kept (kube_watch.SkipLog); a watch event's is the Reflector's to skip.
        self.failed = failed or _raise
        self.mcs: dict[ServiceKey, McsInfo] = {}
        # metadata.uid of each version kept, MultiClusterServices and slices: a rejected
        # version of the same object keeps it; one of an object deleted and created again
        # under the same name (a relist shows no DELETED) does not.
        self.mcs_uids: dict[ServiceKey, str] = {}
        self.services: dict[ServiceKey, dict[str, Any]] = {}
        # Dispatched slices: per service key, slice name → spec; their creationTimestamps.
        self.slices: dict[ServiceKey, dict[str, SliceSpec]] = defaultdict(dict)
        self.slice_keys: dict[tuple[str, str], ServiceKey] = {}  # (ns, slice name) → key
        self.slice_created: dict[tuple[str, str], str] = {}
        self.slice_uids: dict[tuple[str, str], str] = {}
        # The cluster's own (native) slices: per service key, slice name → spec, or the
        # error of a version that did not validate (reported only for served keys).
        self.local: dict[ServiceKey, dict[str, SliceSpec]] = defaultdict(dict)
        self.local_keys: dict[tuple[str, str], ServiceKey] = {}
        self.local_errors: dict[tuple[str, str], str] = {}
        self.local_uids: dict[tuple[str, str], str] = {}
        self.real_imports: set[ServiceKey] = set()  # keys a ServiceImport serves
        # Services Karmada claims for a CrossCluster MultiClusterService (their own watch,
        # label-selected, running from the start: the only provider has nothing else).
        self.claimed: set[ServiceKey] = set()
        # Claimed keys whose native slices have held an endpoint since the claim: this
        # cluster provides them. Kept at zero endpoints (KEP-1645: an import lives as long
        # as its export, whatever its endpoint count; nothing else tells a provider scaled
        # to zero from a consumer); dropped with the claim or the Service.
        self.providing: set[ServiceKey] = set()
        self._written: dict[ServiceKey, set[ObjectId]] = {}
        # Called once, with the first Karmada service (a MultiClusterService, a dispatched
        # slice or a claimed Service): starts the Services and native slices watches.
        self.on_first_service: Callable[[], None] | None = None
        self.services_listed = False  # the Services watch has listed once
        self.local_listed = False  # the native slices watch has listed once
        self.mcs_listed = False  # MultiClusterServices listed once (or found not served)
        # Keys a (re)list being applied changed: refreshed at its end (_one_list).
        self._deferred: set[ServiceKey] | None = None
        # Keys whose ClusterSetIPs an allocation just moved: published again (refresh).
        self._moved: set[ServiceKey] = set()

    @property
    def served(self) -> int:
        return len(self._written)

    @property
    def ready(self) -> bool:
        """Everything a service's import is made of has been listed once."""
        return self.services_listed and self.local_listed and self.mcs_listed

    def _keys(self) -> set[ServiceKey]:
        """Every key Karmada may serve: a MultiClusterService's, a dispatched slice's or a
        claimed Service's."""
        return self.mcs.keys() | self.slices.keys() | self.claimed

    def _created(self, key: ServiceKey) -> str:
        mcs = self.mcs.get(key)
        if mcs is not None and mcs.created:
            return mcs.created
        service = self.services.get(key)
        if service and service.get("created"):
            return str(service["created"])
        return min((self.slice_created.get((key.namespace, n), "")
                    for n in self.slices.get(key, {})), default="")

    def _oldest_first(self, keys: Iterable[ServiceKey]) -> list[ServiceKey]:
        # On a hash collision the older service keeps the address.
        return sorted(keys, key=lambda k: (self._created(k), k))

    def _refresh_deferred(self) -> None:
        keys, self._deferred = self._deferred or set(), None
        for key in self._oldest_first(keys):
            try:
                self.refresh(key)
            except Exception as exc:  # one service must not stop the list
                self.failed({"kind": "Service", "metadata": {
                    "namespace": key.namespace, "name": key.name}}, exc)

    def _first_service(self) -> None:
        if self.on_first_service is not None:
            self.on_first_service()

    def _listed(self, flag: str) -> bool:
        """Mark one watch listed; True when that made everything ready (release all)."""
        was_ready = self.ready
        setattr(self, flag, True)
        if self.ready and not was_ready:
            for key in self._oldest_first(self._keys()):
                self.refresh(key)
            return True
        return False

    # -- handlers (see kube_watch.Handler) -------------------------------------------
    def mcs_upsert(self, obj: Obj) -> None:
        try:
            key, info = parse_mcs(obj)
        except ManifestError as exc:
            self._reject(exc)
            key = ServiceKey(*_ns_name(obj))
            if recreated(self.mcs_uids.get(key), obj):  # the kept version's object is gone
                self.mcs_delete(obj)
            return
        self.mcs_uids[key] = object_uid(obj)
        if self.mcs.get(key) != info:
            self.mcs[key] = info
            self._first_service()
            self.refresh(key)

    def mcs_delete(self, obj: Obj) -> None:
        key, _ = _key(obj)
        self.mcs_uids.pop(key, None)
        if self.mcs.pop(key, None) is not None:
            self.refresh(key)

    @_one_list
    def mcs_replace(self, objects: Sequence[Obj]) -> None:
        seen = set()
        parsed = []
        uids = {}
        for obj in objects:
            # A listed object that does not validate keeps its last good version, unless
            # that was another object's (same name, another uid): then it goes.
            key = ServiceKey(*_ns_name(obj))
            try:
                parsed.append(parse_mcs(obj))
            except ManifestError as exc:
                self._reject(exc)
            except Exception as exc:  # one object must not stop the list
                self.failed(obj, exc)
            if not recreated(self.mcs_uids.get(key), obj):
                seen.add(key)
            uids[key] = object_uid(obj)
        if parsed:
            self._first_service()
        touched = set()
        for key, info in parsed:
            seen.add(key)
            self.mcs_uids[key] = uids.get(key, "")
            if self.mcs.get(key) != info:
                self.mcs[key] = info
                touched.add(key)
        for key in [k for k in self.mcs if k not in seen]:
            del self.mcs[key]
            self.mcs_uids.pop(key, None)
            touched.add(key)
        if not self._listed("mcs_listed"):
            for key in self._oldest_first(touched):
                self.refresh(key)

    def service_upsert(self, obj: Obj) -> None:
        try:
            key, fields = service_fields(obj)
        except ManifestError as exc:
            self._reject(exc)
            return
        if self.services.get(key) != fields:
            self.services[key] = fields
            if key in self._keys():
                self.refresh(key)

    def service_delete(self, obj: Obj) -> None:
        key, _ = _key(obj)
        if self.services.pop(key, None) is not None and key in self._keys():
            self.refresh(key)

    @_one_list
    def service_replace(self, objects: Sequence[Obj]) -> None:
        fresh: dict[ServiceKey, dict[str, Any]] = {}
        for obj in objects:
            try:
                key, fields = service_fields(obj)
            except ManifestError as exc:
                self._reject(exc)
                continue
            except Exception as exc:  # one object must not stop the list
                self.failed(obj, exc)
                key = ServiceKey(*_ns_name(obj))
                if key in self.services:
                    fresh[key] = self.services[key]  # the last good version stays
                continue
            fresh[key] = fields
        touched = {k for k in self.services.keys() | fresh.keys()
                   if self.services.get(k) != fresh.get(k)}
        self.services = fresh
        # The first list (with the others) releases every service waiting for it (see
        # refresh), oldest first.
        if not self._listed("services_listed"):
            for key in self._oldest_first(touched & self._keys()):
                self.refresh(key)

    # Services claimed by Karmada's MultiClusterService controller (CLAIMED_SERVICE_SELECTOR).
    def claimed_upsert(self, obj: Obj) -> None:
        key = ServiceKey(*_ns_name(obj))
        claimed = _claimed(obj)
        if claimed == (key in self.claimed):
            return
        if claimed:
            self.claimed.add(key)
            self._first_service()
        else:
            self.claimed.discard(key)
        self.refresh(key)

    def claimed_delete(self, obj: Obj) -> None:
        key = ServiceKey(*_ns_name(obj))
        if key in self.claimed:
            self.claimed.discard(key)
            self.refresh(key)

    @_one_list
    def claimed_replace(self, objects: Sequence[Obj]) -> None:
        listed = {ServiceKey(*_ns_name(obj)) for obj in objects if _claimed(obj)}
        touched = listed ^ self.claimed
        self.claimed = listed
        if listed:
            self._first_service()
        for key in self._oldest_first(touched):
            self.refresh(key)

    def slice_upsert(self, obj: Obj) -> None:
        parsed = self._parse_slice(obj)
        if parsed is None:
            return
        key, name, spec = parsed
        old_key = self.slice_keys.get((key.namespace, name))
        if old_key is not None and old_key != key:
            self._drop_slice(key.namespace, name)
        if spec is None:
            self._drop_slice(key.namespace, name)
            return
        self.slice_uids[(key.namespace, name)] = object_uid(obj)
        if self.slices[key].get(name) != spec:
            self.slices[key][name] = spec
            self.slice_keys[(key.namespace, name)] = key
            self.slice_created[(key.namespace, name)] = _key(obj)[1]
            self._first_service()
            self.refresh(key)

    def slice_delete(self, obj: Obj) -> None:
        self._drop_slice(*_ns_name(obj))

    @_one_list
    def slice_replace(self, objects: Sequence[Obj]) -> None:
        self._replace_each(objects, self.slice_upsert, self.slice_keys, self._drop_slice)

    def _replace_each(self, objects: Sequence[Obj], upsert: Callable[[Obj], None],
                      known: Mapping[tuple[str, str], ServiceKey],
                      drop: Callable[[str, str], None]) -> None:
        """A list of slices: each upserted, and those `known` but not listed dropped."""
        seen: set[tuple[str, str]] = set()
        for obj in objects:
            seen.add(_ns_name(obj))
            try:
                upsert(obj)
            except Exception as exc:  # one object must not stop the list
                self.failed(obj, exc)
        for ns, name in [k for k in known if k not in seen]:
            drop(ns, name)

    def _parse_slice(self, obj: Obj) -> tuple[ServiceKey, str, SliceSpec | None] | None:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        ns, name = _ns_name(obj)
        svc = labels.get(LABEL_K8S_SERVICE_NAME)
        if not svc or LABEL_SERVICE_NAME in labels:
            # Not tied to a service, or an MCS-imported slice the other handler serves.
            return ServiceKey(ns, svc or ""), name, None
        cluster = annotations.get(ANNOTATION_PROVISION_CLUSTER)
        try:
            if not cluster:
                raise ManifestError(f"EndpointSlice {ns}/{name}: dispatched by Karmada but "
                                    f"without the {ANNOTATION_PROVISION_CLUSTER} annotation")
            spec = parse_endpoint_slice(obj, service_name=svc, cluster=cluster)
        except ManifestError as exc:
            self._reject(exc)
            if recreated(self.slice_uids.get((ns, name)), obj):
                self._drop_slice(ns, name)  # the kept version's object is gone
            return None  # the last good version of this object stays
        return ServiceKey(ns, svc), name, spec

    def _drop_slice(self, ns: str, name: str) -> None:
        key = self.slice_keys.pop((ns, name), None)
        self.slice_created.pop((ns, name), None)
        self.slice_uids.pop((ns, name), None)
        if key is None:
            return
        slices = self.slices.get(key)
        if slices is not None:
            slices.pop(name, None)
            if not slices:
                del self.slices[key]
        self.refresh(key)

    # The cluster's own slices (NATIVE_SLICE_SELECTOR): every Service's, as kube-proxy
    # watches them; they matter only for the keys Karmada serves.
    def local_upsert(self, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        ns, name = _ns_name(obj)
        svc = labels.get(LABEL_K8S_SERVICE_NAME) if isinstance(labels, Mapping) else None
        key = ServiceKey(ns, svc) if isinstance(svc, str) and svc else None
        old_key = self.local_keys.get((ns, name))
        if old_key is not None and old_key != key:
            self._drop_local(ns, name)
        if key is None:
            return
        try:
            spec = parse_endpoint_slice(obj, service_name=key.name, cluster=self.cluster_id)
        except ManifestError as exc:
            # The last good version of this object stays (reported when the key is served,
            # see refresh); one of an object since deleted does not.
            if recreated(self.local_uids.get((ns, name)), obj):
                self._drop_local(ns, name)
            self.local_errors[(ns, name)] = str(exc)
            self.local_keys.setdefault((ns, name), key)
            if key in self._written:
                self.reject(str(exc))
            return
        self.local_errors.pop((ns, name), None)
        if spec is None:
            self._drop_local(ns, name)
            return
        self.local_keys[(ns, name)] = key
        self.local_uids[(ns, name)] = object_uid(obj)
        if self.local[key].get(name) != spec:
            self.local[key][name] = spec
            if key in self._keys():
                self.refresh(key)

    def local_delete(self, obj: Obj) -> None:
        self._drop_local(*_ns_name(obj))

    @_one_list
    def local_replace(self, objects: Sequence[Obj]) -> None:
        self._replace_each(objects, self.local_upsert, self.local_keys, self._drop_local)
        self._listed("local_listed")

    def _drop_local(self, ns: str, name: str) -> None:
        key = self.local_keys.pop((ns, name), None)
        self.local_errors.pop((ns, name), None)
        self.local_uids.pop((ns, name), None)
        if key is None:
            return
        slices = self.local.get(key)
        if slices is not None and slices.pop(name, None) is not None:
            if not slices:
                del self.local[key]
            if key in self._keys():
                self.refresh(key)

    def set_real_import(self, key: ServiceKey, present: bool) -> None:
        if present == (key in self.real_imports):
            return
        if present:
            self.real_imports.add(key)
        else:
            self.real_imports.discard(key)
        if key in self._keys():
            self.refresh(key)

    def foreign_addresses(self, oid: ObjectId, old: tuple[str, ...],
                          new: tuple[str, ...]) -> None:
        """SnapshotStore.watch_addresses: an import that is not Karmada's (a ServiceImport
        an MCS controller wrote, or another source's) holds `new` instead of `old`. No
        Karmada service may have those: one on such an address moves, as a ServiceImport
        wins its name too (they shared it: one listener, DNS giving both names)."""
        if oid.source == self.source and oid.kind == KIND_IMPORT:
            return  # ours
        self._moved |= self.allocator.foreign_changed(old, new)
        self._refresh_moved()

    def _reject(self, exc: ManifestError) -> None:
        self.reject(str(exc))

    # -- one service key -------------------------------------------------------------
    def refresh(self, key: ServiceKey) -> None:
        """Write (or remove) the import and slices of `key`: work for this key only."""
        if self._deferred is not None:  # a list being applied: at its end (_one_list)
            self._deferred.add(key)
            return
        mcs = self.mcs.get(key)
        dispatched = self.slices.get(key, {})
        # The claim marks consumers too: only local endpoints make this a provider, and it
        # stays one while claimed (every claim change and local slice change comes here).
        if key not in self.claimed:
            self.providing.discard(key)
        elif any(s.endpoints for s in self.local.get(key, {}).values()):
            self.providing.add(key)
        if mcs is not None:  # a local MultiClusterService decides
            providers = mcs.providers
            wanted_here = mcs.cross_cluster and (mcs.consumers is None
                                                 or self.cluster_id in mcs.consumers)
        else:  # what Karmada really leaves in a member: dispatched slices, the claim
            providers = None
            wanted_here = bool(dispatched) or key in self.providing
        wanted: dict[ObjectId, Any] = {}
        full = False  # wanted, but no address is free for it
        if wanted_here and key not in self.real_imports:
            if not self.ready:
                # Its ports may come from a local Service not seen yet: serve nothing rather
                # than ports that may be wrong until everything has been listed.
                return
            slices = {n: s for n, s in dispatched.items()
                      if s.cluster != self.cluster_id
                      and (providers is None or s.cluster in providers)}
            if providers is None or self.cluster_id in providers:
                slices.update(self.local.get(key, {}))
                for (ns, name), error in self.local_errors.items():
                    if self.local_keys.get((ns, name)) == key:
                        self.reject(error)
            try:
                spec = parse_service_import(self._import_object(key, mcs, slices))
            except ManifestError as exc:
                what = "MultiClusterService" if mcs is not None else "Karmada service"
                self._reject(ManifestError(f"{what} {key}: {exc}"))
                self._refresh_moved()
                return  # whatever was served for the key stays
            except AllocationError as exc:
                # No address is ours: what was served (at one another may have now) goes.
                # The key stays ranked: the allocator gives it the first address a fresh
                # placement would, and it comes back here as moved (it was unranked, and
                # stayed unserved while every gateway started since served it).
                log.error("kube source: Karmada service %s not served: %s; served once an "
                          "address is free", key, exc)
                full = True
            else:
                wanted[ObjectId(self.source, KIND_IMPORT, key.namespace, key.name)] = spec
                for name, slice_spec in slices.items():
                    wanted[ObjectId(self.source, KIND_SLICE, key.namespace, name)] = slice_spec
        if not wanted and not full:
            self._moved |= self.allocator.unplace(key)
        for oid in self._written.get(key, set()) - wanted.keys():
            self.store.delete(oid)
        for oid, spec in wanted.items():
            self.store.upsert(oid, spec)
        if wanted:
            self._written[key] = set(wanted)
        else:
            self._written.pop(key, None)
        self.changed()
        self._refresh_moved()

    def _refresh_moved(self) -> None:
        """Publish again the services whose ClusterSetIPs the last allocation moved (an
        older service placed before them, or one that went: ClusterSetIPAllocator.place)."""
        while self._moved:
            moved = self._oldest_first(self._moved)
            self._moved = set()
            for key in moved:
                self.refresh(key)

    def _import_object(self, key: ServiceKey, mcs: McsInfo | None,
                       slices: Mapping[str, SliceSpec]) -> dict[str, Any]:
        service = self.services.get(key, {})
        headless = bool(service.get("headless"))
        if "ports" in service:
            ports = service.get("ports") or []
        else:
            seen: dict[tuple[str, str], int] = {}
            for slice_spec in slices.values():
                for ep in slice_spec.endpoints:
                    for p in ep.ports:
                        seen.setdefault((p.name, p.protocol), p.port)
            ports = [{"name": n, "protocol": proto, "port": port}
                     for (n, proto), port in sorted(seen.items())]
        spec: dict[str, Any] = {
            "type": "Headless" if headless else "ClusterSetIP",
            "ports": [{k: p[k] for k in ("name", "protocol", "port", "appProtocol") if k in p}
                      if isinstance(p, Mapping) else p for p in ports],
        }
        for field in ("sessionAffinity", "sessionAffinityConfig", "trafficDistribution"):
            if field in service:
                spec[field] = service[field]
        if not headless:
            families = service.get("ipFamilies") or ()
            asked = families if isinstance(families, list) else ()
            ips, moved = self.allocator.place(key, asked, self._created(key))
            self._moved |= moved
            if not ips:
                raise AllocationError(self.allocator.full_message(asked))
            spec["ips"] = list(ips)
        else:  # headless (perhaps turned so): no address
            self._moved |= self.allocator.unplace(key)
        clusters = sorted({s.cluster for s in slices.values()})
        return {
            "metadata": {"name": key.name, "namespace": key.namespace,
                         "annotations": (mcs.annotations if mcs is not None
                                         else service.get("annotations") or {})},
            "spec": spec,
            "status": {"clusters": [{"cluster": c} for c in clusters]},
        }
