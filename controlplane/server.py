"""The controller's HTTP listener (`--serve`): the gateway stream, health, metrics and a
status page saying which members answer and which are stale."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.controller import Controller
from controlplane.stream import StreamHub
from mcsproxy.config import is_loopback

log = logging.getLogger("controlplane.server")

SHUTDOWN_TIMEOUT_S = 2.0


class ControllerServer:
    def __init__(self, controller: Controller, hub: StreamHub, listen: tuple[str, int]) -> None:
        self.controller = controller
        self.hub = hub
        self.listen = listen
        self.app = web.Application()
        self.app.router.add_get("/v1/stream", hub.handle)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/status", self._status)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.controller.synced.is_set()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.controller.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({
            "members": self.controller.members(),
            "feeds": {c: {"version": f.version, "objects": len(f.objects),
                          "subscribers": len(f.subscribers)}
                      for c, f in sorted(self.hub.feeds.items())},
            "epoch": self.hub.epoch,
        })

    async def start(self) -> None:
        host, port = self.listen
        if not is_loopback(host):
            log.warning("controller listening on non-loopback %s: the stream has no auth; "
                        "put it behind a network policy", host)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)
        log.info("controller serving on %s:%d", *self.bound)

    async def stop(self) -> None:
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
