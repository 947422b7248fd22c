"""TCP benchmark: bulk throughput (iperf3) and short-connection rate (wrk, Connection: close).

Peers in the same run, alternating within each repetition: direct, HAProxy 2.6 `mode tcp`
(default, and tuned with `tune.bufsize 262144`), `mcsproxy gateway`, and a bare uvloop
relay (bench/tcp/bare_relay.py: a Protocol pair and nothing else, what CPython + uvloop
give before any of mcsproxy's work). Pinning: load generators and backends (iperf3 -s,
nginx) on core 0, the proxy under test alone on core 1, one worker/thread each. CPU of
the proxy from /proc/<pid>/stat utime+stime.
Results: bench/results/tcp.md and tcp.json (or --out DIR).
--baseline REV, --baseline-python PATH and --fresh add a second gateway measured in the
same repetitions, as in bench/http/run.py: REV's package (compiled), or this tree's under
another interpreter, both gateways started anew before every repetition with --fresh.

    .venv/bin/python bench/tcp/run.py            # 7 repetitions
    .venv/bin/python bench/tcp/run.py --baseline HEAD~1 --fresh
    .venv/bin/python bench/tcp/run.py --smoke    # seconds; proves it still runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    CpuMeter,
    Procs,
    change_ratio,
    cpu_seconds,
    data_path,
    interpreter,
    median,
    on_load_core,
    prepare_baseline,
    ratio_median,
    ratios,
    restart_in_turn,
    wait_port,
)

BACKEND_IP = "127.0.0.1"
IPERF_PORT, WEB_PORT = 5201, 8081
HAPROXY_IP, TUNED_IP, MCS_IP = "127.0.0.1", "127.0.0.1", "127.240.250.1"
MCS_BASE_IP = "127.240.250.2"
BARE_IP = "127.240.250.3"
HAPROXY_PORTS = {"iperf": 5290, "web": 8190}
TUNED_PORTS = {"iperf": 5291, "web": 8191}
PEERS = ("iperf3", "haproxy", "nginx", "wrk", "taskset")

NGINX_CONF = """daemon off; worker_processes 1; pid {run}/nginx.pid; error_log {run}/nginx.err warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{ access_log off; client_body_temp_path {run}/b; proxy_temp_path {run}/p;
  fastcgi_temp_path {run}/f; uwsgi_temp_path {run}/u; scgi_temp_path {run}/s;
  tcp_nodelay on; keepalive_requests 10000000; keepalive_timeout 120s;
  server {{ listen {ip}:{port} backlog=4096 reuseport;
    location = /small {{ return 200 "{body}\\n"; }} }} }}
"""
HAPROXY_CONF = """global
  nbthread 1
  maxconn 8000
{tune}defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen iperf
  bind {ip}:{iperf}
  server s1 {backend}:{iperf_backend}
listen web
  bind {ip}:{web}
  server s1 {backend}:{web_backend}
"""
SERVICE_YAML = """apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: bench, namespace: bench}}
spec:
  type: ClusterSetIP
  ips: ["{ip}"]
  ports: [{{name: iperf, protocol: TCP, port: {iperf}}}, {{name: web, protocol: TCP, port: {web}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-local
  namespace: bench
  labels:
    multicluster.kubernetes.io/service-name: bench
    multicluster.kubernetes.io/source-cluster: local
addressType: IPv4
ports: [{{name: iperf, protocol: TCP, port: {iperf}}}, {{name: web, protocol: TCP, port: {web}}}]
endpoints: [{{addresses: ["{backend}"]}}]
"""


def iperf(ip: str, port: int, streams: int, seconds: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "iperf3", "-c", ip, "-p", str(port), "-t", str(seconds),
         "-O", "1", "-P", str(streams), "-J"],
        capture_output=True, timeout=seconds + 20, check=True)
    data = json.loads(out.stdout)
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk_close(ip: str, port: int, seconds: int, conns: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s",
         "-H", "Connection: close", f"http://{ip}:{port}/small"],
        capture_output=True, text=True, timeout=seconds + 20, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk gave no rate: {out.stdout}")


async def _latency(ip: str, port: int, rate: float, seconds: float) -> list[float]:
    request = f"GET /small HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode()
    samples: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(ip, port)
                writer.write(request)
                await reader.read()
                writer.close()
        except (OSError, TimeoutError):
            errors += 1
            return
        samples.append(time.perf_counter() - started)

    tasks = []
    interval = 1 / rate
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    if errors:
        raise RuntimeError(f"{errors} failed requests at {rate:.0f}/s")
    return samples


def latency(ip: str, port: int, rate: float, seconds: float) -> tuple[float, float]:
    """p50/p99 in µs of connect+request+close at a fixed (open-loop) rate."""
    import uvloop

    with on_load_core():
        samples = sorted(uvloop.run(_latency(ip, port, rate, seconds)))
    return (samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one short repetition")
    # One repetition's single-stream ratio to tuned HAProxy ranged 0.70-1.30 over 32
    # repetitions on this shared VM: a median of three moved by 0.15 between runs.
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--baseline", metavar="REV",
                    help="also measure the mcsproxy package of this git revision")
    ap.add_argument("--baseline-python", metavar="PATH",
                    help="run the baseline (--baseline, or this tree) with this interpreter")
    ap.add_argument("--fresh", action="store_true",
                    help="start the gateways under test anew before every repetition")
    args = ap.parse_args()
    missing = [p for p in PEERS if shutil.which(p) is None]
    if missing:
        print(f"missing peers: {', '.join(missing)} (apt-get install -y iperf3 haproxy "
              "nginx-light wrk)", file=sys.stderr)
        return 3
    reps, secs = (1, 1) if args.smoke else (args.reps, args.seconds)
    streams_set = (1,) if args.smoke else (1, 8)
    lat_seconds = 0.5 if args.smoke else 3.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = data_path()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="mcsbench-") as run:
        rundir = Path(run)
        try:
            targets = start_all(procs, rundir, args.baseline, args.baseline_python)
            restart = (lambda rep: restart_in_turn(procs, targets, rep)) if args.fresh else None
            results = measure(targets, reps, secs, streams_set, lat_seconds, restart)
        finally:
            procs.stop()
    if "baseline" in targets:
        results["baseline"] = targets["baseline"]["words"]
    results["fresh"] = args.fresh
    results["data_path"] = mode
    write(out, results, args.smoke, reps, secs)
    return 0


def start_gateway(procs: Procs, run: Path, slot: str, ip: str, cwd: Path | None = None,
                  python: str = sys.executable) -> int:
    """`mcsproxy gateway` of the package in `cwd` (None: this tree's), by `python`,
    pinned like the peers, once it listens: its pid."""
    src = run / slot
    src.mkdir(exist_ok=True)  # a restart (--fresh) reuses it
    (src / "bench.yaml").write_text(SERVICE_YAML.format(ip=ip, iperf=IPERF_PORT,
                                                        web=WEB_PORT, backend=BACKEND_IP))
    p = procs.start(PROXY_CORE, python, "-m", "mcsproxy", "gateway", "--cluster-id",
                    "local", "--source", f"file:{src}", "--log-level", "warning",
                    "--dns-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                    stderr=None, cwd=cwd)
    wait_port(ip, WEB_PORT)
    wait_port(ip, IPERF_PORT)
    return p.pid


def start_all(procs: Procs, run: Path, baseline: str | None = None,
              baseline_python: str | None = None) -> dict[str, dict[str, object]]:
    procs.start(LOAD_CORE, "iperf3", "-s", "-B", BACKEND_IP, "-p", str(IPERF_PORT))
    (run / "nginx.conf").write_text(NGINX_CONF.format(run=run, ip=BACKEND_IP, port=WEB_PORT,
                                                      body="x" * 99))
    procs.start(LOAD_CORE, "nginx", "-c", str(run / "nginx.conf"), "-p", str(run))
    targets: dict[str, dict[str, object]] = {
        "direct": {"ip": BACKEND_IP, "iperf": IPERF_PORT, "web": WEB_PORT, "pid": None}}
    for name, ports, tune in (("haproxy", HAPROXY_PORTS, ""),
                              ("haproxy-tuned", TUNED_PORTS, "  tune.bufsize 262144\n")):
        cfg = run / f"{name}.cfg"
        cfg.write_text(HAPROXY_CONF.format(tune=tune, ip=HAPROXY_IP, backend=BACKEND_IP,
                                           iperf_backend=IPERF_PORT, web_backend=WEB_PORT,
                                           **ports))
        p = procs.start(PROXY_CORE, "haproxy", "-f", str(cfg), "-db")
        targets[name] = {"ip": HAPROXY_IP, **ports, "pid": p.pid}
    # "start": how restart_in_turn (--fresh) starts a gateway again.
    start = partial(start_gateway, procs, run, "mcs", MCS_IP)
    targets["mcsproxy"] = {"ip": MCS_IP, "iperf": IPERF_PORT, "web": WEB_PORT,
                           "pid": start(), "start": start}
    bare = procs.start(PROXY_CORE, sys.executable, str(ROOT / "bench" / "tcp" / "bare_relay.py"),
                       BARE_IP, f"{IPERF_PORT}:{BACKEND_IP}:{IPERF_PORT}",
                       f"{WEB_PORT}:{BACKEND_IP}:{WEB_PORT}", stderr=None)
    targets["bare"] = {"ip": BARE_IP, "iperf": IPERF_PORT, "web": WEB_PORT, "pid": bare.pid}
    if baseline or baseline_python:
        base, python, words = prepare_baseline(run, baseline, baseline_python)
        start = partial(start_gateway, procs, run, "base", MCS_BASE_IP, base, python)
        targets["baseline"] = {"ip": MCS_BASE_IP, "iperf": IPERF_PORT, "web": WEB_PORT,
                               "pid": start(), "start": start, "words": words}
    for t in targets.values():
        wait_port(str(t["ip"]), int(t["web"]))  # type: ignore[call-overload]
        wait_port(str(t["ip"]), int(t["iperf"]))  # type: ignore[call-overload]
    time.sleep(0.5)
    return targets


def measure(targets: dict[str, dict[str, object]], reps: int, secs: int,
            streams_set: tuple[int, ...], lat_seconds: float,
            restart: Callable[[int], None] | None = None) -> dict[str, object]:
    names = list(targets)
    runs: list[dict[str, object]] = []
    for rep in range(reps):
        if restart is not None and rep:
            restart(rep)
        order = names[rep % len(names):] + names[:rep % len(names)]  # alternate who goes first
        row: dict[str, object] = {}
        for streams in streams_set:
            for name in order:
                t = targets[name]
                pid = t["pid"]
                cpu0 = cpu_seconds(pid) if pid else 0.0  # type: ignore[arg-type]
                gbps = iperf(str(t["ip"]), int(t["iperf"]), streams, secs)  # type: ignore[call-overload]
                cpu = cpu_seconds(pid) - cpu0 if pid else None  # type: ignore[arg-type]
                row[f"bulk{streams}/{name}"] = {"gbit_s": gbps, "cpu_s": cpu}
        rates: dict[str, float] = {}
        for name in order:
            t = targets[name]
            meter = CpuMeter(t["pid"])  # type: ignore[arg-type]
            rate = wrk_close(str(t["ip"]), int(t["web"]), secs, 32)  # type: ignore[call-overload]
            spent = meter.per_unit(rate * secs)
            rates[name] = rate
            row[f"conn/{name}"] = {"conn_s": rate, "cpu_us_per_conn": spent["cpu"],
                                   "user_us_per_conn": spent["user"],
                                   "sys_us_per_conn": spent["sys"]}
        # Added latency at half the slowest proxy's maximum rate, capped by what the
        # Python open-loop client itself can sustain beside the backend on one core.
        lat_rate = min(min(rates[n] for n in names if n != "direct") / 2, 1500.0)
        # The proxy's CPU at this same offered load too: at its own maximum a slower proxy
        # also pays for waking the load generator and backend on the other core more often
        # (they idle more), so CPU per connection at saturation mixes both effects.
        for name in order:
            t = targets[name]
            meter = CpuMeter(t["pid"])  # type: ignore[arg-type]
            p50, p99 = latency(str(t["ip"]), int(t["web"]), lat_rate, lat_seconds)  # type: ignore[call-overload]
            row[f"lat/{name}"] = {"rate": lat_rate, "p50_us": p50, "p99_us": p99,
                                  "cpu_us_per_conn": meter.per_unit(lat_rate * lat_seconds)["cpu"]}
        runs.append(row)
        print(f"rep {rep + 1}/{reps}: " + ", ".join(
            f"{k}={next(iter(v.values())):.3g}" for k, v in row.items()), file=sys.stderr)
    return {"runs": runs, "targets": names}


def spread(vals: list[float]) -> str:
    return f"{min(vals):.2f}-{max(vals):.2f}" if vals else "—"


def write(out: Path, results: dict[str, object], smoke: bool, reps: int, secs: int) -> None:
    runs: list[dict[str, object]] = results["runs"]  # type: ignore[assignment]
    versions = {
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
        .stdout.split("\n")[0],
        "iperf3": subprocess.run(["iperf3", "-v"], capture_output=True, text=True)
        .stdout.split("\n")[0],
        "python": interpreter(),
        "kernel": platform.release(),
        "data_path": results["data_path"],
    }
    summary: dict[str, object] = {}
    lines = [
        "# TCP proxy benchmark" + (" (smoke: not a measurement)" if smoke else ""), "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, kernel {versions['kernel']}; "
        f"{versions['haproxy']}; {versions['iperf3']}; Python {versions['python']} + uvloop; "
        f"mcsproxy's data path {versions['data_path']}.",
        f"Pinning: iperf3 server/client, nginx backend, wrk and the latency client on core "
        f"{LOAD_CORE}; the proxy under test alone on core {PROXY_CORE}, one worker/thread. "
        f"{reps} repetitions of {secs} s (iperf3 omits its first second), peers alternating; "
        "medians; ratios per repetition, their lowest and highest in the range column.",
        "",
        "| figure | direct | HAProxy default | HAProxy tuned | mcsproxy | mcsproxy / tuned "
        "| range / tuned | mcsproxy / default | bare relay | bare / tuned | mcsproxy / bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    figures = [(f"bulk{s}", "gbit_s", f"iperf3 {s} stream{'s' if s > 1 else ''}, Gbit/s")
               for s in (1, 8)] + [("conn", "conn_s", "new connections/s (wrk, close)"),
                                   ("conn", "cpu_us_per_conn", "proxy CPU µs per connection"),
                                   ("conn", "user_us_per_conn", "of which its own (user)"),
                                   ("conn", "sys_us_per_conn", "of which the kernel's (system)"),
                                   ("lat", "p50_us", "p50 µs at fixed rate"),
                                   ("lat", "p99_us", "p99 µs at fixed rate"),
                                   ("lat", "cpu_us_per_conn",
                                    "proxy CPU µs per connection at fixed rate")]
    for prefix, field, label in figures:
        vals = {n: median(runs, f"{prefix}/{n}", field) for n in results["targets"]}  # type: ignore[attr-defined]
        if all(v is None for v in vals.values()):
            continue
        r_t = ratio_median(runs, f"{prefix}/mcsproxy", f"{prefix}/haproxy-tuned", field)
        per_rep = ratios(runs, f"{prefix}/mcsproxy", f"{prefix}/haproxy-tuned", field)
        r_d = ratio_median(runs, f"{prefix}/mcsproxy", f"{prefix}/haproxy", field)
        r_bt = ratio_median(runs, f"{prefix}/bare", f"{prefix}/haproxy-tuned", field)
        r_mb = ratio_median(runs, f"{prefix}/mcsproxy", f"{prefix}/bare", field)
        summary[f"{prefix}.{field}"] = {**vals, "ratio_tuned": r_t, "ratio_default": r_d,
                                         "ratios_tuned": per_rep, "bare_vs_tuned": r_bt,
                                         "ratio_bare": r_mb}

        def fmt(v: float | None) -> str:
            return "—" if v is None else f"{v:.3g}"

        lines.append(f"| {label} | {fmt(vals['direct'])} | {fmt(vals['haproxy'])} | "
                     f"{fmt(vals['haproxy-tuned'])} | {fmt(vals['mcsproxy'])} | "
                     f"{fmt(r_t)}x | {spread(per_rep)} | {fmt(r_d)}x | "
                     f"{fmt(vals.get('bare'))} | {fmt(r_bt)}x | {fmt(r_mb)}x |")
    lat_rate = median(runs, "lat/mcsproxy", "rate")
    if lat_rate:
        lines += ["", f"Latency rows: one request per new connection, open loop at "
                      f"{lat_rate:.0f} conn/s (half the slower proxy's maximum, capped by the "
                      "Python client); added latency = proxy - direct."]
    if "baseline" in results:
        # The change itself: mcsproxy against the baseline in each repetition.
        pairs = [p for prefix, field, label in figures
                 if (p := change_ratio(runs, f"{prefix}/mcsproxy", f"{prefix}/baseline", field,
                                       label))]
        summary["mcsproxy_vs_baseline"] = pairs
        lines += ["", f"Before: mcsproxy {results['baseline']}, in the same repetitions"
                  + ("; both gateways started anew before each, the order alternating"
                     if results.get("fresh") else "")
                  + ". mcsproxy / before per repetition (median, lowest-highest): "
                  + "; ".join(pairs) + "."]
    stem = "tcp-smoke" if smoke else "tcp"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"versions": versions, "reps": reps, "seconds": secs, "summary": summary,
         "runs": runs, "pinning": {"load": LOAD_CORE, "proxy": PROXY_CORE}}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
