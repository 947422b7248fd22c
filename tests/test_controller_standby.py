"""Kubernetes mode with --serve: a standby replica answers /healthz and /readyz (the
PodDisruptionBudget in deploy/ counts only ready pods), but serves no stream; after a
handover the new leader streams and the old one, standing by again, does not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from controlplane.clusters.kube_app import KubeControllerApp
from controlplane.stream import StreamLimits
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.proxy_fixtures import free_port
from tests.test_controller_kube_support import (
    clusterset,
    export_web,
    kube_controller,
    namespace,
    service,
    service_export,
    write_kubeconfig,
)
from tests.test_leader_fencing import taken_over

HOST = "127.51.0.1"
LIMITS = StreamLimits(write_timeout_s=7.0, queue_bytes=65536)  # not the defaults


def replica(kubeconfig: Path, identity: str) -> tuple[KubeControllerApp, str]:
    port = free_port(HOST)
    app = kube_controller(kubeconfig, identity, ("a", "b"), serve=(HOST, port),
                          stream_limits=LIMITS)
    return app, f"http://{HOST}:{port}"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        await resp.read()
        return resp.status, None


async def until_answers(session: aiohttp.ClientSession, url: str) -> None:
    """The listener comes up before the election: poll it with a deadline."""
    async with asyncio.timeout(5):
        while True:
            try:
                await get(session, url)
                return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)


async def test_standby_is_ready_but_streams_nothing_until_it_leads(tmp_path: Path) -> None:
    async with clusterset(("a", "b")) as cs, aiohttp.ClientSession() as session:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        (one, one_url), (two, two_url) = replica(kubeconfig, "one"), replica(kubeconfig, "two")
        first = spawn(one.run(), name="controller one")
        second: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(one.led.wait(), 10)
            second = spawn(two.run(), name="controller two")
            await until_answers(session, f"{two_url}/healthz")
            assert two.elector is not None and two.elector.terms == 0

            assert await get(session, f"{one_url}/readyz") == (
                200, {"ready": True, "leading": True})
            assert await get(session, f"{two_url}/readyz") == (
                200, {"ready": True, "leading": False})
            assert (await get(session, f"{two_url}/healthz"))[0] == 200
            assert (await get(session, f"{two_url}/metrics"))[0] == 200
            async with session.get(f"{two_url}/v1/stream?cluster=b",
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                assert resp.status == 503 and "not the leader" in await resp.text()
                # The retry opens a new connection (through a Service: maybe the leader's).
                assert resp.headers.get("Connection") == "close"
            assert (await get(session, f"{two_url}/status"))[0] == 503
            status, body = await get(session, f"{one_url}/status")
            assert status == 200 and isinstance(body, dict) and body["leading"] is True
            # The leader's stream has the limits it was configured with.
            hub = one.server.hub if one.server is not None else None
            assert hub is not None
            assert (hub.write_timeout_s, hub.queue_bytes) == (7.0, 65536)

            one.stop()
            await first
            await asyncio.wait_for(two.led.wait(), 5)
            assert await get(session, f"{two_url}/readyz") == (
                200, {"ready": True, "leading": True})
            async with session.get(f"{two_url}/v1/stream?cluster=b",
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                assert resp.status == 200
                assert await resp.content.readline()  # the snapshot's first line
        finally:
            one.stop()
            two.stop()
            await cancel_and_wait([t for t in (first, second) if t is not None])


def sample(app: KubeControllerApp, name: str, **labels: str) -> float | None:
    return app.metrics.registry.get_sample_value(name, labels)


async def test_a_replica_that_stops_leading_exports_none_of_its_terms_gauges(
        tmp_path: Path) -> None:
    """Its last term's imports, unallocated services and conflicts stayed on a standby's
    /metrics for the life of the process: summed over the replicas (as a dashboard does),
    every import counted twice after a handover."""
    async with clusterset(("a", "b")) as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        # a second export of web with another port: a conflict while leading
        cs["b"].put_object(service("web", ports=[("http", 9090)]))
        cs["b"].put_object(service_export("web"))
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        one, _ = replica(kubeconfig, "one")
        first = spawn(one.run(), name="controller one")
        try:
            await asyncio.wait_for(one.led.wait(), 10)
            async with asyncio.timeout(5):
                while sample(one, "mcsproxy_controller_service_imports") != 1:
                    await asyncio.sleep(0.02)
            assert sample(one, "mcsproxy_controller_conflicts",
                          reason="PortConflict") == 1
            taken_over(cs["a"], "two")  # another replica took the Lease
            async with asyncio.timeout(5):
                while one.elector is None or one.elector.is_leader or one.controller:
                    await asyncio.sleep(0.02)
            assert sample(one, "mcsproxy_controller_service_imports") == 0
            assert sample(one, "mcsproxy_controller_unallocated_services") == 0
            assert not sample(one, "mcsproxy_controller_conflicts", reason="PortConflict")
            assert sample(one, "mcsproxy_controller_stream_subscribers") == 0
        finally:
            one.stop()
            await cancel_and_wait([first])
