"""`--source kube` meeting what its code does not expect, against the API emulator.

An object of an odd shape, a watch line nested too deep to decode, a list the source
cannot take apart: none of them may stop the source from following later changes, and
none may leave it reporting healthy while it does not. A bad object is skipped (logged
and counted, its last good version kept), everything else keeps flowing; a failure of a
watch loop itself restarts it with a relist, `connected: false` with the error meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mcsproxy.model import ServiceKey
from mcsproxy.sources.kube import KubeSource
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.kube_emulator import KubeEmulator
from tests.kube_emulator import server as emulator_server
from tests.test_kube_source import (
    FAST,
    WEB,
    karmada_slice,
    local_service,
    running,
    service_import,
)

DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError, not ValueError
KARMADA_LABELS = {"kubernetes.io/service-name": "web",
                  "endpointslice.kubernetes.io/managed-by":
                      "endpointslice-dispatch-controller.karmada.io"}


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        yield emu


async def push_to_watch(emu: KubeEmulator, plural: str, kind: str, obj: dict[str, Any],
                        probe: dict[str, Any] | None = None) -> None:
    """Serve one event on the open watch of `plural` (the one selecting `probe`), past
    the emulator's store: an object no API server validation would have let through."""
    def watchers() -> list[Any]:
        return [w for w in emu.store.watchers if w.rtype.plural == plural
                and (probe is None or w.matches(probe))]
    await emu.wait_for(lambda: bool(watchers()))
    for watcher in watchers():
        watcher.push(kind, obj)


async def test_an_odd_object_in_a_watch_is_skipped_and_the_watch_goes_on(
        emu: KubeEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"]))
    caplog.set_level(logging.ERROR, "mcsproxy.sources.kube")
    async with running(emu, tmp_path, cluster_id="member3") as run:
        await run.until(lambda: run.endpoints() == [("member1", "10.11.0.1")])
        probe = karmada_slice("member1", "web-abc", "web", [])
        # metadata of the wrong JSON type, and annotations of the wrong JSON type deeper in
        # an object the Karmada handler indexes.
        await push_to_watch(emu, "endpointslices", "MODIFIED",
                            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                             "metadata": ["odd"]}, probe)
        await push_to_watch(emu, "endpointslices", "MODIFIED", {
            **karmada_slice("member2", "web-odd", "web", ["10.12.0.9"]),
            "metadata": {"name": "member2-web-odd", "namespace": "test",
                         "labels": KARMADA_LABELS, "annotations": "odd",
                         "resourceVersion": "1"}}, probe)
        # Later changes of the same resource are still followed.
        emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1"]))
        await run.until(lambda: ("member2", "10.12.0.1") in run.endpoints())
        assert ("member2", "10.12.0.9") not in run.endpoints()
        assert run.status.connected and run.status.error is None
        assert sum(r.failed_objects for r in run.source.reflectors) == 2
        assert run.source.m_failed._value.get() == 2
        assert "test/member2-web-odd" in caplog.text
        assert "EndpointSlice" in caplog.text


async def test_an_odd_object_in_a_list_is_skipped_and_the_rest_served(
        emu: KubeEmulator, tmp_path: Path) -> None:
    emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"]))
    emu.put_object({**karmada_slice("member2", "web-odd", "web", ["10.12.0.9"]),
                    "metadata": {"name": "member2-web-odd", "namespace": "test",
                                 "labels": KARMADA_LABELS, "annotations": "odd"}})
    async with running(emu, tmp_path, cluster_id="member3") as run:
        await run.until(lambda: run.endpoints() == [("member1", "10.11.0.1")])
        assert run.status.synced and run.status.connected and run.status.error is None
        emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1"]))
        await run.until(lambda: ("member2", "10.12.0.1") in run.endpoints())
        assert run.source.m_failed._value.get() >= 1


async def test_an_undecodable_watch_line_relists(
        emu: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = emulator_server._line
    monkeypatch.setattr(emulator_server, "_line", lambda kind, obj: (
        obj["raw"] if "raw" in obj else line(kind, obj)))
    emu.put_object(service_import("web"))
    async with running(emu, tmp_path) as run:
        lists = sum(r.lists for r in run.source.reflectors)
        await push_to_watch(emu, "serviceimports", "MODIFIED", {"raw": DEEP + b"\n"})
        emu.put_object(service_import("later", "127.240.3.2"))
        await run.until(lambda: run.store.current.get("test", "later") is not None)
        assert sum(r.lists for r in run.source.reflectors) > lists  # what it missed: relisted
        await run.until(lambda: run.status.connected)
        assert run.status.error is None


async def test_a_failing_loop_reports_disconnected_until_it_recovers(
        emu: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list that cannot be taken apart: the watch loop backs off and relists, the status
    says so, the last good state keeps serving; once lists work again, so does the rest."""
    line = emulator_server._line
    monkeypatch.setattr(emulator_server, "_line", lambda kind, obj: (
        obj["raw"] if "raw" in obj else line(kind, obj)))
    broken = {"on": False}
    list_response = emu._list_response

    def maybe_broken(rtype: Any, *args: Any) -> web.Response:
        if broken["on"] and rtype.plural == "serviceimports":
            return web.Response(body=b'{"items": ' + DEEP + b"}",
                                content_type="application/json")
        return list_response(rtype, *args)

    monkeypatch.setattr(emu, "_list_response", maybe_broken)
    emu.put_object(service_import("web"))
    async with running(emu, tmp_path) as run:
        broken["on"] = True
        await push_to_watch(emu, "serviceimports", "MODIFIED", {"raw": DEEP + b"\n"})
        await run.until(lambda: not run.status.connected)
        assert "RecursionError" in (run.status.error or "")
        assert run.source.m_connected._value.get() == 0
        assert WEB in run.store.current.services  # the last good state serves
        failed_lists = sum(r.lists for r in run.source.reflectors)
        broken["on"] = False
        emu.put_object(service_import("later", "127.240.3.2"))
        await run.until(lambda: run.store.current.get("test", "later") is not None)
        await run.until(lambda: run.status.connected and run.status.error is None)
        assert run.source.m_connected._value.get() == 1
        assert sum(r.lists for r in run.source.reflectors) > failed_lists
        assert run.store.current.get("test", "web") is not None
        assert ServiceKey("test", "later") in run.store.current.services


async def test_a_service_with_odd_ports_is_rejected_not_blamed_on_later_slices(
        emu: KubeEmulator, tmp_path: Path) -> None:
    """A Service's ports are indexed only when its import is made, by whichever change
    comes next: refused with the Service, they no longer fail every later slice."""
    emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
    emu.put_object(karmada_slice("member1", "web-abc", "web", ["10.11.0.1"]))
    async with running(emu, tmp_path, cluster_id="member3") as run:
        await run.until(lambda: run.endpoints() == [("member1", "10.11.0.1")])
        emu.put_object({**local_service("web", []), "spec": {"ports": 5}})
        emu.put_object(karmada_slice("member2", "web-def", "web", ["10.12.0.1"]))
        await run.until(lambda: ("member2", "10.12.0.1") in run.endpoints())
        assert [p.port for p in run.store.current.services[WEB].ports] == [80]
        assert run.source.m_failed._value.get() == 0
        assert run.source.m_rejected._value.get() >= 1


async def test_an_api_server_never_reached_is_logged_once_per_watch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway whose API server did not answer from the start logged nothing at all
    (only a watch that had connected said it was down): a warning per watch now, once,
    not one per retry."""
    caplog.set_level(logging.INFO, logger="mcsproxy.sources")
    async with KubeEmulator() as dead:
        kubeconfig = str(dead.kubeconfig(tmp_path / "kubeconfig"))
    source = KubeSource("east", kubeconfig=kubeconfig, timings=FAST)
    store = SnapshotStore("east")
    task = spawn(source.run(store), name="kube source")
    try:
        async with asyncio.timeout(5):
            while not source.reflectors or not all(
                    r.error and r.lists == 0 for r in source.reflectors):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # several more refused tries, backoff at most 0.2 s
    finally:
        await cancel_and_wait([task])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(source.reflectors), warned
    assert all("cannot reach the API server" in w for w in warned), warned
