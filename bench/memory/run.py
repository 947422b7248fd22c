"""Gateway memory at scale: the real `mcsproxy gateway` process serving N services (file
source; each exported by 3 clusters with 10 endpoints, one TCP port) and its RSS once
synced and settled (VmRSS, and the peak VmHWM). Endpoints are loopback addresses nothing
listens on, so health probes end at once (refused), as against reachable endpoints.

    .venv/bin/python bench/memory/run.py 1000 [ADMIN_PORT]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLUSTERS = ("cluster-a", "cluster-b", "cluster-c")


def write_services(n: int, path: Path) -> None:
    docs = []
    for i in range(n):
        ns, name = f"ns{i % 100}", f"svc{i}"
        docs.append(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceImport\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: ClusterSetIP\n"
            f'  ips: ["127.80.{i // 250 + 1}.{i % 250 + 1}"]\n'
            "  ports: [{name: http, protocol: TCP, port: 80}]\nstatus:\n  clusters: ["
            + ", ".join(f"{{cluster: {c}}}" for c in CLUSTERS) + "]\n")
        for c, cluster in enumerate(CLUSTERS):
            eps = "\n".join(f'  - addresses: ["127.80.{100 + c}.{e + 1}"]\n'
                            "    conditions: {ready: true}" for e in range(10))
            docs.append(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n"
                f"  name: {name}-{cluster}\n  namespace: {ns}\n  labels:\n"
                f"    multicluster.kubernetes.io/service-name: {name}\n"
                f"    multicluster.kubernetes.io/source-cluster: {cluster}\n"
                "addressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\n"
                f"endpoints:\n{eps}\n")
    path.write_text("---\n".join(docs))


def measure(n: int, port: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        write_services(n, Path(d) / "all.yaml")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "cluster-a",
             "--source", f"file:{d}", "--dns-listen", "127.80.0.1:0",
             "--admin-listen", f"127.80.0.1:{port}", "--log-level", "error"])
        started = time.monotonic()
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit("the gateway exited")
                try:
                    with urllib.request.urlopen(
                            f"http://127.80.0.1:{port}/api/status", timeout=5) as r:
                        gw = json.load(r)["gateway"]
                    if gw["ready"] and gw["services"] == n:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            synced = time.monotonic() - started
            time.sleep(5)  # a few probe rounds
            status = dict(line.split(":", 1)
                          for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
            return {"services": n, "sync_s": round(synced, 2),
                    "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
                    "peak_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1)}
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 9995)))
