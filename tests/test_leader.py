"""Leader election on a coordination.k8s.io/v1 Lease in the API emulator (real client)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from controlplane.clusters.kube_api import KubeApi
from controlplane.leader import LeaderElector, LeaseConfig
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.kube_emulator import KubeEmulator

LEASES = "leases.coordination.k8s.io"


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emu:
        yield emu


class Candidate:
    """An elector whose work records when it runs and when it is stopped."""

    def __init__(self, url: str, identity: str, api_timeout_s: float = 1.0,
                 **timings: Any) -> None:
        self.client = ApiClient(Configuration(host=url))
        cfg = {"lease_duration_s": 1.0, "renew_deadline_s": 0.6, "retry_period_s": 0.1,
               **timings}
        self.elector = LeaderElector(KubeApi(self.client, identity, timeout_s=api_timeout_s),
                                     LeaseConfig("kube-system", identity, **cfg))
        self.leading = asyncio.Event()
        self.started: list[float] = []
        self.stopped: list[float] = []
        self.task: asyncio.Task[Any] | None = None

    async def _work(self) -> None:
        self.started.append(time.monotonic())
        self.leading.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.stopped.append(time.monotonic())
            self.leading.clear()

    def start(self) -> None:
        self.task = spawn(self.elector.run(self._work), name=f"elector {id(self)}")

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait([self.task])
            self.task = None
        await self.client.close()


@pytest.fixture
async def pair(emu: KubeEmulator) -> AsyncIterator[list[Candidate]]:
    made: list[Candidate] = []

    def make(identity: str, **timings: Any) -> Candidate:
        made.append(Candidate(emu.url, identity, **timings))
        return made[-1]

    yield make  # type: ignore[misc]
    for c in made:
        await c.stop()


async def first_leader(candidates: list[Candidate], timeout: float = 5.0) -> Candidate:
    waits = {asyncio.ensure_future(c.leading.wait()): c for c in candidates}
    done, pending = await asyncio.wait(waits, timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert done, "nobody became leader"
    return waits[done.pop()]


async def test_one_of_two_leads_and_the_lease_says_who(emu: KubeEmulator, pair: Any) -> None:
    a, b = pair("ctl-a"), pair("ctl-b")
    a.start()
    b.start()
    leader = await first_leader([a, b])
    other = b if leader is a else a
    # Several renewals later the standby still has not started.
    await emu.wait_for(lambda: sum(1 for r in emu.requests if r.method == "PUT") >= 5)
    assert not other.started and leader.elector.is_leader and not other.elector.is_leader
    lease = emu.get_object(LEASES, "mcsproxy-controller", "kube-system")
    assert lease is not None
    spec = lease["spec"]
    assert spec["holderIdentity"] == leader.elector.config.identity
    assert spec["leaseDurationSeconds"] == 1 and spec["leaseTransitions"] == 0
    assert spec["acquireTime"].endswith("Z") and spec["renewTime"] > spec["acquireTime"]


async def test_standby_takes_over_within_the_lease_duration_after_a_crash(
        emu: KubeEmulator, pair: Any) -> None:
    a = pair("ctl-a", release_on_stop=False)
    a.start()
    await a.leading.wait()
    b = pair("ctl-b")
    b.start()
    await emu.wait_for(lambda: any(r.method == "GET" and "leases" in r.path
                                   for r in emu.requests[-3:]))
    crashed = time.monotonic()
    await a.stop()  # no release: b must wait the lease out
    await asyncio.wait_for(b.leading.wait(), 5.0)
    took = b.started[0] - crashed
    assert 0.7 < took < 1.0 + 0.7, took
    spec = (emu.get_object(LEASES, "mcsproxy-controller", "kube-system") or {})["spec"]
    assert spec["holderIdentity"] == "ctl-b" and spec["leaseTransitions"] == 1


async def test_clean_stop_releases_and_the_standby_takes_over_at_once(
        emu: KubeEmulator, pair: Any) -> None:
    a, b = pair("ctl-a", lease_duration_s=5.0), pair("ctl-b", lease_duration_s=5.0)
    a.start()
    await a.leading.wait()
    b.start()
    stopped = time.monotonic()
    await a.stop()
    await asyncio.wait_for(b.leading.wait(), 5.0)
    assert b.started[0] - stopped < 1.0  # well under the 5 s lease


async def test_leader_that_cannot_renew_stops_before_anyone_else_may_lead(
        emu: KubeEmulator, pair: Any) -> None:
    a, b = pair("ctl-a"), pair("ctl-b")
    a.start()
    await a.leading.wait()
    b.start()
    emu.fail_next(None, 503, method="PUT", path="/leases/")
    failing_since = time.monotonic()
    await emu.wait_for(lambda: bool(a.stopped), timeout=5.0)
    # Stopped within the renew deadline (0.6 s) of the last good renewal, before the
    # lease (1 s) could have expired for the standby.
    assert a.stopped[0] - failing_since < 0.6 + 0.3
    assert not b.started
    emu.clear_faults()
    leader = await first_leader([a, b])
    assert leader.elector.is_leader
    assert len(a.started) + len(b.started) == 2  # exactly one new term
