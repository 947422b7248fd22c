"""At most one log line a second for lines that any client or failure can cause per
request, connection or datagram: a service whose endpoints are all down answered 502 to
each request with a line of its own (at 10,000 requests/s, 10,000 lines/s)."""

from __future__ import annotations

from typing import Final

LOG_INTERVAL_S: Final = 1.0


class LogLimit:
    """`per_interval` lines per LOG_INTERVAL_S (one by default); the lines held back are
    counted into the next one said."""

    __slots__ = ("held", "last", "per_interval", "said")

    def __init__(self, per_interval: int = 1) -> None:
        self.per_interval = per_interval
        self.last = float("-inf")  # when the current interval began
        self.said = 0  # lines said in it
        self.held = 0

    def take(self, now: float) -> int:
        """The lines held back since the last one said when this one is to be said
        (now), else -1 (held back)."""
        # A clock behind `last` is another clock (a test's): a new interval too.
        if not 0.0 <= now - self.last < LOG_INTERVAL_S:
            self.last, self.said = now, 0
        if self.said >= self.per_interval:
            self.held += 1
            return -1
        self.said += 1
        held, self.held = self.held, 0
        return held
