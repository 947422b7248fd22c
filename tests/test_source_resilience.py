"""The gateway's sources under partial failure, through real sockets and real clients: a
watch started late or failing, an API server answering 404 for a while or not answering,
a controller stream that hangs or keeps getting cut. The last good view keeps serving,
errors are reported, and what still works keeps being published."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcsproxy.model import ServiceKey, Snapshot
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
