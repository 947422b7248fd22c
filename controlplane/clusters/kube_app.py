"""`mcsproxy controller` in Kubernetes mode: members from kubeconfig contexts or from
Secrets, one leader at a time on a Lease, the gateway stream while leading.

Members come from `--kubeconfig PATH --contexts a,b=cluster-b` (the cluster ID is the
context name unless given after `=`), or, in-cluster, from `--member-secrets NAMESPACE`:
every Secret there labelled `mcsproxy.io/member-cluster` holds a kubeconfig under the key
`kubeconfig`; the label's value is the cluster ID (the Secret's name when empty). The
Lease lives in the first context's cluster, or with the Secrets in their own cluster.
The --serve listener runs for the whole process: health and readiness on a standby too,
the stream and member status only while leading.

Each leadership term builds fresh member clients and reads each once, then reconciles
and serves until the term ends. A member that does not answer that read is not waited
for: it is tried again in the background and joins once it answers, and until then what
it contributed to the services it may export is left everywhere as last written (a
member not read yet would look like one without exports, and its imports elsewhere would
be deleted: controller.py says which services wait, and what of them still changes). A
member that fails after its first read, while the term starts, starts the reading over
after a backoff, never ends the term.

With --member-secrets the Secrets are watched for the whole term (kube_members.py says
what is retried and what is fatal): when the set of members changes, the term's
controller is rebuilt on the new set the way a term starts, every member read again. A
member whose kubeconfig changed (the same members otherwise) is only connected anew in
the running controller (Controller.reconnect): its old connection serves until the new
one has read it, and no other member, service or gateway stream is touched.
Changes in quick succession (a rollout updating several Secrets) make one rebuild: it
waits until the set has held still for MEMBER_SETTLE_S (at most MEMBER_SETTLE_MAX_S),
the current controller serving meanwhile, and takes the latest set. A removed member is
no longer read or written: its exports leave the other members, and what was imported
into it stays as last written (nothing can reach it any more), which a warning says.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient

from controlplane.allocator import DEFAULT_CIDR, parse_cidrs
from controlplane.clusters import ClusterError
from controlplane.clusters.kube import MANAGED_SELECTOR, KubeClusterClient, KubeTimings
from controlplane.clusters.kube_api import KubeApi
from controlplane.clusters.kube_holds import KubeHoldStore
from controlplane.clusters.kube_members import (
    KUBECONFIG_KEY,
    MEMBER_LABEL,
    Kubeconfig,
    MemberSecrets,
    check_cluster_id,
    member_from_secret,
)
from controlplane.command import parse_cluster_cidrs, serve_token, stream_limits_from_args
from controlplane.controller import Controller
from controlplane.leader import LeaderElector, LeaseConfig
from controlplane.metrics import ControllerMetrics
from controlplane.resources import KIND_IMPORT, KIND_SLICE
from controlplane.server import ControllerServer
from controlplane.stream import HEARTBEAT_S, StreamHub, StreamLimits
from mcsproxy.backoff import Backoff
from mcsproxy.kubeclient import SERVICE_ACCOUNT_DIR, InCluster, KubeconfigFile, new_client
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("controlplane.kube")

# A changed member set is applied once it held still this long, or this long at most
# after the first change (Secrets that keep changing still get applied).
MEMBER_SETTLE_S = 1.0
MEMBER_SETTLE_MAX_S = 5.0

__all__ = ["KUBECONFIG_KEY", "MEMBER_LABEL", "KubeControllerApp", "KubeControllerConfig",
           "check_cluster_id", "config_from_args", "member_from_secret", "run"]


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def parse_contexts(text: str) -> tuple[tuple[str, str], ...]:
    """`a,b=cluster-b` → ((context, cluster ID), ...)."""
    found: list[tuple[str, str]] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        context, _, cluster = item.partition("=")
        context, cluster = context.strip(), (cluster.strip() or context.strip())
        found.append((context, check_cluster_id(cluster, f"--contexts {item}")))
    if not found:
        raise ValueError("--contexts names no context")
    ids = [c for _, c in found]
    if len(set(ids)) != len(ids):
        raise ValueError("--contexts: a cluster ID appears twice")
    return tuple(found)


@dataclass(frozen=True)
class KubeControllerConfig:
    kubeconfig: Path | None = None
    contexts: tuple[tuple[str, str], ...] = ()
    member_secrets: str | None = None  # namespace of the member Secrets (in-cluster mode)
    serve: tuple[str, int] | None = None
    clusterset_cidr: str = DEFAULT_CIDR
    cluster_cidrs: tuple[tuple[str, str], ...] = ()
    leader_elect: bool = True
    lease_namespace: str | None = None  # default: --member-secrets or kube-system
    lease_name: str = "mcsproxy-controller"
    lease_duration_s: float = 15.0
    identity: str = field(default_factory=default_identity)
    heartbeat_s: float = HEARTBEAT_S
    stream_limits: StreamLimits = field(default_factory=StreamLimits)
    serve_token_file: Path | None = None  # the stream and /status demand this bearer token
    timings: KubeTimings = field(default_factory=KubeTimings)
    service_account_dir: Path = SERVICE_ACCOUNT_DIR  # in-cluster: token and ca.crt

    def __post_init__(self) -> None:
        if bool(self.contexts) == bool(self.member_secrets):
            raise ValueError("Kubernetes mode needs --contexts or --member-secrets (one)")
        serve_token(self.serve_token_file)  # a bad token file stops the start

    def lease(self) -> LeaseConfig:
        duration = self.lease_duration_s
        return LeaseConfig(
            namespace=self.lease_namespace or self.member_secrets or "kube-system",
            identity=self.identity, name=self.lease_name, lease_duration_s=duration,
            renew_deadline_s=duration * 2 / 3, retry_period_s=duration / 7.5)


async def _client_for(kubeconfig: Path | None, context: str | None,
                      service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiClient:
    """The host cluster: a kubeconfig context, else the pod's service account; either
    reloaded as its credentials rotate (mcsproxy.kubeclient)."""
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return await new_client(InCluster(service_account_dir))
    try:
        return await new_client(KubeconfigFile(kubeconfig, context))
    except (kube_config.ConfigException, OSError, ValueError, KeyError) as exc:
        raise ClusterError(f"kubeconfig {kubeconfig or '(default)'}: {exc}") from None


class KubeControllerApp:
    def __init__(self, config: KubeControllerConfig) -> None:
        self.config = config
        self.metrics = ControllerMetrics()
        self.controller: Controller | None = None
        self.server: ControllerServer | None = None
        self.elector: LeaderElector | None = None
        self.led = asyncio.Event()  # set once the first term has reconciled everything
        self.rebuilds = 0  # controllers rebuilt on a changed member set
        self.reconnects = 0  # members connected anew for a changed kubeconfig (no rebuild)
        self._host: ApiClient | None = None
        self._stop = asyncio.Event()

    async def _host_client(self) -> ApiClient:
        if self._host is None:
            cfg = self.config
            context = cfg.contexts[0][0] if cfg.contexts else None
            self._host = await _client_for(cfg.kubeconfig, context, cfg.service_account_dir)
        return self._host

    async def _clients(self, members: Mapping[str, Kubeconfig] | None,
                       into: list[KubeClusterClient]) -> None:
        """A client per member (from the contexts when `members` is None), into `into` as
        they are made, so the caller closes those made before one failed."""
        cfg = self.config
        if members is None:
            for context, cluster in cfg.contexts:
                into.append(await KubeClusterClient.from_kubeconfig(
                    cluster, cfg.kubeconfig, context, cfg.timings))
                self._attach(into[-1])
        else:
            for cluster, doc in members.items():
                into.append(await KubeClusterClient.from_kubeconfig_dict(
                    cluster, doc, cfg.timings))
                self._attach(into[-1])

    def _attach(self, client: KubeClusterClient) -> None:
        """The fence its writes ask, and the counter its relists after 410 go to."""
        client.fence = self._fence
        relists, cluster = self.metrics.relists_gone, client.cluster_id
        client.on_relist_gone = lambda resource: relists.labels(cluster, resource).inc()

    @property
    def _fence(self) -> Callable[[], float] | None:
        """What the members' writes ask before each is sent (leader.py, fencing)."""
        return None if self.elector is None else self.elector.write_time_left

    async def _hold_store(self) -> KubeHoldStore:
        """The held ClusterSetIPs beside the Lease, written under the same fence."""
        cfg = self.config
        api = KubeApi(await self._host_client(), "holds", cfg.timings.request_timeout_s)
        return KubeHoldStore(api, cfg.lease().namespace, fence=self._fence,
                             backoff_base_s=cfg.timings.backoff_base_s,
                             backoff_cap_s=cfg.timings.backoff_cap_s)

    async def _read_once(self, clients: list[KubeClusterClient]
                         ) -> tuple[list[KubeClusterClient], list[KubeClusterClient]]:
        """Every member read once, all at the same time (each within the request
        timeout): those that answered, and those that did not."""
        results = await asyncio.gather(*(c.sync() for c in clients), return_exceptions=True)
        read, unread = [], []
        for client, result in zip(clients, results, strict=True):
            if not isinstance(result, BaseException):
                read.append(client)
            elif isinstance(result, ClusterError):
                unread.append(client)  # the client logged it
            else:
                raise result
        return read, unread

    async def _start_controller(
            self, clients: list[KubeClusterClient]) -> tuple[Controller, StreamHub | None]:
        """A controller that has read every member that answers and reconciled once.

        A member that does not answer its first read is unread: the controller tries it
        again in the background, and the keys it may export wait for it (controller.py).
        A member failing after it answered (one 503) starts it over after a backoff: it
        is not the end of the term, which would end the process; the next try gives each
        member one read again, so a member that stays down is not waited for. Each try
        starts from nothing, so no half-read member state is carried over."""
        cfg = self.config
        backoff = Backoff(cfg.timings.backoff_base_s, cfg.timings.backoff_cap_s)
        failing = ""
        while True:
            read, unread = await self._read_once(clients)
            hub = (StreamHub(self.metrics, cfg.heartbeat_s, cfg.stream_limits)
                   if cfg.serve else None)
            controller = Controller(read, cidrs=cfg.clusterset_cidr,
                                    cluster_cidrs=dict(cfg.cluster_cidrs), metrics=self.metrics,
                                    publisher=hub, holds=await self._hold_store(),
                                    unread=unread,
                                    retry=(cfg.timings.backoff_base_s, cfg.timings.backoff_cap_s))
            if hub is not None:  # an unread member's feed is added once it is read
                for c in controller.clients:
                    hub.attach(c, controller.written.setdefault(c, {}))
            try:
                await controller.start()
            except ClusterError as exc:
                if str(exc) != failing:  # once per distinct failure, not every retry
                    log.error("reading members failed (%s): starting over", exc)
                failing = str(exc)
                await asyncio.sleep(backoff.next())
                continue
            if failing:
                log.info("members read after earlier failures")
            return controller, hub

    async def lead(self) -> None:
        """One term as the writer: until cancelled."""
        cfg = self.config
        if cfg.member_secrets is None:
            await self._serve_members(None)
            return
        api = KubeApi(await self._host_client(), "host", cfg.timings.request_timeout_s)
        secrets = MemberSecrets(api, cfg.member_secrets, cfg.timings, self.metrics)
        await secrets.load()
        changed = asyncio.Event()
        watch = spawn(secrets.watch(changed.set), name="member Secrets watch")
        serving: asyncio.Task[None] | None = None
        try:
            while True:
                changed.clear()  # before reading the set: a later change wakes us again
                members = dict(secrets.members)
                serving = spawn(self._serve_members(members), name="controller")
                tasks = (serving, watch)
                while True:
                    while secrets.members == members:  # (a set changed back is no change)
                        if not await _changed(changed, tasks, None):
                            return
                        if not await _settled(changed, tasks):
                            return
                    if not await self._reconnect_changed(members, secrets.members):
                        break
                    members = dict(secrets.members)
                _report_departed(self.controller, members, secrets.members)
                await cancel_and_wait([serving])
                self.rebuilds += 1
                log.info("member clusters changed (%s): restarting the controller on them",
                         _difference(members, secrets.members))
        finally:
            await cancel_and_wait([t for t in (serving, watch) if t is not None])

    async def _reconnect_changed(self, old: Mapping[str, Kubeconfig],
                                 new: Mapping[str, Kubeconfig]) -> bool:
        """The same members, some with a new kubeconfig: only those are connected anew,
        in the running controller. False when that does not do (a member came or left,
        or no controller runs yet): the controller is rebuilt instead."""
        controller = self.controller
        if controller is None or old.keys() != new.keys():
            return False
        changed = sorted(c for c in new if new[c] != old[c])
        clients: list[KubeClusterClient] = []
        try:
            await self._clients({c: new[c] for c in changed}, clients)
        except ClusterError as exc:
            log.error("member clusters changed (%s) but cannot be connected (%s): "
                      "restarting the controller on them", _difference(old, new), exc)
            for client in clients:
                await client.close()
            return False
        for client in clients:
            controller.reconnect(client)
        self.reconnects += len(clients)
        log.info("member clusters changed (%s): reconnecting them, the other members left "
                 "as they are", _difference(old, new))
        return True

    async def _serve_members(self, members: Mapping[str, Kubeconfig] | None) -> None:
        """The controller over one set of members (the contexts when None), until
        cancelled."""
        clients: list[KubeClusterClient] = []
        controller: Controller | None = None
        try:
            await self._clients(members, clients)
            controller, hub = await self._start_controller(clients)
            self.controller = controller
            log.info("controller reconciled clusters=%s%s", ",".join(controller.clients),
                     f" (not read yet: {','.join(sorted(controller.unread))})"
                     if controller.unread else "")
            if self.server is not None and hub is not None:
                self.server.lead(controller, hub)
            self.led.set()
            await controller.run()
        finally:
            self.controller = None
            if self.server is not None:
                self.server.stand_by()
            if controller is not None:
                await controller.close()
            else:
                for client in clients:
                    await client.close()

    async def run(self) -> None:
        """Until stop(): lead when elected (or at once without leader election).

        The listener (--serve) is up the whole time, so a standby answers its probes."""
        cfg = self.config
        if cfg.serve is not None:
            self.server = ControllerServer(None, None, cfg.serve, metrics=self.metrics,
                                           token=serve_token(cfg.serve_token_file))
            await self.server.start()
        try:
            await self._run_terms()
        finally:
            if self.server is not None:
                await self.server.stop()
                self.server = None

    async def _run_terms(self) -> None:
        cfg = self.config
        if cfg.leader_elect:
            api = KubeApi(await self._host_client(), "lease", cfg.timings.request_timeout_s)
            self.elector = LeaderElector(api, cfg.lease())
            work = spawn(self.elector.run(self.lead), name="leader election")
        else:
            work = spawn(self.lead(), name="controller term")
        stop = spawn(self._stop.wait(), name="controller stop signal")
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([work, stop])
            if self._host is not None:
                await self._host.close()
                self._host = None
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    def stop(self) -> None:
        self._stop.set()


async def _changed(changed: asyncio.Event, tasks: tuple[asyncio.Task[Any], ...],
                   timeout: float | None) -> bool | None:
    """True once `changed` is set, None after `timeout`; False when one of `tasks` (that
    only an error ends) ended: its error is raised."""
    woken = spawn(changed.wait(), name="member Secrets changed")
    try:
        done, _ = await asyncio.wait({woken, *tasks}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([woken])
    for task in tasks:
        if task in done:
            task.result()
            return False
    return True if woken in done else None


async def _settled(changed: asyncio.Event, tasks: tuple[asyncio.Task[Any], ...]) -> bool:
    """Until the member set held still for MEMBER_SETTLE_S (MEMBER_SETTLE_MAX_S at most);
    False as _changed() says."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MEMBER_SETTLE_MAX_S
    while (left := deadline - loop.time()) > 0:
        changed.clear()
        found = await _changed(changed, tasks, min(MEMBER_SETTLE_S, left))
        if found is False:
            return False
        if found is None:
            break
    return True


def _report_departed(controller: Controller | None, old: Mapping[str, Kubeconfig],
                     new: Mapping[str, Kubeconfig]) -> None:
    """A warning per member that left: what we wrote into it stays there, since nothing
    may reach it any more (its Secret, the only credentials, is gone), and only its
    operator can remove it. Said here, where the old controller still knows how much."""
    for cluster in sorted(old.keys() - new.keys()):
        written = controller.written.get(cluster) if controller is not None else None
        # ServiceExport status is written too, but is the exporter's own object.
        count = None if written is None else sum(
            1 for ref in written if ref.kind in (KIND_IMPORT, KIND_SLICE))
        what = "the objects" if count is None else f"{count} objects"
        log.warning("member cluster %s left: %s we wrote there (ServiceImports, imported "
                    "EndpointSlices labelled %s) stay as last written: delete them there "
                    "if it is not coming back", cluster, what, MANAGED_SELECTOR)


def _difference(old: Mapping[str, Kubeconfig], new: Mapping[str, Kubeconfig]) -> str:
    """`+added -removed ~kubeconfig-changed` cluster IDs, for the log."""
    parts = [f"+{c}" for c in sorted(new.keys() - old.keys())]
    parts += [f"-{c}" for c in sorted(old.keys() - new.keys())]
    parts += [f"~{c}" for c in sorted(old.keys() & new.keys()) if old[c] != new[c]]
    return " ".join(parts)


async def run(config: KubeControllerConfig) -> int:
    import signal

    app = KubeControllerApp(config)
    loop = asyncio.get_running_loop()
    # SIGHUP too: its default action killed the process outright, and the standby then
    # waited the Lease out instead of taking over at once.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, app.stop)
    await app.run()
    return 0


def config_from_args(args: Any) -> KubeControllerConfig:
    """The controller's Kubernetes flags → config; ValueError for bad flags."""
    from mcsproxy.config import ConfigError, parse_host_port

    try:
        serve = parse_host_port(args.serve, "--serve") if args.serve else None
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not math.isfinite(args.lease_duration) or args.lease_duration < 3:
        raise ValueError(f"--lease-duration must be at least 3 seconds, not {args.lease_duration}")
    # Checked here, before any connection: the client library would otherwise log a
    # warning and call a missing file "invalid", and a bad range only failed once connected.
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        raise ValueError(f"--kubeconfig {args.kubeconfig}: no such file")
    parse_cidrs(args.clusterset_cidr)
    return KubeControllerConfig(
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        contexts=parse_contexts(args.contexts) if args.contexts else (),
        member_secrets=args.member_secrets,
        serve=serve,
        clusterset_cidr=args.clusterset_cidr,
        cluster_cidrs=parse_cluster_cidrs(args.cluster_cidr),
        leader_elect=args.leader_elect,
        lease_namespace=args.lease_namespace,
        lease_duration_s=float(args.lease_duration),
        identity=args.identity or default_identity(),
        stream_limits=stream_limits_from_args(args),
        serve_token_file=Path(args.serve_token_file) if args.serve_token_file else None,
    )
