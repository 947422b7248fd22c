"""The admin listener (aiohttp): health, readiness and, later, metrics and status pages.

Kept off the data path: aiohttp is fine here and too slow for the proxy.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from mcsproxy.config import is_loopback

if TYPE_CHECKING:
    from mcsproxy.gateway import Gateway

log = logging.getLogger("mcsproxy.admin")

GATEWAY_KEY = web.AppKey("gateway", object)


def readiness(gateway: Gateway) -> tuple[bool, dict[str, object]]:
    store = gateway.store
    snapshot = store.current
    sources = {
        name: {
            "synced": st.synced,
            "connected": st.connected,
            "objects": st.objects,
            "error": st.error,
        }
        for name, st in store.sources.items()
    }
    ready = store.loaded.is_set() and not gateway.stopping
    detail: dict[str, object] = {
        "ready": ready,
        "cluster_id": gateway.config.cluster_id,
        "snapshot_version": snapshot.version,
        "snapshot_age_s": round(time.time() - snapshot.built_at, 3) if snapshot.built_at else None,
        "services": len(snapshot.services),
        "sources": sources,
        "stopping": gateway.stopping,
    }
    return ready, detail


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    ready, detail = readiness(request.app[GATEWAY_KEY])  # type: ignore[arg-type]
    return web.json_response(detail, status=200 if ready else 503)


class AdminServer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.app = web.Application()
        self.app[GATEWAY_KEY] = gateway
        self.app.router.add_get("/healthz", healthz)
        self.app.router.add_get("/readyz", readyz)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        host, port = self.gateway.config.admin.listen
        if not is_loopback(host):
            log.warning("admin listener on non-loopback address %s: anyone who reaches it "
                        "can read the configuration", host)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)
        log.info("admin listening on %s:%d", *self.bound)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
