"""`mcsproxy gateway --workers 2` end to end: file source, two processes, one ClusterSetIP."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from tests.proxy_fixtures import Backend, ask, free_port

SERVICE = """\
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: web, namespace: test}}
spec:
  type: ClusterSetIP
  ips: ["{ip}"]
  ports: [{{name: web, protocol: TCP, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-east
  namespace: test
  labels:
    multicluster.kubernetes.io/service-name: web
    multicluster.kubernetes.io/source-cluster: east
addressType: IPv4
ports: [{{name: web, protocol: TCP, port: {port}}}]
endpoints: [{{addresses: ["{host}"]}}]
"""


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    """Running (a zombie left for its parent to reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def start_two_worker_gateway(tmp_path: Path, backend: Backend, ip: str, net: int,
                                   *extra: str, stderr: int | None = None,
                                   ) -> asyncio.subprocess.Process:
    """`mcsproxy gateway --workers 2` over a file source importing `backend` at `ip`:80,
    its DNS and admin listeners on 127.<net>.9.1; `extra` arguments come last (and win)."""
    (tmp_path / "web.yaml").write_text(SERVICE.format(ip=ip, host=backend.host,
                                                      port=backend.port))
    own = f"127.{net}.9.1"
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
        "--source", f"file:{tmp_path}", "--workers", "2", "--log-level", "warning",
        "--dns-listen", f"{own}:{free_port(own)}",
        "--admin-listen", f"{own}:{free_port(own)}", *extra, stderr=stderr,
    )


async def test_gateway_with_two_workers_serves_and_stops_them(tmp_path: Path) -> None:
    backend = await Backend("east-1", "127.46.1.1", free_port("127.46.1.1"), "east").start()
    ip = "127.240.46.1"
    proc = await start_two_worker_gateway(tmp_path, backend, ip, 46)
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    if await ask(ip, 80, timeout=1) == "east-1":
                        break
                except OSError:
                    await asyncio.sleep(0.1)
            while len(children(proc.pid)) < 1:
                await asyncio.sleep(0.1)
        workers = children(proc.pid)
        assert [await ask(ip, 80) for _ in range(40)] == ["east-1"] * 40
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        await backend.stop()
    assert not any(alive(pid) for pid in workers)
