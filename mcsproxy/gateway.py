"""The gateway process: sources feed the store, components serve each snapshot."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Protocol

from mcsproxy import compiled
from mcsproxy.admin import AdminServer
from mcsproxy.config import GatewayConfig
from mcsproxy.dns.server import DnsServer
from mcsproxy.http.frontdoor import FrontDoor
from mcsproxy.observability.observer import Observer
from mcsproxy.proxy import ProxyManager
from mcsproxy.proxy.workers import HURRY_SIGNAL, Heartbeat, WorkerPool
from mcsproxy.sources import Source, make_source
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("mcsproxy.gateway")

# Each starts the drain; another one while draining closes what is left at once. SIGHUP
# too: its default action killed the process outright (connections reset, no drain, the
# VIPs left on --vip-interface) when a terminal closed or someone sent it for a reload.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.store = SnapshotStore(config.cluster_id)
        self.sources: list[Source] = [
            make_source(s, config.cluster_id, clusterset_cidr=config.clusterset_cidr,
                        controlplane_token_file=config.controlplane_token_file)
            for s in config.sources
        ]
        self.dns = DnsServer(config.dns, self.store)
        self.admin = AdminServer(self)
        self.proxy = ProxyManager(config.proxy, self.store) if config.proxy.enabled else None
        self.observer = Observer(self)  # events, access log, worker reports, metrics
        if self.proxy is not None:
            self.proxy.events = self.observer.events
            self.proxy.access_log = self.observer.access_log
        # Started in this order, stopped in reverse: admin last up, first to say "not ready".
        self.components: list[Component] = [self.dns, self.admin]
        if self.proxy is not None:
            front = FrontDoor(self.proxy, config.dns.domain) \
                if config.proxy.http.listen is not None else None
            if config.proxy.worker_index > 0:
                self.components = [self.proxy]  # an extra proxy worker: no DNS, no admin
                # Beating from the start: the supervisor kills a worker silent too long.
                if (heartbeat := Heartbeat.from_environment()) is not None:
                    self.components.insert(0, heartbeat)
            else:
                self.components.insert(1, self.proxy)
                if config.proxy.workers > 1:
                    self.components.insert(2, WorkerPool(config.proxy, front))
            if front is not None:  # after the proxy, before the workers that share its port
                self.components.insert(self.components.index(self.proxy) + 1, front)
        self.components.insert(0, self.observer)  # up first, down last: everyone reports
        if config.vip_interface and config.proxy.worker_index == 0:
            from mcsproxy.vip import VipInterface

            # First up, last down: a bad interface stops the start before anything listens,
            # and the addresses go only after the listeners have closed.
            self.vip: VipInterface | None = VipInterface(
                config.vip_interface, self.store, config.clusterset_cidr)
            self.components.insert(0, self.vip)
        else:
            self.vip = None
        self.stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None
        self._hurried = False

    async def start(self) -> None:
        for source in self.sources:
            self.store.register_source(source.name)
        started: list[Component] = []
        try:
            for component in self.components:
                await component.start()
                started.append(component)
        except BaseException:
            for component in reversed(started):
                await component.stop()
            raise
        for source in self.sources:
            self._tasks.append(spawn(source.run(self.store), name=f"source {source.name}"))

    async def stop(self) -> None:
        self.stopping = True
        await cancel_and_wait(self._tasks)
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %r failed", component)

    async def drain(self) -> None:
        """Listeners close, in-flight requests and connections get --drain-timeout; the
        admin (failing /readyz), DNS and sources keep running meanwhile."""
        timeout_s = self.config.proxy.drain_timeout_s
        drainers = [c for c in self.components if hasattr(c, "drain")]
        if not drainers or not timeout_s or self._hurried:
            return
        log.info("draining for at most %.1f s", timeout_s)
        left = await asyncio.gather(*(c.drain(timeout_s) for c in drainers))
        log.info("drained; %d connections left to close", sum(left))

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        """Drain, then stop. Asked again while draining: close what is still open now (a
        second Ctrl-C does not wait out --drain-timeout; the supervisor has its workers
        do the same, with HURRY_SIGNAL). A worker does not count signals: it gets one
        from its supervisor besides any sent to the whole process group (Ctrl-C) or
        cgroup (systemd)."""
        if sig is not None and not self._stop.is_set():
            # Which one: a SIGHUP from a closed terminal and a SIGTERM from kubelet
            # otherwise left the same "gateway stopping" line.
            log.info("%s received", sig.name)
        if self._draining is not None and not self._draining.done() and not self._hurried \
                and self.config.proxy.worker_index == 0:
            self._hurried = True
            log.warning("stop signal while draining: closing what is still open now")
            self._draining.cancel()
        self._stop.set()

    def hurry(self) -> None:
        """A worker's HURRY_SIGNAL: its supervisor, told to stop again while draining,
        has it close what is still open now (stop() cuts it with RSTs) and exit."""
        if not self._hurried:
            self._hurried = True
            log.warning("told to hurry: closing what is still open now")
            if self._draining is not None and not self._draining.done():
                self._draining.cancel()
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig)
        if self.config.proxy.worker_index > 0:
            loop.add_signal_handler(HURRY_SIGNAL, self.hurry)
        await self.start()
        log.info("gateway started cluster_id=%s sources=%s data_path=%s (%s) python=%s",
                 self.config.cluster_id, ",".join(self.config.sources), compiled.STATE,
                 compiled.REASON, compiled.interpreter())
        try:
            await self._stop.wait()
        finally:
            log.info("gateway stopping")
            self.stopping = True  # /readyz answers 503 from here on
            self._draining = spawn(self.drain(), name="drain")
            try:
                await self._draining
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._hurried or (task is not None and task.cancelling()):
                    raise
            except Exception:
                # Whatever broke the drain, every component still stops: the addresses
                # leave --vip-interface, workers end, sources close their connections.
                log.exception("draining failed; stopping without it")
            await self.stop()
            log.info("gateway stopped")
