"""Active health checks: between probes an endpoint's due time waits in its upstream
set's heap (one loop timer per set), each probe runs as a named task, so at most one
probe per endpoint is in flight, and at most PROBES_IN_FLIGHT_MAX per process.

TCP connect by default; for appProtocol http ports an HTTP/1.1 GET whose status must be
2xx or 3xx (as a Kubernetes httpGet probe). Probes of many endpoints are spread by a
random first delay and a jittered interval. Results go to `UpstreamSet.health_result`,
which applies the healthy/unhealthy thresholds and logs each change once.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import logging
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from mcsproxy.config import HealthConfig
from mcsproxy.tasks import cancel_and_wait, spawn
from mcsproxy.upstream.upstream_set import SHARED_RNG

if TYPE_CHECKING:
    from mcsproxy.upstream.upstream_set import Host, UpstreamSet

MAX_STATUS_LINE = 1024
# A probe that could not be made because this process ran out of descriptors: no verdict
# on the endpoint (every endpoint would fail alike and go unhealthy together).
NO_DESCRIPTOR = "out of file descriptors"
log = logging.getLogger("mcsproxy.upstream")


def _failure(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return NO_DESCRIPTOR
    return getattr(exc, "strerror", None) or type(exc).__name__


async def probe_tcp(address: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection opens within the timeout, else why not."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(asyncio.Protocol, address, port)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return _failure(exc)
    transport.close()
    return None


async def probe_http(address: str, port: int, path: str, timeout_s: float) -> str | None:
    """None when GET `path` answers 2xx/3xx within the timeout, else why not."""
    host = f"[{address}]" if ":" in address else address
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mcsproxy-health\r\n"
               "Connection: close\r\n\r\n").encode()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_STATUS_LINE)
            writer.write(request)
            line = await reader.readline()
    except TimeoutError:
        return "timeout"
    except (OSError, ValueError) as exc:
        return _failure(exc)
    finally:
        if writer is not None:
            writer.transport.abort()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return "no HTTP status line"
    status = int(parts[1])
    return None if 200 <= status < 400 else f"status {status}"


# Probes in flight in one gateway process, over every upstream set. Each holds a socket
# for up to its timeout: with every endpoint of a big clusterset blackholed (3,000
# services x 30 endpoints, a 1 s timeout every 5 s) ~18,000 would be open at once, past
# the open-files limit that the proxy's own connections need too.
PROBES_IN_FLIGHT_MAX = 1024


class _Waiting:
    """A host's place in `_pending` while its probe waits in the budget's queue: the
    queue's entry is dropped when it comes up if the host holds anything else there."""

    __slots__ = ()


WAITING = _Waiting()


class ProbeBudget:
    """How many probes are in flight, and how many may be: a probe due past the limit
    waits in `queue`, first come first served, and starts when a probe in flight ends,
    so endpoints are probed less often instead of the process running out of descriptors.

    A queue, not a timer per waiting probe to try again: with 3,000 services x 30
    endpoints blackholed, ~89,000 probes polling for a slot every 0.5-1 probe timeouts
    took ~100,000 timer callbacks a second; the loop ran at 95 % CPU, /readyz took 3-5 s,
    and a SIGTERM took minutes to end the process (each of the 3,000 sets stopped one
    loop pass after the other)."""

    __slots__ = ("in_flight", "limit", "queue", "waited")

    def __init__(self, limit: int = PROBES_IN_FLIGHT_MAX) -> None:
        self.limit = limit
        self.in_flight = 0
        self.waited = 0  # probes put off for want of a slot (their total)
        # Probes waiting for a slot. An entry whose host no longer waits (removed, its
        # checker stopped) is skipped when it comes up, so each host is queued at most
        # once per wait and the queue stays within the hosts probed (plus those removed).
        self.queue: deque[tuple[HealthChecker, Host]] = deque()

    def release(self, _task: object) -> None:
        """A probe ended (its task's done callback): the first one waiting takes its slot."""
        self.in_flight -= 1
        queue = self.queue
        while queue and self.in_flight < self.limit:
            checker, host = queue.popleft()
            checker.resume(host)


PROCESS_PROBES = ProbeBudget()
INF = float("inf")
# Hosts due this close after the earliest are probed with it: one timer for a group, and
# none set again for the part of a millisecond a uvloop timer may come early by.
DUE_SLACK_S = 0.005
# A host's place in its checker's heap: (due on the loop's clock, tie-breaker, host).
_Due = tuple[float, int, "Host"]


class HealthChecker:
    """Probes every host of one upstream set on an interval; `sync` follows its hosts.

    Between probes a host holds only an entry in the checker's heap of due times, under
    one loop timer for the earliest; its probe runs as a task of its own, and its next
    due time is set when the probe is over. A task per host sleeping out the interval
    cost ~1.4 KiB per endpoint (42 MiB at 30,000 endpoints), and then a loop timer per
    host ~610 B under uvloop (53 MiB at 90,000): a heap entry is ~130 B."""

    def __init__(self, upstream: UpstreamSet, config: HealthConfig, http: bool,
                 rng: random.Random | None = None, budget: ProbeBudget | None = None) -> None:
        self.upstream = upstream
        self.config = config
        self.http = http
        self._rng = rng or SHARED_RNG
        self.budget = budget if budget is not None else PROCESS_PROBES
        # Each host's entry in `_heap` until its next probe, the task of the probe in
        # flight, or WAITING while its probe waits for a slot of the budget.
        self._pending: dict[Host, _Due | asyncio.Task[Any] | _Waiting] = {}
        # (due on the loop's clock, tie-breaker, host). An entry whose host holds another
        # in `_pending` (removed, probed since) is dropped when it comes up.
        self._heap: list[_Due] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None  # for _heap[0], at _timer_at
        self._timer_at = INF

    def sync(self, hosts: list[Host]) -> None:
        wanted = set(hosts)
        for host in [h for h in self._pending if h not in wanted]:
            p = self._pending.pop(host)
            if isinstance(p, asyncio.Task):
                p.cancel()
        if len(self._heap) > 2 * len(wanted) + 64:  # mostly hosts gone: drop their entries
            self._heap = [e for e in self._heap if self._pending.get(e[2]) is e]
            heapq.heapify(self._heap)
        for host in wanted:
            if host not in self._pending:
                # A random first delay spreads the probes of many endpoints.
                self._schedule(host, self._rng.uniform(0, self.config.interval_s))

    async def stop(self) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, INF
        await cancel_and_wait([p for p in pending if isinstance(p, asyncio.Task)])

    def _schedule(self, host: Host, delay: float) -> None:
        loop = asyncio.get_running_loop()
        entry = (loop.time() + delay, next(self._order), host)
        heapq.heappush(self._heap, entry)
        self._pending[host] = entry
        if entry[0] < self._timer_at:
            self._arm(loop, entry[0])

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._fire), when

    def _fire(self) -> None:
        """The earliest due time came: probe every host due by now."""
        self._timer, self._timer_at = None, INF
        loop = asyncio.get_running_loop()
        # uvloop's timers count whole milliseconds, down: one may fire a little early.
        now = loop.time() + DUE_SLACK_S
        heap, pending = self._heap, self._pending
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if pending.get(entry[2]) is entry:
                self._due(entry[2])
        if heap:
            self._arm(loop, heap[0][0])

    async def probe(self, host: Host) -> str | None:
        cfg = self.config
        if self.http:
            return await probe_http(host.address, host.port, cfg.http_path, cfg.timeout_s)
        return await probe_tcp(host.address, host.port, cfg.timeout_s)

    def _due(self, host: Host) -> None:
        budget = self.budget
        if budget.in_flight >= budget.limit:
            budget.waited += 1
            if budget.waited == 1:  # said once per process: a sign of a sick clusterset
                log.warning("health checks: %d probes in flight, the most at once; the "
                            "next ones wait for a slot", budget.limit)
            self._pending[host] = WAITING
            budget.queue.append((self, host))
            return
        self._start(host)

    def resume(self, host: Host) -> None:
        """A slot is free for `host`'s probe, if it still waits for one."""
        if self._pending.get(host) is WAITING:
            self._start(host)

    def _start(self, host: Host) -> None:
        budget = self.budget
        budget.in_flight += 1
        task = spawn(self._run(host), name=f"health {self.upstream.name} {host}")
        # A callback, not a finally: a task cancelled before its first step never runs one.
        task.add_done_callback(budget.release)
        self._pending[host] = task

    async def _run(self, host: Host) -> None:
        """One probe; cancelled when the host goes, so it never reports for a host gone."""
        cfg = self.config
        failure = await self.probe(host)
        if failure != NO_DESCRIPTOR:
            self.upstream.health_result(host, failure, cfg)
        if self._pending.get(host) is asyncio.current_task():
            spread = cfg.interval_s * cfg.jitter
            self._schedule(host, cfg.interval_s + self._rng.uniform(-spread, spread))
