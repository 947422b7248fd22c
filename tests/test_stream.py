"""The controller's gateway stream and the gateway's controlplane source: snapshots,
deltas, resume vs resync, the stream going away, malformed messages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import resource
import socket
import sys
import time
from collections import deque
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controlplane.command import ControllerConfig, DirectoryControllerApp, config_from_args
from controlplane.metrics import ControllerMetrics
from controlplane.resources import ObjectRef
from controlplane.server import ControllerServer
from controlplane.stream import (
    HISTORY_BYTES,
    SUBSCRIBER_QUEUE,
    Feed,
    StreamHub,
    Subscriber,
)
from mcsproxy.cli import build_parser
from mcsproxy.dns.wire import encode_name
from mcsproxy.dns.zone import ZoneIndex
from mcsproxy.gateway import Gateway
from mcsproxy.model import ServiceKey
from mcsproxy.sources import SourceSpecError, make_source
from mcsproxy.sources.controlplane import ControlplaneSource
from mcsproxy.store import ServiceMap, SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from mcsproxy.tokenfile import TokenFile
from tests.http_support import head_then_get
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_controller import clusterset_with_backends, dns_a, gateway_config, until
from tests.test_controlplane_source_faults import serve_stream
from tests.test_kube_source import service_import
from tests.test_reconcile_support import eslice, export, namespace, service

WEB = ServiceKey("test", "web")
HOST = "127.49.0.1"
SLOW_HOST = "127.131.0.1"


def write_member(root: Path, cluster: str, addresses: list[str]) -> None:
    root.joinpath(cluster).mkdir(parents=True, exist_ok=True)
    docs = [namespace(), service(), eslice("web-x", addresses), export()]
    root.joinpath(cluster, "web.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))


def addresses(store: SnapshotStore) -> list[str]:
    svc = store.current.services.get(WEB)
    return sorted(e.address for e in svc.endpoints) if svc else []


class Controller:
    """A directory-mode controller with --serve, on a fixed port so it can come back."""

    def __init__(self, clusters: Path, out: Path, port: int, host: str = HOST,
                 **config: object) -> None:
        self.config = ControllerConfig(clusters, out, serve=(host, port), poll_interval_s=0.05,
                                       heartbeat_s=0.2, **config)  # type: ignore[arg-type]
        self.app: DirectoryControllerApp | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> DirectoryControllerApp:
        self.app = DirectoryControllerApp(self.config)
        await self.app.start()
        self.task = asyncio.create_task(self.app.serve())
        await until(lambda: self.app.server is not None and self.app.server.bound)
        return self.app

    async def stop(self) -> None:
        assert self.app is not None and self.task is not None
        self.app.stop()
        await self.task


async def start_source(url: str, store: SnapshotStore, **kw: object) -> tuple[
        ControlplaneSource, asyncio.Task]:
    source = ControlplaneSource(url, store.cluster_id, backoff_initial_s=0.05,
                                backoff_max_s=0.2, **kw)
    return source, spawn(source.run(store), name="test source")


async def test_snapshot_then_deltas_and_resume_without_resync(tmp_path: Path) -> None:
    clusters, out, port = tmp_path / "c", tmp_path / "o", free_port(HOST)
    write_member(clusters, "a", ["127.0.1.1"])
    (clusters / "b").mkdir()
    (clusters / "b" / "ns.yaml").write_text(json.dumps(namespace()))
    ctl = Controller(clusters, out, port)
    app = await ctl.start()
    url = f"http://{HOST}:{port}"
    store = SnapshotStore("b")
    source, task = await start_source(url, store)
    try:
        async with asyncio.timeout(5):
            await store.loaded.wait()
        assert addresses(store) == ["127.0.1.1"]
        assert store.sources[source.name].connected
        write_member(clusters, "a", ["127.0.1.1", "127.0.1.2"])
        await until(lambda: addresses(store) == ["127.0.1.1", "127.0.1.2"])
        assert source.resyncs == 1  # the change came as a delta
        assert source.propagation._sum.get() > 0
        # The gateway goes away, a change happens, it comes back with its version.
        await cancel_and_wait([task])
        epoch, version = source.epoch, source.version
        write_member(clusters, "a", ["127.0.1.3"])
        await until(lambda: app.hub.feeds["b"].version > version)
        resyncs_before = app.metrics.stream_resyncs._value.get()
        again, task = await start_source(url, store)
        again.epoch, again.version = epoch, version
        await until(lambda: addresses(store) == ["127.0.1.3"])
        assert again.resyncs == 0
        assert app.metrics.stream_resyncs._value.get() == resyncs_before
    finally:
        await cancel_and_wait([task])
        await ctl.stop()


async def test_unknown_epoch_or_too_old_version_gets_a_snapshot() -> None:
    objects: dict[ObjectRef, dict] = {}
    feed = Feed("b", "epoch-1", objects)
    feed.history = deque(maxlen=2)
    for i in range(3):
        ref = ObjectRef("ServiceImport", "test", f"s{i}")
        objects[ref] = {"n": i}
        feed.publish({ref: objects[ref]}, [], None)
    assert feed.since("epoch-1", 3) == []
    assert len(feed.since("epoch-1", 1)) == 2
    assert feed.since("epoch-1", 0) is None  # version 1 fell out of the history
    assert feed.since("epoch-0", 3) is None  # another controller run
    assert feed.since("epoch-1", 9) is None
    snapshot = json.loads(feed.snapshot())
    assert snapshot["version"] == 3 and len(snapshot["objects"]) == 3


def test_the_history_is_bounded_in_bytes_too() -> None:
    """A member going stale and back is a delta of every slice it exports (6.3-6.7 MB
    for 10,000 services); 1024 versions of those were kept, up to 6.9 GB a feed. The
    history keeps HISTORY_BYTES of deltas; an older version gets a snapshot."""
    objects: dict[ObjectRef, dict] = {}
    feed = Feed("b", "epoch-1", objects)
    pad = "p" * (1024 * 1024)
    for i in range(HISTORY_BYTES // len(pad) + 8):
        ref = ObjectRef("ServiceImport", "test", f"s{i}")
        objects[ref] = {"n": i, "pad": pad}
        feed.publish({ref: objects[ref]}, [], None)
    kept = sum(len(m) for _, m in feed.history)
    assert kept == feed.history_bytes <= HISTORY_BYTES
    assert feed.since("epoch-1", 1) is None  # fell out of the history: a snapshot
    assert len(feed.since("epoch-1", feed.version - 3)) == 3  # recent ones resume
    big = ObjectRef("ServiceImport", "test", "big")
    objects[big] = {"pad": pad * 40}  # larger than the whole bound: kept alone
    feed.publish({big: objects[big]}, [], None)
    assert [v for v, _ in feed.history] == [feed.version]
    assert feed.since("epoch-1", feed.version - 1) == [feed.history[0][1]]


def test_a_lagging_subscriber_is_marked_for_resync_not_grown() -> None:
    sub = Subscriber()
    for i in range(SUBSCRIBER_QUEUE + 5):
        sub.offer(b"%d\n" % i)
    assert sub.lagging and dropped_all(sub)


def dropped_all(sub: Subscriber) -> bool:
    """Its queue emptied but for the wake-up of its writer (b"")."""
    return sub.queue.qsize() == 1 and sub.queue.get_nowait() == b""


def test_a_subscriber_queue_is_bounded_in_bytes_too() -> None:
    sub = Subscriber(max_bytes=1000)
    sub.offer(b"x" * 5000)  # an empty queue takes one message, however large
    assert not sub.lagging and sub.queued_bytes == 5000
    sub.offer(b"y")
    assert sub.lagging and dropped_all(sub) and sub.queued_bytes == 0
    fresh = Subscriber(max_bytes=1000)
    for _ in range(3):
        fresh.offer(b"z" * 400)
    assert fresh.lagging and fresh.queued_bytes == 0


async def test_a_stream_cancelled_while_waiting_leaves_no_task_behind() -> None:
    """A stream handler cancelled (the server stopping) while it waits for the next
    message: its wait for that message is cancelled with it, not left pending."""
    hub = StreamHub(heartbeat_s=30)
    hub.attach("east", {})
    sub = Subscriber()
    pump = asyncio.create_task(hub._pump(None, hub.feeds["east"], sub))  # type: ignore[arg-type]

    def waiting_for_next() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "Subscriber.next"
                and not t.done()]

    await until(lambda: len(waiting_for_next()) == 1)  # nothing queued, no heartbeat due
    await cancel_and_wait([pump])
    await asyncio.sleep(0)
    assert waiting_for_next() == []


async def test_a_gateway_that_stops_reading_is_dropped_while_the_others_keep_up(
        tmp_path: Path) -> None:
    """One gateway reads the response head and then nothing (a stuck process; its socket
    buffer is small): once the kernel buffers are full, a write waits, and after the
    write timeout its connection is aborted and counted. Meanwhile another gateway gets
    every change, and what the controller holds for the stuck one stays bounded. Both
    limits are the controller's flags (the defaults, 30 s and 16 MiB, would not do it
    within the test's deadline)."""
    queue_bytes = 256 * 1024
    args = build_parser().parse_args([
        "controller", "--clusters-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"),
        "--serve", f"{SLOW_HOST}:0",
        "--stream-write-timeout", "0.5", "--stream-queue-bytes", str(queue_bytes)])
    app = DirectoryControllerApp(dataclasses.replace(config_from_args(args), heartbeat_s=0.2))
    hub, metrics = app.hub, app.metrics
    assert hub is not None
    objects: dict[ObjectRef, dict] = {
        ObjectRef("ServiceImport", "test", "web"): service_import("web")}
    hub.attach("east", objects)
    server = ControllerServer(None, hub, (SLOW_HOST, 0), metrics=metrics)
    await server.start()
    assert server.bound is not None
    loop = asyncio.get_running_loop()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    store = SnapshotStore("east")
    source, task = await start_source(f"http://{SLOW_HOST}:{server.bound[1]}", store)
    try:
        await loop.sock_connect(stuck, server.bound)
        await loop.sock_sendall(stuck, b"GET /v1/stream?cluster=east HTTP/1.1\r\n"
                                       b"Host: controller\r\n\r\n")
        async with asyncio.timeout(5):
            assert b" 200 " in await loop.sock_recv(stuck, 1024)
            await store.loaded.wait()
        feed = hub.feeds["east"]
        await until(lambda: len(feed.subscribers) == 2)
        pad = "p" * 64 * 1024
        published = 0
        async with asyncio.timeout(15):  # ~6 MB/s: the kernel buffers fill in about 1 s
            while len(feed.subscribers) == 2:
                name = f"s{published % 20}"
                ref = ObjectRef("ServiceImport", "test", name)
                objects[ref] = service_import(name, f"127.240.4.{published % 20 + 1}")
                objects[ref]["metadata"]["annotations"] = {"pad": pad}
                hub.publish("east", {ref: objects[ref]}, [], time.time())
                published += 1
                assert all(sub.queued_bytes <= queue_bytes + len(pad) + 1024
                           for sub in feed.subscribers)
                await asyncio.sleep(0.01)
        assert metrics.stream_dropped._value.get() == 1
        assert published > 20
        # The other gateway kept up: it has the last change.
        await until(lambda: source.version == feed.version, timeout=2)
        assert len(store.current.services) == 21
        # The stuck gateway's connection was aborted, not left open.
        async with asyncio.timeout(5):
            try:
                while await loop.sock_recv(stuck, 1 << 20):
                    pass
            except ConnectionResetError:
                pass
    finally:
        stuck.close()
        await cancel_and_wait([task])
        hub.close()
        await server.stop()


async def test_gateway_over_the_stream_serves_and_survives_the_stream_going_down(
    tmp_path: Path,
) -> None:
    backends = [await Backend("east-1", "127.49.1.1", free_port("127.49.1.1"), "east").start()]
    clusters, out, port = tmp_path / "c", tmp_path / "o", free_port(HOST)
    clusterset_with_backends(clusters, backends)
    ctl = Controller(clusters, out, port)
    await ctl.start()
    gateway = Gateway(gateway_config("consumer", f"controlplane:http://{HOST}:{port}",
                                     "127.49.9.1"))
    await gateway.start()
    source = gateway.sources[0]
    try:
        async with asyncio.timeout(5):
            await gateway.store.loaded.wait()
        ip = gateway.store.current.get("test", "web").ips[0]
        name = "web.test.svc.clusterset.local"
        assert await dns_a(gateway.config.dns.listen, name) == [ip]
        assert await ask(ip, 80) == "east-1"
        await ctl.stop()
        status = gateway.store.sources[source.name]
        await until(lambda: not status.connected)
        assert status.error
        # Still serving the last snapshot while the controller is away.
        assert await dns_a(gateway.config.dns.listen, name) == [ip]
        assert await ask(ip, 80) == "east-1"
        await ctl.start()  # a new epoch: the gateway resyncs
        await until(lambda: status.connected and source.resyncs == 2, timeout=10)
        assert gateway.store.current.get("test", "web").ips == (ip,)
    finally:
        await gateway.stop()
        await ctl.stop()
        for b in backends:
            await b.stop()


async def test_malformed_messages_are_rejected_not_crashing(tmp_path: Path) -> None:
    good = {"type": "snapshot", "epoch": "e1", "version": 1, "objects": [
        {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
         "metadata": {"name": "web", "namespace": "test"},
         "spec": {"type": "ClusterSetIP", "ips": ["127.240.9.9"],
                  "ports": [{"port": 80, "protocol": "TCP"}]}}]}
    bad_object = {"type": "snapshot", "epoch": "e2", "version": 1, "objects": [
        {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
         "metadata": {"name": "web", "namespace": "test"},
         "spec": {"type": "ClusterSetIP", "ips": ["not-an-ip"]}}]}
    replies = deque([
        json.dumps(good).encode() + b"\n{not json\n",
        json.dumps(bad_object).encode() + b"\n",
        json.dumps({"type": "delta", "epoch": "e1", "from": 7, "version": 8, "upsert": [],
                    "delete": []}).encode() + b"\n",
    ])
    seen_params: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen_params.append(dict(request.query))
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": "0.2"})
        await response.prepare(request)
        await response.write(replies.popleft() if replies else b"")
        await asyncio.sleep(0.05)
        return response

    runner, url = await serve_stream(handler, HOST)
    store = SnapshotStore("b")
    source, task = await start_source(url, store)
    try:
        await until(lambda: len(seen_params) >= 4)
        status = store.sources[source.name]
        assert not task.done()
        assert store.current.get("test", "web").ips == ("127.240.9.9",)  # the good one stays
        # After a malformed message the source asks for a full resync (no epoch).
        assert "epoch" not in seen_params[1] and "epoch" not in seen_params[2]
        assert status.error is not None
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()


async def test_a_controller_never_reached_is_logged_once_per_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    """A gateway started before its controller, or pointed at a peer that takes the
    connection and never answers: it said nothing in its log, however long it tried
    (its status error said `TimeoutError`). Now each distinct failure is logged once,
    naming the controller and what is served meanwhile."""
    caplog.set_level(logging.INFO, logger="mcsproxy.sources.controlplane")
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    port = free_port(HOST)
    server = await asyncio.start_server(silent, HOST, port)
    store = SnapshotStore("b")
    url = f"http://{HOST}:{port}"
    source, task = await start_source(url, store, headers_timeout_s=0.2)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "mcsproxy.sources.controlplane" and r.levelno >= logging.WARNING]

    try:
        await until(lambda: len(accepted) >= 4)  # three timed out: logged once
        status = store.sources[source.name]
        assert status.error == "TimeoutError: no answer from the controller within 0.2 s"
        assert warnings() == [f"controlplane stream {url} not connected ({status.error}): "
                              "no snapshot yet, not ready; retrying with backoff"]
        server.close()  # now nothing listens: refused, another failure, logged once more
        for writer in accepted:
            writer.close()
        await until(lambda: len(warnings()) == 2)
        assert "ClientConnectorError" in warnings()[1] and not store.loaded.is_set()
    finally:
        await cancel_and_wait([task])
        server.close()


async def test_a_standby_met_on_a_retry_keeps_the_version_for_the_leader() -> None:
    """Both controller replicas stand behind one Service; a standby answers the stream
    503. A retry that met it threw the epoch away (as after a bad message), so the next
    one, at the leader, got a full snapshot instead of the deltas it missed: measured,
    10 stream cuts cost 11 full snapshots and 10 error lines. The epoch is kept now."""
    snapshot = {"type": "snapshot", "epoch": "e1", "version": 4, "more": False,
                "objects": [service_import("web")]}
    seen_params: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen_params.append(dict(request.query))
        if len(seen_params) == 2:  # the standby, as ControllerServer answers
            response: web.StreamResponse = web.json_response(
                {"error": "this controller replica is not the leader"}, status=503)
            response.force_close()
            return response
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": "5"})
        await response.prepare(request)
        if len(seen_params) == 1:
            await response.write(json.dumps(snapshot).encode() + b"\n")
            return response  # the stream ends: the gateway reconnects
        await asyncio.sleep(30)  # the leader again: it has nothing to send yet
        return response

    runner, url = await serve_stream(handler, HOST)
    store = SnapshotStore("b")
    source, task = await start_source(url, store)
    try:
        await until(lambda: len(seen_params) >= 3)
        assert seen_params[2] == {"cluster": "b", "epoch": "e1", "version": "4"}
        assert "HTTP 503" in (store.sources[source.name].error or "")
        assert store.current.get("test", "web") is not None
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()


async def test_the_controller_raises_its_open_files_limit_for_the_streams(
        tmp_path: Path) -> None:
    """The stream takes one descriptor per gateway, up to 4096 connections; with the
    soft limit of 1024 that containerd 2, Docker 25 and systemd hand out, a controller
    took 1008 gateways and dropped the others without a log line. Like the gateway, it
    now raises the soft limit to the hard one at start."""
    write_member(tmp_path / "c", "a", ["127.0.1.1"])
    port = free_port(HOST)

    def low_soft_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 1024))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "controller", "--clusters-dir", str(tmp_path / "c"),
        "--output-dir", str(tmp_path / "o"), "--serve", f"{HOST}:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_soft_nofile)
    assert proc.stderr is not None
    log: list[bytes] = []
    streams: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(10):
            while not log or b"controller serving on" not in log[-1]:
                log.append(await proc.stderr.readline())
                assert log[-1], b"".join(log)
        for i in range(100):  # more gateways than the soft limit had descriptors
            reader, writer = await asyncio.open_connection(HOST, port)
            streams.append(writer)
            writer.write(b"GET /v1/stream?cluster=a HTTP/1.1\r\nHost: controller\r\n\r\n")
            async with asyncio.timeout(3):
                assert (await reader.readline()).startswith(b"HTTP/1.1 200 "), i
        assert b"open files limit 1024 (raised from 64)" in b"".join(log)
        # Still short of 4096 streams: beyond it they are refused unlogged, so it says so.
        assert (b"open files limit 1024 is below the 4160 the stream's 4096 connections "
                b"need: gateways beyond about 960 are refused") in b"".join(log)
    finally:
        for writer in streams:
            writer.close()
        proc.terminate()
        await proc.wait()


async def test_unknown_cluster_is_a_clear_error(tmp_path: Path) -> None:
    clusters, out, port = tmp_path / "c", tmp_path / "o", free_port(HOST)
    write_member(clusters, "a", ["127.0.1.1"])
    ctl = Controller(clusters, out, port)
    await ctl.start()
    store = SnapshotStore("nowhere")
    source, task = await start_source(f"http://{HOST}:{port}", store)
    try:
        status = store.register_source(source.name)
        await until(lambda: status.error is not None and "404" in status.error)
        assert "unknown cluster" in status.error
        assert not store.loaded.is_set()
    finally:
        await cancel_and_wait([task])
        await ctl.stop()


async def test_head_on_the_stream_subscribes_nothing_and_sends_no_body(tmp_path: Path) -> None:
    """It streamed the snapshot after the HEAD's head and counted a subscriber."""
    clusters, out, port = tmp_path / "c", tmp_path / "o", free_port(HOST)
    write_member(clusters, "a", ["127.0.1.1"])
    ctl = Controller(clusters, out, port)
    app = await ctl.start()
    try:
        head, after = await head_then_get(HOST, port, "/v1/stream?cluster=a")
        assert head.startswith(b"HTTP/1.1 200") and b"application/x-ndjson" in head
        assert after.startswith(b"HTTP/1.1 200 OK\r\n"), after[:80]
        assert app.hub is not None
        assert not app.hub.feeds["a"].subscribers
    finally:
        await ctl.stop()


def test_large_snapshots_come_in_parts_applied_at_once() -> None:
    objects = {}
    for i in range(2500):
        ref = ObjectRef("ServiceImport", "test", f"s{i}")
        objects[ref] = {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                        "metadata": {"name": f"s{i}", "namespace": "test"},
                        "spec": {"type": "Headless"}}
    feed = Feed("b", "e1", objects)
    lines = feed.snapshot().splitlines()
    assert [json.loads(line)["more"] for line in lines] == [True, True, False]
    store = SnapshotStore("b")
    source = ControlplaneSource("http://127.0.0.1:1", "b")
    status = store.register_source(source.name)
    for line in lines[:-1]:
        source._handle(line, store, status)
        assert not store.current.services  # nothing applied before the last part
    source._handle(lines[-1], store, status)
    assert len(store.current.services) == 2500 and source.version == 0


async def test_a_resync_encodes_its_parts_one_at_a_time_with_the_loop_between() -> None:
    """Every part of a snapshot was encoded in one block: 0.78 s at 10,000 services (59
    MB), the controller's loop held, once a version a cluster, as gateways resync."""
    objects = {ObjectRef("ServiceImport", "test", f"s{i}"): {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": f"s{i}", "namespace": "test"}, "spec": {"type": "Headless"}}
        for i in range(2500)}
    feed = Feed("b", "e1", objects)
    sent: list[bytes] = []

    class Gateway:  # takes every write at once, as a fast reader does
        async def write(self, data: bytes) -> None:
            sent.append(data)

    seen: list[int] = []  # parts sent, as the loop's other tasks see it

    async def tick() -> None:
        while True:
            seen.append(len(sent))
            await asyncio.sleep(0)

    ticker = spawn(tick(), name="ticker")
    try:
        await asyncio.sleep(0)
        await StreamHub()._resync(Gateway(), feed)  # type: ignore[arg-type]
    finally:
        await cancel_and_wait([ticker])
    assert b"".join(sent) == feed.snapshot() and len(sent) == 3
    assert {1, 2} <= set(seen)


def test_a_one_service_delta_rebuilds_only_that_service_downstream() -> None:
    def imported(i: int, ip: str) -> dict:
        return {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                "metadata": {"name": f"s{i}", "namespace": "test"},
                "spec": {"type": "ClusterSetIP", "ips": [ip],
                         "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}}

    objects = {ObjectRef("ServiceImport", "test", f"s{i}"): imported(i, f"127.240.{i // 250}."
                                                                     f"{i % 250 + 1}")
               for i in range(1500)}
    feed = Feed("b", "e1", objects)
    store = SnapshotStore("b")
    zone = ZoneIndex("clusterset.local", 5)
    rebuilt: list[int] = []
    store.subscribe(lambda snapshot: rebuilt.append(zone.apply(snapshot)))
    source = ControlplaneSource("http://127.0.0.1:1", "b")
    status = store.register_source(source.name)
    for line in feed.snapshot().splitlines():
        source._handle(line, store, status)
    assert rebuilt == [1500]
    before_services, before_entries = store.current.services, dict(zone.services)
    untouched = encode_name("s8.test.svc.clusterset.local").lower()
    packed = zone.names[untouched].rrsets()  # packed on a first query, then kept

    ref = ObjectRef("ServiceImport", "test", "s7")
    objects[ref] = imported(7, "127.240.9.9")
    feed.publish({ref: objects[ref]}, [], None)
    source._handle(feed.history[-1][1], store, status)

    seven = ServiceKey("test", "s7")
    assert source.version == 1 and store.current.changed == {seven} and rebuilt == [1500, 1]
    assert store.current.services[seven].ips == ("127.240.9.9",)
    assert before_services[seven].ips == ("127.240.0.8",)  # the old snapshot is unchanged
    assert isinstance(store.current.services, ServiceMap)
    # Every other service's ImportedService and DNS entry are the same objects as before.
    assert all(store.current.services[k] is before_services[k] for k in before_services
               if k != seven)
    assert all(zone.services[k] is e for k, e in before_entries.items() if k != seven)
    assert zone.services[seven] is not before_entries[seven]
    assert zone.names[untouched].rrsets() is packed


async def test_a_lagging_gateway_gets_the_members_again_after_its_resync() -> None:
    """A subscriber that falls behind has its queue dropped, members messages with it, and
    gets a snapshot instead: the snapshot carries objects only, so the gateway kept the
    members it had (a member gone stale was never said) until they changed again. And
    the resync waited for the next heartbeat (5 s by default), sending nothing meanwhile."""
    objects: dict[ObjectRef, dict] = {}
    hub = StreamHub(heartbeat_s=30)  # the resync may not wait for one (it did)
    hub.attach("b", objects)
    runner, url = await serve_stream(hub.handle, HOST)
    try:
        async with aiohttp.ClientSession() as http, \
                http.get(f"{url}/v1/stream?cluster=b") as resp:

            async def next_message() -> dict:
                """The next message other than a heartbeat."""
                async with asyncio.timeout(2):
                    while (message := json.loads(await resp.content.readline()))["type"] \
                            == "heartbeat":
                        pass
                    return message

            assert (await next_message())["type"] == "snapshot"
            assert (await next_message())["type"] == "members"
            stale = {"a": {"connected": False, "stale": True, "since": 1.0, "error": "x"}}
            hub.set_members(stale)  # queued, then dropped with the rest as it lags
            for i in range(SUBSCRIBER_QUEUE + 1):
                ref = ObjectRef("ServiceImport", "test", f"s{i}")
                objects[ref] = {"n": i}
                hub.publish("b", {ref: objects[ref]}, [], None)
            message = await next_message()
            while message["type"] == "snapshot" and message["more"]:
                message = await next_message()
            assert message["type"] == "snapshot" and len(message["objects"]) > 0
            message = await next_message()
            assert message == {"type": "members", "members": stale}, message
    finally:
        hub.close()
        await runner.cleanup()


async def test_many_gateways_connecting_log_a_line_a_second_not_one_each(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every gateway holds a stream: 1,500 gateways reconnecting after a network blip or a
    leader change made 1,500 INFO lines at once, and 1,500 more as they went. The first
    of a burst is logged, the rest counted into the next line (the subscriber gauge has
    the number at any time); each one is still there at DEBUG."""
    hub = StreamHub(heartbeat_s=0.1)  # a gone gateway is noticed at the next write
    hub.attach("east", {})
    server = ControllerServer(None, hub, ("127.73.0.1", 0), metrics=ControllerMetrics())
    await server.start()
    assert server.bound is not None
    url = f"http://127.73.0.1:{server.bound[1]}/v1/stream?cluster=east"
    gateways = 200
    caplog.set_level(logging.DEBUG, logger="controlplane.stream")
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=10)) as http:
            streams = [await http.get(url) for _ in range(gateways)]
            await until(lambda: len(hub.feeds["east"].subscribers) == gateways)
            for stream in streams:
                stream.close()
            await until(lambda: not hub.feeds["east"].subscribers)
        seconds = time.monotonic() - started
        records = [r for r in caplog.records if r.name == "controlplane.stream"]
        assert len(records) == 2 * gateways  # each connect and each leave, DEBUG included
        lines = [r.getMessage() for r in records if r.levelno >= logging.INFO]
        # one line a second of each kind, the first of each burst at once
        assert 2 <= len(lines) <= 2 * (seconds + 1), lines
        assert lines[0].startswith("gateway of cluster east connected from ")
        assert any("went away" in line for line in lines)
    finally:
        hub.close()
        await server.stop()


def test_a_negative_version_is_refused_not_given_deltas_without_their_base() -> None:
    """version=-1 with the right epoch got every delta in the history and no snapshot:
    the objects the deltas were made on were missing."""
    hub = StreamHub(heartbeat_s=30)
    ref = ObjectRef("ServiceImport", "test", "web")
    hub.attach("east", {ref: service_import("web")})
    other = ObjectRef("ServiceImport", "test", "api")
    hub.publish("east", {other: service_import("api", "127.240.4.2")}, [], time.time())

    async def ask(query: str) -> tuple[int, bytes]:
        app = web.Application()
        app.router.add_get("/v1/stream", hub.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.73.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                    http.get(f"http://127.73.0.1:{port}/v1/stream?{query}") as resp:
                return resp.status, await resp.content.readline()
        finally:
            hub.close()
            await runner.cleanup()

    epoch = hub.epoch
    status, body = asyncio.run(ask(f"cluster=east&epoch={epoch}&version=-1"))
    assert status == 400 and b"version must be an integer >= 0" in body
async def test_with_a_token_file_the_stream_and_status_need_the_bearer_token(
        tmp_path: Path) -> None:
    """--serve-token-file: without the token (or with a stale one after rotation) the
    stream and /status answer 401 and a gateway gets nothing; /healthz and /metrics stay
    open for the probes and Prometheus. A gateway with --controlplane-token-file syncs,
    and follows a rotated token on its next connect."""
    host = "127.76.2.1"
    clusters, out, port = tmp_path / "c", tmp_path / "o", free_port(host)
    write_member(clusters, "east", ["10.1.0.1"])
    served, sent = tmp_path / "serve-token", tmp_path / "gateway-token"
    served.write_text("first-token\n")
    sent.write_text("first-token\n")
    ctl = Controller(clusters, out, port, host, serve_token_file=served)
    await ctl.start()
    url = f"http://{host}:{port}"
    store = SnapshotStore("east")
    source, task = await start_source(url, store, token=TokenFile(sent))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for path in ("/v1/stream?cluster=east", "/status"):
                for headers in ({}, {"Authorization": "Bearer wrong-token"},
                                {"Authorization": "Basic Zmlyc3QtdG9rZW4="}):
                    async with http.get(url + path, headers=headers) as resp:
                        assert resp.status == 401, (path, headers)
            for path in ("/healthz", "/metrics"):
                async with http.get(url + path) as resp:
                    assert resp.status == 200, path
            async with http.get(url + "/status",
                                headers={"Authorization": "Bearer first-token"}) as resp:
                assert resp.status == 200
            async with asyncio.timeout(5):
                await store.loaded.wait()
            assert addresses(store) == ["10.1.0.1"]

            served.write_text("second-token\n")  # rotated on the controller first
            async with http.get(url + "/status",
                                headers={"Authorization": "Bearer first-token"}) as resp:
                assert resp.status == 401
        await ctl.stop()  # the gateway reconnects: refused until it has the new token too
        await ctl.start()
        status = store.sources[source.name]
        await until(lambda: "HTTP 401" in (status.error or ""))
        sent.write_text("second-token\n")
        await until(lambda: status.connected, timeout=5)
    finally:
        await cancel_and_wait([task])
        await ctl.stop()


def test_an_unreadable_token_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (tmp_path / "missing", empty):
        with pytest.raises(ValueError, match="--serve-token-file"):
            ControllerConfig(tmp_path / "c", tmp_path / "o", serve=(HOST, 1),
                             serve_token_file=path)
        with pytest.raises(SourceSpecError, match="--controlplane-token-file"):
            make_source("controlplane:http://127.76.2.1:1", "east",
                        controlplane_token_file=str(path))
