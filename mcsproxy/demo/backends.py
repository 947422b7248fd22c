"""The demo's pods: real servers on each cluster's loopback addresses.

HTTP pods answer with who they are (JSON); echo pods send each chunk back prefixed with
their name, so a client always sees which cluster served it. Killing a cluster closes its
listeners and resets its open connections: clients see refused connects, as when a
cluster's nodes die.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from aiohttp import web

from mcsproxy.demo.clusterset import CLUSTERS, SERVICES, DemoCluster, DemoService, pod_name

log = logging.getLogger("mcsproxy.demo.backends")


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("_open", "_prefix", "transport")

    def __init__(self, prefix: bytes, open_transports: set[asyncio.Transport]) -> None:
        self._prefix = prefix
        self._open = open_transports
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._open.add(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self._prefix + data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self.transport)  # type: ignore[arg-type]


@dataclass
class Pod:
    service: DemoService
    cluster: DemoCluster
    index: int
    requests: int = 0
    _server: asyncio.AbstractServer | None = None
    _runner: web.AppRunner | None = None
    _transports: set[asyncio.Transport] = field(default_factory=set)

    @property
    def name(self) -> str:
        return pod_name(self.service, self.cluster, self.index)

    @property
    def address(self) -> tuple[str, int]:
        return self.cluster.pod_ip(self.index), self.service.target_port

    @property
    def running(self) -> bool:
        return self._server is not None or self._runner is not None

    async def start(self) -> None:
        host, port = self.address
        if self.service.kind == "http":
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                         shutdown_timeout=0.5)
            await self._runner.setup()
            await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        else:
            prefix = f"[{self.name}@{self.cluster.name}] ".encode()
            self._server = await asyncio.get_running_loop().create_server(
                lambda: EchoProtocol(prefix, self._transports), host, port, reuse_address=True
            )

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = {"service": self.service.name, "cluster": self.cluster.name, "pod": self.name,
                "path": request.path}
        return web.Response(text=json.dumps(body) + "\n", content_type="application/json")

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            for transport in list(self._transports):
                transport.abort()
            await server.wait_closed()


class Backends:
    """Every pod of the demo clusterset, started and stopped per cluster."""

    def __init__(self) -> None:
        self.pods: list[Pod] = [
            Pod(svc, c, i)
            for c in CLUSTERS
            for svc in SERVICES
            if c.name in svc.exporters
            for i in range(svc.replicas)
        ]
        self.killed: set[str] = set()

    def of_cluster(self, name: str) -> list[Pod]:
        return [p for p in self.pods if p.cluster.name == name]

    async def start_cluster(self, name: str) -> None:
        await asyncio.gather(*(p.start() for p in self.of_cluster(name) if not p.running))
        self.killed.discard(name)
        log.info("cluster %s: backends running", name)

    async def stop_cluster(self, name: str) -> None:
        await asyncio.gather(*(p.stop() for p in self.of_cluster(name)))
        self.killed.add(name)
        log.info("cluster %s: backends stopped", name)

    async def start(self) -> None:
        for c in CLUSTERS:
            await self.start_cluster(c.name)

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.pods))
