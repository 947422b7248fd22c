"""Helpers every benchmark under bench/ shares: pinning, CPU from /proc, processes by pid,
medians of per-repetition ratios, and the machine's description for the results.

Scripts run as `python bench/<area>/run.py`, so they import this as `bench.common` after
putting the repository root on sys.path (bench/ is a namespace package, no __init__).
"""

from __future__ import annotations

import contextlib
import importlib.util
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
from types import ModuleType

from mcsproxy.compiled import interpreter, state

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HZ = os.sysconf("SC_CLK_TCK")
# Load generator and backends on core 0, the server under test alone on core 1.
LOAD_CORE, PROXY_CORE = "0", "1"
STOP_TIMEOUT_S = 5.0


def script_module(relpath: str) -> ModuleType:
    """Another benchmark script (a path under the repository root), loaded as a module
    for its set-up and peers: scripts are run by path, not imported as a package."""
    name = "bench_" + relpath.removeprefix("bench/").removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """utime and stime of a process (all its threads), in seconds: its own work, and the
    kernel's on its behalf (system calls, and the loopback delivery of what it sends)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / HZ, int(fields[12]) / HZ


def data_path() -> str:
    """How this tree's gateway runs its data path (mcsproxy/compiled.py), for the results:
    a source edited since `make build` runs interpreted, a third slower, and says so
    only in its start-up log. Warned about here too, before anything is measured."""
    mode, why = state()
    if mode != "compiled":
        print(f"warning: the gateway's data path runs interpreted ({why})", file=sys.stderr)
        return f"interpreted ({why})"
    return f"compiled ({why})"


class CpuMeter:
    """The CPU a process (None: none measured) spends over some work, per unit of it."""

    __slots__ = ("pid", "start")

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.start = cpu_split(pid) if pid else (0.0, 0.0)

    def per_unit(self, units: float) -> dict[str, float | None]:
        """µs per unit: all ("cpu"), the process's own ("user") and the kernel's ("sys")."""
        if not self.pid or units <= 0:
            return {"cpu": None, "user": None, "sys": None}
        user, system = (b - a for a, b in zip(self.start, cpu_split(self.pid), strict=True))
        return {"cpu": (user + system) / units * 1e6, "user": user / units * 1e6,
                "sys": system / units * 1e6}


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


def restart_in_turn(procs: Procs, targets: dict[str, dict[str, object]], rep: int) -> None:
    """--fresh: stop the gateways under test (the targets with a "start", a callable that
    starts one again, waits for it to listen and returns its pid) and start them again,
    which one first alternating by repetition: two processes of the same code differ by
    0-6 % depending on which started first, and alternating makes that noise, not bias."""
    names = [n for n, t in targets.items() if "start" in t]
    for name in names:
        for proc in [p for p in procs.procs if p.pid == targets[name]["pid"]]:
            procs.stop_one(proc)
    for name in names if rep % 2 == 0 else names[::-1]:
        targets[name]["pid"] = targets[name]["start"]()  # type: ignore[operator]
    time.sleep(0.5)  # the first health checks and pool connections settle


def extract_revision(rev: str, into: Path, python: str = sys.executable) -> bool:
    """The mcsproxy package of git revision `rev` in `into`, compiled by `python` as `make
    build` compiles it when that revision has a setup.py: measured interpreted, a baseline
    of the compiled data path would look a third slower than it ran. Whether it was."""
    present = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "setup.py", "pyproject.toml"],
        capture_output=True, text=True, check=True, timeout=60).stdout.split()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "mcsproxy", *present],
                             capture_output=True, check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    if "setup.py" not in present:
        return False
    subprocess.run([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=into,
                   capture_output=True, check=True, timeout=900)
    return True


def interpreter_of(python: str, tree: Path, compiled: bool) -> str:
    """`python`'s version and path, as the results name it. With `compiled`, it must load
    the compiled data path of the package in `tree`: one of another minor version finds no
    extension built for it, and measured interpreted the baseline would look a third slower.
    (Inline rather than mcsproxy.compiled.interpreter: an older revision has none.)"""
    code = ("import os, platform, sys; "
            "print(platform.python_version(), f'({os.path.realpath(sys.executable)})')")
    if compiled:
        code = ("import mcsproxy.compiled as c; "
                "assert c.STATE == 'compiled', f'data path {c.STATE}: {c.REASON}'; " + code)
    done = subprocess.run([python, "-c", code], cwd=tree, capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        raise RuntimeError(f"baseline under {python} in {tree}: "
                           f"{(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return done.stdout.strip()


def commit_of(rev: str) -> str:
    """The short commit `rev` names now: results say what ran, not a name that moves
    (HEAD, a branch)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def prepare_baseline(run: Path, rev: str | None, python: str | None) -> tuple[Path, str, str]:
    """For --baseline / --baseline-python: the tree whose package the baseline gateway runs
    (REV's, extracted into run/baseline and compiled, or this one), the interpreter that
    runs it, and how the results name the baseline ("at git revision 1a2b3c4, run by
    Python 3.11.7 (/path)"; the interpreter only when another one was asked for)."""
    asked, python = python, python or sys.executable
    base, compiled, where = ROOT, True, "from the same tree"
    if rev:
        base = run / "baseline"
        base.mkdir()
        compiled = extract_revision(rev, base, python)
        where = f"at git revision {commit_of(rev)}"
    described = interpreter_of(python, base, compiled)
    return base, python, where + (f", run by Python {described}" if asked else "")


def change_ratio(runs: list[dict[str, object]], a: str, b: str, field: str,
                 label: str) -> str | None:
    """run[a][field] / run[b][field] per repetition as results print a change against its
    baseline: the median and the lowest and highest (an A/A run shows the noise floor)."""
    r = ratios(runs, a, b, field)
    return f"{label} {statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f})" if r else None


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
