"""The Kubernetes-mode propagation bench still runs and writes its files (CI: --smoke)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "controlplane" / "kube_propagation.py"


def test_kube_propagation_bench_smoke_writes_results(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    data = json.loads((tmp_path / "kube-propagation-smoke.json").read_text())
    (row,) = data["rows"]
    assert row["services"] == 20 and row["changes"] == 10
    assert 0 < row["first_consumer_p50_ms"] <= row["all_consumers_p50_ms"]
    assert "| 1 | 20 | 10 |" in (tmp_path / "kube-propagation-smoke.md").read_text()
