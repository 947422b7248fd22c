"""DNS benchmark: dnsperf against `mcsproxy gateway`, knot and dnsdist answering one name.

Peers in the same run, alternating within each repetition: knot 3 (authoritative zone
file), dnsdist (SpoofAction, no backend), and the gateway (a file source with one
ClusterSetIP service). All answer `web.ns1.svc.clusterset.local A` → 10.1.2.3. Pinning:
dnsperf on core 0, the server under test alone on core 1, one thread/worker each. CPU of
the server from /proc/<pid>/stat utime+stime over the dnsperf run. Results:
bench/results/dns.md and dns.json (or --out DIR).

    .venv/bin/python bench/dns/run.py            # 3 repetitions of 10 s
    .venv/bin/python bench/dns/run.py --smoke    # seconds; proves it still runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import LOAD_CORE, cpu_seconds, interpreter, version  # noqa: E402
from bench.common import PROXY_CORE as SERVER_CORE  # noqa: E402

HOST = "127.0.0.1"
PORTS = {"knot": 5355, "dnsdist": 5356, "mcsproxy": 5357}
QNAME = "web.ns1.svc.clusterset.local"
ADDRESS = "10.1.2.3"
TOOLS = ("dnsperf", "taskset")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0

ZONE = f"""$ORIGIN clusterset.local.
$TTL 5
@   IN SOA ns.clusterset.local. hostmaster.clusterset.local. 1 3600 600 86400 5
@   IN NS  ns.clusterset.local.
ns  IN A   127.0.0.1
web.ns1.svc IN A {ADDRESS}
"""
KNOT_CONF = """server:
    rundir: "{run}/knot"
    listen: {host}@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "{run}/knot"
template:
  - id: default
    storage: "{run}"
    zonefile-sync: -1
    journal-content: none
zone:
  - domain: clusterset.local
    file: "clusterset.local.zone"
"""
DNSDIST_CONF = """setSecurityPollSuffix("")
setLocal("{host}:{port}")
setACL({{"127.0.0.0/8"}})
addAction(QNameRule("{qname}."), SpoofAction({{"{address}"}}))
addAction(AllRule(), RCodeAction(DNSRCode.NXDOMAIN))
"""
SERVICE_YAML = f"""apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: web, namespace: ns1}}
spec:
  type: ClusterSetIP
  ips: ["{ADDRESS}"]
  ports: [{{name: http, protocol: TCP, port: 80}}]
"""


def query_once(port: int, timeout: float = 0.2) -> bool:
    """One A query for QNAME; True when the answer carries ADDRESS."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in QNAME.split(".")) + b"\x00"
    packet = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, (HOST, port))
            answer = sock.recv(4096)
        except OSError:
            return False
    return answer[:2] == b"\x12\x34" and socket.inet_aton(ADDRESS) in answer


class Server:
    def __init__(self, name: str, argv: list[str], run: Path) -> None:
        self.name = name
        self.port = PORTS[name]
        self.log = (run / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, *argv],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not query_once(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_servers(run: Path, names: list[str]) -> dict[str, Server]:
    (run / "knot").mkdir(exist_ok=True)
    (run / "clusterset.local.zone").write_text(ZONE)
    (run / "knot.conf").write_text(KNOT_CONF.format(run=run, host=HOST, port=PORTS["knot"]))
    (run / "dnsdist.conf").write_text(DNSDIST_CONF.format(
        host=HOST, port=PORTS["dnsdist"], qname=QNAME, address=ADDRESS))
    (run / "imports").mkdir(exist_ok=True)
    (run / "imports" / "web.yaml").write_text(SERVICE_YAML)
    argv = {
        "knot": ["knotd", "-c", str(run / "knot.conf")],
        "dnsdist": ["dnsdist", "--supervised", "--disable-syslog", "-C", str(run / "dnsdist.conf")],
        "mcsproxy": [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "bench",
                     "--source", f"file:{run / 'imports'}",
                     "--dns-listen", f"{HOST}:{PORTS['mcsproxy']}",
                     "--admin-listen", f"{HOST}:0", "--log-level", "warning"],
    }
    servers: dict[str, Server] = {}
    try:
        for name in names:
            servers[name] = Server(name, argv[name], run)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def dnsperf(port: int, seconds: float, queries: Path) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "dnsperf", "-s", HOST, "-p", str(port), "-d", str(queries),
         "-l", str(seconds), "-c", "1", "-T", "1", "-q", "100", "-t", "2"],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    return {"sent": sent, "completed": done, "qps": qps,
            "latency_us": float(latency.group(1)) * 1e6 if latency else 0.0}


def measure(server: Server, seconds: float, queries: Path) -> dict[str, float]:
    before = cpu_seconds(server.proc.pid)
    result = dnsperf(server.port, seconds, queries)
    used_s = cpu_seconds(server.proc.pid) - before
    result["cpu_s"] = used_s
    result["cpu_us_per_query"] = used_s * 1e6 / max(result["completed"], 1)
    return result


def write_results(out_dir: Path, runs: list[dict[str, dict[str, float]]], names: list[str],
                  seconds: float, smoke: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    med = {n: {k: statistics.median(r[n][k] for r in runs)
               for k in ("qps", "cpu_us_per_query", "latency_us")} for n in names}
    peers = [n for n in names if n != "mcsproxy"]
    ratios = {}
    if "mcsproxy" in names:
        for p in peers:
            ratios[p] = {
                "qps": statistics.median(r["mcsproxy"]["qps"] / r[p]["qps"] for r in runs),
                "cpu_us_per_query": statistics.median(
                    r["mcsproxy"]["cpu_us_per_query"] / r[p]["cpu_us_per_query"] for r in runs
                    if r[p]["cpu_us_per_query"] > 0),
            }
    versions = {
        "knot": version(["knotd", "--version"]),
        "dnsdist": version(["dnsdist", "--version"]),
        "dnsperf": version(["sh", "-c", "dnsperf -h 2>&1 | grep -i version || true"]),
        "python": interpreter(),
    }
    machine = (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
               f"{platform.platform()}")
    payload = {"benchmark": "dns", "smoke": smoke, "seconds_per_run": seconds,
               "repetitions": len(runs), "qname": QNAME, "machine": machine,
               "pinning": f"dnsperf on core {LOAD_CORE} (-c 1 -T 1 -q 100); server alone on "
                          f"core {SERVER_CORE}, one worker/thread",
               "versions": versions, "runs": runs, "median": med, "ratio_mcsproxy_over": ratios}
    (out_dir / "dns.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# DNS: dnsperf, one A query at saturation"
        + (" (SMOKE: not a measurement)" if smoke else ""),
        "",
        f"Machine: {machine}. Pinning: {payload['pinning']}. {len(runs)} alternating "
        f"repetitions of {seconds:g} s; medians. Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "| server | qps | CPU µs/query | avg latency µs |",
        "|---|---|---|---|",
    ]
    for n in names:
        m = med[n]
        lines.append(f"| {n} | {m['qps']:,.0f} | {m['cpu_us_per_query']:.2f} | "
                     f"{m['latency_us']:.0f} |")
    if ratios:
        lines += ["", "| mcsproxy ÷ peer (median of per-repetition ratios) | qps | CPU/query |",
                  "|---|---|---|"]
        for p, r in ratios.items():
            lines.append(f"| {p} | {r['qps']:.2f}x | {r['cpu_us_per_query']:.2f}x |")
    (out_dir / "dns.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one short repetition")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install -y dnsperf)", file=sys.stderr)
        return 2
    names = [n for n, binary in (("knot", "knotd"), ("dnsdist", "dnsdist")) if shutil.which(binary)]
    names.append("mcsproxy")
    reps, seconds = (1, 1.0) if args.smoke else (args.repetitions, args.seconds)
    with tempfile.TemporaryDirectory(prefix="mcsproxy-bench-dns-") as tmp:
        run = Path(tmp)
        queries = run / "queries.txt"
        queries.write_text(f"{QNAME} A\n")
        servers = start_servers(run, names)
        try:
            runs = []
            for rep in range(reps):
                order = names if rep % 2 == 0 else list(reversed(names))  # alternate
                runs.append({n: measure(servers[n], seconds, queries) for n in order})
                print(f"repetition {rep + 1}/{reps}: " + ", ".join(
                    f"{n} {runs[-1][n]['qps']:,.0f} qps {runs[-1][n]['cpu_us_per_query']:.2f} µs"
                    for n in names), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    write_results(args.out, runs, names, seconds, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
