"""Log lines: a background task's failure is one line unless at debug."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A gateway-like process: logging set up by the CLI's helper, a spawned task that fails.
FAILING_TASK = """
import asyncio, sys
from mcsproxy.logsetup import setup_logging
from mcsproxy.tasks import spawn

def parse(value):
    raise ValueError(f"cannot parse:\\n{value}")

async def reload():
    return parse("not a number")

async def main():
    spawn(reload(), "reload")
    await asyncio.sleep(0.05)

setup_logging(sys.argv[1])
asyncio.run(main())
"""


@pytest.mark.parametrize("level", ["info", "error"])
def test_a_failed_task_logs_one_line(level: str) -> None:
    done = subprocess.run([sys.executable, "-c", FAILING_TASK, level],
                          capture_output=True, text=True, timeout=30, check=True)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].split()[1:3] == ["ERROR", "mcsproxy.tasks"]
    # Type, message (its line break folded), and where it was raised: the innermost frame.
    assert lines[0].endswith(
        "task reload failed: ValueError: cannot parse: not a number (<string>:7)"), lines


def test_a_failed_task_keeps_its_traceback_at_debug() -> None:
    done = subprocess.run([sys.executable, "-c", FAILING_TASK, "debug"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert "task reload failed: ValueError(" in done.stderr
    assert "Traceback (most recent call last):" in done.stderr
    assert 'line 7, in parse' in done.stderr
