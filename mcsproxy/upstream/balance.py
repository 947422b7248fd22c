"""Load-balancing arithmetic as pure functions: tested with tables, no sockets, no clock.

- `eligible_targets`: which endpoints of a service may get new connections on a port.
- `priority_of`: local-first puts the local cluster at priority 0, the rest at 1;
  spread is one level with every cluster.
- `priority_load`: Envoy's priority arithmetic — per-level health * overprovisioning,
  spill to the next level, normalisation when total health is short, panic thresholds.
- `pick_round_robin` / `pick_least_connections`: choice of one host inside a level.
- `AffinityTable`: sessionAffinity ClientIP with a timeout, on an injected clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

from mcsproxy.model import ImportedService, Locality, ServicePort


class Target(NamedTuple):
    """One (address, port) an upstream set may connect to."""

    address: str
    port: int
    cluster: str
    ready: bool  # False: serving and terminating, used only because nothing is ready


def eligible_targets(service: ImportedService, port: ServicePort) -> tuple[Target, ...]:
    """Endpoints that may get new connections on `port`, as kube-proxy chooses them.

    Ready endpoints whose slice has a port of the same name and protocol; when no endpoint
    of the service, in any cluster, is ready for the port, the ones that are serving and
    terminating, so a rolling restart does not drop traffic (KEP-1669). An endpoint that
    is neither ready nor terminating is never used: it is starting or failing its
    readiness probe. The fallback is per service, not per cluster, as kube-proxy's is per
    service and not per zone: a ready remote endpoint beats a terminating local one, and
    locality priorities apply afterwards to whichever set was chosen. Duplicate
    (address, port) pairs collapse to the first seen.
    """
    ready: list[Target] = []
    terminating: list[Target] = []
    seen: set[tuple[str, int]] = set()
    for ep in service.endpoints:
        target_port = ep.port_for(port)
        if target_port is None or (ep.address, target_port) in seen:
            continue
        if ep.ready:
            seen.add((ep.address, target_port))
            ready.append(Target(ep.address, target_port, ep.cluster, True))
        elif ep.serving and ep.terminating:
            terminating.append(Target(ep.address, target_port, ep.cluster, False))
    if ready:
        return tuple(ready)
    unique: dict[tuple[str, int], Target] = {}
    for t in terminating:
        unique.setdefault((t.address, t.port), t)
    return tuple(unique.values())


def priority_of(cluster: str, local_cluster: str, locality: Locality) -> int:
    """Priority level of an endpoint: 0 for everything when spreading, else local 0, remote 1."""
    if locality == "spread" or cluster == local_cluster:
        return 0
    return 1


class LoadPlan(NamedTuple):
    """Percent of new connections per priority level (sums to 100) and panic per level."""

    loads: tuple[int, ...]
    panic: tuple[bool, ...]


def level_health(healthy: int, total: int, overprovisioning: float) -> int:
    """A level's health in percent: healthy share * overprovisioning factor, capped at 100."""
    if total <= 0:
        return 0
    # Integer per-cent arithmetic, as Envoy's: 71 % healthy x 1.4 is 99, never 99.999.
    factor = round(overprovisioning * 100)
    return min(100, healthy * factor // total)


def priority_load(
    healthy: Sequence[int],
    total: Sequence[int],
    overprovisioning: float = 1.4,
    panic_threshold: int = 50,
) -> LoadPlan:
    """Envoy's priority load: each level takes what its health allows, the rest spills on.

    Level i gets min(health_i, 100 - load already given to levels before it). When the
    health of all levels together is below 100 (the "normalized total health"), there
    is not enough healthy capacity anywhere: loads are scaled in proportion to health (the
    rounding remainder goes to the first level with health, as Envoy does) and each level
    whose healthy share is below `panic_threshold` percent is in panic — it balances over
    all its hosts, healthy or not. When every level is in panic (an empty level counts as
    in panic, as in Envoy), health says nothing any more: load follows the number of
    hosts per level (Envoy's recalculateLoadInTotalPanic), the remainder to the first
    level with hosts. With no health at all and panic disabled, the first level with
    hosts gets everything, balanced over all of them: failing every request instead
    would help no one.
    """
    if len(healthy) != len(total):
        raise ValueError("healthy and total must have one entry per level")
    n = len(total)
    if n == 0:
        return LoadPlan((), ())
    health = [level_health(h, t, overprovisioning) for h, t in zip(healthy, total, strict=True)]
    total_health = min(100, sum(health))
    if total_health == 100:
        loads = []
        left = 100
        for h in health:
            take = min(h, left)
            loads.append(take)
            left -= take
        return LoadPlan(tuple(loads), (False,) * n)
    in_panic = [(t == 0 and panic_threshold > 0) or h * 100 < panic_threshold * t
                for h, t in zip(healthy, total, strict=True)]
    panic = tuple(t > 0 and p for t, p in zip(total, in_panic, strict=True))
    hosts = sum(total)
    if hosts and (all(in_panic) or total_health == 0):
        if not all(in_panic):  # panic disabled and nothing healthy: Envoy's corner case
            first = next(i for i, t in enumerate(total) if t > 0)
            return LoadPlan(tuple(100 if i == first else 0 for i in range(n)),
                            tuple(t > 0 for t in total))
        loads = [t * 100 // hosts for t in total]
        loads[next(i for i, t in enumerate(total) if t > 0)] += 100 - sum(loads)
        return LoadPlan(tuple(loads), panic)
    if total_health == 0:  # no hosts at all
        return LoadPlan((100,) + (0,) * (n - 1), (False,) * n)
    loads = [h * 100 // total_health for h in health]
    remainder = 100 - sum(loads)
    first_healthy = next(i for i, h in enumerate(health) if h > 0)
    loads[first_healthy] += remainder
    return LoadPlan(tuple(loads), panic)


def cluster_shares(loads: Sequence[int], levels: Sequence[Sequence[str]]) -> dict[str, float]:
    """Expected percent of new connections per cluster: each level's load divided evenly
    over the hosts chosen from in that level (`levels[i]`: the cluster of each such host),
    as round robin does; least-connections follows it on average."""
    shares: dict[str, float] = {}
    for load, clusters in zip(loads, levels, strict=False):
        if not load or not clusters:
            continue
        each = load / len(clusters)
        for cluster in clusters:
            shares[cluster] = shares.get(cluster, 0.0) + each
    return {c: round(v, 1) for c, v in sorted(shares.items())}


def choose_level(loads: Sequence[int], roll: int) -> int:
    """The level a roll in [0, 100) lands in, by cumulative load."""
    acc = 0
    for i, load in enumerate(loads):
        acc += load
        if roll < acc:
            return i
    return len(loads) - 1


H = TypeVar("H")


def pick_round_robin(hosts: Sequence[H], counter: int) -> H:
    """The host at `counter` modulo the level's size (the caller advances the counter)."""
    return hosts[counter % len(hosts)]


def pick_least_connections(
    hosts: Sequence[H], active: Callable[[H], int], randbelow: Callable[[int], int]
) -> H:
    """Power of two choices: two distinct random hosts, the one with fewer active connections."""
    n = len(hosts)
    if n == 1:
        return hosts[0]
    i = randbelow(n)
    j = randbelow(n - 1)
    if j >= i:
        j += 1
    a, b = hosts[i], hosts[j]
    return b if active(b) < active(a) else a


class AffinityTable:
    """sessionAffinity ClientIP: client IP → endpoint key, for `timeout_s` since last use.

    As kube-proxy's `recent` match, every connection refreshes the entry; an entry whose
    endpoint is no longer usable is forgotten by the caller. Bounded: beyond `max_entries`
    the least recently used entry is evicted.
    """

    __slots__ = ("_clock", "_entries", "max_entries", "timeout_s")

    def __init__(self, timeout_s: float, clock: Callable[[], float], max_entries: int = 65536):
        self.timeout_s = timeout_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[tuple[str, int], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, client_ip: str) -> tuple[str, int] | None:
        """The endpoint this client is stuck to, or None when unknown or expired."""
        entry = self._entries.get(client_ip)
        if entry is None:
            return None
        key, expires = entry
        if self._clock() >= expires:
            del self._entries[client_ip]
            return None
        return key

    def remember(self, client_ip: str, key: tuple[str, int]) -> None:
        entries = self._entries
        entries[client_ip] = (key, self._clock() + self.timeout_s)
        entries.move_to_end(client_ip)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def forget(self, client_ip: str) -> None:
        self._entries.pop(client_ip, None)
