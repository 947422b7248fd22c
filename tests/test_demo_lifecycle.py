"""`mcsproxy demo` when things go wrong: the demo killed without Ctrl-C, started without
root, or failing to start, leaves nothing running and says why."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_demo import BANNER_END, children_of, read_banner

pytestmark = pytest.mark.timeout(90)


def start_demo(workdir: Path, *prefix: str, entry: tuple[str, ...] = ("-m", "mcsproxy"),
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    """The demo with its banner read (lines so far, ending with BANNER_END if it started)."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, *entry, "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    return proc, read_banner(proc)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Those of `pids` still running (not zombies) after up to `timeout` seconds."""
    def running(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"

    deadline = time.monotonic() + timeout
    left = [p for p in pids if running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if running(p)]
    return left


@pytest.fixture
def cleanup() -> Iterator[list[tuple[subprocess.Popen[str], Path]]]:
    """Demos a test started: whatever is left of them is killed, children included."""
    started: list[tuple[subprocess.Popen[str], Path]] = []
    yield started
    for proc, workdir in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        for pid in children_of(workdir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_demo_children_die_with_the_demo(
    sig: signal.Signals, tmp_path: Path, cleanup: list[tuple[subprocess.Popen[str], Path]],
) -> None:
    workdir = tmp_path / "demo"
    proc, lines = start_demo(workdir)
    cleanup.append((proc, workdir))
    assert lines and lines[-1] == BANNER_END, "\n".join(lines)
    kids = [pid for pid in children_of(workdir) if pid != proc.pid]
    assert len(kids) == 4  # the controller and three gateways

    proc.send_signal(sig)  # SIGKILL: OOM or `kill -9`; SIGHUP: its terminal was closed
    rc = proc.wait(15)
    assert wait_gone(kids, 10) == []
    if sig == signal.SIGHUP:
        assert rc == 0  # a clean stop, as on Ctrl-C


def unprivileged() -> list[str]:
    """A command prefix that runs the demo without the right to bind ports below 1024."""
    if os.geteuid() != 0:
        return []
    # uid 0 without any capability binds like an ordinary user, and can still use the
    # root-owned tmp_path and the checkout.
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop "
                    "CAP_NET_BIND_SERVICE")
    done = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    return prefix


def test_demo_without_root_serves_the_commands_it_prints(
    tmp_path: Path, cleanup: list[tuple[subprocess.Popen[str], Path]],
) -> None:
    workdir = tmp_path / "demo"
    proc, lines = start_demo(workdir, *unprivileged())
    cleanup.append((proc, workdir))
    text = "\n".join(lines)
    assert lines and lines[-1] == BANNER_END, text
    web_url = re.search(r"^  curl (http://\S+)", text, re.M)
    echo = re.search(r"^  echo hello \| nc -q1 (\S+) (\d+)", text, re.M)
    assert web_url and echo, text
    with urllib.request.urlopen(web_url.group(1), timeout=3) as resp:
        assert json.load(resp)["service"] == "web"
    with socket.create_connection((echo.group(1), int(echo.group(2))), timeout=3) as sock:
        sock.sendall(b"hello\n")
        sock.settimeout(3)
        assert sock.recv(200).rstrip().endswith(b"hello")


def test_demo_names_a_clusterset_ip_it_cannot_serve_instead_of_printing_the_banner(
    tmp_path: Path, cleanup: list[tuple[subprocess.Popen[str], Path]],
) -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 7:
        pytest.skip(f"net.ipv4.ip_unprivileged_port_start={start}: anyone may bind port 7")
    # The demo believes it may bind ports below 1024, as if the check were wrong: the
    # gateways then fail to listen there but still report ready.
    force = ("import sys; import mcsproxy.demo.runner as r; "
             "r.can_bind_low_ports = lambda: True; from mcsproxy.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
    workdir = tmp_path / "demo"
    proc, lines = start_demo(workdir, *unprivileged(), entry=("-c", force))
    cleanup.append((proc, workdir))
    out = "\n".join(lines)
    assert BANNER_END not in lines, out
    assert proc.wait(15) == 1, out
    assert re.search(r"gateway-\w+ cannot listen on [\d.]+:(7|80) \(demo/\w+\): "
                     r"Permission denied", out), out


def test_demo_start_failure_shows_the_childs_log_and_keeps_it(tmp_path: Path) -> None:
    # East's DNS port is taken (as an orphan of an earlier demo would hold it), so
    # gateway-east exits at once.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        blocker.bind(("127.0.10.1", 5353))
        done = subprocess.run(
            [sys.executable, "-m", "mcsproxy", "demo"], capture_output=True, text=True,
            timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)},  # its own work dir
        )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "gateway-east exited with 1" in out
    assert re.search(r"^  \| .*Address already in use", out, re.M), out  # the log's tail
    kept = re.search(r"files and logs kept in (\S+)", out)
    assert kept and (Path(kept.group(1)) / "logs" / "gateway-east.log").is_file(), out


def test_demo_ctrl_c_with_open_connections_stops_every_gateway_within_seconds(
    tmp_path: Path, cleanup: list[tuple[subprocess.Popen[str], Path]],
) -> None:
    workdir = tmp_path / "demo"
    proc, lines = start_demo(workdir)
    cleanup.append((proc, workdir))
    assert lines and lines[-1] == BANNER_END, "\n".join(lines)
    conns = []
    try:
        for folder in sorted((workdir / "out").iterdir()):  # one per consumer cluster
            for doc in yaml.safe_load_all((folder / "serviceimport_demo_echo.yaml").read_text()):
                if doc and doc.get("kind") == "ServiceImport":
                    spec = doc["spec"]
                    conn = socket.create_connection((spec["ips"][0], spec["ports"][0]["port"]),
                                                    timeout=3)
                    conns.append(conn)
                    conn.sendall(b"hi\n")
                    assert conn.recv(100).rstrip().endswith(b"hi")
        assert len(conns) == 3  # a client held open through every gateway

        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        took = time.monotonic() - started
        assert proc.stdout is not None
        out = proc.stdout.read()
    finally:
        for conn in conns:
            conn.close()
    assert "did not stop" not in out, out
    assert took < 4.5, f"Ctrl-C took {took:.1f}s"
