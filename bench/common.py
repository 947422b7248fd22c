"""Helpers every benchmark under bench/ shares: pinning, CPU from /proc, processes by pid,
medians of per-repetition ratios, and the machine's description for the results.

Scripts run as `python bench/<area>/run.py`, so they import this as `bench.common` after
putting the repository root on sys.path (bench/ is a namespace package, no __init__).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mcsproxy.compiled import interpreter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HZ = os.sysconf("SC_CLK_TCK")
# Load generator and backends on core 0, the server under test alone on core 1.
LOAD_CORE, PROXY_CORE = "0", "1"
STOP_TIMEOUT_S = 5.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


@contextlib.contextmanager
def on_load_core() -> Iterator[None]:
    """Run the enclosed work (an in-process load client) on the load core, then give the
    affinity back: left unpinned it would share the proxy's core and slow what it measures."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def wait_port(ip: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{ip}:{port} did not open within {timeout}s")


class Procs:
    """Every process started here, stopped by pid (SIGTERM, then SIGKILL after a grace)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, core: str | None, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        """Start `cmd` pinned to `core` (None: unpinned); stdout discarded by default."""
        argv = ["taskset", "-c", core, *cmd] if core is not None else list(cmd)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop_one(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in list(self.procs):
            self.stop_one(proc)


def median(runs: list[dict[str, object]], key: str, field: str) -> float | None:
    vals = [r[key][field] for r in runs if key in r and r[key][field] is not None]  # type: ignore[index]
    return statistics.median(vals) if vals else None  # type: ignore[type-var]


def ratios(runs: list[dict[str, object]], a: str, b: str, field: str) -> list[float]:
    """run[a][field] / run[b][field] per repetition (same minutes compared)."""
    return [r[a][field] / r[b][field] for r in runs  # type: ignore[index,operator]
            if a in r and b in r and r[b][field]]  # type: ignore[index]


def ratio_median(runs: list[dict[str, object]], a: str, b: str, field: str) -> float | None:
    """Median over repetitions of run[a][field] / run[b][field]."""
    vals = ratios(runs, a, b, field)
    return statistics.median(vals) if vals else None


def version(argv: list[str]) -> str:
    """First line a tool prints about its version (stdout or stderr), or 'absent'."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else ""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """What the results were measured on (named in every summary)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "kernel": platform.release(), "python": interpreter()}


def peer_versions() -> dict[str, str]:
    return {
        "haproxy": version(["haproxy", "-v"]),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "-v"]),
        "iperf3": version(["iperf3", "-v"]),
        "dnsperf": version(["sh", "-c", "dnsperf -h 2>&1 | grep -i version || true"]),
        "knot": version(["knotd", "--version"]),
        "dnsdist": version(["dnsdist", "--version"]),
        "locust": version([sys.executable, "-m", "locust", "--version"]),
    }
