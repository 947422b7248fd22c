"""Waiting between reconnect attempts, and naming the failure that caused them.

One implementation for every long-lived client of an API that can go away: the gateway's
Kubernetes reflectors and controller stream, and the controller's member-cluster watches.
Delays grow exponentially to a cap and are jittered, so a fleet of gateways (or the
members of a clusterset) that failed together does not come back in the same instant.
"""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff from `base_s` doubling up to `cap_s`.

    `next()` draws with equal jitter (between half the step and the step: never a
    reconnect at once), `next_full()` with full jitter (anywhere up to the step: spreads
    a fleet widest). Both advance the same sequence; `reset()` after a success.
    """

    __slots__ = ("attempt", "base_s", "cap_s")

    def __init__(self, base_s: float = 0.2, cap_s: float = 30.0) -> None:
        self.base_s, self.cap_s, self.attempt = base_s, cap_s, 0

    def step(self) -> float:
        """The un-jittered delay of this attempt; advances to the next one."""
        delay = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return delay

    def next(self) -> float:
        return self.step() * random.uniform(0.5, 1.0)

    def next_full(self) -> float:
        return random.uniform(0, self.step())

    def reset(self) -> None:
        self.attempt = 0


def describe_error(exc: BaseException) -> str:
    """`Type: message`, or just the type when the exception says nothing."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
