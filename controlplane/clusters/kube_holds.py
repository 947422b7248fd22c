"""The held ClusterSetIPs (controlplane/holds.py) in Kubernetes mode: the ConfigMap
`mcsproxy-clustersetip-holds` in the controller's own namespace, beside its Lease, the
document under `holds.json`.

Read when a term's controller starts, before it allocates anything; written only by the
leader, each write fenced as its member writes are (leader.py). It carries our managed-by
label: one of that name without it is someone else's, ignored and never overwritten
(logged once). A 4xx on reading (RBAC not granted yet) is logged and the term goes on
without the old holds; a failure to answer ends the attempt to start, which is retried
as a member failing to answer is (kube_app.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from controlplane.clusters import ClusterError
from controlplane.clusters.kube_api import KubeApi, KubeApiError, Obj, fenced
from controlplane.holds import HoldStore
from controlplane.resources import CONTROLLER_MANAGER

log = logging.getLogger("controlplane.kube")

HOLDS_CONFIGMAP = "mcsproxy-clustersetip-holds"
HOLDS_KEY = "holds.json"
LABEL_APP_MANAGED_BY = "app.kubernetes.io/managed-by"
CONFIGMAP_PATH = "/api/v1/namespaces/{namespace}/configmaps"


class KubeHoldStore(HoldStore):
    """The held ClusterSetIPs in the ConfigMap `name` of `namespace` (the module's)."""

    def __init__(self, api: KubeApi, namespace: str, *,
                 fence: Callable[[], float] | None = None, name: str = HOLDS_CONFIGMAP,
                 backoff_base_s: float = 0.2, backoff_cap_s: float = 30.0) -> None:
        super().__init__(backoff_base_s, backoff_cap_s)
        self.api = api
        self.namespace, self.name = namespace, name
        self.fence = fence
        self.where = f"configmap {namespace}/{name}"
        self._collection = CONFIGMAP_PATH.format(namespace=namespace)
        self._version: str | None = None  # resourceVersion as last read or written
        self._exists = False
        self._foreign = False

    def _take(self, obj: Obj) -> bytes | None:
        """Note a ConfigMap read or written; its document, None if it is not ours."""
        meta = obj.get("metadata") or {}
        self._exists = True
        self._version = meta.get("resourceVersion")
        if (meta.get("labels") or {}).get(LABEL_APP_MANAGED_BY) != CONTROLLER_MANAGER:
            if not self._foreign:
                log.error("%s exists and is not managed by us (%s=%s): ignored, and the "
                          "held ClusterSetIPs are not saved while it is there", self.where,
                          LABEL_APP_MANAGED_BY, CONTROLLER_MANAGER)
            self._foreign = True
            return None
        self._foreign = False
        data = (obj.get("data") or {}).get(HOLDS_KEY)
        return data.encode() if isinstance(data, str) else b""

    async def _get(self) -> Obj | None:
        try:
            return await self.api.request("GET", f"{self._collection}/{self.name}")
        except KubeApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def _read(self) -> bytes | None:
        try:
            obj = await self._get()
        except KubeApiError as exc:
            log.error("%s: cannot read (%s): starting without the holds of earlier terms",
                      self.where, exc)
            return None
        return None if obj is None else self._take(obj)

    def _body(self, data: bytes) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                "labels": {LABEL_APP_MANAGED_BY: CONTROLLER_MANAGER}}
        if self._version:
            meta["resourceVersion"] = self._version
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                "data": {HOLDS_KEY: data.decode()}}

    async def _write(self, data: bytes) -> None:
        if self._foreign:
            return  # said when found; not ours to overwrite
        # With the resourceVersion last seen: a 409 (or a 404 or 409 between create and
        # update) reads it again and writes once more, under the same fence.
        for _ in range(2):
            method, path = (("PUT", f"{self._collection}/{self.name}") if self._exists
                            else ("POST", self._collection))
            try:
                async with fenced(self.fence, f"{self.where}: {method}"):
                    written = await self.api.request(method, path, body=self._body(data))
            except KubeApiError as exc:
                if exc.code not in (404, 409):
                    raise
                current = await self._get()
                self._exists, self._version = current is not None, None
                if current is not None and self._take(current) is None:
                    return  # someone else's now
                continue
            self._take(written)
            return
        raise ClusterError(f"{self.where}: changed under us twice while writing")


def holds_json(obj: Obj) -> Any:
    """The document a ConfigMap of ours holds, parsed (for tests and tools)."""
    return json.loads((obj.get("data") or {}).get(HOLDS_KEY) or "null")
