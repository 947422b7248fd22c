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


async def test_gateway_with_two_workers_serves_and_stops_them(tmp_path: Path) -> None:
    backend = await Backend("east-1", "127.46.1.1", free_port("127.46.1.1"), "east").start()
    ip = "127.240.46.1"
    (tmp_path / "web.yaml").write_text(SERVICE.format(ip=ip, host=backend.host,
                                                      port=backend.port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
        "--source", f"file:{tmp_path}", "--workers", "2", "--log-level", "warning",
        "--dns-listen", f"127.46.9.1:{free_port('127.46.9.1')}",
        "--admin-listen", f"127.46.9.1:{free_port('127.46.9.1')}",
    )
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
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
