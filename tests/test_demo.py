"""`mcsproxy demo` as a user runs it: the printed commands work, failover is visible,
Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BANNER_END = "Ctrl-C stops everything."


def children_of(workdir: Path) -> list[int]:
    """Processes whose command line names the demo's work dir (controller, gateways)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(workdir).encode() in cmdline and b"mcsproxy" in cmdline:
            pids.append(int(entry.name))
    return pids


def read_banner(proc: subprocess.Popen[str], timeout: float = 30.0) -> list[str]:
    """The demo's output up to its banner's last line (or its end, or the timeout)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.strip() == BANNER_END:
            break
    return lines


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], Path]]:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcsproxy", "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    try:
        lines = read_banner(proc)
        assert lines and lines[-1] == BANNER_END, "\n".join(lines)
        yield proc, lines, workdir
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                for pid in children_of(workdir):
                    os.kill(pid, signal.SIGKILL)
                raise


def try_commands(lines: list[str]) -> list[str]:
    start = lines.index("Try (as a pod in cluster east would):") + 1
    commands = []
    for line in lines[start:]:
        if not line.strip():
            break
        commands.append(line.split("   #")[0].strip())
    return commands


def run_shell(command: str) -> str:
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.load(resp)


def test_demo_quickstart_failover_and_clean_stop(
    demo: tuple[subprocess.Popen[str], list[str], Path],
) -> None:
    proc, lines, workdir = demo
    commands = try_commands(lines)
    assert len(commands) == 5
    for command in commands:
        tool = shlex.split(command)[0] if not command.startswith("echo") else "nc"
        if shutil.which(tool) is None:
            continue  # .ci/run installs dig and nc; a developer machine may lack them
        out = run_shell(command)
        if tool == "dig":
            assert "status: NOERROR" in out and "ANSWER SECTION" in out, out
        elif tool == "curl":
            assert json.loads(out)["cluster"] == "east"  # PreferClose: local while healthy
        else:
            assert out.startswith("[echo-") and out.rstrip().endswith("hello"), out

    web_url = next(c for c in commands if c.startswith("curl")).split()[1]
    assert {get_json(web_url)["cluster"] for _ in range(6)} == {"east"}

    kill = subprocess.run([sys.executable, "-m", "mcsproxy", "demo", "kill", "east"],
                          capture_output=True, text=True, timeout=10)
    assert kill.returncode == 0 and "east     backends killed" in kill.stdout
    # Every request still succeeds: the gateway retries the refused connects on west.
    assert {get_json(web_url)["cluster"] for _ in range(20)} == {"west"}

    restore = subprocess.run([sys.executable, "-m", "mcsproxy", "demo", "restore", "east"],
                             capture_output=True, text=True, timeout=10)
    assert restore.returncode == 0
    deadline = time.monotonic() + 15  # health checks every second, ejection 3 s
    while get_json(web_url)["cluster"] != "east":
        assert time.monotonic() < deadline, "traffic did not return to east"
        time.sleep(0.2)

    assert children_of(workdir)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert children_of(workdir) == []


@pytest.mark.parametrize("argv", [["kill", "nosuch"], ["restore"]])
def test_demo_control_of_a_cluster_that_does_not_exist_names_the_clusters(
        argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "mcsproxy", "demo", *argv],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"mcsproxy: error: demo {argv[0]} "
        + ("no cluster 'nosuch'" if len(argv) > 1 else "needs a cluster name")
        + "; the demo's clusters are east, west, central"], done.stderr


def test_demo_control_without_a_running_demo_says_so() -> None:
    done = subprocess.run([sys.executable, "-m", "mcsproxy", "demo", "kill", "east"],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 1
    assert "no demo is running" in done.stderr
