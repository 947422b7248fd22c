"""The collector pause around bulk builds: off inside, back on after, survivors frozen,
and the previous freeze handed back so cyclic garbage is not held for good."""

from __future__ import annotations

import gc

import pytest

from mcsproxy import gc_pause
from mcsproxy.gc_pause import collector_paused


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


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
