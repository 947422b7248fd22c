"""The access log: one record per proxied connection, text or JSON, written off the loop;
a full queue drops and counts instead of blocking."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import pytest

from mcsproxy.observability.accesslog import AccessLog, format_text
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import service_yaml, start_gateway, value

HOST = "127.57.49.1"


async def wait_lines(path: Path, n: int) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, lines
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_one_record_per_connection(tmp_path: Path, fmt: str) -> None:
    east = await Backend("east-1", "127.57.41.1", free_port("127.57.41.1"), "east").start()
    files = {"web": service_yaml("web", "127.240.57.41", [east]),
             "none": service_yaml("none", "127.240.57.42", [])}
    log_path = tmp_path / "access.log"
    gw = await start_gateway(tmp_path, HOST, files=files, access_log=str(log_path),
                             access_log_format=fmt)
    try:
        assert await ask("127.240.57.41", 80) == "east-1"
        with pytest.raises(OSError):
            await ask("127.240.57.42", 80)
        lines = await wait_lines(log_path, 2)
        if fmt == "json":
            records = sorted((json.loads(line) for line in lines), key=lambda r: r["outcome"])
            ok, none = records[1], records[0]
            assert none["outcome"] == "no_endpoint" and none["upstream"] == "test/none:web/TCP"
            assert "cluster" not in none
            assert ok["outcome"] == "ok" and ok["cluster"] == "east"
            assert ok["endpoint"] == f"127.57.41.1:{east.port}"
            assert ok["listener"] == "127.240.57.41:80/TCP" and ok["kind"] == "tcp"
            assert ok["client"].startswith("127.") and ok["attempts"] == 1
            assert ok["bytes_to_client"] >= len("east-1\n")
            assert ok["time"].endswith("Z") and ok["duration_ms"] >= 0
        else:
            ok = next(line for line in lines if "outcome=ok" in line)
            assert "kind=tcp" in ok and "upstream=test/web:web/TCP" in ok
            assert "cluster=east" in ok and f"endpoint=127.57.41.1:{east.port}" in ok
            assert any("outcome=no_endpoint" in line for line in lines)
        m = await gw.metrics()
        assert value(m, "mcsproxy_accesslog_records_total", outcome="written") == 2
        assert value(m, "mcsproxy_accesslog_records_total", outcome="dropped") == 0
    finally:
        await gw.stop()
        await east.stop()


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "a.log"), "text", queue_max=2)
    await log.start()
    for i in range(5):
        log.record(kind="tcp", outcome="ok", attempts=i)
    assert log.dropped == 3
    await log.stop()
    assert log.written == 2
    assert (tmp_path / "a.log").read_text().count("\n") == 2


def test_text_format_quotes_what_needs_it() -> None:
    line = format_text({"time": 0.0, "kind": "http", "path": "/a b\"c", "status": 200,
                        "duration_ms": 1.5, "cluster": None})
    assert line == 'time=1970-01-01T00:00:00.000Z kind=http duration_ms=1.500 ' \
        'path="/a b\\"c" status=200'


async def test_a_rotated_file_is_reopened(tmp_path: Path) -> None:
    """logrotate renames the file (then maybe compresses it): records after that go to a
    new file at the configured path, not on into the renamed one forever."""
    path = tmp_path / "a.log"
    log = AccessLog(str(path), "json")
    await log.start()
    try:
        log.record(kind="tcp", outcome="ok", attempts=1)
        await log.flush()
        path.rename(tmp_path / "a.log.1")
        log.record(kind="tcp", outcome="ok", attempts=2)
        await log.flush()
        path.unlink()  # removed outright (create-less rotation, an operator's rm)
        log.record(kind="tcp", outcome="ok", attempts=3)
        await log.flush()
    finally:
        await log.stop()
    assert [json.loads(x)["attempts"] for x in (tmp_path / "a.log.1").read_text().splitlines()] \
        == [1]
    assert [json.loads(x)["attempts"] for x in path.read_text().splitlines()] == [3]
    assert log.written == 3


async def run_script(script: str, timeout: float = 20) -> tuple[bytes, bytes]:
    """Run `script` in a Python process of its own; its stdout and stderr once it exited
    0 within `timeout` (a hang fails the test rather than holding it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the script did not exit within {timeout} s")
    assert proc.returncode == 0, err.decode()
    return out, err


async def test_a_write_error_counts_what_was_lost_and_keeps_lines_whole(
        tmp_path: Path) -> None:
    """A full disk (here: RLIMIT_FSIZE) tears the batch being written. The records that
    did not make it are counted dropped and never written later; the next batch starts
    on a line of its own, so every record counted written is one whole JSON line."""
    script = f"""
import asyncio, json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from mcsproxy.observability.accesslog import AccessLog
async def main():
    log = AccessLog({str(tmp_path / "a.log")!r}, "json")
    await log.start()
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
    for i in range(40):
        log.record(kind="tcp", outcome="ok", attempts=i, client="127.0.0.1:1234")
    await log.flush()
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    for i in range(3):
        log.record(kind="tcp", outcome="ok", attempts=100 + i)
    await log.stop()
    print(json.dumps([log.written, log.write_failed]))
asyncio.run(main())
"""
    out, _ = await run_script(script)
    written, failed = json.loads(out)
    assert written + failed == 43 and failed > 0
    good = []
    for line in (tmp_path / "a.log").read_text().splitlines():
        try:
            good.append(json.loads(line)["attempts"])
        except ValueError:
            continue  # the one record torn by the error
    assert len(good) == written
    assert good[-3:] == [100, 101, 102]


async def test_a_failing_access_log_warns_once_and_once_when_it_writes_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk made a warning per batch (5 a second for as long as it stayed full).
    Now one when writes begin to fail and one, with the records lost, when a write
    succeeds again (here: the path, a link to /dev/full, replaced by a file, as a
    rotation would)."""
    caplog.set_level(logging.INFO, logger="mcsproxy.accesslog")
    path = tmp_path / "a.log"
    path.symlink_to("/dev/full")  # every write: ENOSPC
    log = AccessLog(str(path), "json")
    await log.start()
    try:
        for i in range(5):
            log.record(kind="tcp", outcome="ok", attempts=i)
            await log.flush()
        assert (log.written, log.write_failed) == (0, 5)
        path.unlink()
        log.record(kind="tcp", outcome="ok", attempts=5)
        await log.flush()
        log.record(kind="tcp", outcome="ok", attempts=6)
        await log.flush()
    finally:
        await log.stop()
    assert (log.written, log.write_failed) == (2, 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "cannot write" in warnings[0] and "No space left" in warnings[0]
    assert "again; 5 records were lost" in warnings[1]


async def test_a_write_that_never_returns_does_not_keep_the_process_from_exiting(
        tmp_path: Path) -> None:
    """The log is a FIFO nobody reads: once its 64 KiB buffer is full, write(2) blocks
    for ever (as on an NFS mount whose server is gone). The write ran on asyncio's
    executor, whose threads are joined at loop shutdown: the gateway never exited after
    SIGTERM. Now stop() gives up after its timeout and the process exits."""
    script = f"""
import asyncio, json, os
from mcsproxy.observability.accesslog import AccessLog
async def main():
    fifo = {str(tmp_path / "a.fifo")!r}
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read
    log = AccessLog(fifo, "json", stop_timeout=0.5)
    await log.start()
    for i in range(1000):
        log.record(kind="tcp", outcome="ok", attempts=i, path="/" + "x" * 200)
    try:
        await asyncio.wait_for(log.flush(), 1)
        print("the write returned")
    except TimeoutError:
        pass
    for i in range(3):
        log.record(kind="tcp", outcome="ok", attempts=i)
    await log.stop()
    print(json.dumps([log.written, log.write_failed]))
asyncio.run(main())
"""
    out, err = await run_script(script)
    assert json.loads(out) == [0, 3]
    assert b"has not returned in 0.5 s; stopping without it (3 records not written)" in err
