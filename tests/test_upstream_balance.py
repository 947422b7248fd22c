"""The load-balancing arithmetic as tables: eligibility, priorities, spill, panic, picks."""

from __future__ import annotations

import itertools
import random

import pytest
from _pytest.mark import ParameterSet
from hypothesis import given, settings
from hypothesis import strategies as st

from mcsproxy.manifests import parse_endpoint_slice
from mcsproxy.model import Endpoint, EndpointPort, ImportedService, ServiceKey, ServicePort
from mcsproxy.upstream.balance import (
    AffinityTable,
    LoadPlan,
    Target,
    choose_level,
    eligible_targets,
    level_health,
    pick_least_connections,
    pick_round_robin,
    priority_load,
    priority_of,
)

HTTP = ServicePort("http", "TCP", 80)
DNS = ServicePort("dns", "UDP", 53)


def ep(address: str, cluster: str = "a", *, ready: bool = True, serving: bool | None = None,
       terminating: bool = False, ports: tuple[EndpointPort, ...] | None = None) -> Endpoint:
    return Endpoint(
        address=address, addresses=(address,), family=4, cluster=cluster,
        ports=ports if ports is not None else (EndpointPort("http", "TCP", 8080),),
        ready=ready, serving=ready if serving is None else serving, terminating=terminating,
    )


def parsed(address: str, cluster: str = "a", **conditions: bool) -> Endpoint:
    """An endpoint through the EndpointSlice parser; a condition left out is nil."""
    spec = parse_endpoint_slice({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"s-{cluster}", "namespace": "ns", "labels": {
            "multicluster.kubernetes.io/service-name": "s",
            "multicluster.kubernetes.io/source-cluster": cluster}},
        "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [address], "conditions": conditions}],
    })
    assert spec is not None
    return spec.endpoints[0]


# kube-proxy (pkg/proxy endpointslicecache.go, topology.go): nil ready and nil serving are
# true, nil terminating is false; ready endpoints are used, and only when none is ready the
# serving-and-terminating ones. (ready, serving, terminating) with None for nil → "ready",
# "fallback" or "never".
CONDITIONS: dict[tuple[bool | None, bool | None, bool | None], str] = {
    (None, None, None): "ready", (None, None, False): "ready", (None, None, True): "ready",
    (None, False, None): "ready", (None, False, False): "ready", (None, False, True): "ready",
    (None, True, None): "ready", (None, True, False): "ready", (None, True, True): "ready",
    (True, None, None): "ready", (True, None, False): "ready", (True, None, True): "ready",
    (True, False, None): "ready", (True, False, False): "ready", (True, False, True): "ready",
    (True, True, None): "ready", (True, True, False): "ready", (True, True, True): "ready",
    (False, None, None): "never", (False, None, False): "never",
    (False, None, True): "fallback",  # nil serving is true, not "as ready"
    (False, False, None): "never", (False, False, False): "never",
    (False, False, True): "never",
    (False, True, None): "never", (False, True, False): "never",  # starting, not draining
    (False, True, True): "fallback",
}
assert set(CONDITIONS) == set(itertools.product((None, True, False), repeat=3))


def condition_rows() -> list[ParameterSet]:
    """Per combination: beside a ready endpoint of another cluster, and beside nothing
    usable (a not-ready endpoint that is not terminating)."""
    rows: list[ParameterSet] = []
    for (r, s, t), use in CONDITIONS.items():
        name = "/".join(f"{k}={'nil' if v is None else v}"
                        for k, v in (("ready", r), ("serving", s), ("terminating", t)))
        conds = {k: v for k, v in (("ready", r), ("serving", s), ("terminating", t))
                 if v is not None}
        me = parsed("10.1.0.1", **conds)
        mine = [("10.1.0.1", 8080, "a", use == "ready")]
        rows.append(pytest.param(
            (me, ep("10.2.0.1", "b")),
            (mine if use == "ready" else []) + [("10.2.0.1", 8080, "b", True)],
            id=f"{name}+ready"))
        idle = parsed("10.3.0.1", "b", ready=False, serving=True, terminating=False)
        rows.append(pytest.param((me, idle), mine if use != "never" else [],
                                 id=f"{name}+not-ready"))
    return rows


def svc(*endpoints: Endpoint) -> ImportedService:
    return ImportedService(ServiceKey("ns", "s"), "ClusterSetIP", ("127.240.0.1",), (HTTP,),
                           endpoints=endpoints)


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        # ready ones only, port matched by name: service port 80 → endpoint port 8080
        ((ep("10.0.0.1"), ep("10.0.0.2", "b", ready=False, serving=False)),
         [("10.0.0.1", 8080, "a", True)]),
        # a terminating-but-serving endpoint is not used while a ready one exists
        ((ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=True, terminating=True)),
         [("10.0.0.1", 8080, "a", True)]),
        # ... but is, when nothing is ready (kube-proxy's fallback)
        ((ep("10.0.0.2", ready=False, serving=True, terminating=True),
          ep("10.0.0.3", ready=False, serving=False)),
         [("10.0.0.2", 8080, "a", False)]),
        # a slice without a port of that name (or with the wrong protocol) contributes nothing
        ((ep("10.0.0.4", ports=(EndpointPort("metrics", "TCP", 9090),)),
          ep("10.0.0.5", ports=(EndpointPort("http", "UDP", 8080),))), []),
        # duplicates collapse
        ((ep("10.0.0.1"), ep("10.0.0.1", "b")), [("10.0.0.1", 8080, "a", True)]),
        # per service, not per cluster: a ready remote endpoint beats a terminating local one
        ((ep("10.0.0.2", "a", ready=False, serving=True, terminating=True), ep("10.0.0.6", "b")),
         [("10.0.0.6", 8080, "b", True)]),
        ((), []),
        *condition_rows(),
    ],
)
def test_eligible_targets(endpoints: tuple[Endpoint, ...], expected: list[tuple]) -> None:
    assert [tuple(t) for t in eligible_targets(svc(*endpoints), HTTP)] == expected


def test_eligible_targets_port_numbers_differ_per_cluster() -> None:
    a = ep("10.0.0.1", "a", ports=(EndpointPort("http", "TCP", 8080),))
    b = ep("10.0.1.1", "b", ports=(EndpointPort("http", "TCP", 9000),
                                   EndpointPort("", "TCP", 1)))
    assert eligible_targets(svc(a, b), HTTP) == (
        Target("10.0.0.1", 8080, "a", True), Target("10.0.1.1", 9000, "b", True))
    assert eligible_targets(svc(a, b), DNS) == ()


@pytest.mark.parametrize(
    ("cluster", "locality", "level"),
    [("east", "spread", 0), ("west", "spread", 0), ("east", "local-first", 0),
     ("west", "local-first", 1)],
)
def test_priority_of(cluster: str, locality: str, level: int) -> None:
    assert priority_of(cluster, "east", locality) == level  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("healthy", "total", "health"),
    [(10, 10, 100), (72, 100, 100), (71, 100, 99), (5, 10, 70), (0, 10, 0), (0, 0, 0),
     (1, 3, 46)],
)
def test_level_health(healthy: int, total: int, health: int) -> None:
    assert level_health(healthy, total, 1.4) == health


# Envoy's documented table (healthy % of P0 and P1 → load and panic per level); the one
# row that differs from the docs' rounded 7 %/93 % follows Envoy's code, which gives the
# rounding remainder to the first level with health.
@pytest.mark.parametrize(
    ("healthy", "total", "loads", "panic"),
    [
        ((100, 100), (100, 100), (100, 0), (False, False)),
        ((72, 72), (100, 100), (100, 0), (False, False)),
        ((71, 71), (100, 100), (99, 1), (False, False)),
        ((50, 60), (100, 100), (70, 30), (False, False)),
        ((25, 100), (100, 100), (35, 65), (False, False)),
        ((25, 25), (100, 100), (50, 50), (True, True)),
        ((5, 65), (100, 100), (8, 92), (True, False)),
        # every level in panic: load by host count, not health (Envoy's total panic)
        ((0, 0), (2, 3), (40, 60), (True, True)),
        ((0, 0), (1, 9), (10, 90), (True, True)),
        ((3, 0), (10, 2), (84, 16), (True, True)),
        ((1, 0, 0), (4, 0, 2), (67, 0, 33), (True, False, True)),  # empty counts as panic
        # no local endpoints at all: the remote level carries everything, no panic
        ((0, 3), (0, 3), (0, 100), (False, False)),
        # local cluster fully down, remote healthy: clean failover, no panic
        ((0, 2), (2, 2), (0, 100), (False, False)),
        # local-first with two healthy local endpoints of three: 93 % local, 7 % spill
        ((2, 2), (3, 2), (93, 7), (False, False)),
        # one level (spread) at 40 % healthy: all load there, in panic
        ((2,), (5,), (100,), (True,)),
        ((3, 0, 4), (3, 0, 4), (100, 0, 0), (False, False, False)),
        ((1, 0, 4), (4, 0, 4), (35, 0, 65), (False, False, False)),
        ((), (), (), ()),
    ],
)
def test_priority_load(healthy: tuple[int, ...], total: tuple[int, ...],
                       loads: tuple[int, ...], panic: tuple[bool, ...]) -> None:
    plan = priority_load(healthy, total, 1.4, 50)
    assert plan == LoadPlan(loads, panic)
    if loads:
        assert sum(plan.loads) == 100


def test_priority_load_factor_and_threshold_are_parameters() -> None:
    # Without overprovisioning 90 % health keeps only 90 % of the load local.
    assert priority_load((9, 10), (10, 10), 1.0, 50).loads == (90, 10)
    # A panic threshold of 0 never panics; health alone decides.
    assert priority_load((1, 1), (10, 10), 1.4, 0).panic == (False, False)
    assert priority_load((3, 0), (10, 2), 1.4, 0) == LoadPlan((100, 0), (False, False))
    # ...until nothing is healthy: the first level with hosts, over all of them.
    assert priority_load((0, 0), (0, 3), 1.4, 0) == LoadPlan((0, 100), (False, True))
    with pytest.raises(ValueError):
        priority_load((1,), (1, 2))


def envoy_priority_load(healthy: list[int], total: list[int], factor: int,
                        threshold: int) -> LoadPlan:
    """Envoy's LoadBalancerBase (recalculatePerPriorityState, recalculatePerPriorityPanic,
    recalculateLoadInTotalPanic) without degraded hosts, written out step by step: the
    reference priority_load is checked against."""
    n = len(total)
    health = [min(100, factor * h // t) if t else 0 for h, t in zip(healthy, total, strict=True)]
    normalized = min(100, sum(health))
    loads = [0] * n
    if normalized:
        left, first = 100, next(i for i, h in enumerate(health) if h)
        for i in range(n):
            loads[i] = min(left, health[i] * 100 // normalized)
            left -= loads[i]
        loads[first] += left
    panic = [normalized != 100 and (100.0 * h / t if t else 0.0) < threshold
             for h, t in zip(healthy, total, strict=True)]
    if all(panic):
        hosts = sum(total)
        loads = [100 * t // hosts for t in total]
        loads[next(i for i, t in enumerate(total) if t)] += 100 - sum(loads)
    # Envoy reports panic per host set; a level without hosts has none to balance over.
    return LoadPlan(tuple(loads), tuple(p and t > 0 for p, t in zip(panic, total, strict=True)))


@st.composite
def level_counts(draw: st.DrawFn) -> tuple[list[int], list[int], float, int]:
    total = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4).filter(any))
    healthy = [draw(st.integers(0, t)) for t in total]
    factor = draw(st.sampled_from([1.0, 1.4, 2.0]))
    threshold = draw(st.sampled_from([0, 1, 50, 70, 100]))
    return healthy, total, factor, threshold


@settings(max_examples=500, deadline=None)
@given(level_counts())
def test_priority_load_is_envoys(counts: tuple[list[int], list[int], float, int]) -> None:
    healthy, total, factor, threshold = counts
    plan = priority_load(healthy, total, factor, threshold)
    assert sum(plan.loads) == 100
    if threshold == 0 and not any(healthy):
        # Envoy's own corner case (panic off, nothing healthy) sends everything to P0
        # and then fails every request; ours balances over the first level with hosts.
        first = next(i for i, t in enumerate(total) if t)
        assert plan.loads[first] == 100 and plan.panic == tuple(t > 0 for t in total)
        return
    assert plan == envoy_priority_load(healthy, total, round(factor * 100), threshold)


@pytest.mark.parametrize(("loads", "roll", "level"),
                         [((100, 0), 0, 0), ((100, 0), 99, 0), ((93, 7), 92, 0),
                          ((93, 7), 93, 1), ((0, 100), 0, 1), ((35, 0, 65), 35, 2)])
def test_choose_level(loads: tuple[int, ...], roll: int, level: int) -> None:
    assert choose_level(loads, roll) == level


def test_round_robin_visits_every_host_in_turn() -> None:
    hosts = ["a", "b", "c"]
    assert [pick_round_robin(hosts, i) for i in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_connections_never_picks_the_busier_of_two() -> None:
    active = {"idle": 0, "busy": 100}
    rng = random.Random(1)
    picks = [pick_least_connections(["idle", "busy"], active.__getitem__, rng.randrange)
             for _ in range(50)]
    assert set(picks) == {"idle"}
    # with three hosts the busiest is never chosen, the other two are both used
    active3 = {"a": 1, "b": 1, "c": 9}
    picks3 = {pick_least_connections(["a", "b", "c"], active3.__getitem__, rng.randrange)
              for _ in range(200)}
    assert picks3 == {"a", "b"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_affinity_sticks_refreshes_and_expires() -> None:
    clock = FakeClock()
    table = AffinityTable(10, clock)
    table.remember("1.1.1.1", ("10.0.0.1", 80))
    clock.now += 9
    assert table.get("1.1.1.1") == ("10.0.0.1", 80)
    table.remember("1.1.1.1", ("10.0.0.1", 80))  # use refreshes the timeout
    clock.now += 9
    assert table.get("1.1.1.1") == ("10.0.0.1", 80)
    clock.now += 10
    assert table.get("1.1.1.1") is None
    assert len(table) == 0


def test_affinity_table_is_bounded_lru() -> None:
    table = AffinityTable(10, FakeClock(), max_entries=2)
    table.remember("a", ("x", 1))
    table.remember("b", ("x", 2))
    table.remember("a", ("x", 1))
    table.remember("c", ("x", 3))
    assert (table.get("a"), table.get("b"), table.get("c")) == (("x", 1), None, ("x", 3))
