"""Real backends and snapshots for the proxy tests: each cluster on its own 127.0.x.y."""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pytest

from mcsproxy import compiled
from mcsproxy.config import HealthConfig, ProxyConfig
from mcsproxy.manifests import ImportSpec, SliceSpec
from mcsproxy.model import Endpoint, EndpointPort, ServiceKey, ServicePort
from mcsproxy.proxy import ProxyManager
from mcsproxy.store import ObjectId, SnapshotStore

# A test that patches a method of a data-path class: compiled code calls the method
# natively, past the patch, so the test would pass without testing anything. make test
# runs it in its interpreted pass (mcsproxy/compiled.py).
patches_data_path = pytest.mark.skipif(
    compiled.STATE == "compiled",
    reason="patches a compiled method; runs in the interpreted pass of make test")


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait (polling) for a condition the proxy reaches on its own; fail naming `what`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.01)


def traced_bytes_each(build: Callable[[int], object], n: int) -> float:
    """Bytes (tracemalloc) still held per item after `build(i)` for i < n."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [build(i) for i in range(n)]  # alive until measured
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / len(held)
    finally:
        tracemalloc.stop()


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NamedEcho(asyncio.Protocol):
    """Says its name on connect, echoes, answers EOF with b'bye' and closes."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.backend.accepted += 1
        self.backend.transports.add(self.transport)
        self.transport.write(self.backend.name.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write(b"bye")
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.transports.discard(self.transport)


class LoopbackServer:
    """Listening and stopping for the test backends (dataclasses with these fields)."""

    host: str
    port: int
    server: asyncio.Server | None
    transports: set[asyncio.Transport]  # open connections, aborted by stop()

    async def listen(self, protocol: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(protocol, self.host, self.port,
                                               reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self.transports):
                t.abort()
            await self.server.wait_closed()
            self.server = None


@dataclass
class Backend(LoopbackServer):
    name: str
    host: str
    port: int
    cluster: str
    accepted: int = 0
    server: asyncio.Server | None = None
    transports: set[asyncio.Transport] = field(default_factory=set)

    async def start(self) -> Backend:
        await self.listen(lambda: NamedEcho(self))
        return self


def endpoint(address: str, cluster: str, port: int, name: str = "web",
             protocol: str = "TCP", ready: bool = True, serving: bool | None = None,
             terminating: bool = False) -> Endpoint:
    return Endpoint(address=address, addresses=(address,), family=4, cluster=cluster,
                    ports=(EndpointPort(name, protocol, port),),  # type: ignore[arg-type]
                    ready=ready, serving=ready if serving is None else serving,
                    terminating=terminating)


class Clusterset:
    """A store fed directly with one service's import and per-cluster slices."""

    def __init__(self, local: str = "east") -> None:
        self.store = SnapshotStore(local)
        self.store.register_source("test")
        self.store.mark_synced("test")

    def publish(self, name: str, ip: str, ports: Sequence[ServicePort],
                endpoints: Sequence[Endpoint], *, affinity: str = "None",
                affinity_timeout_s: int = 10800, traffic: str | None = None,
                annotations: Mapping[str, str] = MappingProxyType({})) -> None:
        key = ServiceKey("test", name)
        self.store.upsert(
            ObjectId("test", "ServiceImport", "test", name),
            ImportSpec(key, "ClusterSetIP", (ip,), tuple(ports), affinity, affinity_timeout_s,
                       traffic, annotations, ()),
        )
        by_cluster: dict[str, list[Endpoint]] = {}
        for ep in endpoints:
            by_cluster.setdefault(ep.cluster, []).append(ep)
        for oid in [o for o in self.store.source_ids("test")
                    if o.kind == "EndpointSlice" and o.name.startswith(f"{name}.")]:
            if oid.name.split(".", 1)[1] not in by_cluster:
                self.store.delete(oid)
        for cluster, eps in by_cluster.items():
            self.store.upsert(ObjectId("test", "EndpointSlice", "test", f"{name}.{cluster}"),
                              SliceSpec(key, cluster, tuple(eps)))
        self.store.commit()

    def withdraw(self, name: str) -> None:
        for oid in [o for o in self.store.source_ids("test")
                    if o.name == name or o.name.startswith(f"{name}.")]:
            self.store.delete(oid)
        self.store.commit()

    async def proxy(self, **config: Any) -> ProxyManager:
        config.setdefault("health", NO_HEALTH)
        manager = ProxyManager(ProxyConfig(**config), self.store)
        await manager.start()
        return manager

    async def served(self, manager: ProxyManager) -> None:
        await asyncio.wait_for(manager.wait_applied(self.store.current.version), 5)


NO_HEALTH = HealthConfig(interval_s=0)


async def ask(ip: str, port: int, timeout: float = 3.0) -> str:
    """Connect, read the backend's name line, close. Raises on any client-visible failure."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            line = await reader.readline()
        finally:
            writer.close()
            await writer.wait_closed()
    if not line.endswith(b"\n"):
        raise ConnectionError(f"no answer through {ip}:{port}: {line!r}")
    return line.decode().strip()
