"""An in-process gateway over a file source, with real backends per cluster, for the
metrics, admin and status page tests (no tests here)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

from mcsproxy.config import (
    AdminConfig,
    DnsConfig,
    GatewayConfig,
    HealthConfig,
    ProxyConfig,
    WebLimits,
)
from mcsproxy.gateway import Gateway
from tests.proxy_fixtures import Backend

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def service_yaml(name: str, ip: str, backends: Sequence[Backend], *, port_name: str = "web",
                 protocol: str = "TCP", port: int = 80, traffic: str | None = None,
                 namespace: str = "test", app_protocol: str | None = None) -> str:
    """A ClusterSetIP import and a slice per backend; `ip` may be "v4,v6" (dual-stack)."""
    app = f", appProtocol: {app_protocol}" if app_protocol else ""
    ips = ", ".join(f'"{i}"' for i in ip.split(","))
    docs = [f"""apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  type: ClusterSetIP
  ips: [{ips}]
  ports: [{{name: {port_name}, protocol: {protocol}, port: {port}{app}}}]
""" + (f"  trafficDistribution: {traffic}\n" if traffic else "")]
    by_cluster: dict[str, list[Backend]] = {}
    for b in backends:
        by_cluster.setdefault(b.cluster, []).append(b)
    for cluster, group in by_cluster.items():
        # One slice per backend port: a slice's ports are shared by all its endpoints.
        for i, b in enumerate(group):
            docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{cluster}-{i}
  namespace: {namespace}
  labels:
    multicluster.kubernetes.io/service-name: {name}
    multicluster.kubernetes.io/source-cluster: {cluster}
addressType: IPv4
ports: [{{name: {port_name}, protocol: {protocol}, port: {b.port}}}]
endpoints: [{{addresses: ["{b.host}"]}}]
""")
    return "---\n".join(docs)


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Exposition text → sample name → [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, line
        labels = dict(LABEL_RE.findall(m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for lab, v in samples.get(name, [])
               if all(lab.get(k) == want for k, want in labels.items()))


@dataclass
class RunningGateway:
    gateway: Gateway
    source_dir: Path
    http: ClientSession

    @property
    def admin(self) -> str:
        assert self.gateway.admin.bound is not None
        host, port = self.gateway.admin.bound
        return f"http://{host}:{port}"

    @property
    def dns(self) -> tuple[str, int]:
        assert self.gateway.dns.bound is not None
        return self.gateway.dns.bound

    async def get_json(self, path: str, status: int = 200) -> Any:
        async with self.http.get(self.admin + path) as resp:
            assert resp.status == status, await resp.text()
            return await resp.json() if status == 200 else await resp.text()

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        async with self.http.get(self.admin + "/metrics") as resp:
            assert resp.status == 200
            return parse_metrics(await resp.text())

    async def publish(self, name: str, text: str) -> None:
        """Write a service file and wait until the proxy serves the new snapshot."""
        version = self.gateway.store.current.version
        (self.source_dir / f"{name}.yaml").write_text(text)
        deadline = time.monotonic() + 10
        while self.gateway.store.current.version == version:
            assert time.monotonic() < deadline, "the file source did not pick up the change"
            await asyncio.sleep(0.05)
        assert self.gateway.proxy is not None
        await asyncio.wait_for(
            self.gateway.proxy.wait_applied(self.gateway.store.current.version), 5)

    async def stop(self) -> None:
        await self.http.close()
        await self.gateway.stop()


async def start_gateway(tmp_path: Path, host: str, *, cluster: str = "east",
                        health: HealthConfig | None = None, access_log: str | None = None,
                        access_log_format: str = "text", demo_control: str | None = None,
                        files: dict[str, str] | None = None,
                        admin_limits: WebLimits | None = None, **proxy: Any) -> RunningGateway:
    source = tmp_path / "imports"
    source.mkdir(exist_ok=True)
    for name, text in (files or {}).items():
        (source / f"{name}.yaml").write_text(text)
    config = GatewayConfig(
        cluster_id=cluster, sources=(f"file:{source}",),
        dns=DnsConfig(listen=(host, 0)),
        admin=AdminConfig(listen=(host, 0), demo_control=demo_control,
                          limits=admin_limits or WebLimits()),
        proxy=ProxyConfig(health=health or HealthConfig(interval_s=0), **proxy),
        access_log=access_log, access_log_format=access_log_format,
    )
    gateway = Gateway(config)
    await gateway.start()
    await asyncio.wait_for(gateway.store.loaded.wait(), 10)
    assert gateway.proxy is not None
    await asyncio.wait_for(gateway.proxy.wait_applied(gateway.store.current.version), 5)
    http = ClientSession(timeout=ClientTimeout(total=5))
    return RunningGateway(gateway, source, http)


def load_json(text: str) -> Any:
    return json.loads(text)


class LoopTurns:
    """Counts the running loop's turns: a task that does nothing but yield."""

    def __init__(self) -> None:
        self.count = 0
        self.task = asyncio.ensure_future(self.tick())

    async def tick(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self.task.cancel()
