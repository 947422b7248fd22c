"""The controller under a slow or flaky API server: no two leaders at once, no exit on a
transient member error, no member held up by another that hangs.

Everything goes through the real client to the API emulator, some of it through a
loopback proxy that holds answers back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.clusters import ChangeSet, Connection
from controlplane.clusters.state import ClusterObjects
from controlplane.controller import Controller
from controlplane.leader import LeaderElector, LeaseConfig
from controlplane.reconcile import STALE_ANNOTATION
from mcsproxy.tasks import cancel_and_wait, spawn
from tests import test_reconcile_support as reconcile_support
from tests.kube_emulator import KubeEmulator
from tests.test_controller_kube_support import (
    clusterset,
    export_web,
    kube_controller,
    member_slice,
    namespace,
    service,
    service_export,
    write_kubeconfig,
)
from tests.test_leader import Candidate

LEASES = "leases.coordination.k8s.io"

# What the proxy does with one request: None forwards it, ("delay", s) forwards it at once
# but holds the answer s seconds, "hang" never answers.
Policy = Callable[[str, str], Any]


class HoldingProxy:
    """A loopback reverse proxy in front of an API server that can delay or withhold answers."""

    def __init__(self, upstream: str, policy: Policy) -> None:
        self.upstream, self.policy = upstream, policy
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        policy = self.policy(request.method, request.path)
        if policy == "hang":
            await self._closing.wait()
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=await request.read(), headers=headers) as resp:
            body, status = await resp.read(), resp.status
            ctype = resp.headers.get("Content-Type", "application/json")
        if isinstance(policy, tuple) and policy[0] == "delay":
            await asyncio.sleep(policy[1])
        return web.Response(body=body, status=status, headers={"Content-Type": ctype})


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emu:
        yield emu


async def test_a_renewal_answered_late_does_not_stretch_the_term_past_the_lease(
        emu: KubeEmulator) -> None:
    # A renewal committed at T but answered `delay` later must not move the holder's
    # deadline to T + delay + renew deadline: the standby may lead from T + lease duration.
    # Whole seconds: the Lease records its duration rounded up.
    timings = {"lease_duration_s": 1.0, "renew_deadline_s": 0.8, "retry_period_s": 0.05}
    # Within the attempt's timeout, so the renewal counts as made; and 0.3 s short of the
    # renew deadline, so the renewal before it (a retry period earlier, later under load:
    # 0.16 s once in a full run) has not ended the term by the time the answer comes. A
    # term stretched from the answer would still end 0.3 s past the standby's start.
    delay = 0.5
    state: dict[str, Any] = {"armed": False, "cut": None}

    def policy(method: str, path: str) -> Any:
        if state["cut"]:
            return "hang"
        if state["armed"] and method == "PUT" and "/leases/" in path:
            state["cut"] = time.monotonic()  # answered late, then nothing reaches the server
            return ("delay", delay)
        return None

    proxy = HoldingProxy(emu.url, policy)
    a = Candidate(await proxy.start(), "ctl-a", api_timeout_s=2.0, **timings)
    b = Candidate(emu.url, "ctl-b", api_timeout_s=2.0, **timings)
    try:
        a.start()
        await asyncio.wait_for(a.leading.wait(), 5)
        b.start()
        await emu.wait_for(lambda: sum(1 for r in emu.requests if r.method == "GET") >= 6)
        state["armed"] = True
        await asyncio.wait_for(b.leading.wait(), 5)
        await asyncio.wait_for(_until(lambda: bool(a.stopped)), 5)
        assert a.stopped[0] > state["cut"] + delay  # the late answer was taken as a renewal
        assert a.stopped[0] <= b.started[0], (
            f"both led for {a.stopped[0] - b.started[0]:.2f}s")
    finally:
        await a.stop()
        await b.stop()
        await proxy.stop()


async def test_a_standby_dates_a_record_from_when_its_read_returned() -> None:
    # A read slow on its way in (0.9 s) returns the holder's record as written up to then:
    # dated from when the read was sent, the standby would take over 0.9 s early.
    from controlplane.leader import Attempt

    clock = [0.0]
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "mcsproxy-controller", "namespace": "kube-system"},
             "spec": {"holderIdentity": "ctl-a", "renewTime": "2026-11-27T00:00:00.000000Z",
                      "leaseDurationSeconds": 2, "leaseTransitions": 0}}
    writes: list[str] = []

    class SlowReads:
        async def request(self, method: str, path: str, body: Any = None) -> Any:
            if method == "GET":
                clock[0] += 0.9
                return lease
            writes.append(method)
            return body

    elector = LeaderElector(SlowReads(), LeaseConfig(  # type: ignore[arg-type]
        "kube-system", "ctl-b", lease_duration_s=2.0, renew_deadline_s=1.5,
        retry_period_s=0.5), clock=lambda: clock[0])
    assert await elector.try_acquire_or_renew() is Attempt.TAKEN  # first seen, sent at 0
    clock[0] = 2.0  # 2 s after that read was sent, 1.1 s after it returned: not yet
    assert await elector.try_acquire_or_renew() is Attempt.TAKEN and not writes
    clock[0] = 2.95
    assert await elector.try_acquire_or_renew() is Attempt.HELD and writes == ["PUT"]


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_leader_that_finds_another_holder_stops_at_once(emu: KubeEmulator) -> None:
    # A long renew deadline: waiting it out would leave two writers for seconds.
    a = Candidate(emu.url, "ctl-a", api_timeout_s=2.0, lease_duration_s=3.0,
                  renew_deadline_s=2.0, retry_period_s=0.1)
    try:
        a.start()
        await asyncio.wait_for(a.leading.wait(), 5)
        lease = emu.get_object(LEASES, "mcsproxy-controller", "kube-system")
        assert lease is not None
        # Another replica took the Lease (as one would after a partition healed).
        lease["spec"].update(holderIdentity="ctl-b", renewTime="2030-01-01T00:00:00.000000Z")
        emu.put_object({**lease, "apiVersion": "coordination.k8s.io/v1", "kind": "Lease"})
        taken = time.monotonic()
        await asyncio.wait_for(_until(lambda: bool(a.stopped)), 5)
        assert a.stopped[0] - taken < 0.5  # the next renewal (0.1 s) saw it
        spec = (emu.get_object(LEASES, "mcsproxy-controller", "kube-system") or {})["spec"]
        assert spec["holderIdentity"] == "ctl-b"  # and left it alone
        assert not a.elector.is_leader
    finally:
        await a.stop()


async def test_one_member_error_while_the_term_starts_is_retried_not_fatal(
        tmp_path: Path) -> None:
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        # One 503 from member b when its ServiceImports are read back at term start.
        cs["b"].fail_next(1, 503, method="GET", path="/serviceimports")
        app = kube_controller(write_kubeconfig(cs, tmp_path / "kubeconfig"), "one")
        task = spawn(app.run(), name="controller")
        try:
            led = spawn(app.led.wait(), name="led")
            await asyncio.wait({task, led}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            await cancel_and_wait([led])
            assert not task.done(), task.exception()
            assert app.led.is_set()
            # b, not read at the start, is read again in the background and joins.
            await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.1"}
                                      for c in cs.emulators))
            read_back = [r for r in cs["b"].requests
                         if r.method == "GET" and r.path.endswith("/serviceimports")]
            assert len(read_back) >= 2  # the failed read, then the one that worked
        finally:
            app.stop()
            await cancel_and_wait([task])


async def test_a_hung_member_does_not_hold_up_writes_to_the_others() -> None:
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        await cs.start_controller()
        await cs.wait(lambda: cs.addresses("c", "web") == {"10.1.0.1"})
        cs["b"].hang()  # b's API server takes requests and never answers
        try:
            # Sixteen new imports pending for b: its writes now fail after the 2 s timeout,
            # and are retried every second.
            for i in range(16):
                cs["a"].put_object(service(f"svc{i}"))
                cs["a"].put_object(member_slice(f"svc{i}", [f"10.2.0.{i + 1}"]))
                cs["a"].put_object(service_export(f"svc{i}"))
            await cs.wait(lambda: len(cs.imports("c")) == 17, 15)
            for n in range(3):
                address = f"10.1.1.{n + 1}"
                changed = time.monotonic()
                cs["a"].put_object(member_slice("web", ["10.1.0.1", address]))
                await cs.wait(lambda a=address: a in cs.addresses("c", "web"), 10)
                assert time.monotonic() - changed < 0.5, n
                await asyncio.sleep(0.7)
        finally:
            cs["b"].hang(False)


class MemoryMember:
    """A member cluster without I/O: the controller's own work is all there is."""

    def __init__(self, cluster_id: str, objects: ClusterObjects) -> None:
        self.cluster_id, self.objects = cluster_id, objects
        self.connection = Connection(connected=True, since=time.time())

    async def sync(self) -> ChangeSet:
        return ChangeSet()

    async def watch(self, notify: Any) -> None:
        await asyncio.Event().wait()

    async def read_published(self) -> list[Any]:
        return []

    async def apply(self, objects: Any) -> None: ...

    async def delete(self, refs: Any) -> None: ...

    async def update_export_status(self, export: Any) -> None: ...

    async def close(self) -> None: ...


async def test_a_full_reconcile_lets_the_loop_run_between_parts() -> None:
    """Every key of a member reconciled at once (a start, a member going stale and back)
    held the loop for all of it: 2.6-15 s at 10,000 services, health probes, member
    watches and stream heartbeats waiting meanwhile."""
    services = 1500
    docs = [reconcile_support.namespace()]
    for i in range(services):
        docs += [reconcile_support.service(f"web{i}"),
                 reconcile_support.eslice(f"web{i}-a", ["10.1.0.1"], svc=f"web{i}"),
                 reconcile_support.export(f"web{i}")]
    members = [MemoryMember(c, reconcile_support.cluster(c, *docs)) for c in ("a", "b")]
    controller = Controller(members, cidrs="127.74.0.0/16")
    seen: list[int] = []  # imports written into b, as the loop's other tasks see them

    async def tick() -> None:
        while True:
            seen.append(len(controller.written.get("b", ())))
            await asyncio.sleep(0)

    ticker = spawn(tick(), name="ticker")
    try:
        await controller.start()
        total = len(controller.written["b"])
        assert any(0 < n < total for n in seen)  # it ran while keys were still to do
        seen.clear()
        members[0].connection.connected = False  # every key of a reconciled again
        controller.on_change("a", ChangeSet(connection=True))
        await controller.flush()
        stale = [o for o in controller.written["b"].values()
                 if o["metadata"].get("annotations", {}).get(STALE_ANNOTATION)]
        assert len(stale) == services
        assert set(seen) == {total}  # (slices replaced, not added)
    finally:
        await cancel_and_wait([ticker])
        await controller.close()
