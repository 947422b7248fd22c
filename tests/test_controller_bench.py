"""The control-plane benchmarks still run and write their files (CI runs only --smoke)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench" / "controlplane"


def smoke(script: str, out: Path, stem: str) -> tuple[dict[str, Any], str]:
    """Run `script --smoke`; its JSON results and its markdown table."""
    subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    return (json.loads((out / f"{stem}.json").read_text()),
            (out / f"{stem}.md").read_text())


def test_controlplane_bench_smoke_writes_results(tmp_path: Path) -> None:
    data, table = smoke("bench_controlplane.py", tmp_path, "controlplane-smoke")
    (row,) = data["rows"]
    assert row["services"] == 200 and row["changes"] == 20
    assert row["keys_reconciled_per_change"] == 1.0
    assert "| 200 |" in table


def test_kube_propagation_bench_smoke_writes_results(tmp_path: Path) -> None:
    data, table = smoke("kube_propagation.py", tmp_path, "kube-propagation-smoke")
    (row,) = data["rows"]
    assert row["services"] == 20 and row["changes"] == 10
    assert 0 < row["first_consumer_p50_ms"] <= row["all_consumers_p50_ms"]
    assert "| 1 | 20 | 10 |" in table
