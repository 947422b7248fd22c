"""`--source controlplane:` meeting what its code does not expect: the stream must not
end for good while the source still reports connected."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web

from mcsproxy.model import ServiceKey
from mcsproxy.sources import controlplane
from mcsproxy.sources.controlplane import ControlplaneSource
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.test_kube_source import WEB, service_import

DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError, not ValueError
LATER = ServiceKey("test", "later")


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


async def serve_stream(stream: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       host: str = "127.0.0.1") -> tuple[web.AppRunner, str]:
    """A fake controller (or a real hub's handler) answering the stream path with
    `stream`: its runner (for the caller to clean up) and URL."""
    app = web.Application()
    app.router.add_get(controlplane.STREAM_PATH, stream)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"


async def test_an_unforeseen_failure_reconnects_and_reports_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sessions: list[int] = []
    second = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        sessions.append(len(sessions))
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": "5"})
        await response.prepare(request)
        if len(sessions) == 1:
            await response.write(_line({"type": "snapshot", "epoch": "e", "version": 1,
                                        "objects": [service_import("web")]}))
            await response.write(DEEP + b"\n")  # the decoder fails
        elif len(sessions) == 2:
            await response.write(_line({"type": "members", "members": {}}))
        else:
            await second.wait()
            await response.write(_line({"type": "snapshot", "epoch": "e", "version": 2,
                                        "objects": [service_import("web"),
                                                    service_import("later", "127.240.3.2")]}))
        await asyncio.sleep(30)
        return response

    runner, url = await serve_stream(stream)
    store = SnapshotStore("east")
    source = ControlplaneSource(url, "east",
                                backoff_initial_s=0.02, backoff_max_s=0.1)

    def defect(members: dict[str, Any]) -> None:
        raise KeyError("a defect")  # what no except clause of the loop foresaw

    monkeypatch.setattr(source, "_set_members", defect)
    task = spawn(source.run(store), name="test source")
    try:
        async with asyncio.timeout(5):
            while len(sessions) < 3 or store.sources[source.name].connected:
                await asyncio.sleep(0.01)
        status = store.sources[source.name]
        assert "KeyError" in (status.error or "")
        assert WEB in store.current.services  # the last snapshot keeps serving
        second.set()
        async with asyncio.timeout(5):
            while LATER not in store.current.services:
                await asyncio.sleep(0.01)
        assert status.connected and status.error is None
        assert not task.done()
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()


async def test_a_snapshot_that_never_ends_is_bounded_and_the_last_one_kept() -> None:
    """A controller that sends snapshot parts, "more": true, for ever: the parts are
    held until the last, and grew a gateway by 1 GB in 20 s. Past the bound the stream
    is given up (the parts dropped, the error said) and the last snapshot keeps serving."""
    sessions: list[int] = []
    part = {"type": "snapshot", "epoch": "e2", "version": 5, "more": True}

    async def stream(request: web.Request) -> web.StreamResponse:
        sessions.append(len(sessions))
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": "5"})
        await response.prepare(request)
        if len(sessions) == 1:
            await response.write(_line({"type": "snapshot", "epoch": "e", "version": 1,
                                        "objects": [service_import("web")]}))
            return response  # the stream ends: the source comes back for more
        for i in range(1000):  # ~10 KB a part, ~10 MB in all: far past the test's bound
            objects = [service_import(f"s{i}-{j}", f"127.240.{i % 250}.{j + 1}")
                       for j in range(40)]
            await response.write(_line({**part, "objects": objects}))
        await asyncio.sleep(30)
        return response

    runner, url = await serve_stream(stream)
    store = SnapshotStore("east")
    source = ControlplaneSource(url, "east", backoff_initial_s=0.02,
                                backoff_max_s=0.1, max_snapshot_bytes=100_000)
    task = spawn(source.run(store), name="test source")
    try:
        async with asyncio.timeout(5):
            while len(sessions) < 3:
                await asyncio.sleep(0.01)
        status = store.sources[source.name]
        assert "snapshot 5 is over 100000 bytes" in (status.error or "")
        assert not status.connected
        assert list(store.current.services) == [WEB]  # the last good snapshot
        assert source.epoch is None  # the next session asks for a full snapshot
        assert not task.done()
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()


@pytest.mark.parametrize("heartbeat", ["nan", "inf", "soon"])
@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_a_heartbeat_header_that_is_no_interval_falls_back_to_the_default(
        run: Callable[[Coroutine[Any, Any, None]], None], heartbeat: str) -> None:
    """X-Mcsproxy-Heartbeat: nan made every read on uvloop (the gateway's loop) fail
    (`cannot convert float NaN to integer`, logged as a defect): the stream was never
    applied; on asyncio's loop it made a read timeout that never fires."""
    run(_serve_one_snapshot_with(heartbeat))


async def _serve_one_snapshot_with(heartbeat: str) -> None:

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": heartbeat})
        await response.prepare(request)
        await response.write(_line({"type": "snapshot", "epoch": "e", "version": 1,
                                    "objects": [service_import("web")]}))
        await asyncio.sleep(30)
        return response

    runner, url = await serve_stream(stream)
    store = SnapshotStore("east")
    source = ControlplaneSource(url, "east",
                                backoff_initial_s=0.02, backoff_max_s=0.1)
    task = spawn(source.run(store), name="test source")
    try:
        async with asyncio.timeout(5):
            await store.loaded.wait()
        assert WEB in store.current.services and store.sources[source.name].connected
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()


async def test_an_unknown_message_type_is_logged_once_not_per_message(
        caplog: pytest.LogCaptureFixture) -> None:
    """A newer controller's message type the gateway does not know is skipped (forward
    compatible); it was also a warning for every such message, every 5 s on every
    gateway when sent with each heartbeat."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": "5"})
        await response.prepare(request)
        await response.write(_line({"type": "snapshot", "epoch": "e", "version": 1,
                                    "objects": [service_import("web")]}))
        for i in range(20):
            await response.write(_line({"type": "stats", "n": i}))
        await response.write(_line({"type": "members", "members": {"west": {}}}))
        await asyncio.sleep(30)
        return response

    runner, url = await serve_stream(stream)
    store = SnapshotStore("east")
    source = ControlplaneSource(url, "east")
    task = spawn(source.run(store), name="test source")
    try:
        async with asyncio.timeout(5):
            while "west" not in source.members:  # after every "stats" message
                await asyncio.sleep(0.01)
        ignored = [r for r in caplog.records
                   if "unknown" in r.getMessage() and "'stats'" in r.getMessage()]
        assert len(ignored) == 1
        assert store.sources[source.name].connected
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()


async def test_a_message_trickled_without_end_is_given_up() -> None:
    """A peer that sends a byte every 0.1 s and never a newline passed every read
    timeout: the source said connected, with nothing applied, for as long as it went
    on (20 s measured, heartbeat 0.5 s). A message begun must now end in time."""
    errors: list[str | None] = []  # the source's error as each session begins
    store = SnapshotStore("east")

    async def stream(request: web.Request) -> web.StreamResponse:
        errors.append(store.sources["controlplane:" + url].error)
        response = web.StreamResponse(headers={"X-Mcsproxy-Heartbeat": "0.2"})
        await response.prepare(request)
        await response.write(_line({"type": "snapshot", "epoch": "e", "version": 1,
                                    "objects": [service_import("web")]}))
        await response.write(b'{"type": "delta"')
        with contextlib.suppress(ConnectionError):  # the source gave up
            for _ in range(300):
                await asyncio.sleep(0.1)  # well within the read timeout (0.6 s)
                await response.write(b" ")
        return response

    runner, url = await serve_stream(stream)
    url = url
    source = ControlplaneSource(url, "east", message_timeout_s=0.8, backoff_initial_s=0.02,
                                backoff_max_s=0.1)
    task = spawn(source.run(store), name="test source")
    try:
        async with asyncio.timeout(5):
            while len(errors) < 2:
                await asyncio.sleep(0.01)
        assert errors[1] == "LineTooSlow: a message begun was not completed in 0.8 s"
        assert WEB in store.current.services  # the last snapshot keeps serving
    finally:
        await cancel_and_wait([task])
        await runner.cleanup()
