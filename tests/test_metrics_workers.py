"""`--workers 2`: the main process's /metrics adds up both processes' counters.

Each extra worker reports its families over an abstract Unix socket when the admin is
scraped; the kernel spreads connections over both processes by SO_REUSEPORT, so the
per-worker counter shows both at work and the total is exactly what the client made.

The service port is a free one, not a fixed 80: SO_REUSEPORT lets any process of the same
user join the listener, so a second run of this test at the same time (two sessions on one
CI machine) took a share of the other's connections (measured: 55 and 65 of 60 each).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout

from mcsproxy.observability.families import Families
from mcsproxy.observability.workers import WorkerReporter, WorkerReports, fetch_report
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import parse_metrics, service_yaml, value

HOST = "127.57.39.1"
CONNECTIONS = 60


async def test_two_workers_report_into_one_exposition(tmp_path: Path) -> None:
    backend = await Backend("east-1", "127.57.31.1", free_port("127.57.31.1"), "east").start()
    ip = "127.240.57.31"
    port = free_port(ip)
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [backend], port=port))
    admin = f"{HOST}:{free_port(HOST)}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
        "--source", f"file:{tmp_path}", "--workers", "2", "--log-level", "warning",
        "--health-interval", "0", "--dns-listen", f"{HOST}:{free_port(HOST)}",
        "--admin-listen", admin)
    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:

            async def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
                async with http.get(f"http://{admin}/metrics") as resp:
                    return parse_metrics(await resp.text())

            async def worker_listening() -> bool:
                # Its own report: the exposition keeps the main process's listener gauge.
                report = await fetch_report(proc.pid, 1)
                return report is not None and sum(
                    v for fam in report["families"] if fam["name"] == "mcsproxy_proxy_listeners"
                    for _key, v in fam["values"]) == 1

            deadline = time.monotonic() + 30
            while True:  # until both processes serve the listener and the worker reports
                try:
                    m = await scrape()
                    if value(m, "mcsproxy_gateway_workers_reporting") == 1 and \
                            value(m, "mcsproxy_proxy_listeners") == 1 and \
                            await worker_listening():
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "gateway with 2 workers did not come up"
                await asyncio.sleep(0.1)
            for _ in range(CONNECTIONS):
                assert await ask(ip, port) == "east-1"
            # Counted at connect, so exact at once; the active gauge drops as the closes
            # are handled, later on a loaded machine.
            deadline = time.monotonic() + 30
            while True:
                m = await scrape()
                web = {"service": "test/web", "port": "web", "cluster": "east"}
                ok = value(m, "mcsproxy_proxy_connections_total", **web, outcome="ok")
                if ok == CONNECTIONS and value(m, "mcsproxy_upstream_active_connections") == 0:
                    break
                assert time.monotonic() < deadline, (
                    ok, m.get("mcsproxy_proxy_worker_connections_total"),
                    m.get("mcsproxy_upstream_active_connections"))
                await asyncio.sleep(0.1)
        per_worker = {lab["worker"]: v for lab, v in m["mcsproxy_proxy_worker_connections_total"]}
        assert set(per_worker) == {"0", "1"} and sum(per_worker.values()) == CONNECTIONS
        assert all(v > 0 for v in per_worker.values()), per_worker  # both served some
        assert value(m, "mcsproxy_upstream_connect_duration_seconds_count", **web) == CONNECTIONS
        # The name line each, and the b"bye" answering EOF unless the close raced it.
        assert CONNECTIONS * len("east-1\n") <= value(
            m, "mcsproxy_proxy_transferred_bytes_total", **web, direction="to_client") <= \
            CONNECTIONS * len("east-1\nbye")
        # Gauges of state are the main process's own: one endpoint, not two.
        assert value(m, "mcsproxy_upstream_endpoints", **web) == 1
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        await backend.stop()


async def test_a_report_larger_than_one_read_arrives_whole() -> None:
    """A worker's report of a few hundred services is a megabyte of JSON, more than one read
    of the socket returns: it must be read to its end, not taken as "did not report" (then
    the worker's counts stayed at its last complete report, silently)."""
    big = Families()
    many = big.counter("mcsproxy_proxy_connections", "c", ["service"])
    for i in range(20_000):  # about 1 MB of JSON
        many.add([f"ns/service-{i:05}"], 1)
    report = {"pid": 1001, "index": 1, "families": big.to_json()}
    assert len(json.dumps(report)) > 512 * 1024  # more than the socket buffers hold
    main_pid = os.getpid()  # our own pid: an abstract socket name no gateway has
    reporter = WorkerReporter(1, lambda: report, main_pid=main_pid)
    reports = WorkerReports(2, main_pid=main_pid)
    await reporter.start()
    try:
        for _ in range(3):
            merged = Families()
            await reports.merge_into(merged)
            assert reports.reporting == 1
            assert merged["mcsproxy_proxy_connections"].total() == 20_000
    finally:
        await reporter.stop()
