"""The control-plane benchmark still runs and writes its files (CI runs only --smoke)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "controlplane" / "bench_controlplane.py"


def test_controlplane_bench_smoke_writes_results(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    data = json.loads((tmp_path / "controlplane-smoke.json").read_text())
    (row,) = data["rows"]
    assert row["services"] == 200 and row["changes"] == 20
    assert row["keys_reconciled_per_change"] == 1.0
    assert "| 200 |" in (tmp_path / "controlplane-smoke.md").read_text()
