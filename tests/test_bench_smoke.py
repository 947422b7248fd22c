"""`make bench` pieces still run and write their files (CI runs smoke versions only).

No speed is asserted. The failover smoke runs every scenario against mcsproxy and HAProxy
for a few seconds each; the summary test feeds the results committed under bench/results
through bench/run_all.py's tables and plots; the recovery analysis is checked on records
whose answer is known.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(relpath: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def missing_bench_extra() -> str | None:
    for module in ("locust", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            return f"{module} absent (pip install -e '.[bench]', or make bench-smoke)"
    return None


@pytest.mark.skipif(shutil.which("haproxy") is None or shutil.which("taskset") is None,
                    reason="peer binaries absent (apt-get install -y haproxy util-linux)")
def test_failover_smoke_runs_every_scenario_against_both_proxies(tmp_path: Path) -> None:
    if (why := missing_bench_extra()) is not None:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "failover" / "run.py"),
                           "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "failover-smoke.json").read_text())
    ran = {(r["scenario"], r["target"]) for r in data["results"]}
    scenarios = ["cluster-down", "backend-503", "cluster-returns"]
    if data["netns"]:
        scenarios.append("cluster-blackhole")
    else:
        assert "cluster-blackhole" in data["skipped"]
    assert ran == {(s, t) for s in scenarios for t in ("mcsproxy", "haproxy")}
    for r in data["results"]:
        assert r["requests"] > 0
        served = {c for bucket in r["buckets"].values() for c in bucket} - {"failed"}
        assert served <= {"cluster-a", "cluster-b", "cluster-c"} and served
        assert (tmp_path / "failover-smoke" / f"{r['scenario']}-{r['target']}_stats.csv").exists()
    for s in scenarios:
        assert (tmp_path / f"failover-smoke-{s}.png").stat().st_size > 0
    assert "| cluster-down | mcsproxy |" in (tmp_path / "failover-smoke.md").read_text()


def test_recovery_analysis_on_known_records() -> None:
    failover = load("bench/failover/run.py", "bench_failover_run")
    fault = 1000.0
    records = []
    for i in range(800):  # 100 req/s from 4 s before the fault to 4 s after
        t = fault - 4 + i / 100
        failed = 420 <= i < 460  # from 0.2 s to 0.6 s after the fault
        slow = 460 <= i < 510  # and p99 back to normal only after 1.1 s
        cluster = ("cluster-a", "cluster-b", "cluster-c")[i % 3]
        records.append((t, "http", not failed, 30.0 if slow else 2.0 + (i % 7) * 0.1,
                        "ConnectionRefusedError" if failed else cluster))
    r = failover.analyse(records, fault, "cluster-down", "mcsproxy", 4.0)
    assert r["failed"] == r["failed_after_fault"] == 40
    assert r["baseline_p99_ms"] == pytest.approx(2.6)
    # No failure from 0.75 s on, but the 1 s window holds slow requests until 1.25 s.
    assert r["recovery_s"] == pytest.approx(1.25)
    assert r["errors"] == ["ConnectionRefusedError"]
    assert sum(r["split_last_3s"].values()) == pytest.approx(1.0)


def test_summary_tables_and_plots_from_committed_results(tmp_path: Path) -> None:
    if (why := missing_bench_extra()) is not None:
        pytest.skip(why)
    run_all = load("bench/run_all.py", "bench_run_all")
    results = ROOT / "bench" / "results"
    runs = {}
    for name in ("dns", "tcp", "snapshot", "controlplane", "kube-propagation"):
        path = results / f"{name}.json"
        if path.exists():
            runs[name] = {"status": "ok", "seconds": 1.0, "data": json.loads(path.read_text()),
                          "md": f"{name}.md"}
    if "dns" not in runs or "controlplane" not in runs:
        pytest.skip("no committed dns/controlplane results to summarise")
    md = run_all.write_summary(tmp_path, runs, False, "2000-01-01", quick=False)
    text = md.read_text()
    assert "Machine: " in text and "Pinning: " in text
    assert "| DNS | A queries/s at saturation |" in text
    assert "Control plane, 1,000 services" in text
    summary = json.loads((tmp_path / "2000-01-01.json").read_text())
    assert any(r["benchmark"] == "DNS" and r["ratio"] for r in summary["ratios"])
    assert (tmp_path / "2000-01-01-ratios.png").stat().st_size > 0
    assert (tmp_path / "2000-01-01-controlplane.png").stat().st_size > 0


def test_run_all_smoke_runs_the_peerless_benchmarks(tmp_path: Path) -> None:
    if (why := missing_bench_extra()) is not None:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--smoke",
                           "--only", "snapshot,controlplane", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]-smoke.md")  # dated summary
    text = md.read_text()
    assert "- snapshot: ok" in text and "- controlplane: ok" in text
    assert "Control plane, 200 services" in text


def test_cpu_meter_tells_a_process_own_work_from_the_kernels() -> None:
    """bench/common.CpuMeter splits the CPU per unit of work into user and system time
    (the benchmark tables' "its own" and "the kernel's" rows): a pure-Python loop is
    mostly user time, reading /dev/zero into a large buffer mostly system time."""
    common = load("bench/common.py", "bench_common_cpu")
    assert common.CpuMeter(None).per_unit(10) == {"cpu": None, "user": None, "sys": None}
    meter = common.CpuMeter(os.getpid())
    until = time.process_time() + 0.3
    while time.process_time() < until:
        sum(range(1000))
    own = meter.per_unit(2)
    assert own["user"] > own["sys"]
    assert own["cpu"] == pytest.approx(own["user"] + own["sys"])
    assert own["cpu"] >= 0.2 / 2 * 1e6  # µs per unit: 0.3 s over 2 units, ticks of 10 ms
    meter = common.CpuMeter(os.getpid())
    buf = bytearray(1 << 20)
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        until = time.process_time() + 0.3
        while time.process_time() < until:
            os.readv(fd, [buf])  # the kernel zeroes 1 MiB: little for Python to do
    finally:
        os.close(fd)
    kernel = meter.per_unit(1)
    assert kernel["sys"] > kernel["user"]
