"""The controller's HTTP listener (`--serve`): the gateway stream, health, metrics and a
status page saying which members answer and which are stale.

In Kubernetes mode the listener lives as long as the process, leader or standby: /healthz
and /readyz answer on a standby too (a PodDisruptionBudget counts only ready pods, so a
standby that never became ready would block every drain of the leader's node), while the
stream and the member status exist only while this replica leads (503 otherwise; the
gateway's controlplane source retries)."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.controller import Controller
from controlplane.metrics import ControllerMetrics
from controlplane.stream import StreamHub
from mcsproxy.config import WebLimits, is_loopback
from mcsproxy.tokenfile import TokenFile
from mcsproxy.webguard import (
    ConnectionGuard,
    harden_for_browsers,
    refuse_cross_site,
    refuse_without_token,
    serve,
)

log = logging.getLogger("controlplane.server")

SHUTDOWN_TIMEOUT_S = 2.0
# Every gateway of every consumer cluster holds one stream connection, and the gateways of
# a cluster may reach the controller from one NATed address: far more room than the
# admin API's, per client address too (a quarter of it).
LIMITS = WebLimits(max_connections=4096)
# The status page shares the gateway page's stylesheet (mcsproxy/admin_static).
STATUS_PAGE = Path(__file__).resolve().parent.parent / "mcsproxy" / "admin_static"


class ControllerServer:
    def __init__(self, controller: Controller | None, hub: StreamHub | None,
                 listen: tuple[str, int], *, metrics: ControllerMetrics | None = None,
                 limits: WebLimits = LIMITS, token: TokenFile | None = None) -> None:
        self.token = token  # None: the stream and /status are open to whoever reaches them
        self.controller = controller  # None: a standby (Kubernetes mode, not leading)
        self.hub = hub
        self.listen = listen
        if metrics is None:
            assert controller is not None, "a standby server needs the metrics to serve"
            metrics = controller.metrics
        self.metrics = metrics
        # Its status page, as the admin's: not framed, not read by a rebound domain's page.
        self.app = harden_for_browsers(web.Application(middlewares=[refuse_cross_site]))
        self.app.router.add_get("/v1/stream", self._stream)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/status", self._status)
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/static/status.css", self._css)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None
        closed = metrics.http_connections_closed
        self.guard = ConnectionGuard("controller", limits,
                                     on_close=lambda reason: closed.labels(reason).inc())

    def lead(self, controller: Controller, hub: StreamHub) -> None:
        """This replica's term began: serve its controller and stream."""
        self.controller, self.hub = controller, hub

    def stand_by(self) -> None:
        """The term ended: end its streams (gateways reconnect to the next leader)."""
        if self.hub is not None:
            self.hub.close()
        self.controller = self.hub = None

    def _refuse_without_token(self, request: web.Request) -> None:
        if self.token is not None:
            refuse_without_token(self.token, request, "--serve-token-file")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self._refuse_without_token(request)
        if self.hub is None:
            response = web.json_response(
                {"error": "this controller replica is not the leader"}, status=503)
            # A gateway's retry must open a new connection, which a Service may send to
            # the leader; a kept-alive one would lead back here.
            response.force_close()
            return response
        return await self.hub.handle(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.controller is None:
            # A standby is ready: to take over, and for the PodDisruptionBudget.
            return web.json_response({"ready": True, "leading": False})
        ready = self.controller.synced.is_set()
        return web.json_response({"ready": ready, "leading": True},
                                 status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATUS_PAGE / "controller.html",
                                headers={"Cache-Control": "no-cache"})

    async def _css(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATUS_PAGE / "status.css",
                                headers={"Content-Type": "text/css"})

    async def _status(self, request: web.Request) -> web.Response:
        self._refuse_without_token(request)
        if self.controller is None or self.hub is None:
            return web.json_response({"leading": False}, status=503)
        controller = self.controller
        return web.json_response({
            "leading": True,
            "members": controller.members(),
            "exports": {c: sorted([str(k) for k in cl.objects.exports]
                                  + [f"{k} (Karmada)" for k in cl.objects.mcs])
                        for c, cl in sorted(controller.clients.items())},
            "imports": controller.imported_count,
            "conflicts": [{"service": str(k), "reasons": [r for r, _ in found],
                           "messages": [m for _, m in found]}
                          for k, found in sorted(controller.conflicts.items())],
            "propagation": controller.metrics.propagation_summary(),
            "feeds": {c: {"version": f.version, "objects": len(f.objects),
                          "subscribers": len(f.subscribers)}
                      for c, f in sorted(self.hub.feeds.items())},
            "epoch": self.hub.epoch,
        })

    async def start(self) -> None:
        host, port = self.listen
        if not is_loopback(host) and self.token is None:
            log.warning("controller listening on non-loopback %s: the stream has no auth; "
                        "put it behind a network policy or use --serve-token-file", host)
        self._runner, self.bound = await serve(self.app, (host, port), self.guard, "--serve",
                                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        log.info("controller serving on %s:%d", *self.bound)

    async def stop(self) -> None:
        if self.hub is not None:
            self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
