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
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

from mcsproxy import statuscmd
from mcsproxy.http.wire import REFUSAL_REASONS
from mcsproxy.observability import workers
from mcsproxy.observability.families import Families
from mcsproxy.observability.workers import WorkerReporter, WorkerReports, fetch_report
from tests.http_support import HttpBackend, RawClient
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_http_smuggling import SHAPES
from tests.test_metrics_support import LoopTurns, parse_metrics, service_yaml, value

HOST = "127.57.39.1"
CONNECTIONS = 60


Samples = dict[str, list[tuple[dict[str, str], float]]]


@asynccontextmanager
async def two_workers(source: Path, *extra: str, admin: str | None = None,
                      ) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                               Callable[[], Awaitable[Samples]]]]:
    """`gateway --workers 2` over `source`, once both processes serve every listener and
    the worker reports; yields the process and a scrape of its /metrics. `extra`: more
    gateway arguments; `admin`: its admin address, to ask more than /metrics."""
    admin = admin or f"{HOST}:{free_port(HOST)}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
        "--source", f"file:{source}", "--workers", "2", "--log-level", "warning",
        "--health-interval", "0", "--dns-listen", f"{HOST}:{free_port(HOST)}",
        "--admin-listen", admin, *extra)
    try:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:

            async def scrape() -> Samples:
                async with http.get(f"http://{admin}/metrics") as resp:
                    return parse_metrics(await resp.text())

            listeners = len(list(source.glob("*.yaml")))
            await until_both_serve(proc.pid, scrape, listeners)
            yield proc, scrape
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0


async def until_both_serve(main_pid: int, scrape: Callable[[], Awaitable[Samples]],
                           listeners: int) -> None:
    async def worker_listening() -> bool:
        # Its own report: the exposition keeps the main process's listener gauge.
        report = await fetch_report(main_pid, 1)
        return report is not None and \
            report.families["mcsproxy_proxy_listeners"].total() == listeners

    deadline = time.monotonic() + 30
    while True:  # until both processes serve the listeners and the worker reports
        try:
            m = await scrape()
            if value(m, "mcsproxy_gateway_workers_reporting") == 1 and \
                    value(m, "mcsproxy_proxy_listeners") == listeners and \
                    await worker_listening():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "gateway with 2 workers did not come up"
        await asyncio.sleep(0.1)


async def test_two_workers_report_into_one_exposition(tmp_path: Path) -> None:
    backend = await Backend("east-1", "127.57.31.1", free_port("127.57.31.1"), "east").start()
    ip = "127.240.57.31"
    port = free_port(ip)
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [backend], port=port))
    try:
        async with two_workers(tmp_path) as (_, scrape):
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
        await backend.stop()


async def test_two_workers_sum_the_http_request_duration(tmp_path: Path) -> None:
    """Each HTTP request on a connection of its own, so SO_REUSEPORT spreads them over both
    processes: the histogram in the exposition is the sum of both, bucket by bucket."""
    backend = await HttpBackend("east-1", "127.57.33.1", "east").start()
    ip = "127.240.57.33"
    port = free_port(ip)
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [backend], port=port,
                                                    app_protocol="http"))
    try:
        async with two_workers(tmp_path) as (proc, scrape):
            for path in ["/"] * (CONNECTIONS - 10) + ["/sleep/150"] * 10:
                client = await RawClient.open(ip, port)
                assert (await client.get(path)).status == 200
                await client.close()
            m = await scrape()
            report = await fetch_report(proc.pid, 1)
        assert report is not None
        web = {"service": "test/web", "port": "web", "cluster": "east"}
        assert value(m, "mcsproxy_http_request_duration_seconds_count", **web) == CONNECTIONS
        assert value(m, "mcsproxy_http_request_duration_seconds_bucket", **web,
                     le="0.1") == CONNECTIONS - 10
        assert value(m, "mcsproxy_http_request_duration_seconds_bucket", **web,
                     le="0.25") == CONNECTIONS
        assert value(m, "mcsproxy_http_request_duration_seconds_sum", **web) >= 10 * 0.15
        # The worker's own part: some, not all (the main process served the rest).
        mine = [counts for counts, _sum in
                report.families["mcsproxy_http_request_duration_seconds"].values.values()]
        assert len(mine) == 1 and 0 < sum(mine[0]) < CONNECTIONS, mine
    finally:
        await backend.stop()


# The refusal's text (what the client reads) by the reason label it is counted under.
REFUSAL_TEXTS = [(b"malformed request", "malformed"), (b"only origin-form", "malformed"),
                 (b"CONNECT is not supported", "malformed"),
                 (b"invalid Host", "invalid_host"), (b"missing Host", "invalid_host"),
                 (b"more than one Host", "invalid_host"), (b"invalid authority", "invalid_host"),
                 (b"HTTP/", "http_version"), (b"the request line is not HTTP", "http_version"),
                 (b"only the chunked", "transfer_coding"),
                 (b"Transfer-Encoding in", "transfer_coding"), (b"only Expect", "expect"),
                 (b"too many header fields", "too_many_headers"),
                 (b"request header fields too large", "headers_too_large"),
                 (b"request URI too long", "uri_too_long")]


async def test_two_workers_count_every_refused_request(tmp_path: Path) -> None:
    """Requests refused before a service is chosen are in no service's counters: each
    refusal shape once, through a listener and the front door, each on a connection of
    its own (so both processes refuse some), counted by kind, status and reason."""
    backend = await HttpBackend("east-1", "127.57.35.1", "east").start()
    ip, tcp_ip = "127.240.57.35", "127.240.57.36"
    port = free_port(ip)
    front = (HOST, free_port(HOST))
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [backend], port=port,
                                                    app_protocol="http"))
    (tmp_path / "redis.yaml").write_text(service_yaml("redis", tcp_ip, [backend],
                                                      port=free_port(tcp_ip)))
    want: Counter[tuple[str, str, str]] = Counter()

    async def refused(where: tuple[str, int], raw: bytes, status: int) -> bytes:
        client = await RawClient.open(*where)
        client.send(raw)
        r = await client.response()
        await client.close()
        assert r.status == status, (raw[:60], r.status, r.body)
        return r.body

    try:
        async with two_workers(tmp_path, "--http-listen", f"{front[0]}:{front[1]}",
                               "--http-header-timeout", "0.5") as (proc, scrape):
            failed = 0
            for name, raw, status in SHAPES:
                body = await refused((ip, port), raw, status)
                now_failed = value(await scrape(), "mcsproxy_http_requests_total",
                                   outcome="failed")
                if now_failed > failed:
                    # A body that breaks after its head chose the service: that request
                    # is the service's, counted there (failed), not as a refusal.
                    assert b"Transfer-Encoding: chunked" in raw and status == 400, name
                    failed = now_failed
                    continue
                [reason] = {r for text, r in REFUSAL_TEXTS if body.startswith(text)} or {name}
                want["listener", str(status), reason] += 1
            for where, kind in (((ip, port), "listener"), (front, "front_door")):
                await refused(where, b"GET / HTTP/1.1\r\nHost: h:99999999999\r\n\r\n", 400)
                want[kind, "400", "invalid_host"] += 1
            for host, status, reason in [("evil.example", 421, "not_clusterset"),
                                         ("nope.test.svc.clusterset.local", 404,
                                          "unknown_service"),
                                         ("redis.test.svc.clusterset.local", 404, "not_http")]:
                await refused(front, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode(),
                              status)
                want["front_door", str(status), reason] += 1
            # Served requests are not refusals: nor are the 128 before the 429.
            client = await RawClient.open(ip, port)
            client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 300)  # one write, one read
            assert [(await client.response()).status for _ in range(129)] == [200] * 128 + [429]
            await client.close()
            want["listener", "429", "too_many_pipelined"] += 1
            # Slowloris: a head never finished gets 408; a connection that never sent a byte
            # is closed without an answer.
            slow = await RawClient.open(*front)
            slow.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            silent = await RawClient.open(ip, port)
            assert (await slow.response()).status == 408
            assert await silent.closed()
            await slow.close()
            await silent.close()
            want["front_door", "408", "head_timeout"] += 1
            want["listener", "none", "head_timeout"] += 1
            m = await scrape()
            report = await fetch_report(proc.pid, 1)
        got = {(lab["listener_kind"], lab["status"], lab["reason"]): v
               for lab, v in m.get("mcsproxy_http_refused_total", [])}
        assert got == want
        assert {reason for _, _, reason in got} <= set(REFUSAL_REASONS)  # the bounded set
        assert value(m, "mcsproxy_http_requests_total", outcome="2xx") == 128
        # Both processes refused some: the exposition is their sum.
        assert report is not None
        assert 0 < report.families["mcsproxy_http_refused"].total() < sum(want.values())
    finally:
        await backend.stop()


async def test_explain_counts_every_workers_connections_as_endpoints_does(
        tmp_path: Path) -> None:
    """/explain counted the main process's connections only (13 of 20 open), while
    /endpoints and the metric add the worker's."""
    backends = [await Backend(f"east-{i}", f"127.57.43.{i}", free_port(f"127.57.43.{i}"),
                              "east").start() for i in (1, 2)]
    ip = "127.240.57.43"
    port = free_port(ip)
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, backends, port=port))
    admin = f"{HOST}:{free_port(HOST)}"
    held = []
    try:
        async with two_workers(tmp_path, admin=admin) as (proc, _), \
                ClientSession(timeout=ClientTimeout(total=10)) as http:
            for _ in range(20):
                reader, writer = await asyncio.open_connection(ip, port)
                assert (await reader.readline()).startswith(b"east-")
                held.append(writer)
            report = await fetch_report(proc.pid, 1)
            assert report is not None and sum(
                sum(hosts.values()) for hosts in report.active.values()) > 0  # both hold some
            async with http.get(f"http://{admin}/endpoints?service=test/web") as resp:
                rows = (await resp.json())["endpoints"]
            async with http.get(f"http://{admin}/explain?service=test/web") as resp:
                explained = (await resp.json())["ports"][0]["endpoints"]
            for writer in held:
                writer.close()
        by_endpoint = {r["address"]: r["active_connections"] for r in rows}
        assert sum(by_endpoint.values()) == 20
        assert {e["address"]: e["active_connections"] for e in explained} == by_endpoint
    finally:
        for backend in backends:
            await backend.stop()


async def test_the_pages_say_whose_health_and_ejections_they_show(tmp_path: Path) -> None:
    """A worker's report carries counters and connections, not its ejections: /endpoints,
    /explain, /api/status and `mcsproxy status` showed the main process's health as if it
    were every process's, so an endpoint a worker ejected looked in service."""
    backend = await Backend("east-1", "127.57.44.1", free_port("127.57.44.1"), "east").start()
    ip = "127.240.57.44"
    port = free_port(ip)
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [backend], port=port))
    admin = f"{HOST}:{free_port(HOST)}"
    try:
        async with two_workers(tmp_path, admin=admin), \
                ClientSession(timeout=ClientTimeout(total=10)) as http:

            async def get(path: str) -> Any:
                async with http.get(f"http://{admin}{path}") as resp:
                    return await resp.json()

            scope = (await get("/endpoints"))["health_scope"]
            explained = (await get("/explain?service=test/web"))["ports"][0]
            status_ = await get("/api/status")
        assert scope == workers.health_scope(2)
        assert scope.startswith("health and ejections shown are the main process's")
        assert explained["health_scope"] == scope
        assert explained["words"][-1] == scope[0].upper() + scope[1:] + "."
        assert status_["gateway"]["health_scope"] == scope
        assert scope in statuscmd.render(status_).splitlines()
    finally:
        await backend.stop()


async def test_endpoints_lists_the_endpoints_a_worker_ejected(tmp_path: Path) -> None:
    """Each process ejects on the failures it sees: an endpoint the worker kept out showed
    in service on /endpoints and /explain (the main process's view alone), with nothing
    to tell."""
    live = await Backend("east-1", "127.57.45.1", free_port("127.57.45.1"), "east").start()
    dead = Backend("east-2", "127.57.45.2", free_port("127.57.45.2"), "east")  # refuses
    ip = "127.240.57.45"
    port = free_port(ip)
    (tmp_path / "web.yaml").write_text(service_yaml("web", ip, [live, dead], port=port))
    admin = f"{HOST}:{free_port(HOST)}"
    try:
        async with two_workers(tmp_path, "--outlier-consecutive-failures", "1", admin=admin) \
                as (proc, _), ClientSession(timeout=ClientTimeout(total=10)) as http:
            deadline = time.monotonic() + 10
            while True:  # until the worker has met the dead endpoint (the kernel spreads)
                assert await ask(ip, port) == "east-1"  # retried: the client never sees it
                report = await fetch_report(proc.pid, 1)
                if report is not None and report.ejected:
                    break
                assert time.monotonic() < deadline, "the worker ejected nothing"
            async with http.get(f"http://{admin}/endpoints?service=test/web") as resp:
                rows = {r["address"]: r for r in (await resp.json())["endpoints"]}
            async with http.get(f"http://{admin}/explain?service=test/web") as resp:
                explained = {r["address"]: r
                             for r in (await resp.json())["ports"][0]["endpoints"]}
        for page in (rows, explained):
            assert page["127.57.45.1"]["ejected_by_workers"] == {}
            by_workers = page["127.57.45.2"]["ejected_by_workers"]
            assert list(by_workers) == ["1"] and 0 < by_workers["1"] <= 30
    finally:
        await live.stop()


async def test_a_restarted_workers_counters_go_with_their_service(tmp_path: Path) -> None:
    """The counters a killed worker reported are kept (the sums never go backwards), but only
    while their service is served: they used to stay in /metrics for good, so every worker
    restart under service churn added the series of services long withdrawn."""
    backend = await Backend("east-1", "127.57.41.1", free_port("127.57.41.1"), "east").start()
    services = {"web": "127.240.57.41", "gone": "127.240.57.42"}
    ports = {name: free_port(ip) for name, ip in services.items()}
    for name, ip in services.items():
        (tmp_path / f"{name}.yaml").write_text(
            service_yaml(name, ip, [backend], port=ports[name]))
    try:
        async with two_workers(tmp_path) as (proc, scrape):
            for name, ip in services.items():
                assert await ask(ip, ports[name]) == "east-1"
            # Scraped before the kill: what a worker counted after its last report is lost.
            m = await scrape()
            assert value(m, "mcsproxy_proxy_connections_total", outcome="ok") == 2
            before = await fetch_report(proc.pid, 1)
            assert before is not None
            os.kill(before.pid, signal.SIGKILL)
            await until_both_serve(proc.pid, scrape, 2)  # its last report is now retired
            (tmp_path / "gone.yaml").unlink()
            deadline = time.monotonic() + 15
            while True:
                m = await scrape()
                if value(m, "mcsproxy_snapshot_services") == 1 and \
                        value(m, "mcsproxy_proxy_listeners") == 1:
                    break
                assert time.monotonic() < deadline, "the withdrawal was not applied"
                await asyncio.sleep(0.1)
            await until_both_serve(proc.pid, scrape, 1)
            m = await scrape()
        left = {name for name, samples in m.items()
                for labels, _ in samples if labels.get("service") == "test/gone"}
        assert not left, left
        web = {"service": "test/web", "port": "web", "cluster": "east"}
        assert value(m, "mcsproxy_proxy_connections_total", **web, outcome="ok") == 1
    finally:
        await backend.stop()


class FakeWorker:
    """What a worker's Observer gives its WorkerReporter: a fresh copy of `families` on
    every report (the reporter empties what it sends), and its active connections."""

    def __init__(self, families: Families,
                 active: dict[str, dict[str, int]] | None = None) -> None:
        self.families = families
        self.active = active or {}

    async def collect(self) -> tuple[Families, Iterator[tuple[str, dict[str, int]]]]:
        return Families.from_json(self.families.to_json()), iter(self.active.items())


async def test_a_report_larger_than_one_read_arrives_whole() -> None:
    """A worker's report of a few hundred services is a megabyte of JSON, more than one read
    of the socket returns: it must be read to its end, not taken as "did not report" (then
    the worker's counts stayed at its last complete report, silently)."""
    big = Families()
    many = big.counter("mcsproxy_proxy_connections", "c", ["service"])
    for i in range(20_000):  # about 1 MB of JSON
        many.add([f"ns/service-{i:05}"], 1)
    active = {f"ns/service-{i:05}:web/TCP": {"127.0.0.1:80": i % 3} for i in range(2_500)}
    assert len(json.dumps(big.to_json())) > 512 * 1024  # more than the socket buffers hold
    main_pid = os.getpid()  # our own pid: an abstract socket name no gateway has
    reporter = WorkerReporter(1, FakeWorker(big, active).collect, main_pid=main_pid)
    reports = WorkerReports(2, main_pid=main_pid)
    await reporter.start()
    try:
        for _ in range(3):
            merged = Families()
            await reports.merge_into(merged)
            assert reports.reporting == 1
            assert merged["mcsproxy_proxy_connections"].total() == 20_000
            assert reports.active == active  # in three {"active"} lines
    finally:
        await reporter.stop()


async def test_a_worker_report_is_made_and_read_in_parts_with_turns_of_the_loop() -> None:
    """Made and read whole, the report of 10,000 services (360,000 series) stopped the
    loops for 1.7-2.6 s, longer than the 1 s the main process waited for it: the worker's
    counters were missing from every scrape. Now lines of at most REPORT_PART_SERIES
    series, and the loop given a turn after each line made, read and merged."""
    part = workers.REPORT_PART_SERIES
    big = Families()
    many = big.counter("mcsproxy_proxy_connections", "c", ["service"])
    for i in range(4 * part):
        many.add([f"ns/service-{i:05}"], 1)
    lines = list(workers.report_lines(Families.from_json(big.to_json()), iter(())))
    assert [len(json.loads(line).get("family", {}).get("values", [])) for line in lines] == \
        [part, part, part, part, 0]  # and {"end": true}
    turns = LoopTurns()
    await asyncio.sleep(0)
    try:
        into = Families()
        before = turns.count
        await workers.merge_gradually(into, big)  # no I/O: turns only where it gives them
        assert turns.count - before >= 4
    finally:
        turns.stop()
    assert into["mcsproxy_proxy_connections"].total() == 4 * part
    assert not big["mcsproxy_proxy_connections"].values  # emptied as it went
    main_pid = os.getpid()
    reporter = WorkerReporter(1, FakeWorker(into).collect, main_pid=main_pid)
    reports = WorkerReports(2, main_pid=main_pid)
    await reporter.start()
    try:
        merged = Families()
        await reports.merge_into(merged)
    finally:
        await reporter.stop()
    assert reports.reporting == 1
    assert merged["mcsproxy_proxy_connections"].total() == 4 * part


async def test_a_report_cut_short_is_no_report() -> None:
    """A worker that dies mid-report: what arrived must not count (its totals would dip),
    its last whole report stands in."""
    main_pid = os.getpid()
    fams = families_with_connections(7)
    reporter = WorkerReporter(1, FakeWorker(fams).collect, main_pid=main_pid)
    reports = WorkerReports(2, main_pid=main_pid)
    await reporter.start()
    try:
        merged = families_with_connections(0)
        await reports.merge_into(merged)
        assert reports.reporting == 1 and merged["mcsproxy_proxy_connections"].total() == 7
    finally:
        await reporter.stop()

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = list(workers.report_lines(families_with_connections(9), iter(())))
        writer.write(workers._line({"pid": reporter.pid, "index": 1}))
        writer.write(b"".join(lines[:-1]))  # everything but {"end": true}
        await writer.drain()
        writer.close()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(workers.socket_name(main_pid, 1))
    server = await asyncio.start_unix_server(cut_short, sock=sock)
    try:
        assert await fetch_report(main_pid, 1) is None
        merged = families_with_connections(0)
        await reports.merge_into(merged)
        assert reports.reporting == 0
        assert merged["mcsproxy_proxy_connections"].total() == 7  # the last whole one
    finally:
        server.close()
        await server.wait_closed()


def families_with_connections(n: float) -> Families:
    f = Families()
    f.counter("mcsproxy_proxy_connections", "c", ["service"]).add(["ns/web"], n)
    return f


async def test_retired_counters_stay_bounded_under_churn() -> None:
    """100 rounds: a new service each round, the last one withdrawn, the worker restarted.
    The retired counters of a withdrawn port come back with it within RETIRED_KEEP_S (no
    counter reset) and are forgotten after it, so they do not pile up."""
    now = [0.0]
    worker = FakeWorker(Families())

    def restart(pid: int, services: list[str]) -> None:
        fam = Families()
        conns = fam.counter("mcsproxy_proxy_connections", "c", ["service", "port", "outcome"])
        for name in services:
            conns.add([name, "web", "ok"], 1)
        reporter.pid = pid
        worker.families = fam

    def main(services: list[str]) -> Families:
        fam = Families()  # the main process's own: every port it serves, zeros included
        conns = fam.counter("mcsproxy_proxy_connections", "c", ["service", "port", "outcome"])
        for name in services:
            conns.add([name, "web", "ok"], 0)
        return fam

    main_pid = os.getpid()
    reporter = WorkerReporter(1, worker.collect, main_pid=main_pid)
    reports = WorkerReports(2, main_pid=main_pid, clock=lambda: now[0])
    await reporter.start()
    try:
        for r in range(100):
            restart(1000 + r, ["ns/base", f"ns/churn-{r}"])
            merged = main(["ns/base", f"ns/churn-{r}"])
            await reports.merge_into(merged)  # the previous pid's report is retired
            served = {key[0] for key in merged["mcsproxy_proxy_connections"].values}
            assert served == {"ns/base", f"ns/churn-{r}"}, served
            # Every worker before this one counted a connection to the base service.
            assert merged["mcsproxy_proxy_connections"].total(service="ns/base") == r + 1
            now[0] += 60.0
        retired = reports.retired["mcsproxy_proxy_connections"].values
        assert len(retired) <= 2 + 600 // 60, len(retired)  # base + those not yet forgotten
        # A withdrawn port back within RETIRED_KEEP_S gets its retired counts again.
        merged = main(["ns/base", "ns/churn-95"])
        await reports.merge_into(merged)
        assert merged["mcsproxy_proxy_connections"].total(service="ns/churn-95") == 1
    finally:
        await reporter.stop()


async def test_concurrent_scrapes_merge_a_restarted_workers_report_once() -> None:
    """/metrics and the status page may gather at once. Merging awaits between parts now,
    so two merges could interleave: both would see the worker's new pid and retire its
    last report twice, doubling the counts it had made."""
    main_pid = os.getpid()
    worker = FakeWorker(families_with_connections(5))
    reporter = WorkerReporter(1, worker.collect, main_pid=main_pid)
    reporter.pid = 1001
    reports = WorkerReports(2, main_pid=main_pid)
    await reporter.start()
    try:
        await reports.merge_into(families_with_connections(0))
        reporter.pid = 1002  # restarted, counting from zero
        worker.families = families_with_connections(1)
        scrapes = [families_with_connections(3), families_with_connections(3)]
        await asyncio.gather(*(reports.merge_into(m) for m in scrapes))
    finally:
        await reporter.stop()
    assert [m["mcsproxy_proxy_connections"].total() for m in scrapes] == [3 + 5 + 1] * 2
    assert reports.reporting == 1
