"""The collector pause around bulk builds: off inside, back on after, survivors frozen,
and the previous freeze handed back so cyclic garbage is not held for good."""

from __future__ import annotations

import gc
import threading

import pytest
from prometheus_client import CollectorRegistry

from mcsproxy import admin, gc_pause
from mcsproxy.gc_pause import collector_off, collector_paused
from mcsproxy.observability.families import Families


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector can free it


def test_the_collector_is_off_inside_and_back_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_pause, "BURST_GAP_S", 0.0)  # each pause starts a burst
    assert gc.isenabled()
    try:
        with collector_paused():
            assert not gc.isenabled()
            kept = [Node() for _ in range(100)]
            with collector_paused():  # nested: left as found
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= 100  # the survivors are left out of collections
        frozen = gc.get_freeze_count()
        del kept
        # Cycles dropped after a freeze are collected when the next burst begins...
        with collector_paused():
            assert gc.get_freeze_count() == 0
        assert gc.get_freeze_count() <= frozen - 100
        # ...but not between the parts of one burst (a full pass each would be quadratic).
        monkeypatch.setattr(gc_pause, "BURST_GAP_S", 60.0)
        with collector_paused():
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_without_unfreeze_frozen_garbage_is_still_collected_now_and_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """unfreeze=False (the running controller) spares the loop a pass over the whole
    heap at each burst, but cycles frozen along with the survivors are collected once
    FULL_CLEANUP_EVERY_S has passed, not kept until a restart."""
    monkeypatch.setattr(gc_pause, "BURST_GAP_S", 0.0)
    monkeypatch.setattr(gc_pause._Bursts, "last_unfreeze", 0.0)
    try:
        with collector_paused():
            kept = [Node() for _ in range(100)]
        del kept
        monkeypatch.setattr(gc_pause, "FULL_CLEANUP_EVERY_S", 1e9)
        with collector_paused(unfreeze=False):
            assert gc.get_freeze_count() >= 100  # left frozen
        monkeypatch.setattr(gc_pause, "FULL_CLEANUP_EVERY_S", 0.0)
        with collector_paused(unfreeze=False):
            assert gc.get_freeze_count() == 0  # handed back and collected
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_collector_off_is_shared_by_overlapping_threads_and_restored_by_the_last() -> None:
    first_in, second_in, first_may_leave = (threading.Event() for _ in range(3))
    seen: list[bool] = []

    def first() -> None:
        with collector_off():
            seen.append(gc.isenabled())
            first_in.set()
            first_may_leave.wait(5)
        seen.append(gc.isenabled())  # the second is still inside

    def second() -> None:
        first_in.wait(5)
        with collector_off():
            second_in.set()
            first_may_leave.set()
            t1.join(5)
            seen.append(gc.isenabled())

    assert gc.isenabled()
    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    t2.start()
    t2.join(5)
    assert second_in.is_set() and seen == [False, False, False]
    assert gc.isenabled()  # the last one out turned it back on
    gc.disable()
    try:
        with collector_off():
            pass
        assert not gc.isenabled()  # disabled by someone else: left as found
    finally:
        gc.enable()


def test_a_metrics_render_sets_off_no_collection() -> None:
    # A gateway of 10,000 services (1.0M series): the render's allocations set off two
    # full collections of 0.6-0.7 s per scrape, each holding the loop's proxy and DNS.
    families = Families()
    fam = families.gauge("mcsproxy_test_series", "many series", ["service", "cluster"])
    for i in range(20_000):
        fam.add([f"ns/svc{i}", "east"], i)
    in_render: list[int] = []
    rendered: list[list[bytes]] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and threading.current_thread().name == "render":
            in_render.append(info["generation"])

    render = threading.Thread(name="render", target=lambda: rendered.append(
        admin._render(families, CollectorRegistry())))
    gc.callbacks.append(record)
    try:
        gc.collect(0)  # the allocation count at 0: no collection due as the thread starts
        render.start()
        render.join(30)
    finally:
        gc.callbacks.remove(record)
    assert b"".join(rendered[0]).count(b"\nmcsproxy_test_series{") == 20_000
    # Without the pause: 86 collections in the render. With it at most one, set off by
    # the first allocation after it ends (the allocation count kept rising meanwhile).
    assert len(in_render) <= 1, in_render
