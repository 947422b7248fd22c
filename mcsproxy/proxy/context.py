"""What every connection of one listener shares: its upstream set, config and bookkeeping."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from mcsproxy.config import ProxyConfig
from mcsproxy.observability.accesslog import AccessLog
from mcsproxy.upstream import UpstreamSet

log = logging.getLogger("mcsproxy.proxy")

GIVE_UP_LOG_INTERVAL_S = 1.0


class Tracked(Protocol):
    """A TCP connection or UDP flow, as the idle sweep and shutdown see it."""

    idle: int

    def expire(self) -> None: ...
    def abort(self) -> None: ...


class ListenerContext:
    """Mutable on purpose: a snapshot that moves a ClusterSetIP:port to another service
    rebinds `upstream` here and the listener keeps its socket."""

    __slots__ = ("_last_give_up_log", "access_log", "config", "conns", "gave_up", "name",
                 "upstream")

    def __init__(self, name: str, upstream: UpstreamSet, config: ProxyConfig,
                 conns: set[Tracked], access_log: AccessLog | None = None) -> None:
        self.name = name
        self.upstream = upstream
        self.config = config
        self.conns = conns  # shared by every listener of the manager, for the idle sweep
        self.gave_up = 0
        self.access_log = access_log  # None unless --access-log
        self._last_give_up_log = 0.0

    def give_up(self, why: str) -> None:
        """A client connection or flow that found no endpoint: counted, logged at most 1/s."""
        self.gave_up += 1
        now = time.monotonic()
        if now - self._last_give_up_log >= GIVE_UP_LOG_INTERVAL_S:
            self._last_give_up_log = now
            log.warning("listener %s: no endpoint for a client (%s); %d so far",
                        self.name, why, self.gave_up)
