"""bench/http/run.py --smoke still runs and writes its results (no speed is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcsproxy import compiled

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("haproxy", "nginx", "wrk", "taskset")
needs_peers = pytest.mark.skipif(
    any(shutil.which(p) is None for p in PEERS),
    reason="peer binaries absent (apt-get install -y haproxy nginx-light wrk)")


def smoke(script: str, out: Path, *args: str) -> str:
    """bench/<script> --smoke [args], writing into `out`; it must exit 0. Its stdout."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *args,
                           "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_peers
def test_http_bench_smoke_writes_results(tmp_path: Path) -> None:
    smoke("http/run.py", tmp_path)
    table = (tmp_path / "http-smoke.md").read_text()
    assert "| 100B | req/s |" in table and "| 64KiB | proxy CPU µs/req |" in table
    assert "| 100B | proxy CPU µs/req at fixed rate |" in table
    assert "| 100B | of which its own (user) |" in table
    assert "| 64KiB | of which the kernel's (system) |" in table
    assert f"mcsproxy's data path {compiled.state()[0]} (" in table
    data = json.loads((tmp_path / "http-smoke.json").read_text())
    run = data["runs"][0]
    for size in ("100B", "64KiB"):
        for target in ("direct", "haproxy", "nginx", "mcsproxy", "bare"):
            assert run[f"{size}/{target}"]["req_s"] > 0
            if target != "direct":  # the CPU of the proxy under test, split
                r = run[f"{size}/{target}"]
                assert r["user_us_per_req"] >= 0 and r["sys_us_per_req"] >= 0, (size, target)
                assert r["cpu_us_per_req"] == pytest.approx(
                    r["user_us_per_req"] + r["sys_us_per_req"]), (size, target)
            assert not run[f"{size}/{target}"].get("errors"), (size, target)
            fixed = run[f"fixed/{size}/{target}"]  # the open-loop client's row
            assert fixed["rate"] > 0 and 0 < fixed["p50_us"] <= fixed["p99_us"], (size, target)
    assert data["idle_bytes_per_conn"]["mcsproxy"] >= 0
    assert data["scaling"]["workers2"]["req_s"] > 0


@needs_peers
def test_http_post_bench_smoke_writes_results(tmp_path: Path) -> None:
    smoke("http/post.py", tmp_path)
    table = (tmp_path / "http-post-smoke.md").read_text()
    assert "| req/s |" in table and "| of which the kernel's (system) |" in table
    assert "mcsproxy / HAProxy: req/s " in table
    data = json.loads((tmp_path / "http-post-smoke.json").read_text())
    [run] = data["runs"]
    for target in ("mcsproxy", "haproxy", "bare"):
        r = run[target]
        assert r["req_s"] > 0 and r["cpu_us_per_req"] == pytest.approx(
            r["user_us_per_req"] + r["sys_us_per_req"]), target
    counted = data["syscalls_per_req"]["mcsproxy"]
    if counted is not None:  # perf present: a request is two reads and two writes at least
        assert counted.get("read", 0) >= 1.9
        assert counted.get("write", 0) + counted.get("writev", 0) >= 1.9


@needs_peers
def test_run_all_runs_the_chunked_post_variant(tmp_path: Path) -> None:
    printed = smoke("run_all.py", tmp_path, "--only", "http-post-chunked")
    data = json.loads((tmp_path / "http-post-chunked-smoke.json").read_text())
    assert data["chunked"] is True  # run_all handed post.py its --chunked
    assert "- http-post-chunked: ok" in printed
