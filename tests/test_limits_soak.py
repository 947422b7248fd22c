"""bench/soak/run.py in a few seconds: it runs, loses no request, and writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def soak(tmp_path: Path, *args: str) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak" / "run.py"), "--smoke", "--out",
         str(tmp_path), *args],
        capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "soak.md").read_text().startswith("# Soak")
    return json.loads((tmp_path / "soak.json").read_text())  # type: ignore[no-any-return]


def test_soak_smoke_writes_flat_figures(tmp_path: Path) -> None:
    result = soak(tmp_path, "--duration", "4", "--idle", "300")
    assert result["ok"] > 100 and result["failed"] == 0, result["errors"]
    assert result["changes"] >= 3 and len(result["samples"]) >= 3
    idle = result["idle"]
    assert idle["connections"] == idle["endpoint_sides"] == 300
    assert not idle["fresh_gateway"] and idle["gateway_processes"] == 1
    assert idle["gateway_fds"] >= 600  # both sides of each


def test_soak_idle_connections_on_gateway_workers(tmp_path: Path) -> None:
    """The path taken when one process's descriptor limit cannot hold both sides of every
    idle connection: a fresh gateway with --workers shares them, all arrive, and RSS and
    descriptors are summed over its processes."""
    result = soak(tmp_path, "--duration", "2", "--idle", "400", "--idle-workers", "2")
    assert result["failed"] == 0, result["errors"]
    idle = result["idle"]
    assert idle["fresh_gateway"] and idle["gateway_processes"] == 2
    assert idle["connections"] == idle["endpoint_sides"] == 400
    assert idle["gateway_fds"] >= 800
    assert all(n > 100 for n in idle["fds_per_process"]), idle  # SO_REUSEPORT: both
