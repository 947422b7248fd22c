"""Shared by the reliability tests (drain, limits, faults, fuzz): imports written as YAML,
the real gateway as a subprocess, a slow HTTP backend and a load loop that counts what
clients see.

Addresses: these tests use 127.77.0.0/16 for endpoints and 127.240.77.0/24 for
ClusterSetIPs, apart from the other test files' ranges.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

DEADLINE_S = 15.0
LISTEN_RE = re.compile(r"(dns|admin) listening on ([\d.]+):(\d+)")


@dataclass(frozen=True)
class Port:
    name: str
    port: int
    target: int
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass
class Svc:
    """One imported service and its endpoints per cluster: {cluster: [(address, ready)]}."""

    name: str
    ip: str
    ports: Sequence[Port]
    endpoints: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    namespace: str = "chaos"


def import_documents(services: Sequence[Svc]) -> list[dict[str, object]]:
    docs: list[dict[str, object]] = []
    for svc in services:
        ports = []
        for p in svc.ports:
            port: dict[str, object] = {"name": p.name, "protocol": p.protocol, "port": p.port}
            if p.app_protocol:
                port["appProtocol"] = p.app_protocol
            ports.append(port)
        docs.append({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": svc.name, "namespace": svc.namespace},
            "spec": {"type": "ClusterSetIP", "ips": [svc.ip], "ports": ports},
            "status": {"clusters": [{"cluster": c} for c in svc.endpoints]},
        })
        for cluster, eps in svc.endpoints.items():
            docs.append({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{svc.name}-{cluster}", "namespace": svc.namespace,
                             "labels": {
                                 "multicluster.kubernetes.io/service-name": svc.name,
                                 "multicluster.kubernetes.io/source-cluster": cluster}},
                "addressType": "IPv4",
                "ports": [{"name": p.name, "protocol": p.protocol, "port": p.target}
                          for p in svc.ports],
                "endpoints": [{"addresses": [addr], "conditions": {"ready": ready}}
                              for addr, ready in eps],
            })
    return docs


def write_imports(path: Path, services: Sequence[Svc]) -> None:
    """Atomically (rename), so the file source never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(import_documents(services)))
    os.replace(tmp, path)


class GatewayProcess:
    """`mcsproxy gateway` as a child process; its stderr kept and searched as it comes."""

    def __init__(self, source: str, *args: str, cluster_id: str = "east",
                 env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", cluster_id,
                    "--source", source, "--dns-listen", "127.0.0.1:0",
                    "--admin-listen", "127.0.0.1:0", "--log-level", "info", *args]
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.ports: dict[str, tuple[str, int]] = {}
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, preexec_fn: object = None) -> GatewayProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=self.env, preexec_fn=preexec_fn)  # type: ignore[arg-type]
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.wait_log(lambda: len(self.ports) == 2, "dns and admin listening")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            if m := LISTEN_RE.search(text):
                self.ports[m.group(1)] = (m.group(2), int(m.group(3)))
            self._changed.set()
        self._changed.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def wait_log(self, cond: object, what: str, timeout: float = DEADLINE_S) -> None:
        async with asyncio.timeout(timeout):
            while not cond():  # type: ignore[operator]
                assert self.proc is not None
                if self.proc.returncode is not None or (
                        self._reader is not None and self._reader.done()):
                    raise AssertionError(f"gateway exited waiting for {what}:\n{self.log}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_line(self, needle: str, timeout: float = DEADLINE_S) -> None:
        await self.wait_log(lambda: needle in self.log, repr(needle), timeout)

    @property
    def admin(self) -> str:
        host, port = self.ports["admin"]
        return f"http://{host}:{port}"

    async def admin_get(self, path: str) -> tuple[int, object]:
        async with ClientSession(timeout=ClientTimeout(total=3)) as http, \
                http.get(self.admin + path) as resp:
            body = await resp.text()
            try:
                return resp.status, json.loads(body)
            except ValueError:
                return resp.status, body

    async def wait_ready(self) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while (await self.admin_get("/readyz"))[0] != 200:
                await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = DEADLINE_S) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def stop(self) -> None:
        """By pid: SIGTERM, SIGKILL after the deadline."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class SlowHttp:
    """An HTTP endpoint: GET /delay/<ms> answers its name after ms; / at once."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.served = 0
        self.runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        ms = request.match_info.get("ms")
        if ms:
            await asyncio.sleep(int(ms) / 1000)
        self.served += 1
        return web.Response(text=self.name)

    async def start(self) -> SlowHttp:
        app = web.Application()
        app.router.add_get("/", self._handle)
        app.router.add_get("/delay/{ms:\\d+}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@dataclass
class Tally:
    """What the load's clients saw."""

    ok: int = 0
    failed: int = 0  # a request sent whose answer did not come back whole, or a 5xx
    refused: int = 0  # a new connection refused (a closed listener): counted apart
    errors: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(why)


async def http_load(url: str, tally: Tally, stop: asyncio.Event, users: int,
                    timeout: float = 5.0, refused_ends: bool = False) -> None:
    """`users` keep-alive clients, each one request after another until `stop`. A refused
    connect ends that user when `refused_ends` (the gateway stopped listening)."""
    async def user(http: ClientSession) -> None:
        while not stop.is_set():
            try:
                async with http.get(url) as resp:
                    await resp.read()
                    if resp.status >= 500:
                        tally.fail(f"HTTP {resp.status}")
                    else:
                        tally.ok += 1
            except ConnectionRefusedError:
                tally.refused += 1
                if refused_ends:
                    return
            except (ClientError, TimeoutError, OSError) as exc:
                if refused_ends and isinstance(getattr(exc, "os_error", None),
                                               ConnectionRefusedError):
                    tally.refused += 1
                    return
                tally.fail(f"{type(exc).__name__}: {exc}")

    connector = TCPConnector(limit=users, force_close=False)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=timeout)) as http:
        await asyncio.gather(*(user(http) for _ in range(users)))


async def wait_until(cond: object, what: str, timeout: float = DEADLINE_S,
                     poll_s: float = 0.02) -> None:
    """Poll with a deadline, for state with no event to wait on (another process's)."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(poll_s)
