"""HTTP requests in the metrics and the access log: by destination cluster and outcome,
retries after a 503, no endpoint at all, upstream connect latency, request duration."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from mcsproxy.config import HttpConfig
from mcsproxy.observability import observer
from mcsproxy.observability.stats import REQUEST_BUCKETS
from tests.http_support import HttpBackend, RawClient
from tests.proxy_fixtures import Backend, free_port
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
        # How --workers share the load counts HTTP requests too (it read 0 for HTTP).
        assert value(m, "mcsproxy_proxy_worker_connections_total", worker="0") == 6
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


def buckets(samples: dict[str, list[tuple[dict[str, str], float]]],
            **labels: str) -> dict[str, float]:
    """The request duration histogram's cumulative counts by `le`."""
    return {lab["le"]: v for lab, v in samples.get(
        "mcsproxy_http_request_duration_seconds_bucket", [])
        if all(lab.get(k) == want for k, want in labels.items())}


async def test_http_request_duration_by_service_port_and_cluster(tmp_path: Path) -> None:
    """Requests of known duration land in their buckets, per service port and serving
    cluster: fast ones, answers after 150 ms, a 504 after the per-try timeout (0.7 s; the
    tick checking it is 0.175 s, so it ends within 0.525-0.875 s); unrouted requests and
    clusters without requests get no series, and a withdrawn service's go (and resume from
    where they were when it comes back)."""
    east = await HttpBackend("east-1", "127.57.81.1", "east").start()
    west = await HttpBackend("west-1", "127.57.82.1", "west").start()
    files = {"web": service_yaml("web", "127.240.57.81", [east], app_protocol="http"),
             "api": service_yaml("api", "127.240.57.82", [west], app_protocol="http"),
             "gone": service_yaml("gone", "127.240.57.83", [], app_protocol="http")}
    gw = await start_gateway(tmp_path, "127.57.89.1", files=files,
                             http=HttpConfig(per_try_timeout_s=0.7, request_timeout_s=2.0))
    try:
        for ip, paths in (("127.240.57.81", ["/", "/", "/", "/sleep/150", "/sleep/150"]),
                          ("127.240.57.82", ["/", "/"]), ("127.240.57.83", ["/"])):
            client = await RawClient.open(ip, 80)
            for path in paths:
                await client.get(path)
            await client.close()
        client = await RawClient.open("127.240.57.81", 80)
        assert (await client.get("/slow")).status == 504  # the endpoint never answers
        await client.close()

        m = await gw.metrics()
        web = {"service": "test/web", "port": "web", "cluster": "east"}
        got = buckets(m, **web)
        assert list(got) == [repr(b) for b in REQUEST_BUCKETS] + ["+Inf"]
        assert (got["0.1"], got["0.25"], got["0.5"], got["1.0"], got["+Inf"]) == \
            (3, 5, 5, 6, 6), got
        count = value(m, "mcsproxy_http_request_duration_seconds_count", **web)
        assert count == value(m, "mcsproxy_http_requests_total", **web) == 6
        assert 2 * 0.15 + 0.525 <= value(
            m, "mcsproxy_http_request_duration_seconds_sum", **web) < 2 * 0.1 + 1.0 + 0.3
        api = {"service": "test/api", "port": "web"}
        assert buckets(m, **api, cluster="west")["0.1"] == value(
            m, "mcsproxy_http_request_duration_seconds_count", **api) == 2
        # Only where requests were counted: not the no_endpoint one (cluster none).
        assert {(lab["service"], lab["cluster"]) for lab, _ in
                m["mcsproxy_http_request_duration_seconds_count"]} == {
            ("test/web", "east"), ("test/api", "west")}
        assert value(m, "mcsproxy_http_requests_total", service="test/gone") == 1

        await gw.publish("api", "---\n")
        m = await gw.metrics()
        assert {lab["service"] for lab, _ in
                m["mcsproxy_http_request_duration_seconds_count"]} == {"test/web"}
        assert buckets(m, **web) == got
        # Back within RETIRED_KEEP_S: counted on from where it was, like every counter.
        await gw.publish("api", files["api"])
        client = await RawClient.open("127.240.57.82", 80)
        assert (await client.get("/")).status == 200
        await client.close()
        m = await gw.metrics()
        assert value(m, "mcsproxy_http_request_duration_seconds_count", **api) == 3
    finally:
        await gw.stop()
        await east.stop()
        await west.stop()


async def test_an_open_http_client_connection_counts_as_open(tmp_path: Path) -> None:
    """HTTP client connections were left out of proxy_active_connections, so /metrics,
    /api/status and `mcsproxy status` said 0 open connections beside a keep-alive client."""
    east = await HttpBackend("east-1", "127.57.91.1", "east").start()
    files = {"web": service_yaml("web", "127.240.57.91", [east], app_protocol="http")}
    gw = await start_gateway(tmp_path, "127.57.99.1", files=files)
    try:
        client = await RawClient.open("127.240.57.91", 80)
        assert (await client.get("/")).status == 200
        await asyncio.sleep(0.3)  # idle past the tick that drops its parser: still open
        assert value(await gw.metrics(), "mcsproxy_proxy_active_connections") == 1
        assert (await gw.get_json("/api/status"))["gateway"]["active_connections"] == 1
        await client.close()
        deadline = time.monotonic() + 5
        while value(await gw.metrics(), "mcsproxy_proxy_active_connections") != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await gw.stop()
        await east.stop()


async def test_worker_connections_keep_a_withdrawn_http_ports_requests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mcsproxy_proxy_worker_connections_total counts HTTP requests; when a withdrawn
    port's counters are forgotten (RETIRED_KEEP_S after it left) they must stay in the
    worker's total, as its TCP connections do: only the connections were kept, and the
    counter went from 3 back to 0."""
    monkeypatch.setattr(observer, "RETIRED_KEEP_S", 0.0)  # forgotten at the next scrape
    east = await HttpBackend("east-1", "127.57.91.1", "east").start()
    web = service_yaml("web", "127.240.57.91", [east], app_protocol="http")
    gw = await start_gateway(tmp_path, "127.57.99.1", files={"web": web})
    try:
        client = await RawClient.open("127.240.57.91", 80)
        for _ in range(3):
            assert (await client.get("/")).status == 200
        await client.close()
        total = "mcsproxy_proxy_worker_connections_total"
        assert value(await gw.metrics(), total, worker="0") == 3
        await gw.publish("web", "---\n")
        for _ in range(3):  # retired, then forgotten: the total stays
            assert value(await gw.metrics(), total, worker="0") == 3
        assert not gw.gateway.observer._retired
    finally:
        await gw.stop()
        await east.stop()


async def test_gateway_made_errors_are_logged_at_most_once_a_second(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every request to a service whose endpoints are all down is answered 502, and each
    one logged a line of its own: 20 requests, 20 lines (a storm at any real rate). Now
    a line a second per listener, saying how many it held back; so for requests the
    gateway refuses (400 from a scanner)."""
    dead = Backend("east-1", "127.57.92.1", free_port("127.57.92.1"), "east")  # refused
    files = {"web": service_yaml("web", "127.240.57.92", [dead], app_protocol="http")}
    gw = await start_gateway(tmp_path, "127.57.99.2", files=files)
    try:
        caplog.set_level(logging.INFO, logger="mcsproxy.http")
        started = time.monotonic()
        for _ in range(20):
            client = await RawClient.open("127.240.57.92", 80)
            assert (await client.get("/")).status == 502
            await client.close()
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.240.57.92", 80)
            writer.write(b"NOT HTTP\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
            writer.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "mcsproxy.http"]
        failed = [m for m in lines if " 502 " in m]
        refused = [m for m in lines if " 400 " in m]
        if time.monotonic() - started < 1.0:  # else a second line may be due
            assert (len(failed), len(refused)) == (1, 1), lines
        assert 1 <= len(failed) <= 3 and 1 <= len(refused) <= 3, lines
    finally:
        await gw.stop()
