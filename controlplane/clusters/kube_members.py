"""The member clusters named by labelled Secrets in the host cluster (`--member-secrets`).

Every Secret in the namespace labelled `mcsproxy.io/member-cluster` holds a kubeconfig
under the key `kubeconfig`; the label's value is the cluster ID (the Secret's name when
empty). A leadership term lists them once (`load()`), then lists and watches them for
the rest of the term (`watch()`), so a member Secret added, removed or changed takes
effect without a restart of the process.

What fails where, and why:
- Before the first successful list there is nothing to serve. A transient failure (5xx,
  429, refused, timed out) is retried with backoff; a 4xx answer (RBAC Forbidden, a bad
  token) or no usable member Secret at all is a configuration error no retry fixes, and
  ends the controller with its message, which is where an operator looks.
- After it, the members keep being served whatever the host's API server does (static
  stability, as for the members themselves): any failure is retried with backoff, with
  the last good set kept. A streak of failures is logged once, its end once.
- A Secret whose kubeconfig turns invalid keeps its last good kubeconfig (an error says
  so, once per distinct problem); a deleted Secret removes its member. A set that would
  become empty is not applied: a controller without members does nothing, and losing
  every Secret at once is far likelier a mistake than the intent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import yaml
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import Configuration

from controlplane.clusters import ClusterError
from controlplane.clusters.kube import KubeTimings
from controlplane.clusters.kube_api import (
    KubeApi,
    KubeApiError,
    Obj,
    WatchExpired,
    WatchRefused,
)
from controlplane.metrics import ControllerMetrics
from mcsproxy.backoff import Backoff
from mcsproxy.config import CLUSTER_ID_RE

log = logging.getLogger("controlplane.kube")

MEMBER_LABEL = "mcsproxy.io/member-cluster"
KUBECONFIG_KEY = "kubeconfig"
Kubeconfig = dict[str, Any]
_SHORT_WATCH_S = 1.0  # a watch that ends sooner without events counts as a failed attempt


def check_cluster_id(cluster: str, where: str) -> str:
    if not CLUSTER_ID_RE.match(cluster) or len(cluster) > 253:
        raise ValueError(f"{where}: {cluster!r} is not an RFC-1123 cluster ID")
    return cluster


def member_from_secret(secret: Mapping[str, Any]) -> tuple[str, Kubeconfig]:
    """A member Secret → (cluster ID, kubeconfig dict); ValueError says what is wrong."""
    meta = secret.get("metadata") or {}
    name = str(meta.get("name"))
    cluster = (meta.get("labels") or {}).get(MEMBER_LABEL) or name
    check_cluster_id(cluster, f"Secret {name}")
    raw = (secret.get("data") or {}).get(KUBECONFIG_KEY)
    if not raw:
        raise ValueError(f"Secret {name}: no {KUBECONFIG_KEY!r} key")
    try:
        doc = yaml.safe_load(base64.b64decode(raw))
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"Secret {name}: {KUBECONFIG_KEY} is not a kubeconfig: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"Secret {name}: {KUBECONFIG_KEY} is not a kubeconfig mapping")
    return cluster, doc


async def check_kubeconfig(name: str, doc: Kubeconfig) -> None:
    """ValueError unless a client can be configured from `doc` (as the term will do):
    a mapping without a usable context must not replace a working kubeconfig."""
    try:
        await kube_config.load_kube_config_from_dict(
            config_dict=copy.deepcopy(doc), client_configuration=Configuration())
    except Exception as exc:
        # The loader meets malformed input with AttributeError or AssertionError too: any
        # of them means "not usable", and none may end the watch serving the others.
        text = str(exc) or type(exc).__name__
        raise ValueError(f"Secret {name}: {KUBECONFIG_KEY} is not usable: {text}") from None


def _name(secret: Mapping[str, Any]) -> str:
    return str((secret.get("metadata") or {}).get("name"))


class MemberSecrets:
    """The member Secrets of one namespace: `members` is the set the controller runs on."""

    def __init__(self, api: KubeApi, namespace: str, timings: KubeTimings,
                 metrics: ControllerMetrics | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.timings = timings
        self.metrics = metrics
        self.path = f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets"
        self.members: dict[str, Kubeconfig] = {}  # cluster ID → kubeconfig
        self._good: dict[str, tuple[str, Kubeconfig]] = {}  # Secret → last usable member
        self._reported: dict[str, str] = {}  # Secret → its problem, as last logged
        self._duplicates: set[str] = set()  # cluster IDs reported as claimed twice
        self._kept_empty = False  # an empty set was refused and said so
        self._rv: str | None = None  # None: list before watching
        self._failures = 0  # failed requests in the current streak

    # -- reading -------------------------------------------------------------------------
    async def load(self) -> dict[str, Kubeconfig]:
        """The first list of a term: retried while the failure is transient."""
        backoff = Backoff(self.timings.backoff_base_s, self.timings.backoff_cap_s)
        while True:
            try:
                items, rv = await self.api.list(self.path, MEMBER_LABEL)
            except KubeApiError as exc:
                self._count_failure()
                raise ClusterError(f"member Secrets in namespace {self.namespace}: {exc}") \
                    from None
            except ClusterError as exc:
                self._failed(exc)
                await asyncio.sleep(backoff.next())
                continue
            self._recovered()
            await self._replace(items, rv)
            if not self.members:
                raise ClusterError(f"no member Secrets labelled {MEMBER_LABEL} in namespace "
                                   f"{self.namespace}")
            return self.members

    async def watch(self, changed: Callable[[], None]) -> None:
        """Keep `members` current until cancelled; `changed()` whenever the set differs."""
        backoff = Backoff(self.timings.backoff_base_s, self.timings.backoff_cap_s)
        while True:
            delay = 0.0
            try:
                if self._rv is None:
                    items, rv = await self.api.list(self.path, MEMBER_LABEL)
                    self._recovered()
                    if await self._replace(items, rv):
                        changed()
                if await self._watch_once(changed):
                    backoff.reset()
                else:
                    delay = backoff.next()
            except WatchExpired:
                log.info("member Secrets watch expired (410 Gone): relisting")
                self._rv = None
                if self.metrics is not None:
                    self.metrics.relists_gone.labels("", "secrets").inc()
            except ClusterError as exc:
                self._failed(exc)
                delay = backoff.next()
                if isinstance(exc, WatchRefused):  # answered with an error: list again
                    self._rv = None
            if delay:
                await asyncio.sleep(delay)

    async def _watch_once(self, changed: Callable[[], None]) -> bool:
        """One watch request; False when it ended at once with nothing (retry later)."""
        assert self._rv is not None
        loop = asyncio.get_running_loop()
        started, events = loop.time(), 0
        timeout_s = self.timings.watch_timeout_s * random.uniform(1.0, 2.0)
        stream = self.api.watch(self.path, self._rv, label_selector=MEMBER_LABEL,
                                timeout_s=timeout_s,
                                idle_s=timeout_s + self.timings.request_timeout_s)
        async with contextlib.aclosing(stream) as lines:
            async for event in lines:
                kind = event["type"]
                if kind == "OPEN":
                    self._recovered()
                    continue
                if kind == "BROKEN":
                    log.debug("member Secrets watch broke (%s)", event["error"])
                    continue
                events += 1
                obj = event["object"]
                if kind == "DELETED":
                    self._forget(_name(obj))
                elif kind in ("ADDED", "MODIFIED"):
                    await self._read(obj)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self._rv = str(rv)
                if kind != "BOOKMARK" and self._apply():
                    changed()
        return events > 0 or loop.time() - started >= _SHORT_WATCH_S

    # -- failure streaks -----------------------------------------------------------------
    def _count_failure(self) -> None:
        if self.metrics is not None:
            self.metrics.member_secret_errors.inc()

    def _failed(self, exc: ClusterError) -> None:
        self._count_failure()
        self._failures += 1
        if self._failures > 1:  # the streak was reported when it began
            log.debug("member Secrets in namespace %s: still failing: %s", self.namespace, exc)
            return
        kept = (f"keeping the {len(self.members)} member clusters" if self.members
                else "no member clusters yet")
        log.error("member Secrets in namespace %s cannot be read (%s): %s, retrying with "
                  "backoff", self.namespace, exc, kept)

    def _recovered(self) -> None:
        if self._failures:
            log.info("member Secrets in namespace %s readable again after %d failed attempts",
                     self.namespace, self._failures)
            self._failures = 0

    # -- Secrets → members ---------------------------------------------------------------
    async def _replace(self, items: Iterable[Obj], rv: str) -> bool:
        """A full list: what it lacks was deleted. True when `members` changed."""
        seen = set()
        for secret in items:
            seen.add(_name(secret))
            await self._read(secret)
        for name in set(self._good) | set(self._reported):
            if name not in seen:
                self._forget(name)
        self._rv = rv
        return self._apply()

    async def _read(self, secret: Mapping[str, Any]) -> None:
        name = _name(secret)
        try:
            member = member_from_secret(secret)
            if self._good.get(name) != member:
                await check_kubeconfig(name, member[1])
        except ValueError as exc:
            problem = str(exc)
            if self._reported.get(name) != problem:
                self._reported[name] = problem
                what = ("keeping its last good kubeconfig for cluster "
                        f"{self._good[name][0]}" if name in self._good else "skipped")
                log.error("member Secrets in namespace %s: %s: %s", self.namespace, problem,
                          what)
            return
        if self._reported.pop(name, None) is not None:
            log.info("member Secret %s/%s is usable again", self.namespace, name)
        self._good[name] = member

    def _forget(self, name: str) -> None:
        self._good.pop(name, None)
        self._reported.pop(name, None)

    def _apply(self) -> bool:
        """Make `members` what the Secrets say; True when it changed."""
        members: dict[str, Kubeconfig] = {}
        duplicates = set()
        for name, (cluster, doc) in sorted(self._good.items()):
            if cluster in members:
                duplicates.add(cluster)
                if cluster not in self._duplicates:
                    log.error("member Secrets in namespace %s: Secret %s is a second one for "
                              "cluster %s: the first by name is used", self.namespace, name,
                              cluster)
                continue
            members[cluster] = doc
        self._duplicates = duplicates
        if not members and self.members:
            if not self._kept_empty:
                log.error("member Secrets in namespace %s: none usable is left: keeping the "
                          "last %d member clusters", self.namespace, len(self.members))
            self._kept_empty = True
            return False
        self._kept_empty = False
        if members == self.members:
            return False
        self.members = members
        return True
