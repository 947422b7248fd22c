"""A leader that was paused (SIGSTOP, a long GC or swap stall) past its lease must not write
once it runs again: its writers, woken by answers that came in during the pause, would
otherwise send the next writes before the renewal loop notices the lease is gone.

The API emulators run on their own event loop in a thread, so they keep answering while
the controller's loop is blocked, as a real API server does while a process is stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from controlplane.clusters import ChangeSet
from controlplane.clusters.kube import KubeTimings
from controlplane.clusters.kube_app import KubeControllerApp, KubeControllerConfig
from controlplane.leader import micro_time
from controlplane.resources import KIND_SLICE
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.kube_emulator import KubeEmulator
from tests.test_controller_kube_support import (
    SLICES,
    member_slice,
    namespace,
    ours,
    service,
    service_export,
    write_kubeconfig,
)

T = TypeVar("T")
LEASES = "leases.coordination.k8s.io"
SERVICES = 24  # more than a writer's concurrency (8): writes wait behind the held ones


class ThreadedEmulators:
    """Emulators served from another thread's event loop."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.names = names
        self.emulators: dict[str, KubeEmulator] = {}

    def call(self, fn: Callable[[], T]) -> T:
        """fn() on the emulators' loop (they are not thread-safe), its result here."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(10)

    def __enter__(self) -> ThreadedEmulators:
        self.thread.start()
        for name in self.names:
            emu = self.call(KubeEmulator)
            asyncio.run_coroutine_threadsafe(emu.start(), self.loop).result(10)
            self.emulators[name] = emu
        return self

    def __exit__(self, *exc: object) -> None:
        for emu in self.emulators.values():
            asyncio.run_coroutine_threadsafe(emu.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.call(predicate):
                await asyncio.sleep(0.02)


@contextmanager
def paused(seconds: float) -> Iterator[None]:
    """The process stops for `seconds` (the body included): nothing of this loop runs,
    the clock goes on, the emulators answer."""
    until = time.monotonic() + seconds
    yield
    time.sleep(max(0.0, until - time.monotonic()))


def taken_over(emu: KubeEmulator, holder: str) -> None:
    """Another candidate writes the Lease, as after it waited out the lease duration."""
    lease = emu.get_object(LEASES, "mcsproxy-controller", "kube-system")
    assert lease is not None
    spec = lease["spec"]
    emu.put_object({**lease, "spec": {
        **spec, "holderIdentity": holder, "acquireTime": micro_time(datetime.now(UTC)),
        "renewTime": micro_time(datetime.now(UTC)),
        "leaseTransitions": spec.get("leaseTransitions", 0) + 1}})


async def test_a_leader_resumed_after_its_lease_ran_out_sends_no_write(tmp_path: Path) -> None:
    with ThreadedEmulators(("a", "b")) as emus:
        a, b = emus.emulators["a"], emus.emulators["b"]

        def setup() -> None:
            for emu in (a, b):
                emu.put_object(namespace("demo"))
            for i in range(SERVICES):
                a.put_object(service(f"web{i}"))
                a.put_object(member_slice(f"web{i}", ["10.1.0.1"], name=f"web{i}-abc"))
                a.put_object(service_export(f"web{i}"))

        emus.call(setup)
        lease_s = 1.5
        app = KubeControllerApp(KubeControllerConfig(
            kubeconfig=write_kubeconfig(emus, tmp_path / "kubeconfig"),
            contexts=(("a", "a"), ("b", "b")), lease_namespace="kube-system",
            lease_duration_s=lease_s, identity="one",
            timings=KubeTimings(request_timeout_s=8.0, probe_interval_s=0.2,
                                backoff_base_s=0.05, backoff_cap_s=0.3)))
        task = spawn(app.run(), name="controller one")
        try:
            await asyncio.wait_for(app.led.wait(), 10)
            await emus.until(lambda: sum(1 for s in b.list_objects(SLICES, "demo")
                                         if ours(s)) >= SERVICES)
            # Every slice changes; b's answers to the slice updates are held: its writer
            # has 8 updates on the way and the rest waiting.
            sent = emus.call(lambda: len(b.requests))

            def change() -> None:
                b.hold_answers(method="PUT", path="/endpointslices/")
                for i in range(SERVICES):
                    a.put_object(member_slice(f"web{i}", ["10.1.0.2"], name=f"web{i}-abc"))

            emus.call(change)
            await emus.until(lambda: sum(1 for r in b.requests[sent:]
                                         if r.method == "PUT" and "endpointslices" in r.path)
                             >= 8)
            controller = app.controller
            assert controller is not None
            members = list(controller.clients.values())
            async with asyncio.timeout(5):
                while "a" in controller._writers:  # a's slices written
                    await asyncio.sleep(0.02)
            # The answers come during the pause, which outlasts the lease; meanwhile a
            # standby takes the Lease over, as it may once the lease ran out.
            with paused(lease_s + 0.3):
                emus.call(b.release_answers)
                time.sleep(lease_s)
                emus.call(lambda: taken_over(a, "two"))
            # Waking, it learns (as from a watch event that came during the pause) that
            # one of its slices in a (whose writer is idle) was deleted: the repair is
            # queued before the renewal loop runs again. Writes already handed to a
            # connection when the process stopped may still go out (nothing on this side
            # can stop those); no other may be started.
            started = [m.writes for m in members]
            gone = next(r for r in controller.written["a"] if r.kind == KIND_SLICE)
            controller.clients["a"].own.forget(gone)  # as the watch's DELETED event does
            controller.on_change("a", ChangeSet(published={gone: None}))
            await asyncio.sleep(0.5)
            assert [m.writes for m in members] == started, "writes started after the pause"
            assert app.elector is not None and not app.elector.is_leader
        finally:
            app.stop()
            await cancel_and_wait([task])
