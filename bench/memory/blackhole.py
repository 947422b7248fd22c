"""The gateway with every endpoint of its clusterset blackholed: RSS, open descriptors,
CPU, /readyz and DNS answer times while health probes time out, then how long SIGTERM
takes to end it.

The services are bench/memory/run.py's (N services, each exported by 3 clusters with 10
endpoints). The gateway runs in a network namespace of its own (needs root and
`ip netns`) where the endpoints' addresses lead to a veth whose peer is down: a SYN
goes out and nothing ever answers, as with a cluster behind a dropped link, where a
loopback address nothing listens on would refuse at once.

    .venv/bin/python bench/memory/blackhole.py 3000 [SECONDS]

Timings (ms) come from a shared machine and show only whether the loop keeps up
(milliseconds) or not (seconds); the descriptor and RSS figures are the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

write_services = common.script_module("bench/memory/run.py").write_services

NETNS = f"mcsbh-{os.getpid()}"
ADMIN = ("127.80.0.1", 29901)
DNS = ("127.80.0.1", 25353)
ENDPOINTS = "127.80.100.0/22"  # run.py's endpoints: 127.80.100-102.x
SAMPLE_EVERY_S = 2.0
STOP_WAIT_S = 60.0


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


def make_netns() -> None:
    """Loopback for the ClusterSetIPs, DNS and admin; the endpoints out a dead link."""
    ip("netns", "add", NETNS)
    ns = ("-n", NETNS)
    ip(*ns, "link", "set", "lo", "up")
    ip(*ns, "link", "add", "bh0", "type", "veth", "peer", "name", "bh1")
    ip(*ns, "link", "set", "bh0", "up", "arp", "off")  # bh1 stays down: no carrier
    ip(*ns, "addr", "add", "127.80.99.1/24", "dev", "bh0")
    subprocess.run(["ip", "netns", "exec", NETNS, "sysctl", "-qw",
                    "net.ipv4.conf.bh0.route_localnet=1"], check=True, timeout=10)
    ip(*ns, "route", "del", "127.0.0.0/8", "table", "local")
    ip(*ns, "route", "add", "local", "127.80.0.0/18", "dev", "lo", "table", "local")
    ip(*ns, "route", "add", ENDPOINTS, "dev", "bh0")


def in_netns(argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *argv]


def probe_script() -> str:
    """Run inside the namespace: one /readyz and one DNS query, their times in ms."""
    return f"""
import json, socket, struct, time, urllib.request
out = {{}}
t = time.monotonic()
try:
    urllib.request.urlopen("http://{ADMIN[0]}:{ADMIN[1]}/readyz", timeout=5).read()
    out["readyz_ms"] = round((time.monotonic() - t) * 1000, 1)
except Exception as e:
    out["readyz_ms"] = None; out["readyz_error"] = type(e).__name__
name = b"".join(bytes([len(p)]) + p for p in b"svc1.ns1.svc.clusterset.local".split(b"."))
q = struct.pack(">6H", 7, 0x0100, 1, 0, 0, 0) + name + b"\\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
t = time.monotonic()
try:
    s.sendto(q, ("{DNS[0]}", {DNS[1]})); s.recv(512)
    out["dns_ms"] = round((time.monotonic() - t) * 1000, 1)
except Exception as e:
    out["dns_ms"] = None
print(json.dumps(out))
"""


def proc_figures(pid: int) -> dict[str, float]:
    status = dict(line.split(":", 1)
                  for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}


def sample(pid: int) -> dict[str, object]:
    figures: dict[str, object] = dict(proc_figures(pid))
    answer = subprocess.run(in_netns([sys.executable, "-c", probe_script()]),
                            capture_output=True, text=True, timeout=30)
    figures.update(json.loads(answer.stdout or "{}"))
    return figures


def measure(n: int, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        write_services(n, Path(d) / "all.yaml")
        gateway = subprocess.Popen(in_netns(
            [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "cluster-a",
             "--source", f"file:{d}", "--dns-listen", f"{DNS[0]}:{DNS[1]}",
             "--admin-listen", f"{ADMIN[0]}:{ADMIN[1]}", "--log-level", "error"]))
        # `ip netns exec` execs the gateway: its pid is the gateway's.
        started = time.monotonic()
        samples = []
        try:
            while True:
                if gateway.poll() is not None:
                    raise SystemExit("the gateway exited")
                if sample(gateway.pid).get("readyz_ms") is not None:
                    break
                if time.monotonic() - started > 300:
                    raise SystemExit("not ready within 300 s")
                time.sleep(0.5)
            ready_s = time.monotonic() - started
            last_cpu, last_t = proc_figures(gateway.pid)["cpu_s"], time.monotonic()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(SAMPLE_EVERY_S)
                s = sample(gateway.pid)
                now = time.monotonic()
                s["cpu_pct"] = round((s["cpu_s"] - last_cpu) / (now - last_t) * 100)  # type: ignore[operator]
                last_cpu, last_t = s["cpu_s"], now
                samples.append(s)
            asked = time.monotonic()
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(timeout=STOP_WAIT_S)
                stop_s: float | None = round(time.monotonic() - asked, 2)
            except subprocess.TimeoutExpired:
                stop_s = None  # still running after STOP_WAIT_S
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()

    def spread(key: str) -> list[float | None]:
        values = [s.get(key) for s in samples]
        known = [v for v in values if isinstance(v, (int, float))]
        return [min(known), max(known)] if known else [None, None]

    return {"services": n, "endpoints": n * 30, "ready_s": round(ready_s, 1),
            "rss_mib": spread("rss_mib"), "fds": spread("fds"), "cpu_pct": spread("cpu_pct"),
            "readyz_ms": spread("readyz_ms"), "dns_ms": spread("dns_ms"),
            "unanswered": sum(1 for s in samples
                              if s.get("readyz_ms") is None or s.get("dns_ms") is None),
            "samples": len(samples), "sigterm_exit_s": stop_s}


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root (ip netns)")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 40.0
    make_netns()
    try:
        print(json.dumps(measure(n, seconds)))
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False, timeout=10)


if __name__ == "__main__":
    main()
