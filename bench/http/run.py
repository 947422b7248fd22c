"""HTTP keep-alive benchmark: wrk, 100-byte and 64 KiB responses, through each proxy.

Peers in the same run, alternating within each repetition: direct to the nginx backend,
HAProxy 2.6 `mode http` (`http-reuse always`; also as "HAProxy + features", configured with
its nearest equivalents of mcsproxy's features), nginx as reverse proxy (upstream keepalive),
`mcsproxy gateway` proxying an appProtocol http port with every feature on (health
checks, outlier ejection, retries and budget, X-Forwarded-*/Via/x-request-id, the cluster
response header), and a bare uvloop + httptools relay (bench/http/bare_relay.py: requests
parsed for their ends and passed on unchanged, nothing else; what these libraries give
before any of mcsproxy's work). Pinning: wrk and the nginx backend on core 0, the proxy
under test alone on core 1, one worker/thread each. CPU of the proxy from /proc/<pid>/stat
utime+stime.
Also: memory per idle keep-alive client connection (RSS growth over N idle connections)
and `--workers 2` scaling: a 1-worker and a 2-worker gateway of their own, both unpinned
(taskset 0,1), wrk (2 threads, 100 connections) unpinned, the backend on core 0; the same
repetitions alternating; CPU per process (main, worker, backend, wrk) and the connections
each process holds mid-run. Every address must be free before the start: with
SO_REUSEPORT a second run (or an orphaned worker) on the same address would silently
share the listener and the measurement.
With --baseline REV a second gateway runs the mcsproxy package of git revision REV
(extracted with git archive and compiled as `make build` does, pinned like the first) in
the same repetitions, so a change is measured before and after against the same peers.
--baseline-python PATH runs that second gateway (this tree's, or REV's compiled by PATH)
with another interpreter, a venv's python holding mcsproxy's dependencies: how CPython was
built (PGO, LTO) moves every figure here (README, Development).
An A/A run (the same code in both slots, 5 repetitions) differed by 18 % in 64 KiB CPU
per request here, and two gateway processes of the same code differ by 0-6 % in rate
depending on which started first: --fresh starts both gateways anew before every
repetition, the order alternating, so that a process's luck becomes noise the medians
absorb instead of a bias; the results then add mcsproxy / before per repetition.
Instruction counts (bench/http/micro.py) are deterministic but not time: check both.
Results: bench/results/http.md and http.json (or --out DIR).

    .venv/bin/python bench/http/run.py            # 3 repetitions
    .venv/bin/python bench/http/run.py --baseline 5209414 --fresh
    .venv/bin/python bench/http/run.py --baseline-python /other/venv/bin/python --fresh
    .venv/bin/python bench/http/run.py --smoke    # seconds; proves it still runs
    .venv/bin/python bench/http/run.py --workers-only  # rewrite only the scaling line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
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
    CpuMeter,
    change_ratio,
    data_path,
    interpreter,
    on_load_core,
    prepare_baseline,
    restart_in_turn,
    script_module,
)
from bench.http.openloop import fixed_rate  # noqa: E402

tcp = script_module("bench/tcp/run.py")  # shared helpers: Procs, cpu_seconds, wait_port, medians
LOAD_CORE, PROXY_CORE = tcp.LOAD_CORE, tcp.PROXY_CORE

BACKEND = ("127.0.0.1", 18481)  # own ports: other benches use 8081 with reuseport
PORTS = {"haproxy": 18490, "nginx": 18491, "haproxy-features": 18492, "bare": 18493}
MCS_IP, MCS_W2_IP, MCS_BASE_IP = "127.240.251.1", "127.240.251.2", "127.240.251.3"
MCS_W1_IP = "127.240.251.4"  # the 1-worker gateway of the scaling figure, unpinned
PEERS = ("haproxy", "nginx", "wrk", "taskset")
SIZES = {"100B": "/small", "64KiB": "/big"}
WRK_CONNS = 50
# The open-loop client (bench/http/openloop.py): its rate ceiling and run length.
FIXED_RATE_CAP = 5000.0
FIXED_SECONDS = 3.0
SCALING_CONNS, SCALING_THREADS = 100, 2
ALL_CORES = f"{LOAD_CORE},{PROXY_CORE}"

BACKEND_CONF = """daemon off; worker_processes 1; pid {run}/backend.pid;
error_log {run}/backend.err warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{ access_log off; client_body_temp_path {run}/b1; proxy_temp_path {run}/b2;
  fastcgi_temp_path {run}/b3; uwsgi_temp_path {run}/b4; scgi_temp_path {run}/b5;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 10000000; keepalive_timeout 120s;
  open_file_cache max=100 inactive=600s; open_file_cache_valid 600s;
  default_type application/octet-stream;
  server {{ listen {ip}:{port} backlog=4096; root {run}/www;
    location = /small {{ return 200 "{body}\\n"; }}
    location = /big {{ try_files /big =404; }} }} }}
"""
NGINX_PROXY_CONF = """daemon off; worker_processes 1; pid {run}/proxy.pid;
error_log {run}/proxy.err warn; worker_rlimit_nofile 20000;
events {{ worker_connections 8192; multi_accept on; }}
http {{ access_log off; client_body_temp_path {run}/p1; proxy_temp_path {run}/p2;
  fastcgi_temp_path {run}/p3; uwsgi_temp_path {run}/p4; scgi_temp_path {run}/p5;
  tcp_nodelay on; keepalive_requests 10000000; keepalive_timeout 120s;
  upstream be {{ server {bip}:{bport}; keepalive 128; keepalive_requests 10000000; }}
  server {{ listen 127.0.0.1:{port} backlog=4096;
    location / {{ proxy_pass http://be; proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffer_size 16k; proxy_buffers 8 16k; proxy_busy_buffers_size 32k; }} }} }}
"""
HAPROXY_CONF = """global
  nbthread 1
  maxconn 8000
  tune.bufsize 16384
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server s1 {bip}:{bport} maxconn 1000
"""
# The same HAProxy with what mcsproxy's flags switch on, as far as HAProxy 2.6 has it:
# HTTP health checks at mcsproxy's defaults (5 s, 1 s timeout, 2 down, 2 up), outlier
# ejection on 5 consecutive errors (observe layer7), 2 retries with redispatch on connect
# failures and 502/503/504 (HAProxy has no retry budget), X-Forwarded-For/-Proto, Via both
# ways, an x-request-id kept or generated (a process prefix and a counter, as mcsproxy
# makes it; HAProxy's documented example format costs more), the cluster response header,
# the 1 s connect and 10 s header-read timeouts. Not the target peer (that is the plain
# configuration above): it shows what the same features cost HAProxy.
HAPROXY_FEATURES_CONF = """global
  nbthread 1
  maxconn 8000
  tune.bufsize 16384
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  timeout check 1s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  option forwardfor
  unique-id-format %{{+X}}o%pid-%rt
  http-request set-header X-Forwarded-Proto http
  http-request add-header Via "1.1 mcsproxy"
  http-request set-header x-request-id %[unique-id] unless {{ req.hdr(x-request-id) -m found }}
  http-response add-header Via "1.1 mcsproxy"
  http-response set-header x-mcs-cluster local
  default_backend be
backend be
  option httpchk GET /small
  retries 2
  option redispatch
  retry-on conn-failure empty-response response-timeout 502 503 504
  default-server check inter 5s fall 2 rise 2 observe layer7 error-limit 5 on-error mark-down
  server s1 {bip}:{bport} maxconn 1000
"""
SERVICE_YAML = """apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: {name}, namespace: bench}}
spec:
  type: ClusterSetIP
  ips: ["{ip}"]
  ports: [{{name: http, protocol: TCP, port: {port}, appProtocol: http}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-local
  namespace: bench
  labels:
    multicluster.kubernetes.io/service-name: {name}
    multicluster.kubernetes.io/source-cluster: local
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {bport}}}]
endpoints: [{{addresses: ["{bip}"]}}]
"""


def wrk(ip: str, port: int, path: str, seconds: float, conns: int,
        core: str | None = LOAD_CORE) -> dict[str, float]:
    """req/s and p50/p99 latency (µs) from wrk --latency, keep-alive."""
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", f"http://{ip}:{port}{path}"]
    if core is not None:
        cmd = ["taskset", "-c", core, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return parse_wrk(out.stdout, out.stderr)


def parse_wrk(stdout: str, stderr: str = "") -> dict[str, float]:
    result: dict[str, float] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["req_s"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            result["p50_us" if parts[0] == "50%" else "p99_us"] = _micros(parts[1])
        elif "Non-2xx" in line or "Socket errors" in line:
            result["errors"] = result.get("errors", 0) + sum(
                int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    if "req_s" not in result:
        raise RuntimeError(f"wrk gave no rate: {stdout} {stderr}")
    return result


def _micros(text: str) -> float:
    for suffix, factor in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    raise ValueError(text)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_memory(ip: str, port: int, pid: int, n: int) -> float:
    """Bytes of proxy RSS per idle keep-alive client connection (one request each first)."""
    request = f"GET /small HTTP/1.1\r\nHost: {ip}\r\n\r\n".encode()
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection((ip, port), timeout=5)
            s.sendall(request)
            socks.append(s)
        for s in socks:
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(4096)
        # Idle means idle for a while: mcsproxy frees a connection's parser and queue after
        # a whole tick (0.25 s) without a read, HAProxy its buffers at once.
        time.sleep(1.0)
        after = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return max(0, after - before) * 1024 / n


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def socket_pids(ip: str, port: int, listening: bool) -> list[int]:
    """Pid of every TCP socket on ip:port (listeners, or accepted connections), one per
    socket, from `ss -p`."""
    state = ["-l"] if listening else ["state", "established"]
    out = subprocess.run(["ss", "-tnpH", *state, "src", f"{ip}:{port}"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return [int(part.split(",")[0]) for line in out.splitlines()
            for part in line.split("pid=")[1:]]


def check_free(addresses: list[tuple[str, int]]) -> None:
    """Refuse to start over somebody's listener: SO_REUSEPORT lets another run's gateway
    (or an orphaned worker) share our address, and the other peers would fail to bind
    and leave us measuring a foreign server."""
    taken = [f"{ip}:{port} (pids {socket_pids(ip, port, True) or '?'})"
             for ip, port in addresses if socket_pids(ip, port, True)]
    if taken:
        raise RuntimeError("already listening, another benchmark runs or left processes "
                           "behind: " + ", ".join(taken))


def cpu_or_zero(pid: int) -> float:
    try:
        return tcp.cpu_seconds(pid)
    except FileNotFoundError:
        return 0.0


def scaling_run(ip: str, port: int, secs: float, gateway: int,
                backend: int) -> dict[str, object]:
    """wrk against one gateway, unpinned; CPU % of each of its processes, of the backend
    and of wrk; how many client connections each gateway process holds half-way."""
    procs = {"main": gateway, **{f"worker{i + 1}": c for i, c in enumerate(children(gateway))},
             "backend": backend}
    cpu0 = {k: cpu_or_zero(v) for k, v in procs.items()}
    cmd = ["wrk", f"-t{SCALING_THREADS}", f"-c{SCALING_CONNS}", f"-d{secs:g}s", "--latency",
           f"http://{ip}:{port}/small"]
    t0 = time.monotonic()
    wrk_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(secs / 2)
    holders = socket_pids(ip, port, False)
    stdout, stderr = wrk_proc.communicate(timeout=secs + 30)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's share is taken by difference
    elapsed = time.monotonic() - t0
    result: dict[str, object] = dict(parse_wrk(stdout, stderr))
    cpu = {k: round(100 * (cpu_or_zero(v) - cpu0[k]) / elapsed, 1) for k, v in procs.items()}
    result["cpu_pct"] = cpu
    result["conns"] = {k: holders.count(v) for k, v in procs.items() if k != "backend"}
    result["foreign_conns"] = sum(1 for h in holders if h not in procs.values())
    result["_rusage"] = ru.ru_utime + ru.ru_stime
    return result


def measure_scaling(targets: dict[str, dict[str, object]], reps: int,
                    secs: float) -> dict[str, object]:
    """`--workers 2` against 1 worker, the same placement, alternating over `reps`."""
    backend = int(targets["direct"]["backend_pid"])  # type: ignore[call-overload]
    runs: list[dict[str, object]] = []
    for rep in range(reps):
        row: dict[str, object] = {}
        order = ("workers1", "workers2") if rep % 2 == 0 else ("workers2", "workers1")
        for label in order:
            t = targets[f"_{label}"]
            ip, port = str(t["ip"]), int(t["port"])  # type: ignore[call-overload]
            owners = set(socket_pids(ip, port, True))
            mine = {int(t["pid"]), *children(int(t["pid"]))}  # type: ignore[call-overload]
            if not owners <= mine:
                raise RuntimeError(f"{ip}:{port} is also served by pids {owners - mine}")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = scaling_run(ip, port, secs, int(t["pid"]), backend)  # type: ignore[call-overload]
            used = r.pop("_rusage") - (before.ru_utime + before.ru_stime)  # type: ignore[operator]
            r["cpu_pct"]["wrk"] = round(100 * used / secs, 1)  # type: ignore[index]
            row[label] = r
        runs.append(row)
        print(f"scaling rep {rep + 1}/{reps}: " + ", ".join(
            f"{k}={v['req_s']:.0f} cpu={v['cpu_pct']} conns={v['conns']}"  # type: ignore[index]
            for k, v in row.items()), file=sys.stderr)
    summary: dict[str, object] = {}
    for label in ("workers1", "workers2"):
        summary[label] = {"req_s": tcp.median(runs, label, "req_s"),
                          "p50_us": tcp.median(runs, label, "p50_us"),
                          "p99_us": tcp.median(runs, label, "p99_us"),
                          "errors": sum(r[label].get("errors", 0) for r in runs)}  # type: ignore[attr-defined]
        summary[label]["cpu_pct"] = {  # type: ignore[index]
            k: statistics.median(r[label]["cpu_pct"][k] for r in runs)  # type: ignore[index]
            for k in runs[0][label]["cpu_pct"]}  # type: ignore[index]
        summary[label]["conns"] = runs[-1][label]["conns"]  # type: ignore[index]
    summary["ratio"] = tcp.ratio_median(runs, "workers2", "workers1", "req_s")
    summary["placement"] = (
        f"both gateways unpinned (taskset {ALL_CORES}), wrk unpinned ({SCALING_THREADS} threads, "
        f"{SCALING_CONNS} connections, 100 B), nginx backend on core {LOAD_CORE}")
    summary["runs"] = runs
    return summary


def scaling_text(scaling: dict[str, object], reps: int, secs: float) -> str:
    w1: dict[str, object] = scaling["workers1"]  # type: ignore[assignment]
    w2: dict[str, object] = scaling["workers2"]  # type: ignore[assignment]

    def cpu(w: dict[str, object]) -> str:
        return ", ".join(f"{k} {v:.0f}%" for k, v in w["cpu_pct"].items())  # type: ignore[attr-defined]

    errors = int(w1["errors"]) + int(w2["errors"])  # type: ignore[call-overload]
    return (
        f"`--workers 2` scaling ({scaling['placement']}; {reps} repetitions of {secs:g} s "
        f"alternating, medians): 1 worker {w1['req_s']:.0f} req/s, 2 workers "
        f"{w2['req_s']:.0f} req/s ({scaling['ratio']:.2f}x). CPU per process, 1 worker: "
        f"{cpu(w1)}; 2 workers: {cpu(w2)} (200% = both cores). Client connections per "
        f"process: " + ", ".join(f"{k} {v}" for k, v in w2["conns"].items())  # type: ignore[attr-defined]
        + "."
        + (f" wrk errors: {errors}." if errors else "")
        + " The machine is saturated with 2 workers: wrk and the backend need about a core "
        "between them, so 2 cores cannot show 2x.")


def workers_only(out: Path, reps: int, secs: float, smoke: bool) -> int:
    """Start the backend and the two scaling gateways only; rewrite the scaling line of
    the existing results (the rest of the table is kept as measured)."""
    stem = "http-smoke" if smoke else "http"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    if not md.exists() or not js.exists():
        print(f"--workers-only needs {md} and {js} from a full run", file=sys.stderr)
        return 2
    procs = tcp.Procs()
    with tempfile.TemporaryDirectory(prefix="mcsbench-http-") as run:
        try:
            targets = start_all(procs, Path(run), scaling_only=True)
            scaling = measure_scaling(targets, reps, secs)
        finally:
            procs.stop()
    data = json.loads(js.read_text())
    data["scaling"] = scaling
    js.write_text(json.dumps(data, indent=1))
    lines = [ln for ln in md.read_text().splitlines() if not ln.startswith("`--workers 2`")]
    while lines and not lines[-1]:
        lines.pop()
    lines += ["", scaling_text(scaling, reps, secs)]
    md.write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one short repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--idle-conns", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--baseline", metavar="REV",
                    help="also measure the mcsproxy package of this git revision")
    ap.add_argument("--baseline-python", metavar="PATH",
                    help="run the baseline (--baseline, or this tree) with this interpreter: "
                         "another venv's python with mcsproxy's dependencies")
    ap.add_argument("--fresh", action="store_true",
                    help="start the gateways under test anew before every repetition")
    ap.add_argument("--workers-only", action="store_true",
                    help="measure only --workers 2 scaling; rewrite that line of the results")
    args = ap.parse_args()
    missing = [p for p in PEERS if shutil.which(p) is None]
    if missing:
        print(f"missing peers: {', '.join(missing)} (apt-get install -y haproxy nginx-light "
              "wrk)", file=sys.stderr)
        return 3
    reps, secs, idle = (1, 1.0, 200) if args.smoke else (args.reps, args.seconds, args.idle_conns)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * idle + 1024)), hard))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.workers_only:
        return workers_only(out, reps, secs, args.smoke)
    mode = data_path()
    procs = tcp.Procs()
    with tempfile.TemporaryDirectory(prefix="mcsbench-http-") as run:
        try:
            targets = start_all(procs, Path(run), args.baseline, args.baseline_python)
            restart = (lambda rep: restart_in_turn(procs, targets, rep)) if args.fresh else None
            results = measure(targets, reps, secs, idle, restart)
        finally:
            procs.stop()
    if "baseline" in targets:
        results["baseline"] = targets["baseline"]["words"]
    results["fresh"] = args.fresh
    results["data_path"] = mode
    write(out, results, args.smoke, reps, secs)
    return 0


def start_mcsproxy(procs: tcp.Procs, run: Path, name: str, ip: str, workers: int,
                   core: str, cwd: Path | None = None, python: str = sys.executable) -> int:
    """`cwd`: a directory holding another mcsproxy package (`python -m` imports it first);
    `python`: the interpreter that runs it."""
    src = run / name
    src.mkdir(exist_ok=True)  # a restart (--fresh) reuses it
    (src / "svc.yaml").write_text(SERVICE_YAML.format(name=name, ip=ip, port=BACKEND[1],
                                                      bip=BACKEND[0], bport=BACKEND[1]))
    p = procs.start(core, python, "-m", "mcsproxy", "gateway", "--cluster-id", "local",
                    "--source", f"file:{src}", "--log-level", "warning",
                    "--dns-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                    "--health-http-path", "/small", "--http-cluster-header", "x-mcs-cluster",
                    "--workers", str(workers), stderr=None, cwd=cwd)
    return p.pid


def start_and_wait(procs: tcp.Procs, run: Path, slot: str, ip: str, cwd: Path | None,
                   python: str) -> int:
    """A gateway under test started again (--fresh), once it listens: its pid."""
    pid = start_mcsproxy(procs, run, slot, ip, 1, PROXY_CORE, cwd, python)
    tcp.wait_port(ip, BACKEND[1])
    return pid


def start_all(procs: tcp.Procs, run: Path, baseline: str | None = None,
              baseline_python: str | None = None,
              scaling_only: bool = False) -> dict[str, dict[str, object]]:
    check_free([BACKEND, *(("127.0.0.1", p) for p in PORTS.values()),
                *((ip, BACKEND[1]) for ip in (MCS_IP, MCS_W2_IP, MCS_BASE_IP, MCS_W1_IP))])
    run.chmod(0o755)  # nginx workers run unprivileged: they must read www/big
    (run / "www").mkdir()
    (run / "www" / "big").write_bytes(b"b" * 65536)
    fmt = {"run": run, "bip": BACKEND[0], "bport": BACKEND[1]}
    (run / "backend.conf").write_text(BACKEND_CONF.format(run=run, ip=BACKEND[0],
                                                          port=BACKEND[1], body="x" * 99))
    procs.start(LOAD_CORE, "nginx", "-c", str(run / "backend.conf"), "-p", str(run))
    w1 = start_mcsproxy(procs, run, "scale1", MCS_W1_IP, 1, ALL_CORES)
    w2 = start_mcsproxy(procs, run, "two", MCS_W2_IP, 2, ALL_CORES)
    targets: dict[str, dict[str, object]] = {
        "direct": {"ip": BACKEND[0], "port": BACKEND[1], "pid": None},
        "_workers1": {"ip": MCS_W1_IP, "port": BACKEND[1], "pid": w1},
        "_workers2": {"ip": MCS_W2_IP, "port": BACKEND[1], "pid": w2},
    }
    if scaling_only:
        return started(procs, run, targets)
    (run / "haproxy.cfg").write_text(HAPROXY_CONF.format(port=PORTS["haproxy"], **fmt))
    hp = procs.start(PROXY_CORE, "haproxy", "-f", str(run / "haproxy.cfg"), "-db")
    (run / "haproxy-features.cfg").write_text(
        HAPROXY_FEATURES_CONF.format(port=PORTS["haproxy-features"], **fmt))
    hf = procs.start(PROXY_CORE, "haproxy", "-f", str(run / "haproxy-features.cfg"), "-db")
    (run / "proxy.conf").write_text(NGINX_PROXY_CONF.format(port=PORTS["nginx"], **fmt))
    procs.start(PROXY_CORE, "nginx", "-c", str(run / "proxy.conf"), "-p", str(run))
    mcs = start_mcsproxy(procs, run, "one", MCS_IP, 1, PROXY_CORE)
    bare = procs.start(PROXY_CORE, sys.executable, str(ROOT / "bench" / "http" / "bare_relay.py"),
                       f"127.0.0.1:{PORTS['bare']}", f"{BACKEND[0]}:{BACKEND[1]}", stderr=None)
    targets["haproxy"] = {"ip": "127.0.0.1", "port": PORTS["haproxy"], "pid": hp.pid}
    targets["haproxy-features"] = {"ip": "127.0.0.1", "port": PORTS["haproxy-features"],
                                   "pid": hf.pid}
    targets["nginx"] = {"ip": "127.0.0.1", "port": PORTS["nginx"], "pid": None}
    targets["bare"] = {"ip": "127.0.0.1", "port": PORTS["bare"], "pid": bare.pid}
    # "start": how restart_in_turn (--fresh) starts it again.
    targets["mcsproxy"] = {"ip": MCS_IP, "port": BACKEND[1], "pid": mcs, "start": partial(
        start_and_wait, procs, run, "one", MCS_IP, None, sys.executable)}
    if baseline or baseline_python:
        base, python, words = prepare_baseline(run, baseline, baseline_python)
        pid = start_mcsproxy(procs, run, "base", MCS_BASE_IP, 1, PROXY_CORE, base, python)
        targets["baseline"] = {"ip": MCS_BASE_IP, "port": BACKEND[1], "pid": pid,
                               "start": partial(start_and_wait, procs, run, "base",
                                                MCS_BASE_IP, base, python),
                               "words": words}
    started(procs, run, targets)
    # nginx's master forks the worker that serves: measure the worker.
    master = int((run / "proxy.pid").read_text())
    workers = children(master)
    targets["nginx"]["pid"] = workers[0] if workers else master
    return targets


def started(procs: tcp.Procs, run: Path,
            targets: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Every target answers, and every process started is still ours and alive (a peer
    that could not bind exits, and its port may answer for somebody else)."""
    for t in targets.values():
        tcp.wait_port(str(t["ip"]), int(t["port"]))  # type: ignore[call-overload]
    time.sleep(0.5)
    dead = [" ".join(map(str, p.args)) for p in procs.procs if p.poll() is not None]
    if dead:
        raise RuntimeError(f"exited at start: {dead}")
    backend = int((run / "backend.pid").read_text())
    workers = children(backend)
    targets["direct"]["backend_pid"] = workers[0] if workers else backend  # CPU, not "proxy"
    return targets


def measure(targets: dict[str, dict[str, object]], reps: int, secs: float,
            idle: int, restart: Callable[[int], None] | None = None) -> dict[str, object]:
    names = [n for n in targets if not n.startswith("_")]
    fixed_s = min(secs, FIXED_SECONDS)
    runs: list[dict[str, object]] = []
    for rep in range(reps):
        if restart is not None and rep:
            restart(rep)
        order = names[rep % len(names):] + names[:rep % len(names)]  # alternate who goes first
        row: dict[str, object] = {}
        for size, path in SIZES.items():
            for name in order:
                t = targets[name]
                meter = CpuMeter(t["pid"])  # type: ignore[arg-type]
                r: dict[str, float | None] = {
                    **wrk(str(t["ip"]), int(t["port"]), path, secs, WRK_CONNS)}  # type: ignore[call-overload]
                spent = meter.per_unit(r["req_s"] * secs)  # type: ignore[operator]
                r["cpu_us_per_req"] = spent["cpu"]
                r["user_us_per_req"] = spent["user"]
                r["sys_us_per_req"] = spent["sys"]
                row[f"{size}/{name}"] = r
        for size, path in SIZES.items():
            # Latency and CPU at one offered load for all: half the slowest proxy's maximum,
            # capped by what the Python client sustains beside the backend on its core.
            rate = min(min(row[f"{size}/{n}"]["req_s"] for n in names if n != "direct") / 2,  # type: ignore[index]
                       FIXED_RATE_CAP)
            for name in order:
                t = targets[name]
                meter = CpuMeter(t["pid"])  # type: ignore[arg-type]
                with on_load_core():
                    p50, p99 = fixed_rate(str(t["ip"]), int(t["port"]), path, rate, fixed_s)  # type: ignore[call-overload]
                row[f"fixed/{size}/{name}"] = {
                    "rate": rate, "p50_us": p50, "p99_us": p99,
                    "cpu_us_per_req": meter.per_unit(rate * fixed_s)["cpu"]}
        runs.append(row)
        print(f"rep {rep + 1}/{reps}: " + ", ".join(
            f"{k}={v['req_s']:.0f}" for k, v in row.items() if "req_s" in v), file=sys.stderr)  # type: ignore[index, operator]
    memory = {}
    for name in ("haproxy", "nginx", "mcsproxy"):
        t = targets[name]
        memory[name] = idle_memory(str(t["ip"]), int(t["port"]), int(t["pid"]), idle)  # type: ignore[call-overload]
    scaling = measure_scaling(targets, reps, secs)
    return {"runs": runs, "targets": names, "idle_bytes_per_conn": memory,
            "idle_conns": idle, "scaling": scaling}


def write(out: Path, results: dict[str, object], smoke: bool, reps: int, secs: float) -> None:
    runs: list[dict[str, object]] = results["runs"]  # type: ignore[assignment]
    versions = {
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
        .stdout.split("\n")[0],
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        .stderr.strip(),
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        .stdout.split("\n")[0].strip(),
        "python": interpreter(),
        "kernel": platform.release(),
        "data_path": results["data_path"],
    }

    def fmt(v: float | None, digits: str = ".3g") -> str:
        return "—" if v is None else format(v, digits)

    names: list[str] = results["targets"]  # type: ignore[assignment]
    base = results.get("baseline")
    lines = [
        "# HTTP keep-alive proxy benchmark" + (" (smoke: not a measurement)" if smoke else ""),
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, kernel {versions['kernel']}; "
        f"{versions['haproxy']}; {versions['nginx']}; {versions['wrk']}; "
        f"Python {versions['python']} + uvloop + httptools; mcsproxy's data path "
        f"{versions['data_path']}.",
        f"Pinning: wrk (1 thread, {WRK_CONNS} keep-alive connections) and the nginx backend on "
        f"core {LOAD_CORE}; the proxy under test alone on core {PROXY_CORE}, one worker/thread. "
        f"{reps} repetitions of {secs:g} s, peers alternating; medians; ratios per repetition.",
        "mcsproxy runs with every feature on: active HTTP health checks, outlier ejection, "
        "retries with a budget, X-Forwarded-For/-Proto, Via, x-request-id generation, the "
        "cluster response header. HAProxy + features is the same HAProxy with their "
        "nearest equivalents (health checks, observe layer7, retries with retry-on and "
        "redispatch, forwardfor, Via, unique-id as x-request-id, the response header): what "
        "the features cost it; the target peer is HAProxy."
        + (f" The column before is mcsproxy {base}, the same flags, measured in the same "
           "repetitions." if base else ""),
        "",
        "| response | figure | direct | HAProxy | nginx | mcsproxy | mcsproxy / HAProxy "
        "| mcsproxy / nginx | HAProxy + features | mcsproxy / HAProxy + features "
        "| bare relay | bare / HAProxy | mcsproxy / bare |"
        + (" before | before / HAProxy |" if base else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if base else ""),
    ]
    summary: dict[str, object] = {}

    def add_row(key: str, size: str, field: str, label: str) -> None:
        """One figure of one response size: every peer, the ratios, the baseline's."""
        vals = {n: tcp.median(runs, f"{key}/{n}", field) for n in names}
        r_h = tcp.ratio_median(runs, f"{key}/mcsproxy", f"{key}/haproxy", field)
        r_n = tcp.ratio_median(runs, f"{key}/mcsproxy", f"{key}/nginx", field)
        r_f = tcp.ratio_median(runs, f"{key}/mcsproxy", f"{key}/haproxy-features", field)
        r_bh = tcp.ratio_median(runs, f"{key}/bare", f"{key}/haproxy", field)
        r_mb = tcp.ratio_median(runs, f"{key}/mcsproxy", f"{key}/bare", field)
        summary[f"{key}.{field}"] = {**vals, "ratio_haproxy": r_h, "ratio_nginx": r_n,
                                     "ratio_haproxy_features": r_f, "bare_vs_haproxy": r_bh,
                                     "ratio_bare": r_mb}
        line = (f"| {size} | {label} | {fmt(vals['direct'])} | {fmt(vals['haproxy'])} | "
                f"{fmt(vals['nginx'])} | {fmt(vals['mcsproxy'])} | {fmt(r_h)}x | "
                f"{fmt(r_n)}x | {fmt(vals['haproxy-features'])} | {fmt(r_f)}x | "
                f"{fmt(vals.get('bare'))} | {fmt(r_bh)}x | {fmt(r_mb)}x |")
        if base:
            r_b = tcp.ratio_median(runs, f"{key}/baseline", f"{key}/haproxy", field)
            summary[f"{key}.{field}"]["baseline_ratio_haproxy"] = r_b  # type: ignore[index]
            line += f" {fmt(vals['baseline'])} | {fmt(r_b)}x |"
        lines.append(line)

    for size in SIZES:
        for field, label in (("req_s", "req/s"), ("cpu_us_per_req", "proxy CPU µs/req"),
                             ("user_us_per_req", "of which its own (user)"),
                             ("sys_us_per_req", "of which the kernel's (system)"),
                             ("p50_us", "p50 µs"), ("p99_us", "p99 µs")):
            add_row(size, size, field, label)
        for field, label in (("p50_us", "p50 µs at fixed rate"),
                             ("p99_us", "p99 µs at fixed rate"),
                             ("cpu_us_per_req", "proxy CPU µs/req at fixed rate")):
            add_row(f"fixed/{size}", size, field, label)
    if base:
        # The change itself: mcsproxy against the baseline in each repetition.
        pairs = [p for size in SIZES
                 for field, label in (("req_s", "req/s"), ("cpu_us_per_req", "CPU per request"))
                 if (p := change_ratio(runs, f"{size}/mcsproxy", f"{size}/baseline", field,
                                       f"{size} {label}"))]
        summary["mcsproxy_vs_baseline"] = pairs
        lines += ["", "mcsproxy / before, per repetition (median, lowest-highest"
                  + ("; both gateways started anew before each repetition, the order "
                     "alternating" if results.get("fresh") else "") + "): "
                  + ", ".join(pairs) + "."]
    rates = {size: tcp.median(runs, f"fixed/{size}/mcsproxy", "rate") for size in SIZES}
    mem: dict[str, float] = results["idle_bytes_per_conn"]  # type: ignore[assignment]
    scaling: dict[str, object] = results["scaling"]  # type: ignore[assignment]
    lines += [
        "",
        "Rows \"at fixed rate\": an open-loop client (bench/http/openloop.py, 32 keep-alive "
        "connections, on the load core) sends requests at one rate for every peer, half the "
        f"slowest proxy's maximum and at most {FIXED_RATE_CAP:.0f}/s ("
        + ", ".join(f"{size} {fmt(r, '.0f')}/s" for size, r in rates.items())
        + "); latency counts from when a request was issued, including any wait for a free "
        "connection. wrk's rows are at saturation, where p99 mostly restates the rate.",
        "",
        f"Memory per idle keep-alive client connection (RSS growth over "
        f"{results['idle_conns']} connections, one request each): "
        + ", ".join(f"{n} {v / 1024:.1f} KiB" for n, v in mem.items()) + ".",
        "",
        scaling_text(scaling, reps, secs),
    ]
    stem = "http-smoke" if smoke else "http"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"versions": versions, "reps": reps, "seconds": secs, "baseline": base,
         "summary": summary,
         "runs": runs, "idle_bytes_per_conn": mem, "scaling": scaling,
         "pinning": {"load": LOAD_CORE, "proxy": PROXY_CORE}}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
