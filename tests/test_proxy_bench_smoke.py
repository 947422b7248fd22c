"""bench/tcp/run.py --smoke still runs and writes its results (no speed is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcsproxy import compiled

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("iperf3", "haproxy", "nginx", "wrk", "taskset")


@pytest.mark.skipif(any(shutil.which(p) is None for p in PEERS),
                    reason="peer binaries absent (apt-get install -y iperf3 haproxy "
                           "nginx-light wrk)")
def test_tcp_bench_smoke_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tcp" / "run.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "tcp-smoke.md").read_text()
    assert "| iperf3 1 stream, Gbit/s |" in table and "new connections/s" in table
    assert "| range / tuned |" in table
    assert "| of which its own (user) |" in table and "| of which the kernel's (system) |" in table
    assert f"mcsproxy's data path {compiled.state()[0]} (" in table
    data = json.loads((tmp_path / "tcp-smoke.json").read_text())
    run = data["runs"][0]
    for target in ("direct", "haproxy", "haproxy-tuned", "mcsproxy", "bare"):
        assert run[f"bulk1/{target}"]["gbit_s"] > 0
        conn = run[f"conn/{target}"]
        assert conn["conn_s"] > 0
        if target != "direct":  # the CPU of the proxy under test, split
            assert conn["user_us_per_conn"] >= 0 and conn["sys_us_per_conn"] >= 0, target
            assert conn["cpu_us_per_conn"] == pytest.approx(
                conn["user_us_per_conn"] + conn["sys_us_per_conn"]), target
    assert len(data["summary"]["bulk1.gbit_s"]["ratios_tuned"]) == data["reps"]
