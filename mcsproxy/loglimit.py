"""At most one log line a second for lines that any client or failure can cause per
request, connection or datagram: a service whose endpoints are all down answered 502 to
each request with a line of its own (at 10,000 requests/s, 10,000 lines/s)."""

from __future__ import annotations

from typing import Final

LOG_INTERVAL_S: Final = 1.0


class LogLimit:
    """One line per LOG_INTERVAL_S; the lines held back are counted into the next one."""

    __slots__ = ("held", "last")

    def __init__(self) -> None:
        self.last = float("-inf")
        self.held = 0

    def take(self, now: float) -> int:
        """The lines held back since the last one said when this one is to be said
        (now), else -1 (held back)."""
        if now - self.last < LOG_INTERVAL_S:
            self.held += 1
            return -1
        held, self.held, self.last = self.held, 0, now
        return held
