"""`mcsproxy demo` when things go wrong: the demo killed without Ctrl-C, started without
root, or failing to start, leaves nothing running and says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_demo import BANNER_END, children_of

pytestmark = pytest.mark.timeout(90)


def start_demo(workdir: Path, *prefix: str,
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    """The demo with its banner read (lines so far, ending with BANNER_END if it started)."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "mcsproxy", "demo", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.strip() == BANNER_END:
            break
    return proc, lines


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
