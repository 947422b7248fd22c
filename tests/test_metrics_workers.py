"""`--workers 2`: the main process's /metrics adds up both processes' counters.

Each extra worker reports its families over an abstract Unix socket when the admin is
scraped; the kernel spreads connections over both processes by SO_REUSEPORT, so the
per-worker counter shows both at work and the total is exactly what the client made.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout

from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import parse_metrics, service_yaml, value

HOST = "127.57.39.1"
CONNECTIONS = 60


async def test_two_workers_report_into_one_exposition(tmp_path: Path) -> None:
    backend = await Backend("east-1", "127.57.31.1", free_port("127.57.31.1"), "east").start()
    ip = "127.240.57.31"
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [backend]))
    admin = f"{HOST}:{free_port(HOST)}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
        "--source", f"file:{tmp_path}", "--workers", "2", "--log-level", "warning",
        "--health-interval", "0", "--dns-listen", f"{HOST}:{free_port(HOST)}",
        "--admin-listen", admin)
    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:

            async def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
                async with http.get(f"http://{admin}/metrics") as resp:
                    return parse_metrics(await resp.text())

            deadline = time.monotonic() + 20
            while True:  # until both processes serve the listener and the worker reports
                try:
                    m = await scrape()
                    if value(m, "mcsproxy_gateway_workers_reporting") == 1 and \
                            value(m, "mcsproxy_proxy_listeners") == 1:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "gateway with 2 workers did not come up"
                await asyncio.sleep(0.1)
            # The worker may bind its listener a moment after it starts reporting.
            await asyncio.sleep(0.5)
            for _ in range(CONNECTIONS):
                assert await ask(ip, 80) == "east-1"
            deadline = time.monotonic() + 5
            while True:
                m = await scrape()
                web = {"service": "test/web", "port": "web", "cluster": "east"}
                ok = value(m, "mcsproxy_proxy_connections_total", **web, outcome="ok")
                if ok == CONNECTIONS and value(m, "mcsproxy_upstream_active_connections") == 0:
                    break
                assert time.monotonic() < deadline, (
                    ok, m.get("mcsproxy_proxy_worker_connections_total"))
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
