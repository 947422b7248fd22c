"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does.

Of several controllers only the Lease holder writes. The holder renews every retry period;
when it cannot renew within `renew_deadline_s` (counted from when its last successful
renewal was sent, not answered) it stops its work (cancels it) before anyone else may
take over; when a renewal finds another holder, it stops at once. A candidate takes the
Lease once the holder's record has not changed for the holder's `leaseDurationSeconds`,
measured on the candidate's own clock from when it first saw that record (so clocks need
not agree between hosts). Writes use the Lease's resourceVersion: of two candidates
racing, one gets 409 and stays candidate. A holder that stops cleanly releases the Lease
so a standby takes over at once.

Fencing: stopping the work is not enough on its own. A process paused past its lease
(SIGSTOP, a stall) wakes with answers waiting for its writers, which would start their
next writes before the renewal loop gets to run and cancel them. So every write of a
term asks `write_time_left()` first (each member's KubeClusterClient has it as its
`fence`, set in kube_app.py, and so does the ConfigMap of held ClusterSetIPs; both go
through kube_api.fenced): none is started once the renew deadline has passed on this
replica's monotonic clock, whether or not the renewal loop has noticed yet, and one
still under way then is cut short. A request already handed to the socket when the
process stopped may still reach the API server: nothing on this side can stop that one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controlplane.clusters import ClusterError
from controlplane.clusters.kube_api import KubeApi, KubeApiError, Obj
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("controlplane.leader")

LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Attempt(enum.Enum):
    HELD = "held"  # we hold the Lease now
    TAKEN = "taken"  # another identity holds it, unexpired
    FAILED = "failed"  # no answer, an error, or a write race lost: try again


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    namespace: str
    identity: str
    name: str = "mcsproxy-controller"
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    release_on_stop: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("lease timings need 0 < retry period < renew deadline "
                             "< lease duration")
        if not self.identity:
            raise ValueError("a leader election identity must not be empty")


class LeaderElector:
    def __init__(self, api: KubeApi, config: LeaseConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.api = api
        self.config = config
        self._clock = clock
        self._wall = wall
        self._observed: tuple[Any, ...] | None = None  # the holder's record as last seen
        self._observed_at = 0.0
        # The clock reading taken before the last attempt that left us holding the Lease:
        # that write was committed no earlier, so others' lease duration runs from later.
        self._renewed_at = 0.0
        self._lease: Obj | None = None
        self.is_leader = False
        self.terms = 0  # times this elector became leader

    @property
    def _collection(self) -> str:
        return LEASE_PATH.format(namespace=self.config.namespace)

    def _spec(self, acquire: str, transitions: int, now: str) -> Obj:
        return {"holderIdentity": self.config.identity,
                "leaseDurationSeconds": max(1, math.ceil(self.config.lease_duration_s)),
                "acquireTime": acquire, "renewTime": now, "leaseTransitions": transitions}

    async def try_acquire_or_renew(self) -> Attempt:
        """One attempt: whether we hold the Lease afterwards, or someone else does."""
        cfg = self.config
        now_wall, now = micro_time(self._wall()), self._clock()
        try:
            lease = await self.api.request("GET", f"{self._collection}/{cfg.name}")
        except KubeApiError as exc:
            if exc.code != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                    "spec": self._spec(now_wall, 0, now_wall)}
            try:
                self._lease = await self.api.request("POST", self._collection, body=body)
            except KubeApiError as exc2:
                if exc2.code == 409:
                    return Attempt.TAKEN  # another candidate created it first
                raise
            self._observe(self._lease, now)
            return Attempt.HELD
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"),
                  spec.get("leaseDurationSeconds"))
        if record != self._observed:
            # Seen when the answer came, not when the read was sent (as client-go): a read
            # slow on its way in may return a record written well after it was sent, and
            # dating it earlier would let us take over before its holder's term is up.
            self._observed, self._observed_at = record, self._clock()
        duration = float(spec.get("leaseDurationSeconds") or cfg.lease_duration_s)
        if holder and holder != cfg.identity and now < self._observed_at + duration:
            return Attempt.TAKEN
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == cfg.identity:
            acquire = spec.get("acquireTime") or now_wall
        else:
            acquire, transitions = now_wall, transitions + 1
        body = {**lease, "spec": {**spec, **self._spec(acquire, transitions, now_wall)}}
        try:
            self._lease = await self.api.request(
                "PUT", f"{self._collection}/{cfg.name}", body=body)
        except KubeApiError as exc:
            if exc.code in (409, 404):
                # Someone wrote it since we read it; the next read says who holds it.
                return Attempt.FAILED
            raise
        self._observe(self._lease, now)
        return Attempt.HELD

    def _observe(self, lease: Obj, now: float) -> None:
        spec = lease.get("spec") or {}
        self._observed = (spec.get("holderIdentity"), spec.get("renewTime"),
                          spec.get("leaseTransitions"), spec.get("leaseDurationSeconds"))
        self._observed_at = self._renewed_at = now

    async def _attempt(self, timeout_s: float) -> Attempt:
        try:
            async with asyncio.timeout(max(0.001, timeout_s)):
                return await self.try_acquire_or_renew()
        except (ClusterError, TimeoutError) as exc:
            log.warning("lease %s/%s: %s", self.config.namespace, self.config.name,
                        str(exc) or "timed out")
            return Attempt.FAILED

    async def _acquire(self) -> None:
        cfg = self.config
        while await self._attempt(cfg.retry_period_s) is not Attempt.HELD:
            # Jitter keeps candidates that started together from colliding every round.
            await asyncio.sleep(cfg.retry_period_s * random.uniform(1.0, 1.2))

    def write_time_left(self) -> float:
        """Until the renew deadline, counted from before the last successful renewal: no
        other candidate can have taken the Lease before it. 0 when not leading."""
        if not self.is_leader:
            return 0.0
        return self._renewed_at + self.config.renew_deadline_s - self._clock()

    async def _hold(self) -> None:
        """Renew until a renewal misses the deadline or finds another holder; then return
        (leadership lost)."""
        cfg = self.config
        # Measured from before each successful write, not from its answer: a renewal
        # answered late must not stretch our term past the others' lease duration.
        last_renewed = self._renewed_at
        while True:
            deadline = last_renewed + cfg.renew_deadline_s
            await asyncio.sleep(max(0.0, min(cfg.retry_period_s, deadline - self._clock())))
            if self._clock() >= deadline:
                break
            result = await self._attempt(deadline - self._clock())
            if result is Attempt.HELD:
                last_renewed = self._renewed_at
            elif result is Attempt.TAKEN:
                # The other holder writes already: retrying until the deadline would only
                # keep two writers going.
                holder = self._observed[0] if self._observed else None
                log.error("lease %s/%s: now held by %s: stopped writing", cfg.namespace,
                          cfg.name, holder if holder and holder != cfg.identity
                          else "another candidate")
                return
            elif self._clock() >= deadline:
                break
        log.error("lease %s/%s: not renewed within %.1fs: stopped writing",
                  cfg.namespace, cfg.name, cfg.renew_deadline_s)

    async def release(self) -> None:
        """Give the Lease up so a standby need not wait out the duration."""
        if self._lease is None:
            return
        spec = dict(self._lease.get("spec") or {})
        if spec.get("holderIdentity") != self.config.identity:
            return
        spec.update(holderIdentity="", leaseDurationSeconds=1,
                    renewTime=micro_time(self._wall()))
        try:
            async with asyncio.timeout(self.api.timeout_s):
                await self.api.request("PUT", f"{self._collection}/{self.config.name}",
                                       body={**self._lease, "spec": spec})
        except (ClusterError, TimeoutError) as exc:
            log.warning("lease %s/%s not released (%s): the standby waits it out",
                        self.config.namespace, self.config.name, str(exc) or "timed out")
        self._lease = None

    async def run(self, lead: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Until cancelled: become leader, run lead() while leading, stop it on loss.

        If lead() returns or fails by itself, the Lease is released and run() returns
        (re-raising its error): the process should exit rather than hold a Lease idly.
        """
        cfg = self.config
        while True:
            await self._acquire()
            self.is_leader, self.terms = True, self.terms + 1
            log.info("lease %s/%s: %s is the leader", cfg.namespace, cfg.name, cfg.identity)
            work = spawn(lead(), name="leader work")
            hold = spawn(self._hold(), name=f"lease renewal {cfg.name}")
            finished = lost = False
            try:
                await asyncio.wait({work, hold}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.is_leader = False
                finished, lost = work.done(), hold.done()
                await cancel_and_wait([hold, work])
                # Lost: someone else may hold it now. Stopping: hand it over at once.
                if not lost and (finished or cfg.release_on_stop):
                    await self.release()
            if finished:
                work.result()  # its error, if any, ends run()
                return
