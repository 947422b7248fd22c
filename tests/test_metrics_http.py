"""HTTP requests in the metrics and the access log: by destination cluster and outcome,
retries after a 503, no endpoint at all, upstream connect latency."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.http_support import HttpBackend, RawClient
from tests.test_metrics_support import service_yaml, start_gateway, value

HOST = "127.57.79.1"


async def test_http_requests_by_cluster_and_outcome(tmp_path: Path) -> None:
    east = await HttpBackend("east-1", "127.57.71.1", "east").start()
    west = await HttpBackend("west-1", "127.57.72.1", "west", status=503).start()
    files = {"web": service_yaml("web", "127.240.57.71", [east, west], app_protocol="http"),
             "gone": service_yaml("gone", "127.240.57.72", [], app_protocol="http")}
    log_path = tmp_path / "access.log"
    gw = await start_gateway(tmp_path, HOST, files=files, access_log=str(log_path),
                             access_log_format="json")
    try:
        client = await RawClient.open("127.240.57.71", 80)
        for _ in range(6):
            response = await client.get("/")
            assert (response.status, response.body) == (200, b"east-1")
        await client.close()
        client = await RawClient.open("127.240.57.72", 80)
        assert (await client.get("/")).status == 503
        await client.close()

        m = await gw.metrics()
        web = {"service": "test/web", "port": "web"}
        assert value(m, "mcsproxy_http_requests_total", **web, cluster="east",
                     outcome="2xx") == 6
        assert value(m, "mcsproxy_http_requests_total", **web, cluster="west") == 0
        # Each 503 from west was retried on east; the client never saw it.
        assert value(m, "mcsproxy_proxy_retries_total", **web) == len(west.requests) > 0
        assert value(m, "mcsproxy_http_requests_total", service="test/gone", cluster="none",
                     outcome="no_endpoint") == 1
        assert value(m, "mcsproxy_upstream_connect_attempts_total", **web, cluster="east",
                     outcome="ok") == value(
            m, "mcsproxy_upstream_connect_duration_seconds_count", **web, cluster="east") >= 1

        # Bytes exchanged with each cluster's endpoint: exactly what the backends wrote.
        ok_answer = len(b"HTTP/1.1 200 X\r\nContent-Length: 6\r\nX-Backend: east-1\r\n\r\neast-1")
        sick_answer = len(b"HTTP/1.1 503 X\r\nContent-Length: 11\r\nX-Backend: west-1\r\n\r\n"
                          b"sick west-1")
        assert value(m, "mcsproxy_proxy_transferred_bytes_total", **web, cluster="east",
                     direction="to_client") == len(east.requests) * ok_answer
        assert value(m, "mcsproxy_proxy_transferred_bytes_total", **web, cluster="west",
                     direction="to_client") == len(west.requests) * sick_answer
        assert value(m, "mcsproxy_proxy_transferred_bytes_total", **web, cluster="east",
                     direction="to_upstream") > len(east.requests) * 40  # request heads

        deadline = time.monotonic() + 5
        while len(log_path.read_text().splitlines() if log_path.exists() else []) < 7:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        ok = [r for r in records if r.get("outcome") == "2xx"]
        assert len(ok) == 6 and ok[0]["kind"] == "http" and ok[0]["method"] == "GET"
        assert ok[0]["path"] == "/" and ok[0]["status"] == 200 and ok[0]["cluster"] == "east"
        # Every attempt's bytes: a request retried after west's 503 carries both answers.
        assert {r["bytes_to_client"] for r in ok} <= {ok_answer, ok_answer + sick_answer}
        assert sum(r["bytes_to_client"] for r in ok) == (
            len(east.requests) * ok_answer + len(west.requests) * sick_answer)
        assert all(r["bytes_to_upstream"] > 40 for r in ok)
        gone = [r for r in records if r.get("upstream", "").startswith("test/gone")]
        assert [(r["status"], r["outcome"]) for r in gone] == [(503, "no_endpoint")]
    finally:
        await gw.stop()
        await east.stop()
        await west.stop()
