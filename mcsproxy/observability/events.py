"""A bounded ring of recent state changes for the status page and `mcsproxy status`.

Fed by the places that already log a state change once (ejections, health flips, panic,
traffic split changes, snapshots, sources): a deque append per change, nothing per
connection. Each event has a sequence number so a page can ask for what is new.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

EVENTS_MAX = 500


class EventRing:
    __slots__ = ("_clock", "_events", "seq")

    def __init__(self, maxlen: int = EVENTS_MAX, clock: Callable[[], float] = time.time) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._clock = clock
        self.seq = 0

    def add(self, kind: str, subject: str, text: str) -> None:
        """kind: a short word (ejection, health, failover, panic, snapshot, source, endpoint);
        subject: what it is about (an upstream like ns/name:port/TCP, a source name)."""
        self.seq += 1
        self._events.append({"seq": self.seq, "time": self._clock(), "kind": kind,
                             "subject": subject, "text": text})

    def since(self, seq: int = 0, limit: int = EVENTS_MAX) -> list[dict[str, Any]]:
        """Events newer than `seq`, oldest first, at most the last `limit`."""
        found = [e for e in self._events if e["seq"] > seq]
        return found[-limit:] if limit else []

    def __len__(self) -> int:
        return len(self._events)
