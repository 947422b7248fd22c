"""bench/soak/run.py in a few seconds: it runs, loses no request, and writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_smoke_writes_flat_figures(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak" / "run.py"), "--smoke", "--duration", "4",
         "--idle", "300", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.md").read_text().startswith("# Soak")
    assert result["ok"] > 100 and result["failed"] == 0, result["errors"]
    assert result["changes"] >= 3 and len(result["samples"]) >= 3
    assert result["idle"]["connections"] == 300
    assert result["idle"]["gateway_fds"] >= 600  # both sides of every idle connection
