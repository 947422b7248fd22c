"""`mcsproxy controller`: wiring the directory clients, the controller, the stream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from controlplane.allocator import DEFAULT_CIDR, parse_cidrs
from controlplane.clusters import STALE_AFTER_S, ClusterError
from controlplane.clusters.directory import POLL_INTERVAL_S, DirectoryCluster, discover_clusters
from controlplane.controller import Controller
from controlplane.holds import DirectoryHoldStore
from controlplane.metrics import ControllerMetrics
from controlplane.server import LIMITS as SERVE_LIMITS
from controlplane.server import ControllerServer
from controlplane.stream import HEARTBEAT_S, StreamHub, StreamLimits
from mcsproxy.config import CLUSTER_ID_RE
from mcsproxy.tasks import cancel_and_wait, in_daemon_thread, spawn
from mcsproxy.tokenfile import TokenFile, TokenFileError

log = logging.getLogger("controlplane.command")


class ControllerConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ControllerConfig:
    clusters_dir: Path
    output_dir: Path
    once: bool = False
    serve: tuple[str, int] | None = None
    clusterset_cidr: str = DEFAULT_CIDR
    cluster_cidrs: tuple[tuple[str, str], ...] = ()
    poll_interval_s: float = POLL_INTERVAL_S
    stale_after_s: float = STALE_AFTER_S  # a member folder unreadable this long is stale
    heartbeat_s: float = HEARTBEAT_S
    stream_limits: StreamLimits = field(default_factory=StreamLimits)
    serve_token_file: Path | None = None  # the stream and /status demand this bearer token

    def __post_init__(self) -> None:
        try:
            parse_cidrs(self.clusterset_cidr)
            for cluster, cidr in self.cluster_cidrs:
                parse_cidrs(cidr, f"--cluster-cidr {cluster}={cidr}")
        except ValueError as exc:
            raise ControllerConfigError(str(exc)) from None
        if not self.clusters_dir.is_dir():
            raise ControllerConfigError(f"--clusters-dir {self.clusters_dir}: not a directory")
        if self.output_dir.resolve() == self.clusters_dir.resolve():
            raise ControllerConfigError("--output-dir must differ from --clusters-dir")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            # It failed later as "mcsproxy: error: OUT: File exists", exit 1, no flag named.
            raise ControllerConfigError(f"--output-dir {self.output_dir}: not a directory")
        serve_token(self.serve_token_file)  # a bad token file stops the start


def parse_cluster_cidrs(values: list[str]) -> tuple[tuple[str, str], ...]:
    """`--cluster-cidr east=127.240.1.0/24` (repeatable) → ((cluster, cidr), ...)."""
    pairs: dict[str, str] = {}
    for value in values:
        cluster, sep, cidr = value.partition("=")
        if not sep or not cluster or not cidr:
            raise ControllerConfigError(f"--cluster-cidr: expected CLUSTER=CIDR, got {value!r}")
        if not CLUSTER_ID_RE.match(cluster):
            raise ControllerConfigError(f"--cluster-cidr {value}: {cluster!r} is not an "
                                        "RFC-1123 cluster ID")
        if cluster in pairs:
            raise ControllerConfigError(f"--cluster-cidr: {cluster} given twice")
        try:
            parse_cidrs(cidr, f"--cluster-cidr {value}")
        except ValueError as exc:
            raise ControllerConfigError(str(exc)) from None
        pairs[cluster] = cidr
    return tuple(sorted(pairs.items()))


def stream_limits_from_args(args: argparse.Namespace) -> StreamLimits:
    """--stream-write-timeout and --stream-queue-bytes, in either mode."""
    try:
        return StreamLimits(args.stream_write_timeout, args.stream_queue_bytes)
    except ValueError as exc:
        raise ControllerConfigError(str(exc)) from None


class DirectoryControllerApp:
    """The controller in directory mode, with its optional stream listener."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.metrics = ControllerMetrics()
        self.hub = (StreamHub(self.metrics, config.heartbeat_s, config.stream_limits)
                    if config.serve else None)
        self.controller: Controller | None = None
        self.server: ControllerServer | None = None
        self._tasks: list[asyncio.Task[object]] = []
        self._stop = asyncio.Event()
        self._rejected: dict[Path, str] = {}  # DIR's folders that cannot be a cluster, as logged

    def _client(self, cluster: str) -> DirectoryCluster:
        return DirectoryCluster(cluster, self.config.clusters_dir, self.config.output_dir,
                                self.config.poll_interval_s, self.config.stale_after_s)

    async def start(self) -> Controller:
        clusters, rejected = discover_clusters(self.config.clusters_dir)
        if rejected:  # at start, fatal as a bad file is: the operator is there to rename it
            path, reason = min(rejected.items())
            raise ClusterError(f"{path}: {reason}")
        if not clusters:
            raise ClusterError(f"--clusters-dir {self.config.clusters_dir}: no cluster folders")
        try:
            self.config.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # "/proc/x: No such file or directory" named no flag
            raise OSError(exc.errno, f"--output-dir {self.config.output_dir}: cannot create: "
                                     f"{exc.strerror}") from None
        # A folder of OUT whose member folder is away (a volume not mounted yet, a checkout
        # under way) is a member not read, as one that stops answering in Kubernetes mode:
        # what it may export waits for it. Before, a restart then unexported its services
        # everywhere, while the same folder going away under a running controller only
        # made them stale. A member that left for good has its OUT folder removed too.
        away, _ = discover_clusters(self.config.output_dir)
        unread = []
        for cluster in away:
            if cluster not in clusters:
                client = self._client(cluster)
                with contextlib.suppress(ClusterError):  # its error, for the log and /status
                    await client.sync()
                unread.append(client)
        controller = Controller([self._client(c) for c in clusters],
                                cidrs=self.config.clusterset_cidr,
                                cluster_cidrs=dict(self.config.cluster_cidrs),
                                metrics=self.metrics,
                                publisher=self.hub,
                                holds=DirectoryHoldStore(self.config.output_dir),
                                unread=unread,
                                retry=(self.config.poll_interval_s,
                                       max(1.0, self.config.poll_interval_s)))
        self.controller = controller
        if self.hub is not None:
            for c in clusters:
                self.hub.attach(c, controller.written.setdefault(c, {}))
        await controller.start()
        for cluster in clusters:  # so that a member with nothing written is remembered too
            with contextlib.suppress(OSError):  # (one that cannot be written says so itself)
                (self.config.output_dir / cluster).mkdir(exist_ok=True)
        log.info("controller reconciled clusters=%s services=%d%s", ",".join(clusters),
                 controller.imported_count,
                 f" (not read yet: {','.join(sorted(controller.unread))})"
                 if controller.unread else "")
        return controller

    async def _discover(self) -> None:
        """Folders that appear later join the clusterset."""
        assert self.controller is not None
        while True:
            await asyncio.sleep(max(1.0, self.config.poll_interval_s))
            try:
                found, rejected = await in_daemon_thread(
                    partial(discover_clusters, self.config.clusters_dir), "discover clusters")
            except (ClusterError, OSError) as exc:  # tried again: discovery never ends
                log.error("%s", exc)
                continue
            self._report_rejected(rejected)
            for cluster in found:
                if cluster in self.controller.clients or cluster in self.controller.unread:
                    continue  # (an unread member is adopted by the controller once read)
                client = self._client(cluster)
                try:
                    await self.controller.add_cluster(client)
                except (ClusterError, OSError) as exc:
                    log.error("new cluster %s not added yet: %s", cluster, exc)
                    self.controller.clients.pop(cluster, None)
                    continue
                with contextlib.suppress(OSError):  # remembered (start()); else said by writes
                    (self.config.output_dir / cluster).mkdir(exist_ok=True)
                if self.hub is not None:
                    self.hub.attach(cluster, self.controller.written[cluster])
                    self.hub.set_members(self.controller.members())
                log.info("cluster %s joined", cluster)

    def _report_rejected(self, rejected: dict[Path, str]) -> None:
        """Each folder that cannot be a cluster, said once (discovery looks every second),
        and again only if it changes; the other folders join regardless."""
        for path, reason in sorted(rejected.items()):
            if self._rejected.get(path) != reason:
                log.error("ignoring %s: %s; the other cluster folders are still served",
                          path, reason)
        for path in sorted(self._rejected.keys() - rejected.keys()):
            log.info("%s: gone or renamed, no longer ignored", path)
        self._rejected = rejected

    async def serve(self) -> None:
        """After start(): keep reconciling (and streaming) until stop() or a signal."""
        assert self.controller is not None
        if self.config.serve is not None and self.hub is not None:
            self.server = ControllerServer(self.controller, self.hub, self.config.serve,
                                           token=serve_token(self.config.serve_token_file))
            await self.server.start()
        reconciling = spawn(self.controller.run(), name="controller loop")
        stop = spawn(self._stop.wait(), name="controller stop signal")
        self._tasks = [reconciling, spawn(self._discover(), name="cluster discovery"), stop]
        try:
            # Also when the loop ends by itself (a bug: its task's guard logged why). A
            # process left serving /healthz without it writes nothing more; exiting lets
            # its supervisor restart it.
            await asyncio.wait((reconciling, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self.close()
        if reconciling.done() and not reconciling.cancelled():
            raise ClusterError(f"the controller loop ended: {reconciling.exception()!r}")

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.controller is not None:
            await self.controller.close()


async def run(config: ControllerConfig) -> int:
    app = DirectoryControllerApp(config)
    # Installed before the initial reconcile (seconds at thousands of services): a signal
    # then ends it cleanly instead of a KeyboardInterrupt traceback or a bare SIGTERM death.
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    phase = "starting"

    def on_signal() -> None:
        nonlocal phase
        if phase == "starting" and starting is not None:
            starting.cancel()
        phase = "stopping"
        app.stop()

    if threading.current_thread() is threading.main_thread():  # (not when embedded)
        # SIGHUP too: its default action killed the controller outright.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal)
    log.info("controller starting: the initial reconcile")
    try:
        await app.start()
    except asyncio.CancelledError:
        if phase != "stopping":
            raise
        await app.close()
        log.info("stopped during the initial reconcile")
        return 0
    except ClusterError:
        await app.close()
        raise
    if phase == "starting":
        phase = "serving"
    if config.once or phase == "stopping":
        failed = app.controller.failed_clusters if app.controller is not None else set()
        await app.close()
        if config.once and failed:  # each failure was logged with its reason
            raise ClusterError(f"--once: writing to cluster(s) {', '.join(sorted(failed))} "
                               "failed")
        return 0
    await app.serve()
    return 0


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    """The directory-mode flags → config; ControllerConfigError or ConfigError."""
    from mcsproxy.config import parse_host_port

    return ControllerConfig(
        clusters_dir=Path(args.clusters_dir),
        output_dir=Path(args.output_dir),
        once=args.once,
        serve=parse_host_port(args.serve, "--serve") if args.serve else None,
        clusterset_cidr=args.clusterset_cidr,
        cluster_cidrs=parse_cluster_cidrs(args.cluster_cidr),
        stream_limits=stream_limits_from_args(args),
        serve_token_file=Path(args.serve_token_file) if args.serve_token_file else None,
    )


def serve_token(path: Path | None) -> TokenFile | None:
    """--serve-token-file, read once now so that a bad file stops the start, in either mode."""
    if path is None:
        return None
    try:
        return TokenFile(path)
    except TokenFileError as exc:
        raise ControllerConfigError(f"--serve-token-file: {exc}") from None


# Descriptors the controller holds besides its streams: the listener, member API
# connections, files being written, the event loop's own (16 of 1024 measured in use).
FILES_SPARE = 64


def raise_open_files_limit(serve: tuple[str, int] | None) -> None:
    """With --serve, the soft open-files limit raised to the hard one, as the gateway
    does: with the 1024 that containerd 2, Docker 25 and systemd hand out, the stream
    took 1008 gateways, not the 4096 of its connection limit, and refused the rest
    without a log line. After the flags are checked: a bad flag is one line."""
    if serve is None:
        return
    from mcsproxy.cli import raise_nofile_limit

    before, after = raise_nofile_limit()
    log.info("open files limit %d%s", after,
             f" (raised from {before})" if after != before else "")
    # Past the limit the streams beyond it are closed at accept, and nothing (uvloop's
    # accept included) logs it: said once here instead.
    wanted = SERVE_LIMITS.max_connections + FILES_SPARE
    if after < wanted:
        log.warning("open files limit %d is below the %d the stream's %d connections need: "
                    "gateways beyond about %d are refused without a log line; raise the "
                    "hard limit (ulimit -Hn, LimitNOFILE)", after, wanted,
                    SERVE_LIMITS.max_connections, max(after - FILES_SPARE, 0))


def run_from_args(args: argparse.Namespace, config_error: type[Exception]) -> int:
    """The `controller` subcommand: flags → config → run. Errors leave as config_error
    (exit 2, bad flags) or ClusterError/OSError messages (exit 1)."""
    import uvloop

    from mcsproxy.config import ConfigError

    if args.contexts or args.member_secrets:
        if args.clusters_dir or args.output_dir or args.once:
            raise config_error("--contexts/--member-secrets (Kubernetes mode) and "
                               "--clusters-dir/--output-dir/--once do not mix")
        from controlplane.clusters import kube_app

        try:
            kube_config = kube_app.config_from_args(args)
        except ValueError as exc:
            raise config_error(str(exc)) from None
        raise_open_files_limit(kube_config.serve)
        try:
            return uvloop.run(kube_app.run(kube_config))
        except ClusterError as exc:
            print(f"mcsproxy controller: error: {exc}", file=sys.stderr)
            return 1
    if args.kubeconfig:
        raise config_error("--kubeconfig needs --contexts a,b,c (or --member-secrets NS)")
    if not args.clusters_dir or not args.output_dir:
        raise config_error("controller needs --clusters-dir DIR and --output-dir OUT")
    try:
        config = config_from_args(args)
    except (ControllerConfigError, ConfigError) as exc:
        raise config_error(str(exc)) from None
    raise_open_files_limit(config.serve)
    try:
        return uvloop.run(run(config))
    except ClusterError as exc:
        print(f"mcsproxy controller: error: {exc}", file=sys.stderr)
        return 1
