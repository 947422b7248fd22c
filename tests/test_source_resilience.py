"""The gateway's sources under partial failure, through real sockets and real clients: a
watch started late or failing, an API server answering 404 for a while or not answering,
a controller stream that hangs or keeps getting cut. The last good view keeps serving,
errors are reported, and what still works keeps being published."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.metrics import ControllerMetrics
from controlplane.resources import ObjectRef
from controlplane.server import ControllerServer
from controlplane.stream import SNAPSHOT_CHUNK, StreamHub
from mcsproxy.model import ServiceKey, Snapshot
from mcsproxy.sources.controlplane import ControlplaneSource
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.kube_emulator import KubeEmulator
from tests.test_kube_source import (
    FAST,
    WEB,
    imported_slice,
    karmada_slice,
    local_service,
    multicluster_service,
    running,
    service_import,
)

KWEB = ServiceKey("test", "kweb")
HTTP80 = [{"name": "http", "protocol": "TCP", "port": 80}]
CONTROLLER_HOST, RELAY_HOST = "127.86.0.1", "127.86.0.2"


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        yield emu


# -- kube source: Karmada's lazily started Services watch -------------------------------
async def test_first_multicluster_service_after_sync_is_published(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """The first MultiClusterService starts the Services watch; once it has listed, the
    service is published with the local Service's ports, without waiting for another
    change to flush it."""
    async with running(emu, tmp_path) as run:
        emu.put_object(local_service("kweb", HTTP80))
        emu.put_object(karmada_slice("west", "kweb-abc", "kweb", ["10.11.0.1"]))
        emu.put_object(multicluster_service("kweb"))
        await run.until(lambda: KWEB in run.store.current.services)
        assert [p.port for p in run.store.current.services[KWEB].ports] == [80]


async def test_services_watch_failing_does_not_freeze_the_source(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """While the Services list keeps failing (no RBAC), ServiceImports and their slices
    keep being published; the Karmada service waits for its ports and the error is in
    the status. Once the list works, the Karmada service follows."""
    emu.fail_next(None, 403, method="GET", path="/api/v1/services")
    async with running(emu, tmp_path) as run:
        emu.put_object(karmada_slice("west", "kweb-abc", "kweb", ["10.11.0.1"]))
        emu.put_object(multicluster_service("kweb"))
        await run.until(lambda: "services" in (run.status.error or ""))
        emu.put_object(service_import("web"))
        emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1"]))
        await run.until(lambda: run.endpoints() == [("west", "10.1.0.1")])
        assert KWEB not in run.store.current.services
        assert not run.status.connected and "403" in (run.status.error or "")
        emu.clear_faults()
        await run.until(lambda: KWEB in run.store.current.services)
        await run.until(lambda: run.status.connected and run.status.error is None)


# -- kube source: the API server misbehaving ---------------------------------------------
async def test_404_on_a_served_resource_keeps_the_last_imports(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """ServiceImports answering 404 on every version after they were listed (an API server
    whose CRD handlers are not ready yet): the imports keep serving, the error is reported
    and the resource is asked again with backoff, not after not_served_retry_s."""
    emu.put_object(service_import("web"))
    emu.put_object(imported_slice("web-west", "web", "west", ["10.1.0.1"]))
    async with running(emu, tmp_path) as run:
        missing: list[int] = []

        def check(snapshot: Snapshot) -> None:
            if WEB not in snapshot.services:
                missing.append(snapshot.version)

        run.store.subscribe(check)
        asked = sum(1 for r in emu.requests if r.path.endswith("/serviceimports"))
        emu.fail_next(None, 404, method="GET", path="/serviceimports")
        emu.drop_watches()
        # The watch, then both versions' lists answered 404, then asked again.
        await run.until(lambda: sum(1 for r in emu.requests
                                    if r.path.endswith("/serviceimports")) >= asked + 4)
        assert missing == []
        assert "404" in (run.status.error or "") and not run.status.connected
        emu.clear_faults()
        await run.until(lambda: run.status.connected and run.status.error is None)
        assert missing == [] and run.endpoints() == [("west", "10.1.0.1")]


async def test_a_watch_without_response_headers_is_given_up_within_request_timeout(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """The watches end and the API server takes the new ones but never answers: noticed
    within request_timeout_s, not after timeoutSeconds + idle_margin_s (20 s here)."""
    emu.put_object(service_import("web"))
    timings = dataclasses.replace(FAST, request_timeout_s=0.5, watch_timeout_s=20.0,
                                  idle_margin_s=2.0)
    async with running(emu, tmp_path, timings=timings) as run:
        emu.hang()
        emu.drop_watches()
        try:
            await run.until(lambda: not run.status.connected, timeout=3.0)
            assert "TimeoutError" in (run.status.error or "")
            assert WEB in run.store.current.services
        finally:
            emu.hang(False)
        await run.until(lambda: run.status.connected and run.status.error is None)


# -- controlplane source: the stream's connection misbehaving ---------------------------
class Relay:
    """A TCP relay in front of the controller; `mode(n)` decides connection n's fate:
    "hang" (taken, never answered), "pass", ("cut", seconds) then a reset, or ("mute",
    seconds) then nothing gets through any more while both connections stay up."""

    def __init__(self, target: tuple[str, int],
                 mode: Callable[[int], str | tuple[str, float]]) -> None:
        self.target, self.mode = target, mode
        self.accepted: list[float] = []  # loop time of each connection
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str) -> str:
        self._server = await asyncio.start_server(self._connection, host, 0)
        return f"http://{host}:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await cancel_and_wait(list(self._tasks))

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted.append(asyncio.get_running_loop().time())
        mode = self.mode(len(self.accepted))
        upstream: asyncio.StreamWriter | None = None
        try:
            if mode == "hang":
                while await reader.read(65536):
                    pass
                return
            up_reader, upstream = await asyncio.open_connection(*self.target)
            pipes = [spawn(_pipe(reader, upstream), name="relay up"),
                     spawn(_pipe(up_reader, writer), name="relay down")]
            try:
                if isinstance(mode, tuple):
                    await asyncio.sleep(mode[1])
                else:
                    await asyncio.gather(*pipes)
            finally:
                await cancel_and_wait(pipes)
            if isinstance(mode, tuple) and mode[0] == "mute":
                with contextlib.suppress(OSError):
                    while await reader.read(65536):
                        pass
        finally:
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def stream_server(objects: dict[ObjectRef, dict[str, Any]]
                        ) -> AsyncIterator[tuple[StreamHub, tuple[str, int]]]:
    """A controller's stream server holding `objects` for cluster east; yields its hub
    (to publish more) and the address it is bound to."""
    hub = StreamHub(heartbeat_s=0.2)
    hub.attach("east", objects)
    server = ControllerServer(None, hub, (CONTROLLER_HOST, 0), metrics=ControllerMetrics())
    await server.start()
    assert server.bound is not None
    try:
        yield hub, server.bound
    finally:
        hub.close()
        await server.stop()


@contextlib.asynccontextmanager
async def controller_behind(
        mode: Callable[[int], str | tuple[str, float]]) -> AsyncIterator[tuple[Relay, str]]:
    """A controller's stream server with one ServiceImport for cluster east, and a relay
    in front of it; yields the relay and its URL."""
    web = {ObjectRef("ServiceImport", "test", "web"): service_import("web")}
    async with stream_server(web) as (_hub, bound):
        relay = Relay(bound, mode)
        try:
            yield relay, await relay.start(RELAY_HOST)
        finally:
            await relay.stop()


@contextlib.asynccontextmanager
async def synced_source() -> AsyncIterator[
        tuple[StreamHub, ControlplaneSource, SnapshotStore, asyncio.Task[None]]]:
    """A controller's stream server with one ServiceImport for cluster east and a source
    connected to it directly, synced; yields the hub, the source, its store and its task
    (cancelled at the end)."""
    web = {ObjectRef("ServiceImport", "test", "web"): service_import("web")}
    async with stream_server(web) as (hub, bound):
        store = SnapshotStore("east")
        source = ControlplaneSource(f"http://{CONTROLLER_HOST}:{bound[1]}", "east")
        task = spawn(source.run(store), name="test source")
        try:
            async with asyncio.timeout(5):
                await store.loaded.wait()
            yield hub, source, store, task
        finally:
            await cancel_and_wait([task])


async def test_controlplane_stream_without_response_headers_reconnects() -> None:
    """The first connection is taken and never answered: given up after the headers
    timeout, the next one syncs."""
    async with controller_behind(lambda n: "hang" if n == 1 else "pass") as (relay, url):
        store = SnapshotStore("east")
        source = ControlplaneSource(url, "east", headers_timeout_s=0.3,
                                    backoff_initial_s=0.05, backoff_max_s=0.2)
        task = spawn(source.run(store), name="test source")
        try:
            async with asyncio.timeout(3):
                await store.loaded.wait()
            assert WEB in store.current.services and len(relay.accepted) >= 2
        finally:
            await cancel_and_wait([task])


async def test_controlplane_backoff_starts_over_after_a_resumed_session_worked() -> None:
    """Every session works for a while and is then cut. Only the first gets a snapshot;
    the others resume (members, heartbeats). Each worked, so each reconnect waits the
    initial backoff, not a delay doubling towards backoff_max_s."""
    session_s = 0.3
    async with controller_behind(lambda n: ("cut", session_s)) as (relay, url):
        store = SnapshotStore("east")
        source = ControlplaneSource(url, "east", backoff_initial_s=0.05, backoff_max_s=5.0)
        task = spawn(source.run(store), name="test source")
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(6):
                    while len(relay.accepted) < 8:
                        await asyncio.sleep(0.05)
        finally:
            await cancel_and_wait([task])
        assert source.resyncs == 1  # the later sessions resumed
        gaps = [round(b - a - session_s, 2) for a, b in pairwise(relay.accepted)]
        assert len(gaps) >= 7 and max(gaps) < 0.25, gaps


async def test_controlplane_snapshot_rejected_in_a_later_part_backs_off() -> None:
    """A snapshot in parts whose last part holds an object that does not validate: the
    parts before it apply nothing, so the session did not work and the reconnects (each
    fetching the whole snapshot again) back off instead of repeating at the initial delay.
    Nothing of the rejected snapshot is served."""
    objects = {ObjectRef("ServiceImport", "test", f"s{i:04}"):
               service_import(f"s{i:04}", f"127.240.{i // 250}.{i % 250 + 1}")
               for i in range(SNAPSHOT_CHUNK)}
    objects[ObjectRef("ServiceImport", "test", "zbad")] = service_import(
        "zbad", ports=[{"name": "x", "protocol": "TCP", "port": 70000}])
    async with stream_server(objects) as (_hub, bound):
        relay = Relay(bound, lambda n: "pass")
        url = await relay.start(RELAY_HOST)
        store = SnapshotStore("east")
        source = ControlplaneSource(url, "east", backoff_initial_s=0.05, backoff_max_s=5.0)
        task = spawn(source.run(store), name="test source")
        try:
            await asyncio.sleep(1.5)  # 0.05 doubling: at most 6 tries; at 0.05 each: ~30
        finally:
            await cancel_and_wait([task])
            await relay.stop()
    assert 2 <= len(relay.accepted) <= 7, relay.accepted
    assert "zbad" in (store.sources[source.name].error or "")
    assert len(store.current.services) == 0 and not store.loaded.is_set()


async def test_controlplane_object_count_follows_the_deltas() -> None:
    """The source's object count (admin /readyz detail, the objects metric) follows what
    deltas add and remove, not only what the last full snapshot held."""
    web = ObjectRef("ServiceImport", "test", "web")
    async with synced_source() as (hub, source, store, _task):
        status = store.sources[source.name]
        assert status.objects == 1
        api = ObjectRef("ServiceImport", "test", "api")
        west = ObjectRef("EndpointSlice", "test", "web-west")
        hub.publish("east", {api: service_import("api", "127.240.3.2"),
                             west: imported_slice("web-west", "web", "west", ["10.1.0.1"])},
                    [], None)
        async with asyncio.timeout(5):
            while status.objects != 3:
                await asyncio.sleep(0.01)
        hub.publish("east", {west: imported_slice("web-west", "web", "west", ["10.1.0.2"])},
                    [web, ObjectRef("ServiceImport", "test", "never-sent")], None)
        async with asyncio.timeout(5):
            while len(store.current.services) != 1:
                await asyncio.sleep(0.01)
        assert status.objects == 2


async def test_controlplane_stream_gone_silent_is_given_up_and_resumed() -> None:
    """The connection stays up but nothing comes through any more (a black-holed path, a
    stuck controller): after three missed heartbeats the source gives up on it, serves
    what it has meanwhile, reconnects and resumes from its version, no snapshot."""
    web = ObjectRef("ServiceImport", "test", "web")
    async with stream_server({web: service_import("web")}) as (hub, bound):
        relay = Relay(bound, lambda n: ("mute", 0.3) if n == 1 else "pass")
        url = await relay.start(RELAY_HOST)
        store = SnapshotStore("east")
        source = ControlplaneSource(url, "east", backoff_initial_s=0.05, backoff_max_s=0.2)
        task = spawn(source.run(store), name="test source")
        try:
            async with asyncio.timeout(5):
                await store.loaded.wait()
            status = store.sources[source.name]
            async with asyncio.timeout(5):
                while relay.accepted[-1] + 0.35 > asyncio.get_running_loop().time():
                    await asyncio.sleep(0.02)  # muted now
            api = ObjectRef("ServiceImport", "test", "api")
            hub.publish("east", {api: service_import("api", "127.240.3.2")}, [], None)
            async with asyncio.timeout(3):
                while status.connected:
                    await asyncio.sleep(0.01)
            assert "Timeout" in (status.error or "")
            assert WEB in store.current.services  # the last good state keeps serving
            async with asyncio.timeout(5):
                while not (status.connected and ServiceKey("test", "api") in
                           store.current.services):
                    await asyncio.sleep(0.01)
            assert len(relay.accepted) == 2 and source.resyncs == 1
        finally:
            await cancel_and_wait([task])
            await relay.stop()


async def test_controlplane_source_cancelled_as_a_message_arrives_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel (the gateway shutting down) landing in the loop turn in which a message
    arrives ends the source. asyncio.wait_for, on Python 3.11, returned the message and
    dropped the cancel: the source kept following the stream and whoever waited for it to
    end waited for ever (a hang of the backoff test above under load; with heartbeats every
    millisecond, 21 of 300 cancels at a random moment were lost)."""
    async with synced_source() as (_hub, _source, _store, task):
        try:
            loop = asyncio.get_running_loop()
            feed_data = aiohttp.StreamReader.feed_data

            def feed_and_cancel(reader: aiohttp.StreamReader, data: bytes,
                                size: int = 0) -> bool:
                more = feed_data(reader, data, size)
                # After the reader's wakeup, before the source's: the race, every time.
                loop.call_soon(task.cancel)
                return more

            # The next heartbeat (every 0.2 s) arrives with a cancel.
            monkeypatch.setattr(aiohttp.StreamReader, "feed_data", feed_and_cancel)
            await asyncio.wait([task], timeout=2)
            assert task.cancelled()
        finally:
            monkeypatch.undo()  # or the cancel ending the test would be lost too
