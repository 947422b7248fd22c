"""The admin API of a running gateway: /config_dump, /endpoints, /explain, /api/status,
the demo relay, and `mcsproxy status` printing the same as a table."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import itertools
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as render_metrics

from bench.common import script_module
from mcsproxy import admin, jsonstream
from mcsproxy.config import OutlierConfig
from mcsproxy.model import ServiceKey
from mcsproxy.observability import status
from mcsproxy.observability.families import Families, Family, drop_gradually
from tests.http_support import RawClient, head_then_get
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import (
    LoopTurns,
    RunningGateway,
    parse_metrics,
    service_yaml,
    start_gateway,
    value,
)

HOST = "127.57.29.1"
SNAPSHOT_BENCH = script_module("bench/snapshot/run.py")  # its generator of services


async def test_config_dump_endpoints_explain_and_status(tmp_path: Path) -> None:
    east = await Backend("east-1", "127.57.21.1", free_port("127.57.21.1"), "east").start()
    west = await Backend("west-1", "127.57.22.1", free_port("127.57.22.1"), "west").start()
    files = {"web": service_yaml("web", "127.240.57.21", [east, west]),
             "api": service_yaml("api", "127.240.57.22", [east], traffic="PreferClose",
                                 port_name="", port=8080)}
    gw = await start_gateway(tmp_path, HOST, files=files)
    try:
        dump = await gw.get_json("/config_dump")
        assert dump["snapshot"]["version"] == gw.gateway.store.current.version
        services = {s["key"]: s for s in dump["snapshot"]["services"]}
        assert set(services) == {"test/web", "test/api"}
        web_svc = services["test/web"]
        assert web_svc["ips"] == ["127.240.57.21"] and web_svc["locality"] == "spread"
        assert sorted(e["cluster"] for e in web_svc["endpoints"]) == ["east", "west"]
        assert services["test/api"]["locality"] == "local-first"
        assert dump["config"]["cluster_id"] == "east"
        assert dump["config"]["proxy"]["overprovisioning_factor"] == 1.4
        one = await gw.get_json("/config_dump?service=test/api")
        assert [s["key"] for s in one["snapshot"]["services"]] == ["test/api"]
        await gw.get_json("/config_dump?service=test/nope", status=404)
        await gw.get_json("/config_dump?service=bad", status=400)

        # An open connection shows on its endpoint.
        reader, writer = await asyncio.open_connection("127.240.57.22", 8080)
        assert await reader.readline() == b"east-1\n"
        rows = (await gw.get_json("/endpoints?service=test/api"))["endpoints"]
        assert [(r["address"], r["cluster"], r["priority"], r["healthy"], r["ejected"],
                 r["active_connections"], r["port"]) for r in rows] == [
            ("127.57.21.1", "east", 0, True, False, 1, "")]
        # A count, as the page and `mcsproxy status` print it: 1, not 1.0.
        gateway_row = (await gw.get_json("/api/status"))["gateway"]
        assert gateway_row["active_connections"] == 1
        assert type(gateway_row["active_connections"]) is int
        # Which CPython runs it: its speed depends on how that was built (PGO, LTO).
        version, executable = gateway_row["python"].split(" ", 1)
        assert version == platform.python_version()
        assert os.path.samefile(executable.strip("()"), sys.executable)
        writer.close()
        await writer.wait_closed()
        everything = await gw.get_json("/endpoints")
        assert everything["health_scope"] is None  # one process: its health is all there is
        rows = everything["endpoints"]
        assert {(r["service"], r["cluster"]) for r in rows} == {
            ("test/web", "east"), ("test/web", "west"), ("test/api", "east")}

        explained = await gw.get_json("/explain?service=test/web")
        port = explained["ports"][0]
        assert port["live"] and port["split"] == {"east": 50.0, "west": 50.0}
        assert port["health_scope"] is None
        assert port["levels"] == [{"priority": 0, "clusters": ["east", "west"], "endpoints": 2,
                                   "healthy": 2, "health_percent": 100, "load_percent": 100,
                                   "panic": False}]
        api = await gw.get_json("/explain?service=test/api&port=8080")
        assert [p["port"]["port"] for p in api["ports"]] == [8080]
        assert api["words"][0].startswith(
            "Locality local-first (trafficDistribution: PreferClose)")
        async with gw.http.get(gw.admin + "/explain?service=test/web&format=text") as resp:
            body = await resp.text()
        assert body.startswith("test/web port web/TCP:\n  Locality spread")
        assert "east 50%, west 50%" in body
        await gw.get_json("/explain", status=400)
        # a typo answered JSON without a word
        assert "format must be text or json, not 'txt'" in await gw.get_json(
            "/explain?service=test/web&format=txt", status=400)
        assert (await gw.get_json("/explain?service=test/web&format=json"))["ports"]
        await gw.get_json("/explain?service=test/nope", status=404)
        await gw.get_json("/explain?service=test/web&port=9", status=404)
        await gw.get_json("/endpoints?service=test/wbe", status=404)  # was 200, no endpoints

        for _ in range(4):
            await ask("127.240.57.21", 80)
        status = await gw.get_json("/api/status")
        assert status["clusters"] == ["east", "west"]
        web_row = next(s for s in status["services"] if s["service"] == "test/web")
        cells = web_row["clusters"]
        assert cells["east"]["connections"] + cells["west"]["connections"] == 4
        assert {type(v) for c in cells.values()
                for k, v in c.items() if k in ("connections", "failed", "active")} == {int}
        assert cells["east"]["expected_share"] == 50.0
        assert any(e["kind"] == "snapshot" for e in status["events"])
        latest = status["events"][-1]["seq"]
        assert status["events_seq"] == latest
        assert (await gw.get_json(f"/api/status?since={latest}"))["events"] == []
        # A page still open from before a restart asks past our numbering: it gets every
        # recent event (it got none, for as long as the new process had fewer events).
        after_restart = await gw.get_json(f"/api/status?since={latest + 100}")
        assert after_restart["events"] == status["events"][-len(after_restart["events"]):]
        assert after_restart["events"] and after_restart["events_seq"] == latest

        # The CLI prints the same as a table.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcsproxy", "status", "--admin", gw.admin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert lines[0].startswith("gateway east: ready, snapshot v")
        header = next(line for line in lines if line.startswith("SERVICE"))
        assert header.split() == ["SERVICE", "LOCALITY", "east", "(local)", "west"]
        row = next(line for line in lines if line.startswith("test/web:web/TCP"))
        assert "spread" in row and "1/1 50%" in row
        assert any(line.startswith("test/api:8080/TCP") and "local-first" in line
                   for line in lines)
        assert "RECENT EVENTS" in lines
    finally:
        await gw.stop()
        await east.stop()
        await west.stop()


async def test_head_gets_no_body_and_keeps_the_connection_framed(tmp_path: Path) -> None:
    """The streamed answers wrote their body after a HEAD's head too (/metrics 27 KB with
    its Content-Length, the JSON ones unframed): the next answer on that connection was
    read from the middle of it."""
    east = await Backend("east-1", "127.57.25.1", free_port("127.57.25.1"), "east").start()
    gw = await start_gateway(tmp_path, HOST, files={
        "web": service_yaml("web", "127.240.57.25", [east])})
    try:
        host, port = gw.gateway.admin.bound
        for path in ("/healthz", "/metrics", "/config_dump", "/endpoints", "/api/status"):
            _, after = await head_then_get(host, port, path)
            assert after.startswith(b"HTTP/1.1 200 OK\r\n"), (path, after[:80])
    finally:
        await gw.stop()
        await east.stop()


async def test_an_ejection_that_ran_out_shows_as_over_with_no_connection_since(
        tmp_path: Path) -> None:
    """Only a new connection used to end an ejection: after it ran out /endpoints,
    /metrics, /api/status and /explain all kept the endpoint out (and a local-first
    service spilled) until the next client came."""
    east = await Backend("east-1", "127.57.23.1", free_port("127.57.23.1"), "east").start()
    west = await Backend("west-1", "127.57.24.1", free_port("127.57.24.1"), "west").start()
    dead = Backend("east-2", "127.57.23.2", free_port("127.57.23.2"), "east")  # refuses
    files = {"web": service_yaml("web", "127.240.57.23", [east, dead, west],
                                 traffic="PreferClose")}
    gw = await start_gateway(tmp_path, HOST, files=files, outlier=OutlierConfig(
        consecutive_failures=1, base_ejection_s=0.3))
    try:
        assert gw.gateway.proxy is not None
        (upstream,) = gw.gateway.proxy.upstreams.values()
        host = upstream.hosts[(dead.host, dead.port)]
        for _ in range(6):  # round-robin reaches the dead one; the client is retried
            # (to west too once the dead one is out: east takes 70 % then)
            assert await ask("127.240.57.23", 80) in ("east-1", "west-1")
            if host.ejected:
                break
        assert host.ejected
        # Wait out the ejection on the set's own clock; no connection comes meanwhile.
        await asyncio.sleep(host.ejected_until - time.monotonic() + 0.05)

        rows = (await gw.get_json("/endpoints?service=test/web"))["endpoints"]
        row = next(r for r in rows if r["address"] == dead.host)
        assert (row["ejected"], row["ejected_for_s"], row["healthy"]) == (False, 0.0, True)
        m = await gw.metrics()
        assert value(m, "mcsproxy_upstream_endpoints", service="test/web", state="ejected") == 0
        assert value(m, "mcsproxy_upstream_expected_share_percent", cluster="east") == 100
        status = await gw.get_json("/api/status")
        cells = next(s for s in status["services"] if s["service"] == "test/web")["clusters"]
        assert (cells["east"]["healthy"], cells["east"]["ejected"]) == (2, 0)
        assert cells["east"]["expected_share"] == 100.0
        assert any("returned from ejection" in e["text"] for e in status["events"])
        port = (await gw.get_json("/explain?service=test/web"))["ports"][0]
        assert port["split"] == {"east": 100.0} and not port["spill"]
        assert not any(e["ejected"] for e in port["endpoints"])
    finally:
        await gw.stop()
        await east.stop()
        await west.stop()


async def test_a_listener_that_cannot_bind_shows_without_failing_readiness(
        tmp_path: Path) -> None:
    """A ClusterSetIP:port held by another socket: the gauge counts it and /readyz names
    it while staying 200 (the other service and DNS keep serving); once the socket is
    gone the retry binds and both clear."""
    backend = await Backend("east-1", "127.57.81.1", free_port("127.57.81.1"), "east").start()
    blocked, free = "127.240.57.81", "127.240.57.82"
    blocker = socket.socket()
    blocker.bind((blocked, 80))
    blocker.listen()
    files = {"web": service_yaml("web", blocked, [backend]),
             "api": service_yaml("api", free, [backend])}
    gw = await start_gateway(tmp_path, "127.57.89.1", files=files)
    try:
        assert value(await gw.metrics(), "mcsproxy_proxy_listeners_failing") == 1
        assert value(await gw.metrics(), "mcsproxy_proxy_listeners") == 1
        detail = await gw.get_json("/readyz")  # 200: still ready
        assert detail["ready"] is True
        assert detail["listeners_failing"] == [
            {"address": blocked, "port": 80, "protocol": "TCP", "service": "test/web:web/TCP",
             "error": "Address already in use"}]
        assert await ask(free, 80) == "east-1"
        await asyncio.sleep(0.7)  # a retry, still held: still counted once
        assert value(await gw.metrics(), "mcsproxy_proxy_listeners_failing") == 1

        blocker.close()
        deadline = time.monotonic() + 10
        while value(await gw.metrics(), "mcsproxy_proxy_listeners_failing") != 0:
            assert time.monotonic() < deadline, "the listener never bound"
            await asyncio.sleep(0.1)
        assert (await gw.get_json("/readyz"))["listeners_failing"] == []
        assert value(await gw.metrics(), "mcsproxy_proxy_listeners") == 2
        assert await ask(blocked, 80) == "east-1"
    finally:
        blocker.close()
        await gw.stop()
        await backend.stop()


async def test_failed_connections_show_alike_in_metrics_status_and_the_cli(
        tmp_path: Path) -> None:
    """The page printed "N failed" from /api/status but `mcsproxy status` left it out, so
    a cluster refusing every connect looked idle in the terminal. HTTP requests no
    endpoint answered (502) counted as requests served: "2 total", no failure."""
    dead = Backend("west-1", "127.57.83.1", free_port("127.57.83.1"), "west")  # not started
    files = {"web": service_yaml("web", "127.240.57.83", [dead]),
             "api": service_yaml("api", "127.240.57.84", [dead], app_protocol="http")}
    gw = await start_gateway(tmp_path, "127.57.89.3", files=files)
    try:
        for _ in range(2):
            with pytest.raises(OSError):
                await ask("127.240.57.83", 80)
            client = await RawClient.open("127.240.57.84", 80)
            assert (await client.get("/")).status == 502
            await client.close()
        assert value(await gw.metrics(), "mcsproxy_http_requests_total", service="test/api",
                     cluster="west", outcome="failed") == 2
        failed = value(await gw.metrics(), "mcsproxy_proxy_connections_total",
                       service="test/web", cluster="west", outcome="failed")
        assert failed == 2
        api, row = (await gw.get_json("/api/status"))["services"]
        assert row["clusters"]["west"]["failed"] == failed
        assert (api["clusters"]["west"]["failed"], api["clusters"]["west"]["requests"]) == (2, 0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcsproxy", "status", "--admin", gw.admin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        for name in ("test/web:web/TCP", "test/api:web/TCP"):
            line = next(x for x in out.decode().splitlines() if x.startswith(name))
            assert line.endswith("2 failed") and "total" not in line, line
    finally:
        await gw.stop()


async def test_status_cli_reports_an_unreachable_admin() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "status", "--admin",
        f"http://127.57.29.2:{free_port('127.57.29.2')}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and out == b""
    assert b"cannot read" in err


async def test_demo_buttons_are_relayed_to_the_demo_control_api(tmp_path: Path) -> None:
    """A stand-in for `mcsproxy demo`'s control API (its real one is tested in test_demo)."""
    calls: list[str] = []
    state = {"east": {"backends": "running"}}

    async def clusters(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def action(request: web.Request) -> web.Response:
        name, verb = request.match_info["name"], request.match_info["action"]
        calls.append(f"{verb} {name}")
        state[name]["backends"] = "killed" if verb == "kill" else "running"
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/clusters", clusters)
    app.router.add_post("/clusters/{name}/{action}", action)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port("127.57.29.3")
    await web.TCPSite(runner, "127.57.29.3", port).start()
    gw = await start_gateway(tmp_path, HOST, demo_control=f"http://127.57.29.3:{port}")
    try:
        assert (await gw.get_json("/api/status"))["demo_control"] == \
            f"http://127.57.29.3:{port}"
        assert await gw.get_json("/demo/clusters") == {"east": {"backends": "running"}}
        async with gw.http.post(gw.admin + "/demo/clusters/east/kill") as resp:
            assert resp.status == 200
            assert (await resp.json())["east"]["backends"] == "killed"
        assert calls == ["kill east"]
        async with gw.http.post(gw.admin + "/demo/clusters/east/explode") as resp:
            assert resp.status in (404, 405)
    finally:
        await gw.stop()
        await runner.cleanup()
    gw = await start_gateway(tmp_path, HOST)
    try:
        await gw.get_json("/demo/clusters", status=404)
    finally:
        await gw.stop()


def test_aiohttp_server_errors_are_logged_at_most_once_a_second() -> None:
    # A malformed request to the admin API makes aiohttp log an error with a traceback:
    # without a limit, anyone reaching the port could fill the log.
    import logging
    import time

    from mcsproxy.logsetup import RateLimit, setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("info")
        assert any(isinstance(f, RateLimit) for f in logging.getLogger("aiohttp.server").filters)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    limit = RateLimit(0.2)

    def record() -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                 "Error handling request", None, None)

    assert sum(limit.filter(record()) for _ in range(50)) == 1
    time.sleep(0.25)
    later = record()
    assert limit.filter(later) and later.getMessage().endswith("(49 similar records dropped)")


async def gateway_with_many_services(tmp_path: Path, host: str) -> RunningGateway:
    """A gateway whose proxy serves 350 services of two ports (175 of them with a
    ClusterSetIP), each in 3 clusters of 2 endpoints: bench/snapshot's generator."""
    gw = await start_gateway(tmp_path, host)
    store = gw.gateway.store
    store.register_source("bulk")
    for oid, spec in SNAPSHOT_BENCH.objects(350, 2):
        store.upsert(oid, spec)
    store.mark_synced("bulk")
    store.commit()
    assert gw.gateway.proxy is not None
    await asyncio.wait_for(gw.gateway.proxy.wait_applied(store.current.version), 30)
    return gw


async def test_answers_about_every_service_are_streamed_and_let_the_loop_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Built and serialised whole, in one stretch of the loop that the proxy and DNS share,
    # 10,000 services of 30 endpoints held them up for 7.4-8.9 s (/config_dump), 2.1 s
    # (/endpoints) and 1.0 s (/api/status, asked every 1.5 s by the status page).
    gw = await gateway_with_many_services(tmp_path, "127.57.29.5")
    snapshot = gw.gateway.store.current
    proxy = gw.gateway.proxy
    assert proxy is not None
    pulled: dict[str, list[tuple[int, int]]] = {}  # path: (the loop's turn, units) an item
    stream = admin.stream_json_list

    async def recorded(request: web.Request, prefix: str, items: Any,
                       suffix: Any) -> web.StreamResponse:
        log = pulled.setdefault(request.path, [])

        def each() -> Any:
            for item, units in items:
                log.append((turns.count, units))
                yield item, units

        return await stream(request, prefix, each(), suffix)

    monkeypatch.setattr(admin, "stream_json_list", recorded)
    answers = {}
    turns = LoopTurns()
    try:
        for path in ("/config_dump", "/endpoints", "/api/status"):
            async with gw.http.get(gw.admin + path) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "application/json"
                assert "Content-Length" not in resp.headers  # streamed, not built whole
                answers[path] = await resp.json()
        upstreams = list(proxy.upstreams.values())
    finally:
        turns.stop()
        await gw.stop()

    dump = answers["/config_dump"]
    assert dump["snapshot"]["version"] == snapshot.version
    assert dump["snapshot"]["built_at"] == snapshot.built_at
    assert dump["snapshot"]["services"] == json.loads(json.dumps(
        [admin.service_json(snapshot.services[k]) for k in sorted(snapshot.services)]))
    assert dump["config"] == json.loads(json.dumps(admin.jsonable(gw.gateway.config)))
    rows = answers["/endpoints"]["endpoints"]
    assert len(upstreams) == 350  # 175 services with a ClusterSetIP, 2 ports each
    assert len(rows) == sum(len(u.hosts) for u in upstreams) == 350 * 6
    assert {r["cluster"] for r in rows} == {"cluster-a", "cluster-b", "cluster-c"}
    status = answers["/api/status"]
    assert len(status["services"]) == 350 * 2  # a row per service port
    assert status["clusters"] == ["east", "cluster-a", "cluster-b", "cluster-c"]
    assert status["gateway"]["services"] == 350 and status["gateway"]["proxy"] is True
    served = [r for r in status["services"] if r["served"]]
    assert len(served) == 350
    assert all(sum(c["endpoints"] for c in r["clusters"].values()) == 6 for r in served)

    # Items built and serialised in one turn of the loop share its count: each such
    # batch is cut as soon as its units reach WORK_PER_TURN.
    for path, log in pulled.items():
        batches = [[units for _, units in group]
                   for _, group in itertools.groupby(log, key=lambda p: p[0])]
        assert len(batches) >= 7, path
        for batch in batches[:-1]:
            assert sum(batch) >= jsonstream.WORK_PER_TURN > sum(batch[:-1]), path
        assert sum(batches[-1]) < jsonstream.WORK_PER_TURN + batches[-1][-1], path


def test_jsonable_turns_dataclasses_mappings_and_sequences_into_json_data() -> None:
    @dataclasses.dataclass(frozen=True)
    class Inner:
        port: int
        names: tuple[str, ...]

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner
        by_key: dict[ServiceKey, Inner]
        tags: frozenset[str]
        missing: float | None = None

    value = Outer(Inner(80, ("a", "b")), {ServiceKey("ns", "x"): Inner(1, ())},
                  frozenset({"t"}))
    assert admin.jsonable(value) == {
        "inner": {"port": 80, "names": ["a", "b"]},
        "by_key": {"ns/x": {"port": 1, "names": []}},
        "tags": ["t"], "missing": None}
    assert admin.jsonable(Outer) is Outer  # a class, not an instance: left alone
    # Looked up once per class: dataclasses by their field names, the rest as None.
    assert admin.FIELD_NAMES[Outer] == ("inner", "by_key", "tags", "missing")
    assert admin.FIELD_NAMES[Inner] == ("port", "names")
    assert admin.FIELD_NAMES[frozenset] is None


async def test_metric_families_are_gathered_with_turns_of_the_loop_between(
        tmp_path: Path) -> None:
    # 10,000 services made 500,000 series, collected in one stretch of the loop (0.7 s):
    # the status page's /api/status and every /metrics scrape stopped the proxy for it.
    gw = await gateway_with_many_services(tmp_path, "127.57.29.6")
    observer = gw.gateway.observer
    turns = LoopTurns()
    try:
        await asyncio.sleep(0)
        before = turns.count
        gathered = await observer.gather()  # one process: no I/O, only its own turns
        during = turns.count - before
        at_once = Families()
        for _ in observer._collect_steps(at_once):  # the same steps, without turns
            pass
    finally:
        turns.stop()
        await gw.stop()
    # 350 upstream sets of 6 endpoints, a turn every WORK_PER_TURN units of (1 + 6) each
    assert during >= 350 * 7 // jsonstream.WORK_PER_TURN
    clock = {"mcsproxy_snapshot_age_seconds"}  # read twice, a moment apart
    assert [f for f in gathered.to_json() if f["name"] not in clock] == \
        [f for f in at_once.to_json() if f["name"] not in clock]
    assert sum(len(f.values) for f in gathered.by_name.values()) > 350 * 10


def test_metrics_are_rendered_in_parts_with_one_help_and_type_a_family() -> None:
    # Rendered whole, one family of 30,000 histograms (~60 MB of text) held the loop for
    # 0.15-0.25 s while prometheus-client sorted, joined and encoded it in single calls.
    families = Families()
    gauge = families.gauge("mcsproxy_test_share", "a share\nof traffic", ["service"])
    hist = families.histogram("mcsproxy_test_seconds", "durations", ["service"], (0.1, 1.0))
    for i in range(2 * admin.METRICS_PART_SERIES + 7):  # three parts each, in label order
        gauge.add([f"ns/svc{i:06d}"], i)
        hist.values[(f"ns/svc{i:06d}",)] = [[i, 1, 0], i * 0.5]
    families.counter("mcsproxy_test_small", "one part", []).add([], 3)
    whole = render_metrics(families)  # before _render, which empties what it rendered
    parts = admin._render(families, CollectorRegistry())
    assert len(parts) == 3 + 3 + 1 + 1  # the process registry's, empty here, last
    assert b"".join(parts) == whole
    text = whole.decode()
    for name in ("mcsproxy_test_share", "mcsproxy_test_seconds", "mcsproxy_test_small_total"):
        assert text.count(f"# TYPE {name} ") == text.count(f"# HELP {name} ") == 1
    assert [len(f.values) for f in families] == [0, 0, 0]  # freed as it went, in the thread


async def test_the_status_traffic_table_and_freeing_the_families_give_the_loop_turns() -> None:
    # Made in one go, 10,000 services' traffic table (100,000 series) stopped the loop
    # for 43-61 ms every 1.5 s the status page is open, and freeing the families 40 ms.
    per_turn = status.TRAFFIC_SERIES_PER_TURN
    families = Families()
    conns = families.counter("mcsproxy_proxy_connections", "c",
                             ["service", "port", "cluster", "outcome"])
    requests = families.counter("mcsproxy_http_requests", "r",
                                ["service", "port", "cluster", "outcome"])
    active = families.gauge("mcsproxy_upstream_active_connections", "a",
                            ["service", "port", "cluster"])
    for i in range(per_turn):
        conns.add([f"ns/s{i}", "web", "east", "ok"], 2)
        conns.add([f"ns/s{i}", "web", "west", "failed"], 1)
        requests.add([f"ns/s{i}", "web", "east", "2xx"], 5)
        active.add([f"ns/s{i}", "web", "east"], 1)
    turns = LoopTurns()
    await asyncio.sleep(0)
    try:
        before = turns.count
        traffic = await status.traffic_by_cluster(families)  # no I/O: only its own turns
        made = turns.count - before
        before = turns.count
        await drop_gradually(families)
        dropped = turns.count - before
    finally:
        turns.stop()
    assert len(traffic) == per_turn
    assert traffic[("ns/s7", "web")] == {
        "east": {"connections": 2, "requests": 5, "active": 1, "failed": 0},
        "west": {"connections": 0, "requests": 0, "active": 0, "failed": 1}}
    assert made >= 4 and dropped >= 4  # 4 x per_turn series each
    assert all(not f.values for f in families)


async def test_metrics_scrapes_sent_at_once_share_one_render(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every /metrics request gathered and rendered on its own: 12 sent at once by one
    client (it may hold 64 admin connections) were 12 renders, up to six at a time in
    threads holding the GIL against the proxy's loop. Requests that arrive during a
    scrape now share the next one; none is answered with series older than itself."""
    renders = 0
    render = admin._render

    def slow_render(families: Families, process: CollectorRegistry) -> list[bytes]:
        nonlocal renders
        renders += 1
        time.sleep(0.2)  # a large clusterset's render, in the thread as the real one
        return render(families, process)

    monkeypatch.setattr(admin, "_render", slow_render)
    gw = await start_gateway(tmp_path, "127.81.10.1")
    try:
        async def scrape() -> str:
            async with gw.http.get(gw.admin + "/metrics") as resp:
                assert resp.status == 200
                return await resp.text()

        bodies = await asyncio.gather(*(scrape() for _ in range(12)))
        assert all("mcsproxy_dns_queries_total" in body for body in bodies)
        assert renders <= 2, renders  # the first arrival's, then one for all the others
        assert gw.gateway.admin.app[admin.SCRAPE_KEY]._parts is None  # nobody waits: freed
        # A scrape after them is a scrape of its own.
        await scrape()
        assert renders <= 3
    finally:
        await gw.stop()


@pytest.mark.parametrize(("accept", "gzipped"), [
    ("gzip", True), ("deflate, GZip;q=0.5", True), ("gzip;q=0", False), ("identity", False),
    (None, False)])
async def test_metrics_are_gzipped_for_a_scraper_that_accepts_it(
        tmp_path: Path, accept: str | None, gzipped: bool) -> None:
    """Prometheus always sends Accept-Encoding: gzip, and got the text as it is: 158 MB
    a scrape at 6,000 services of 2 ports in 3 clusters (8.3 MB gzipped)."""
    backends = [Backend(f"{c}-1", f"127.81.11.{9 + i}", 9, c)
                for i, c in enumerate(("east", "west"))]
    files = {f"s{i}": service_yaml(f"s{i}", f"127.241.9.{i + 1}", backends) for i in range(20)}
    gw = await start_gateway(tmp_path, "127.81.11.1", files=files)
    try:
        extra = f"Accept-Encoding: {accept}\r\n" if accept is not None else ""
        client = await RawClient.open(*gw.gateway.admin.bound)  # it decodes nothing
        try:
            resp = await client.get("/metrics", host="127.81.11.1", extra=extra)
        finally:
            await client.close()
        assert resp.status == 200
        assert resp.headers[b"vary"] == b"Accept-Encoding"
        assert resp.headers.get(b"content-encoding") == (b"gzip" if gzipped else None)
        text = (gzip.decompress(resp.body) if gzipped else resp.body).decode()
        samples = parse_metrics(text)
        assert value(samples, "mcsproxy_snapshot_services") == 20
        assert len(samples["mcsproxy_upstream_endpoints"]) == 20 * 2 * 3
    finally:
        await gw.stop()


async def ask_and_stop_reading(address: tuple[str, int]) -> socket.socket:
    """A /metrics request from a client that then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, address)
    await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


async def test_a_metrics_answer_nobody_reads_is_cut_off_with_its_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that asked for /metrics and stopped reading held the text (158 MB at
    6,000 services of 2 ports in 3 clusters) as long as it kept the connection: 8 such
    clients of a 2,000-service gateway held 183 MB until they left. Now the answer has
    METRICS_WRITE_TIMEOUT_S, then the connection is closed."""
    part = b"#" * (1 << 20)
    monkeypatch.setattr(admin, "_render", lambda families, process: [part] * 48)
    monkeypatch.setattr(admin, "METRICS_WRITE_TIMEOUT_S", 0.5)
    gw = await start_gateway(tmp_path, "127.81.12.1")
    loop = asyncio.get_running_loop()
    try:
        with await ask_and_stop_reading(gw.gateway.admin.bound) as sock:
            await asyncio.sleep(1.5)  # not reading, past the deadline
            received = 0
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(sock, 1 << 20):
                    received += len(chunk)
        assert received < 48 * len(part)  # cut off, then closed
        assert gw.gateway.admin.guard.closed["answer_timeout"] == 1
    finally:
        await gw.stop()


async def test_scrape_texts_held_by_unread_answers_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the write timeout a client could still ask, stop reading and ask again on
    another connection (it may hold 64), each request a scrape of its own and its text
    held: 64 x 158 MB at 6,000 services. A new scrape now waits while METRICS_TEXTS_HELD
    texts are being written."""
    renders = 0
    part = b"#" * (1 << 20)

    def big_render(families: Families, process: CollectorRegistry) -> list[bytes]:
        nonlocal renders
        renders += 1
        return [part] * 48

    monkeypatch.setattr(admin, "_render", big_render)
    monkeypatch.setattr(admin, "METRICS_WRITE_TIMEOUT_S", 1.5)
    gw = await start_gateway(tmp_path, "127.81.13.1")
    address = gw.gateway.admin.bound
    socks = []
    try:
        for held in range(1, admin.METRICS_TEXTS_HELD + 1):
            socks.append(await ask_and_stop_reading(address))
            async with asyncio.timeout(5):
                while renders < held:
                    await asyncio.sleep(0.01)
        socks.append(await ask_and_stop_reading(address))
        await asyncio.sleep(0.7)
        assert renders == admin.METRICS_TEXTS_HELD  # waits for a text to go
        async with asyncio.timeout(5):  # the first answer's timeout frees one
            while renders == admin.METRICS_TEXTS_HELD:
                await asyncio.sleep(0.01)
        assert gw.gateway.admin.guard.closed["answer_timeout"] >= 1
    finally:
        for sock in socks:
            sock.close()
        await gw.stop()


async def test_a_gather_adds_per_cluster_not_per_endpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Series are per service port and cluster, but the gather added each endpoint's open
    connections and state to them one Family.add at a time: 720,000 of 1.3M adds at 6,000
    services of 2 ports in 3 clusters of 10 endpoints."""
    adds = 0
    add = Family.add

    def counted(family: Family, labels: Sequence[str], value: float) -> None:
        nonlocal adds
        adds += 1
        add(family, labels, value)

    monkeypatch.setattr(Family, "add", counted)
    counts = []
    for i, endpoints in enumerate((2, 10)):
        (tmp_path / str(i)).mkdir()
        gw = await start_gateway(tmp_path / str(i), f"127.81.14.{i + 1}")
        try:
            store = gw.gateway.store
            store.register_source("bulk")
            for oid, spec in SNAPSHOT_BENCH.objects(40, endpoints):
                store.upsert(oid, spec)
            store.mark_synced("bulk")
            store.commit()
            assert gw.gateway.proxy is not None
            await asyncio.wait_for(gw.gateway.proxy.wait_applied(store.current.version), 30)
            adds = 0
            await gw.gateway.observer.gather()
            counts.append(adds)
        finally:
            await gw.stop()
    assert counts[0] == counts[1], counts
