"""Failover under steady locust load: mcsproxy and HAProxy given the same endpoints.

Three clusters, two backend pods each (bench/failover/backend.py: HTTP on :8080, TCP echo
on :9000, answers carry the cluster's name). As root, each cluster's pods live in a network
namespace of their own behind a veth pair (10.254.N.0/24); otherwise they listen on
loopback (127.0.N.x) and the blackhole scenario is skipped. locust (bench/locustfile.py)
drives a bounded rate (users x per-user rate) through the proxy under test; mcsproxy's
users resolve the services through its DNS, HAProxy's are given its fixed addresses.

Scenarios, each run once per proxy, the fault injected `--warm` seconds into the load:
  cluster-down      every pod of cluster-c stops (connects refused)
  cluster-blackhole cluster-c's packets are dropped: a blackhole route for the host side's
                    address inside cluster-c's namespace eats every reply (SYN-ACKs, data).
                    On loopback nothing equivalent exists: `ip route add blackhole` does not
                    apply to local addresses, so this needs the namespace (root).
  backend-503       one pod of cluster-a answers 503 to everything, health checks included
  cluster-returns   cluster-c is down when the load starts and comes back at the fault

Both proxies are configured alike: health checks every 1 s, down after 2 failures, up after
2 successes; connect timeout 1 s; 3 tries with another server (HAProxy: `retries 3`,
`option redispatch`, `retry-on conn-failure empty-response response-timeout 503`;
mcsproxy retries refused/timed-out connects and 502/503/504 by default); per-try response
timeout 2 s. The client gives up on a request after 5 s. Pinning: locust and the backends on
core 0, the proxy under test alone on core 1.

Reported per run: failed requests (all, and after the fault), time to recover (from the
fault until every request started from then on succeeds and the p99 of the requests started
in a 1 s window is within 20 % of the baseline p99 before the fault, floor 1 ms), and the
traffic split over time (PNG, fault marked).

    .venv/bin/python bench/failover/run.py            # all scenarios, ~4 minutes
    .venv/bin/python bench/failover/run.py --smoke    # seconds per run; proves it runs
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    RESULTS,
    Procs,
    machine,
    version,
    wait_port,
)

CLUSTERS = ("cluster-a", "cluster-b", "cluster-c")
PODS = 2
HTTP_PORT, TCP_PORT = 8080, 9000
WEB_VIP, ECHO_VIP = "127.240.199.1", "127.240.199.2"
WEB_NAME, ECHO_NAME = "web.bench.svc.clusterset.local", "echo.bench.svc.clusterset.local"
FAULT_CLUSTER, FAULT_POD = "cluster-c", ("cluster-a", 0)
SCENARIOS = ("cluster-down", "cluster-blackhole", "backend-503", "cluster-returns")
TARGETS = ("mcsproxy", "haproxy")
CONNECT_TIMEOUT_S, HEALTH_INTERVAL_S, PER_TRY_S, CLIENT_TIMEOUT_S = 1, 1, 2, 5
RECOVERY_WINDOW_S, RECOVERY_STEP_S, P99_SLACK, P99_FLOOR_MS = 1.0, 0.25, 1.2, 1.0
BUCKET_S = 0.25
NS_PREFIX = "mcsbench-"

HAPROXY_CONF = """global
  nbthread 1
  maxconn 4000
defaults
  timeout connect {connect}s
  timeout client 30s
  timeout server {per_try}s
  timeout check 1s
  retries 3
  option redispatch
  default-server check inter {inter}s fall 2 rise 2
frontend web
  mode http
  bind 127.0.0.1:{http}
  default_backend web
backend web
  mode http
  balance roundrobin
  option httpchk GET /healthz
  http-reuse always
  retry-on conn-failure empty-response response-timeout 503
{http_servers}
listen echo
  mode tcp
  bind 127.0.0.1:{tcp}
  balance roundrobin
{tcp_servers}
"""
GATEWAY_FLAGS = ("--connect-timeout", str(CONNECT_TIMEOUT_S), "--connect-attempts", "3",
                 "--health-interval", str(HEALTH_INTERVAL_S), "--health-timeout", "1",
                 "--health-unhealthy-threshold", "2", "--health-healthy-threshold", "2",
                 "--health-http-path", "/healthz", "--http-per-try-timeout", str(PER_TRY_S),
                 "--dns-ttl", "5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@dataclass
class Pod:
    cluster: str
    index: int
    address: str
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Clusterset:
    """The three clusters' pods, in network namespaces (root) or on loopback."""

    procs: Procs
    netns: bool
    pods: list[Pod] = field(default_factory=list)
    blackholed: set[str] = field(default_factory=set)

    def ns(self, cluster: str) -> str:
        return NS_PREFIX + cluster

    def host_address(self, cluster: str) -> str:
        return f"10.254.{CLUSTERS.index(cluster) + 1}.1"

    def setup(self) -> None:
        for n, cluster in enumerate(CLUSTERS, start=1):
            if self.netns:
                self._teardown_ns(cluster)  # left over by a killed run
                ns, host, inner = self.ns(cluster), f"mcsb{n}h", f"mcsb{n}n"
                ip("netns", "add", ns)
                ip("link", "add", host, "type", "veth", "peer", "name", inner)
                ip("link", "set", inner, "netns", ns)
                ip("addr", "add", f"{self.host_address(cluster)}/24", "dev", host)
                ip("link", "set", host, "up")
                ip("-n", ns, "link", "set", "lo", "up")
                for k in range(PODS):
                    ip("-n", ns, "addr", "add", f"10.254.{n}.{10 + k}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")
            for k in range(PODS):
                address = f"10.254.{n}.{10 + k}" if self.netns else f"127.0.{n}.{10 + k}"
                self.pods.append(Pod(cluster, k, address))
        for cluster in CLUSTERS:
            self.start(cluster)

    def _teardown_ns(self, cluster: str) -> None:
        # Deleting the namespace deletes its veth end, and with it the pair; the host end
        # is deleted too in case a killed run left the namespace held open.
        host = f"mcsb{CLUSTERS.index(cluster) + 1}h"
        for argv in (["netns", "del", self.ns(cluster)], ["link", "del", host]):
            subprocess.run(["ip", *argv], capture_output=True, timeout=10, check=False)

    def teardown(self) -> None:
        for pod in self.pods:
            if pod.proc is not None:
                self.procs.stop_one(pod.proc)
                pod.proc = None
        if self.netns:
            for cluster in CLUSTERS:
                self._teardown_ns(cluster)

    def of(self, cluster: str) -> list[Pod]:
        return [p for p in self.pods if p.cluster == cluster]

    def start(self, cluster: str) -> None:
        for pod in self.of(cluster):
            if pod.proc is not None:
                continue
            prefix = ("ip", "netns", "exec", self.ns(cluster)) if self.netns else ()
            pod.proc = self.procs.start(
                LOAD_CORE, *prefix, sys.executable, str(Path(__file__).with_name("backend.py")),
                "--cluster", cluster, "--ip", pod.address, "--http-port", str(HTTP_PORT),
                "--tcp-port", str(TCP_PORT), stderr=None)
        for pod in self.of(cluster):
            wait_port(pod.address, HTTP_PORT)
            wait_port(pod.address, TCP_PORT)

    def stop(self, cluster: str) -> None:
        for pod in self.of(cluster):
            if pod.proc is not None:
                self.procs.stop_one(pod.proc)
                pod.proc = None

    def blackhole(self, cluster: str) -> None:
        ip("-n", self.ns(cluster), "route", "add", "blackhole",
           f"{self.host_address(cluster)}/32")
        self.blackholed.add(cluster)

    def restore(self) -> None:
        """Back to every pod up and healthy, nothing dropped."""
        for cluster in list(self.blackholed):
            ip("-n", self.ns(cluster), "route", "del", "blackhole",
               f"{self.host_address(cluster)}/32")
            self.blackholed.discard(cluster)
        for cluster in CLUSTERS:
            self.start(cluster)
        for pod in self.pods:
            if pod.proc is not None:
                pod.proc.send_signal(signal.SIGUSR2)

    def fail_pod(self, cluster: str, index: int) -> None:
        pod = self.of(cluster)[index]
        assert pod.proc is not None
        pod.proc.send_signal(signal.SIGUSR1)


def slices_yaml(cs: Clusterset) -> str:
    docs = []
    for svc, vip, port, proto in (("web", WEB_VIP, HTTP_PORT, "appProtocol: http, "),
                                  ("echo", ECHO_VIP, TCP_PORT, "")):
        docs.append(f"""apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: {svc}, namespace: bench}}
spec:
  type: ClusterSetIP
  ips: ["{vip}"]
  ports: [{{name: p, protocol: TCP, {proto}port: {80 if svc == 'web' else port}}}]""")
        for cluster in CLUSTERS:
            addrs = ", ".join(f'{{addresses: ["{p.address}"]}}' for p in cs.of(cluster))
            docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {svc}-{cluster}
  namespace: bench
  labels:
    multicluster.kubernetes.io/service-name: {svc}
    multicluster.kubernetes.io/source-cluster: {cluster}
addressType: IPv4
ports: [{{name: p, protocol: TCP, port: {port}}}]
endpoints: [{addrs}]""")
    return "\n---\n".join(docs) + "\n"


@contextmanager
def proxy(target: str, cs: Clusterset, run: Path,
          access_log: Path | None = None) -> Iterator[dict[str, object]]:
    """Start the proxy under test on PROXY_CORE; yield the locust configuration for it."""
    procs = Procs()
    try:
        if target == "mcsproxy":
            src = run / "imports"
            src.mkdir(exist_ok=True)
            (src / "bench.yaml").write_text(slices_yaml(cs))
            dns = free_port()
            logging = (("--access-log", str(access_log), "--access-log-format", "json",
                        "--log-level", "info") if access_log is not None
                       else ("--log-level", "warning"))
            procs.start(PROXY_CORE, sys.executable, "-m", "mcsproxy", "gateway",
                        "--cluster-id", "cluster-a", "--source", f"file:{src}",
                        "--dns-listen", f"127.0.0.1:{dns}", "--admin-listen", "127.0.0.1:0",
                        *logging, *GATEWAY_FLAGS,
                        stderr=None if access_log is None else
                        access_log.with_suffix(".err").open("ab"))
            wait_port(WEB_VIP, 80)
            wait_port(ECHO_VIP, TCP_PORT)
            yield {"dns": f"127.0.0.1:{dns}", "http": f"{WEB_NAME}:80",
                   "tcp": f"{ECHO_NAME}:{TCP_PORT}"}
        else:
            http, tcp = free_port(), free_port()
            servers = [(f"{p.cluster}-{p.index}", p.address) for p in cs.pods]
            (run / "haproxy.cfg").write_text(HAPROXY_CONF.format(
                connect=CONNECT_TIMEOUT_S, per_try=PER_TRY_S, inter=HEALTH_INTERVAL_S,
                http=http, tcp=tcp,
                http_servers="\n".join(f"  server {n} {a}:{HTTP_PORT}" for n, a in servers),
                tcp_servers="\n".join(f"  server {n} {a}:{TCP_PORT}" for n, a in servers)))
            procs.start(PROXY_CORE, "haproxy", "-f", str(run / "haproxy.cfg"), "-db",
                        stderr=(run / "haproxy.log").open("ab"))
            wait_port("127.0.0.1", http)
            wait_port("127.0.0.1", tcp)
            yield {"dns": None, "http": f"127.0.0.1:{http}", "tcp": f"127.0.0.1:{tcp}"}
    finally:
        procs.stop()


@dataclass
class Timing:
    warm_s: float
    after_s: float
    users: int
    rate_per_user: float


def run_one(scenario: str, target: str, cs: Clusterset, timing: Timing, run: Path,
            csv_dir: Path, keep: bool = False) -> dict[str, object]:
    """One scenario against one proxy: load, fault at warm_s, records analysed."""
    if scenario == "cluster-returns":
        cs.stop(FAULT_CLUSTER)
    access_log = run / f"{scenario}-{target}.access.log" if keep else None
    with proxy(target, cs, run, access_log) as endpoints:
        # Let the health checks see the starting state (2 checks at 1 s) before load.
        time.sleep(2.5 if scenario == "cluster-returns" else 1.0)
        log = run / f"{scenario}-{target}.requests.csv"
        config = {**endpoints, "rate": timing.rate_per_user, "timeout": CLIENT_TIMEOUT_S,
                  "log": str(log)}
        prefix = csv_dir / f"{scenario}-{target}"
        seconds = timing.warm_s + timing.after_s
        locust = subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, sys.executable, "-m", "locust",
             "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
             "-u", str(timing.users), "-r", str(timing.users * 10), "-t", f"{seconds:g}s",
             "--stop-timeout", str(CLIENT_TIMEOUT_S), "--csv", str(prefix), "--only-summary",
             "--exit-code-on-error", "0", "--loglevel", "WARNING"],
            env={**os.environ, "MCSB_LOCUST": json.dumps(config)},
            stdout=subprocess.DEVNULL, stderr=(run / "locust.err").open("ab"))
        try:
            started = Path(f"{log}.started")
            deadline = time.monotonic() + 30
            while not started.exists():
                if locust.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"locust did not start; see {run / 'locust.err'}")
                time.sleep(0.05)
            time.sleep(timing.warm_s)
            fault_at = time.time()
            inject(scenario, cs)
            if keep:
                (run / f"{scenario}-{target}.fault").write_text(f"{fault_at}\n")
            locust.wait(timeout=seconds + CLIENT_TIMEOUT_S + 30)
        finally:
            if locust.poll() is None:
                locust.kill()
                locust.wait()
    cs.restore()
    for leftover in ("_exceptions.csv", "_stats_history.csv"):
        prefix.with_name(prefix.name + leftover).unlink(missing_ok=True)
    if not log.exists():
        raise RuntimeError(f"locust wrote no request log; see {run / 'locust.err'}")
    return analyse(read_records(log), fault_at, scenario, target, timing.after_s)


def inject(scenario: str, cs: Clusterset) -> None:
    if scenario == "cluster-down":
        cs.stop(FAULT_CLUSTER)
    elif scenario == "cluster-blackhole":
        cs.blackhole(FAULT_CLUSTER)
    elif scenario == "backend-503":
        cs.fail_pod(*FAULT_POD)
    elif scenario == "cluster-returns":
        cs.start(FAULT_CLUSTER)
    else:
        raise ValueError(scenario)


def read_records(path: Path) -> list[tuple[float, str, bool, float, str]]:
    with path.open() as f:
        return [(float(r["wall"]), r["kind"], r["ok"] == "1", float(r["latency_ms"]),
                 r["cluster"]) for r in csv.DictReader(f)]


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def recovery(records: list[tuple[float, str, bool, float, str]], fault_at: float,
             first: float, end: float) -> tuple[float, float | None]:
    """The baseline p99 (ms) and the time to recover of these records (see the module
    docstring), None when they did not recover within the run."""
    begun = [(r[0] - fault_at, r) for r in records]
    # Baseline: the median p99 of the 1 s windows before the fault, so that it is compared
    # with windows of the same size after it.
    pre = [(t, r[3]) for t, r in begun if r[0] > first + 0.5 and t + r[3] / 1000 < 0 and r[2]]
    windows = []
    w = min((t for t, _ in pre), default=0.0)
    while w + RECOVERY_WINDOW_S <= 0:
        windows.append(p99([lat for t, lat in pre if w <= t < w + RECOVERY_WINDOW_S]))
        w += RECOVERY_WINDOW_S
    measured = sorted(q for q in windows if q is not None)
    base_p99 = measured[len(measured) // 2] if measured else 0.0
    bound = max(base_p99 * P99_SLACK, base_p99 + P99_FLOOR_MS)
    failed_starts = [t for t, r in begun if not r[2]]
    w = 0.0
    while w + RECOVERY_WINDOW_S <= end:
        if not any(t >= w for t in failed_starts):
            q = p99([r[3] for t, r in begun if w <= t < w + RECOVERY_WINDOW_S])
            if q is not None and q <= bound:
                return base_p99, w
        w += RECOVERY_STEP_S
    return base_p99, None


def analyse(records: list[tuple[float, str, bool, float, str]], fault_at: float,
            scenario: str, target: str, after_s: float) -> dict[str, object]:
    """Failures, time to recover and the split per time bucket, times relative to the fault."""
    if not records:
        raise RuntimeError(f"{scenario}/{target}: no requests were made")
    first = min(r[0] for r in records)
    # Failures count when they happen (completion); recovery is judged by when requests
    # start, so a request still stuck on a dead endpoint counts against its own window.
    done = [(r[0] + r[3] / 1000 - fault_at, r) for r in records]
    failures = [t for t, r in done if not r[2]]
    after = [t for t in failures if t >= 0]
    end = min(max(t for t, _ in done), after_s)  # the stop phase is not steady load
    base_p99, recovered = recovery(records, fault_at, first, end)
    # The HTTP requests alone: the HTTP proxy's own recovery, without the TCP echo's.
    _, recovered_http = recovery([r for r in records if r[1] == "http"], fault_at, first, end)
    buckets: dict[int, dict[str, int]] = {}
    for r in records:
        b = int((r[0] - fault_at) // BUCKET_S)
        key = r[4] if r[2] else "failed"
        buckets.setdefault(b, {})[key] = buckets.setdefault(b, {}).get(key, 0) + 1
    tail = [r for t, r in done if end - 3.0 <= t < end and r[2]]
    split = {c: sum(1 for r in tail if r[4] == c) / max(len(tail), 1) for c in CLUSTERS}
    back = None
    if scenario == "cluster-returns":
        seen = [r[0] - fault_at for r in records if r[2] and r[4] == FAULT_CLUSTER
                and r[0] >= fault_at]
        back = min(seen) if seen else None
    grace = CONNECT_TIMEOUT_S + HEALTH_INTERVAL_S
    return {
        "scenario": scenario, "target": target, "requests": len(records),
        "failed": len(failures), "failed_after_fault": len(after),
        "failed_after_grace": sum(1 for t in after if t >= grace),
        "failed_by_kind": {k: sum(1 for r in records if not r[2] and r[1] == k)
                           for k in ("http", "tcp")},
        "errors": sorted({r[4] for r in records if not r[2]}),
        "last_failure_s": max(after) if after else None,
        "baseline_p99_ms": base_p99, "recovery_s": recovered, "recovery_http_s": recovered_http,
        "returning_cluster_first_served_s": back,
        "split_last_3s": split, "req_s": len(records) / max(end - (first - fault_at), 1e-9),
        "buckets": {str(k * BUCKET_S): v for k, v in sorted(buckets.items())},
    }


def plot(results: list[dict[str, object]], scenario: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["scenario"] == scenario]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.6 * len(rows)), sharex=True,
                             squeeze=False)
    colours = {"cluster-a": "#4c72b0", "cluster-b": "#55a868", "cluster-c": "#8172b2",
               "failed": "#c44e52"}
    for ax, r in zip(axes[:, 0], rows, strict=True):
        buckets: dict[str, dict[str, int]] = r["buckets"]  # type: ignore[assignment]
        xs = [float(k) for k in buckets]
        bottom = [0.0] * len(xs)
        for key, colour in colours.items():
            ys = [buckets[k].get(key, 0) / BUCKET_S for k in buckets]
            ax.bar(xs, ys, width=BUCKET_S, bottom=bottom, color=colour, label=key,
                   align="edge", linewidth=0)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ax.set_ylim(0, max(bottom, default=1) * 1.15)
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        rec = r["recovery_s"]
        title = (f"{r['target']}: {r['failed']} failed of {r['requests']}, recovered "
                 + (f"{rec:.2f} s after the fault" if rec is not None else "not within the run"))
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("req/s")
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel(f"seconds from the fault ({scenario}, dashed line)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt(v: object, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def write(out: Path, results: list[dict[str, object]], skipped: dict[str, str], smoke: bool,
          timing: Timing, netns: bool) -> None:
    stem = "failover-smoke" if smoke else "failover"
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in results)]
    for s in scenarios:
        plot(results, s, out / f"{stem}-{s}.png")
    layout = ("network namespaces with veth pairs (10.254.N.0/24)" if netns
              else "loopback addresses (127.0.N.x)")
    info = machine()
    locust = version([sys.executable, "-m", "locust", "--version"]).split()
    lines = [
        "# Failover under steady load" + (" (smoke: not a measurement)" if smoke else ""), "",
        f"Machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}; "
        f"{version(['haproxy', '-v'])}; locust {locust[1] if len(locust) > 1 else '?'}.",
        f"Pinning: locust and the 6 backend pods on core {LOAD_CORE}, the proxy under test "
        f"alone on core {PROXY_CORE}. Clusters on {layout}. Load: {timing.users} users x "
        f"{timing.rate_per_user:g} req/s (3 HTTP keep-alive : 1 new TCP connection), fault "
        f"at {timing.warm_s:g} s, {timing.after_s:g} s after it; client timeout "
        f"{CLIENT_TIMEOUT_S} s.",
        f"Both proxies: health checks every {HEALTH_INTERVAL_S} s (fall 2, rise 2), connect "
        f"timeout {CONNECT_TIMEOUT_S} s, 3 tries on other servers, per-try timeout "
        f"{PER_TRY_S} s, retry on connect failure and 502/503/504 (HAProxy: `retries 3`, "
        "`option redispatch`, `retry-on conn-failure empty-response response-timeout 503`).",
        "Recovery: from the fault until every request started from then on succeeds and "
        "the p99 of the requests started in a 1 s window is within 20 % of the p99 before "
        f"the fault (floor {P99_FLOOR_MS:g} ms); \"HTTP only\": the same over the HTTP "
        "requests alone (the HTTP proxy's own recovery, without the TCP echo's connects).", "",
        "| scenario | proxy | requests | failed | failed after fault | failed after "
        f"{CONNECT_TIMEOUT_S + HEALTH_INTERVAL_S} s | recovery s | recovery s, HTTP only | "
        "baseline p99 ms | split a/b/c, last 3 s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        split: dict[str, float] = r["split_last_3s"]  # type: ignore[assignment]
        lines.append(
            f"| {r['scenario']} | {r['target']} | {r['requests']} | {r['failed']} | "
            f"{r['failed_after_fault']} | {r['failed_after_grace']} | {fmt(r['recovery_s'])} | "
            f"{fmt(r.get('recovery_http_s'))} | "
            f"{fmt(r['baseline_p99_ms'], '.1f')} | "
            + "/".join(f"{split[c] * 100:.0f}" for c in CLUSTERS)
            + f" | {', '.join(r['errors']) or '—'} |")  # type: ignore[arg-type]
    back = [r for r in results if r["scenario"] == "cluster-returns"]
    if back:
        lines += ["", "cluster-returns: first request served by the returning cluster "
                  + ", ".join(f"{r['target']} {fmt(r['returning_cluster_first_served_s'])} s"
                              for r in back) + " after its pods started."]
    for s, why in skipped.items():
        lines += ["", f"{s}: skipped ({why})."]
    lines += ["", "Plots: " + ", ".join(f"![{s}]({stem}-{s}.png)" for s in scenarios)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"smoke": smoke, "machine": info, "netns": netns, "timing": timing.__dict__,
         "pinning": {"load": LOAD_CORE, "proxy": PROXY_CORE}, "skipped": skipped,
         "results": results}, indent=1))
    print("\n".join(lines))


def netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = NS_PREFIX + "probe"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True,
                        timeout=10).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10, check=False)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="short runs: proves every scenario runs")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--warm", type=float, default=8.0, help="seconds of load before the fault")
    ap.add_argument("--after", type=float, default=12.0, help="seconds of load after it")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s per user")
    ap.add_argument("--no-netns", action="store_true", help="clusters on loopback addresses")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="keep the work files in DIR (per-request CSVs, the gateway's JSON "
                         "access log and log): to find out which requests failed and why")
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    missing = [t for t in ("taskset", *(["haproxy"] if "haproxy" in targets else []))
               if shutil.which(t) is None]
    # find_spec, not import: importing locust monkey-patches this process with gevent.
    missing += [f"{m} (pip install -e '.[bench]')" for m in ("locust", "matplotlib")
                if importlib.util.find_spec(m) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 3
    timing = (Timing(1.5, 2.5, 10, 10.0) if args.smoke
              else Timing(args.warm, args.after, args.users, args.rate))
    netns = not args.no_netns and netns_available()
    scenarios = args.scenarios.split(",")
    skipped = {}
    if "cluster-blackhole" in scenarios and not netns:
        scenarios.remove("cluster-blackhole")
        skipped["cluster-blackhole"] = ("needs network namespaces (root and `ip netns`): a "
                                        "blackhole route does not apply to loopback addresses")
    out = args.out
    csv_dir = out / ("failover-smoke" if args.smoke else "failover")
    csv_dir.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    results = []
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (nullcontext(str(args.keep)) if args.keep is not None
          else tempfile.TemporaryDirectory(prefix="mcsbench-failover-")) as tmp:
        cs = Clusterset(procs, netns)
        try:
            cs.setup()
            for scenario in scenarios:
                for target in targets:
                    r = run_one(scenario, target, cs, timing, Path(tmp), csv_dir,
                                keep=args.keep is not None)
                    print(f"{scenario} / {target}: {r['failed']} failed of {r['requests']}, "
                          f"recovery {fmt(r['recovery_s'])} s", file=sys.stderr, flush=True)
                    results.append(r)
        finally:
            cs.teardown()
            procs.stop()
    write(out, results, skipped, args.smoke, timing, netns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
