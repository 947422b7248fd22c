"""The DNS and snapshot benchmarks still run and write their files (no speed asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("dnsperf") is None or shutil.which("taskset") is None,
                    reason="dnsperf/taskset not installed (apt-get install -y dnsperf)")
def test_dns_bench_smoke(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench/dns/run.py"), "--smoke", "--out",
                    str(tmp_path)], check=True, timeout=120, capture_output=True)
    result = json.loads((tmp_path / "dns.json").read_text())
    assert result["smoke"] and result["median"]["mcsproxy"]["qps"] > 0
    assert "| mcsproxy |" in (tmp_path / "dns.md").read_text()


def test_snapshot_bench_smoke(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench/snapshot/run.py"), "--smoke", "--out",
                    str(tmp_path)], check=True, timeout=120, capture_output=True)
    result = json.loads((tmp_path / "snapshot.json").read_text())
    assert [r["eager"] for r in result["results"]] == [False, True]
    assert all(r["build_and_swap_s"] > 0 for r in result["results"])
    assert "B/endpoint" in (tmp_path / "snapshot.md").read_text()
