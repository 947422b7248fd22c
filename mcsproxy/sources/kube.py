"""`--source kube`: ServiceImports, imported EndpointSlices and Karmada's in the local cluster.

What is watched (each by its own Reflector, kube_watch.py: list + watch, resourceVersion
resume, bookmarks, 410 relist with a diff, backoff with jitter):

- ServiceImports, `multicluster.x-k8s.io` v1alpha1, or v1beta1 when v1alpha1 is not
  served. The two versions have one schema and a CRD serving both stores them once, so
  one version is watched, never both (that would see every import twice).
- EndpointSlices labelled `multicluster.kubernetes.io/service-name` (server-side label
  selector: the cluster's own slices never reach the gateway).
- Karmada: the slices Karmada's dispatch controller writes (selected by their managed-by
  label), MultiClusterServices (`networking.karmada.io/v1alpha1`; optional: Karmada does
  not put them in the members, some installs do), the Services Karmada claims for a
  CrossCluster MultiClusterService (label-selected; a failing list, say Services not
  granted, does not hold back the first sync, nor does one of MultiClusterServices:
  Karmada's services wait for it) and, once the first Karmada service
  appears, Services (for ports) and the cluster's own EndpointSlices (managed-by
  `endpointslice-controller.k8s.io`: the local endpoints of a cluster that is also a
  provider; a failing list of either does not hold back the first sync either: Karmada's
  services wait for both, the rest is published); see kube_karmada.py. A cluster without
  the Karmada CRD answers 404 for MultiClusterServices, which counts as none; it is asked
  again every minute, so installing it later needs no restart.

Every object goes through mcsproxy.manifests; one that does not validate is logged with
its name and skipped, and its last good version keeps serving: the same object's, by
metadata.uid. An object deleted and created again under its name is another object (a
relist after 410 shows no DELETED in between): its invalid version withdraws the deleted
one's, as a live watch's DELETED does. Changes are committed to
the store coalesced (one snapshot per burst, at most every `commit_delay_s`) from the
first complete sync on, also while a watch started later has not listed yet, and each
change costs work for its own service key only.

Static stability: while the API server is unreachable the store keeps serving the last
snapshot; the source reports `connected: false` and the error in /readyz detail and keeps
retrying. The gateway answers SERVFAIL only until the first complete list of everything.

Credentials: `KUBECONFIG` when set (its current context), else the in-cluster service
account, else `~/.kube/config`; reloaded as they rotate or expire (a rewritten token file
or kubeconfig, an exec plugin's expiry, a 401), see mcsproxy.kubeclient.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from mcsproxy.clustersetip import DEFAULT_CIDR, ClusterSetIPAllocator, parse_cidrs
from mcsproxy.kubeclient import (
    SERVICE_ACCOUNT_DIR,
    CredentialSource,
    InCluster,
    KubeconfigFile,
    new_client,
)
from mcsproxy.manifests import (
    LABEL_SERVICE_NAME,
    MCS_GROUP,
    MCS_VERSIONS,
    ManifestError,
    parse_endpoint_slice,
    parse_service_import,
)
from mcsproxy.model import ServiceKey
from mcsproxy.sources.kube_karmada import (
    CLAIMED_SERVICE_SELECTOR,
    KARMADA_GROUP,
    KARMADA_SLICE_SELECTOR,
    NATIVE_SLICE_SELECTOR,
    KarmadaServices,
)
from mcsproxy.sources.kube_watch import (
    Handler,
    Obj,
    Reflector,
    Resource,
    SkipLog,
    WatchTimings,
    object_uid,
    recreated,
)
from mcsproxy.store import ObjectId, SnapshotStore, Spec
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("mcsproxy.sources.kube")

COMMIT_DELAY_S = 0.005
CONFIG_RETRY_S = 10.0

IMPORTS = Resource(MCS_GROUP, MCS_VERSIONS, "serviceimports")
MCS_SLICES = Resource("discovery.k8s.io", ("v1",), "endpointslices", LABEL_SERVICE_NAME)
KARMADA_SLICES = Resource("discovery.k8s.io", ("v1",), "endpointslices",
                          KARMADA_SLICE_SELECTOR)
NATIVE_SLICES = Resource("discovery.k8s.io", ("v1",), "endpointslices", NATIVE_SLICE_SELECTOR)
MULTICLUSTER_SERVICES = Resource(KARMADA_GROUP, ("v1alpha1",), "multiclusterservices")
SERVICES = Resource("", ("v1",), "services")
CLAIMED_SERVICES = Resource("", ("v1",), "services", CLAIMED_SERVICE_SELECTOR)


class CallbackHandler:
    """A kube_watch.Handler made of three functions."""

    def __init__(self, replace: Callable[[Sequence[Obj]], None],
                 upsert: Callable[[Obj], None], delete: Callable[[Obj], None]) -> None:
        self.replace, self.upsert, self.delete = replace, upsert, delete


class StoreHandler:
    """ServiceImports or MCS-labelled slices straight into the store, by object name."""

    def __init__(self, source: KubeSource, kind: str, parse: Callable[[Obj], Spec | None],
                 on_key: Callable[[ServiceKey, int], None] | None = None) -> None:
        self.source = source
        self.kind = kind
        self.parse = parse
        self.on_key = on_key  # (service key, +1 / -1) as objects of a key come and go
        self.known: dict[ObjectId, ServiceKey] = {}
        self.uids: dict[ObjectId, str] = {}  # metadata.uid of the version served

    def _oid(self, obj: Obj) -> ObjectId | None:
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
            self.source.reject(f"{self.kind} without metadata.name")
            return None
        return ObjectId(self.source.name, self.kind, str(meta.get("namespace") or "default"),
                        meta["name"])

    def upsert(self, obj: Obj) -> None:
        oid = self._oid(obj)
        if oid is None:
            return
        try:
            spec = self.parse(obj)
        except ManifestError as exc:
            self.source.reject(str(exc))
            if recreated(self.uids.get(oid), obj):
                # Deleted and created again (a relist after 410 shows no DELETED): the
                # last good version was another object's, and that object is gone.
                self._remove(oid)
            return  # the last good version of this object stays in the store
        if spec is None:
            self._remove(oid)
            return
        old_key = self.known.get(oid)
        self.source.store.upsert(oid, spec)
        self.known[oid] = spec.key
        self.uids[oid] = object_uid(obj)
        if self.on_key is not None and old_key != spec.key:
            if old_key is not None:
                self.on_key(old_key, -1)
            self.on_key(spec.key, +1)
        self.source.changed()

    def delete(self, obj: Obj) -> None:
        oid = self._oid(obj)
        if oid is not None:
            self._remove(oid)

    def _remove(self, oid: ObjectId) -> None:
        key = self.known.pop(oid, None)
        self.uids.pop(oid, None)
        if key is None:
            return
        self.source.store.delete(oid)
        if self.on_key is not None:
            self.on_key(key, -1)
        self.source.changed()

    def replace(self, objects: Sequence[Obj]) -> None:
        listed = {oid for obj in objects if (oid := self._oid(obj)) is not None}
        for oid in self.known.keys() - listed:
            self._remove(oid)
        for obj in objects:
            try:
                self.upsert(obj)
            except Exception as exc:  # one object must not stop the list
                self.source.skipped.skip("kube source", obj, exc, "listed object")


class KubeSource:
    def __init__(
        self,
        cluster_id: str,
        *,
        clusterset_cidr: str = DEFAULT_CIDR,
        kubeconfig: str | None = None,
        timings: WatchTimings | None = None,
        commit_delay_s: float = COMMIT_DELAY_S,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> None:
        self.name = "kube"
        self.cluster_id = cluster_id
        self.kubeconfig = kubeconfig
        self.service_account_dir = service_account_dir
        self.timings = timings or WatchTimings()
        self.commit_delay_s = commit_delay_s
        # Ranked, nothing held: every gateway of the cluster must give a Karmada
        # service the same address (ClusterSetIPAllocator.place).
        self.allocator = ClusterSetIPAllocator(parse_cidrs(clusterset_cidr),
                                               hold_released=False)
        self.store = SnapshotStore(cluster_id)  # replaced by the gateway's in run()
        self.reflectors: list[Reflector] = []
        self._optional: list[Reflector] = []  # their failing does not hold the first sync
        self.karmada: KarmadaServices | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._api: ApiClient | None = None
        self._commit_handle: asyncio.TimerHandle | None = None
        self._import_counts: dict[ServiceKey, int] = {}
        self._synced_once = False
        self.registry = CollectorRegistry(auto_describe=True)
        self.m_connected = Gauge("mcsproxy_source_kube_connected",
                                 "1 while every watch of the kube source is connected",
                                 registry=self.registry)
        self.m_rejected = Counter("mcsproxy_source_kube_rejected_objects",
                                  "Objects rejected by validation (their last good version "
                                  "keeps serving)", registry=self.registry)
        self.m_failed = Counter("mcsproxy_source_kube_failed_objects",
                                "Objects or watch events skipped because applying them "
                                "raised (logged; their last good version keeps serving)",
                                registry=self.registry)
        self.skipped = SkipLog(self.m_failed.inc)  # listed objects; events: per reflector
        self.m_relists = Gauge("mcsproxy_source_kube_relists_gone",
                               "Relists after 410 Gone, over all watches",
                               registry=self.registry)

    # -- lifecycle -------------------------------------------------------------------
    async def run(self, store: SnapshotStore) -> None:
        self.store = store
        status = store.register_source(self.name)
        status.connected = False
        self.karmada = KarmadaServices(store, self.name, self.cluster_id, self.allocator,
                                       changed=self.changed, reject=self.reject,
                                       failed=self._listed_object_failed)
        self.karmada.on_first_service = self._start_services
        # Every import's address (ServiceImports, other sources'), Karmada's excepted, is
        # taken for Karmada's services.
        store.watch_addresses(self.karmada.foreign_addresses)
        try:
            self._api = await self._client(status)
            k = self.karmada
            self._start(IMPORTS, StoreHandler(self, "ServiceImport", parse_service_import,
                                              self._import_counted))
            self._start(MCS_SLICES, StoreHandler(self, "EndpointSlice", parse_endpoint_slice))
            # Optional too: a MultiClusterService list refused (RBAC without them, 5xx from
            # a broken CRD) used to hold back the first sync of everything; Karmada's
            # services wait for it anyway (KarmadaServices.ready).
            self._start(MULTICLUSTER_SERVICES,
                        CallbackHandler(k.mcs_replace, k.mcs_upsert, k.mcs_delete),
                        optional=True)
            self._start(KARMADA_SLICES,
                        CallbackHandler(k.slice_replace, k.slice_upsert, k.slice_delete))
            # Services may be denied (RBAC) in a cluster that serves no Karmada service:
            # that must not hold back the first sync (as for the later Services watch).
            self._start(CLAIMED_SERVICES,
                        CallbackHandler(k.claimed_replace, k.claimed_upsert, k.claimed_delete),
                        optional=True)
            await asyncio.gather(*self._tasks)
        finally:
            if self._commit_handle is not None:
                self._commit_handle.cancel()
            await cancel_and_wait(self._tasks)
            if self._api is not None:
                await self._api.close()

    def _credentials(self) -> CredentialSource:
        path = self.kubeconfig or os.environ.get("KUBECONFIG")
        if path:
            return KubeconfigFile(path.split(os.pathsep)[0])
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return InCluster(self.service_account_dir)
        if Path("~/.kube/config").expanduser().exists():
            return KubeconfigFile(Path("~/.kube/config").expanduser())
        raise kube_config.ConfigException(
            "no KUBECONFIG, no in-cluster service account, no ~/.kube/config")

    async def _client(self, status: Any) -> ApiClient:
        """The API client; retried while no configuration can be loaded."""
        while True:
            try:
                client = await new_client(self._credentials())
                log.info("kube source: API server %s", client.configuration.host)
                return client
            except (kube_config.ConfigException, OSError, ValueError) as exc:
                status.error = f"kubernetes client configuration: {exc}"
                log.error("kube source: %s; retrying in %.0f s", status.error, CONFIG_RETRY_S)
                await asyncio.sleep(CONFIG_RETRY_S * random.uniform(0.8, 1.2))

    def _start(self, resource: Resource, handler: Handler, *, optional: bool = False) -> None:
        assert self._api is not None
        reflector = Reflector(self._api, resource, handler, timings=self.timings,
                              on_state=self._state_changed, on_failed=self.m_failed.inc)
        self.reflectors.append(reflector)
        if optional:
            self._optional.append(reflector)
        self._tasks.append(spawn(reflector.run(), name=f"kube watch {resource.describe()}"))

    def _start_services(self) -> None:
        """Services and the cluster's own slices are watched only once a Karmada service
        (a dispatched slice, a MultiClusterService or a claimed Service) needs their ports
        and endpoints."""
        assert self.karmada is not None
        self.karmada.on_first_service = None
        k = self.karmada
        # Optional for the first sync: started while a dispatched slice or the claimed
        # Services are listed, a failing list would else hold every other service back;
        # Karmada's services wait for them anyway (KarmadaServices.ready).
        self._start(SERVICES, CallbackHandler(k.service_replace, k.service_upsert,
                                              k.service_delete), optional=True)
        self._start(NATIVE_SLICES, CallbackHandler(k.local_replace, k.local_upsert,
                                                   k.local_delete), optional=True)

    # -- state -----------------------------------------------------------------------
    def reject(self, message: str) -> None:
        self.m_rejected.inc()
        log.error("kube source: rejected %s; keeping its last good version", message)

    def _listed_object_failed(self, obj: Obj, exc: Exception) -> None:
        self.skipped.skip("kube source", obj, exc, "listed object")

    def _import_counted(self, key: ServiceKey, delta: int) -> None:
        """A ServiceImport of `key` appeared or went: while one exists it overrides a
        Karmada service of the same name."""
        assert self.karmada is not None
        count = self._import_counts.get(key, 0) + delta
        if count > 0:
            self._import_counts[key] = count
        else:
            self._import_counts.pop(key, None)
        self.karmada.set_real_import(key, count > 0)

    def changed(self) -> None:
        """Something reached the store: commit soon, once for the whole burst.

        Gated on the first sync only, not on every watch being synced now: a watch started
        later (Services, for the first Karmada service) may take long or keep failing
        to list, and that must not hold back every other change.
        """
        if self._commit_handle is None and self._synced_once:
            loop = asyncio.get_running_loop()
            self._commit_handle = loop.call_later(self.commit_delay_s, self._commit)

    def _commit(self) -> None:
        self._commit_handle = None
        status = self.store.register_source(self.name)
        status.objects = self.objects
        status.last_change = time.time()
        self.store.commit()

    @property
    def synced(self) -> bool:
        # An optional watch holds the first sync while it works (so that sync is complete),
        # not while it fails.
        return bool(self.reflectors) and all(
            r.synced or (r in self._optional and r.error is not None) for r in self.reflectors)

    @property
    def objects(self) -> int:
        counted = sum(len(r.handler.known) for r in self.reflectors
                      if isinstance(r.handler, StoreHandler))
        return counted + (self.karmada.served if self.karmada else 0)

    def _state_changed(self) -> None:
        status = self.store.register_source(self.name)
        errors = [f"{r.name}: {r.error}" for r in self.reflectors if r.error]
        status.connected = all(r.connected for r in self.reflectors)
        status.error = "; ".join(errors) or None
        self.m_connected.set(1 if status.connected else 0)
        self.m_relists.set(sum(r.relists_gone for r in self.reflectors))
        if self.synced and not status.synced:
            log.info("kube source synced: %s", ", ".join(
                f"{r.name}={'listed' if r.served else 'not served'}" for r in self.reflectors))
            self.store.mark_synced(self.name)
            self._synced_once = True
            self._commit()
