"""UpstreamSet: picks, failover order, ejection, affinity and drain on a fake clock."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcsproxy.config import HealthConfig, OutlierConfig, ProxyConfig
from mcsproxy.upstream import Target, UpstreamSet
from tests.proxy_fixtures import traced_bytes_each

HC = HealthConfig(healthy_threshold=2, unhealthy_threshold=3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Conn:
    def __init__(self) -> None:
        self.aborted = False
        self.aborted_event = asyncio.Event()
        self.told_silent = False

    def abort(self) -> None:
        self.aborted = True
        self.aborted_event.set()

    def cluster_silent(self, waited_s: float = 0.0) -> None:
        if not waited_s:  # for another endpoint of the cluster: its own wait decides
            self.told_silent = True


def targets(spec: dict[str, int]) -> list[Target]:
    """{'east': 2, 'west': 1} → endpoints 127.0.1.1-2 (east), 127.0.2.1 (west)."""
    out = []
    for ci, (cluster, n) in enumerate(spec.items(), start=1):
        out += [Target(f"127.0.{ci}.{i}", 8080, cluster, True) for i in range(1, n + 1)]
    return out


def make(spec: dict[str, int], locality: str = "spread", **cfg: object) -> UpstreamSet:
    clock = FakeClock()
    config = ProxyConfig(**cfg)  # type: ignore[arg-type]
    u = UpstreamSet("ns/s:http", "east", config, locality=locality,  # type: ignore[arg-type]
                    clock=clock, rng=random.Random(7))
    u.update(targets(spec))
    return u


def clusters(u: UpstreamSet, n: int = 100) -> Counter[str]:
    return Counter(u.pick().cluster for _ in range(n))  # type: ignore[union-attr]


def test_spread_round_robin_reaches_every_endpoint_evenly() -> None:
    u = make({"east": 2, "west": 2, "north": 1})
    picks = Counter(u.pick().key for _ in range(100))  # type: ignore[union-attr]
    assert len(picks) == 5 and set(picks.values()) == {20}


def test_local_first_stays_local_then_spills_by_health() -> None:
    u = make({"east": 3, "west": 3}, "local-first")
    assert clusters(u) == {"east": 100}
    east = [h for h in u.hosts.values() if h.cluster == "east"]
    for _ in range(3):
        u.health_result(east[0], "refused", HC)
    assert u.plan.loads == (93, 7)
    for host in east[1:]:
        for _ in range(3):
            u.health_result(host, "refused", HC)
    assert u.plan.loads == (0, 100)
    assert clusters(u) == {"west": 100}
    for host in east:
        for _ in range(2):
            u.health_result(host, None, HC)
    assert clusters(u) == {"east": 100}


def test_health_thresholds_need_consecutive_results() -> None:
    u = make({"east": 1})
    host = next(iter(u.hosts.values()))
    u.health_result(host, "refused", HC)
    u.health_result(host, "refused", HC)
    u.health_result(host, None, HC)  # a success breaks the streak
    u.health_result(host, "refused", HC)
    u.health_result(host, "refused", HC)
    assert host.healthy
    u.health_result(host, "refused", HC)
    assert not host.healthy
    u.health_result(host, None, HC)
    assert not host.healthy
    u.health_result(host, None, HC)
    assert host.healthy


def test_exclude_tries_rest_of_level_then_other_cluster_then_anything() -> None:
    u = make({"east": 2, "west": 1}, "local-first")
    first = u.pick()
    assert first is not None and first.cluster == "east"
    second = u.pick(exclude={first})
    assert second is not None and second.cluster == "east" and second is not first
    third = u.pick(exclude={first, second})
    assert third is not None and third.cluster == "west"
    assert u.pick(exclude={first, second, third}) is None


def test_the_last_try_leaves_the_tried_clusters_while_one_is_healthy() -> None:
    u = make({"east": 3, "west": 1}, "local-first")
    east = [h for h in u.hosts.values() if h.cluster == "east"]
    west = next(h for h in u.hosts.values() if h.cluster == "west")
    assert u.pick(exclude=east[:2]) is east[2]  # tries left: the rest of the level first
    assert u.pick(exclude=east[:2], last_try=True) is west
    assert u.pick(exclude=east[:1], last_try=True) is west
    for _ in range(3):
        u.health_result(west, "timeout", HC)
    # no healthy host elsewhere: the last try stays where the ordinary order leads
    assert u.pick(exclude=east[:2], last_try=True) is east[2]
    assert u.pick(exclude=[*east, west], last_try=True) is None


def test_spread_retry_leaves_the_tried_cluster_first() -> None:
    u = make({"east": 2, "west": 2, "central": 2})
    for _ in range(30):
        first = u.pick()
        assert first is not None
        second = u.pick(exclude={first})
        assert second is not None and second.cluster != first.cluster
        third = u.pick(exclude={first, second})
        assert third is not None and third.cluster not in (first.cluster, second.cluster)
        # every cluster tried once: the pods left are used before giving up
        fourth = u.pick(exclude={first, second, third})
        assert fourth is not None and fourth not in (first, second, third)


def test_exclude_falls_back_to_unhealthy_hosts_last() -> None:
    u = make({"east": 1, "west": 1}, "local-first")
    west = next(h for h in u.hosts.values() if h.cluster == "west")
    for _ in range(3):
        u.health_result(west, "timeout", HC)
    east = u.pick()
    assert east is not None and east.cluster == "east"
    assert u.pick(exclude={east}) is west


def test_outlier_ejection_time_grows_and_is_capped() -> None:
    u = make({"east": 4}, outlier=OutlierConfig(consecutive_failures=2, base_ejection_s=10,
                                                max_ejection_s=25, max_ejection_percent=50))
    clock = u._clock
    assert isinstance(clock, FakeClock)
    host = next(iter(u.hosts.values()))
    durations = []
    for _ in range(4):
        u.connect_failed(host, "refused")
        u.connect_failed(host, "refused")
        assert host.ejected
        assert all(u.pick() is not host for _ in range(12))
        durations.append(host.ejected_until - clock.now)
        clock.now = host.ejected_until
        u.pick()  # expiry is noticed on the next pick
        assert host.healthy
    assert durations == [10, 20, 25, 25]


def test_time_in_service_shortens_the_next_ejection_again() -> None:
    """As Envoy's multiplier: ejections in a row grow, each base ejection time in service
    takes one step off. It only grew: after three faults days apart, the next lost SYN
    ejected the endpoint for the cap instead of the base time."""
    u = make(
        {"east": 4},
        outlier=OutlierConfig(
            consecutive_failures=1, base_ejection_s=10, max_ejection_s=300, max_ejection_percent=50
        ),
    )
    clock = u._clock
    assert isinstance(clock, FakeClock)
    host = next(iter(u.hosts.values()))

    def eject_after(in_service_s: float) -> float:
        clock.now += in_service_s
        u.connect_failed(host, "refused")
        assert host.ejected
        duration = host.ejected_until - clock.now
        clock.now = host.ejected_until
        u.expire_due()
        assert host.healthy
        return duration

    assert [eject_after(0) for _ in range(3)] == [10, 20, 30]
    assert eject_after(25) == 20  # two steps off, one on
    assert eject_after(86400) == 10  # a day later: a first ejection again
    assert host.times_ejected == 5  # what the admin page shows still counts them all


def test_an_ejection_ends_on_time_for_readers_when_no_connection_comes() -> None:
    """Only pick() used to end an ejection: with no connection after it ran out, the
    split, the plan and the seconds left that the admin, metrics, status page and explain
    read still showed the endpoint out (a local-first service 30 % spilled for good)."""
    u = make({"east": 2, "west": 2}, locality="local-first",
             outlier=OutlierConfig(consecutive_failures=1, base_ejection_s=10))
    clock = u._clock
    assert isinstance(clock, FakeClock)
    host = u.hosts[("127.0.1.1", 8080)]
    u.connect_failed(host, "refused")
    assert u.split() == {"east": 70.0, "west": 30.0}
    clock.now += 4
    assert u.split() == {"east": 70.0, "west": 30.0}
    clock.now += 6
    assert u.split() == {"east": 100.0}
    assert not host.ejected and host.healthy
    assert u.plan.loads == (100, 0)
    assert u.snapshot_state()["loads"] == [100, 0]


def test_the_seconds_left_of_an_ejection_are_read_on_the_sets_clock() -> None:
    u = make({"east": 2}, outlier=OutlierConfig(consecutive_failures=1, base_ejection_s=10))
    clock = u._clock
    assert isinstance(clock, FakeClock)
    host = u.hosts[("127.0.1.1", 8080)]
    u.connect_failed(host, "refused")
    clock.now += 4
    assert u.ejected_for_s(host) == 6
    clock.now += 6
    assert u.ejected_for_s(host) == 0.0


def test_an_ejection_that_ran_out_does_not_hold_back_the_next() -> None:
    """With one ejection allowed at a time, one that ran out while no pick came still
    counted, so the next failing endpoint stayed in."""
    u = make({"east": 4}, outlier=OutlierConfig(consecutive_failures=1, base_ejection_s=10,
                                                max_ejection_percent=25))
    clock = u._clock
    assert isinstance(clock, FakeClock)
    first, second = u.hosts[("127.0.1.1", 8080)], u.hosts[("127.0.1.2", 8080)]
    u.connect_failed(first, "refused")
    u.connect_failed(second, "refused")
    assert first.ejected and not second.ejected  # 25 %: one of four
    clock.now += 10
    u.connect_failed(second, "refused")
    assert not first.ejected and second.ejected


def test_success_resets_the_failure_count() -> None:
    u = make({"east": 2}, outlier=OutlierConfig(consecutive_failures=2))
    host = next(iter(u.hosts.values()))
    u.connect_failed(host, "refused")
    u.connect_ok(host, Conn())
    u.connect_failed(host, "refused")
    assert not host.ejected
    u.response_status(host, 503)
    assert host.ejected


def test_a_connect_timeout_from_a_silent_cluster_ejects_at_once() -> None:
    u = make({"east": 2, "west": 2}, connect_timeout_s=1.0)
    clock = u._clock
    assert isinstance(clock, FakeClock)
    east = [h for h in u.hosts.values() if h.cluster == "east"]
    west = [h for h in u.hosts.values() if h.cluster == "west"]
    for h in (*east, *west):
        u.connect_ok(h, Conn())
    clock.now += 0.5
    u.connect_ok(east[1], Conn())  # east answered while east[0]'s connect waited
    clock.now += 0.6
    u.connect_failed(east[0], "timeout")
    assert not east[0].ejected and east[0].consecutive_failures == 1  # a lost SYN
    u.connect_failed(west[0], "timeout")
    assert west[0].ejected  # nothing in west answered for the whole wait
    assert west[0].stats.attempts["timeout"] == 1
    u.connect_failed(west[1], "connect timeout")  # the HTTP proxy's word for it
    assert west[1].ejected and west[1].stats.attempts["timeout"] == 2
    u.connect_failed(east[0], "timeout")  # east[1] answered within this wait too
    assert not east[0].ejected and east[0].consecutive_failures == 2
    assert [u.pick().cluster for _ in range(4)] == ["east"] * 4  # type: ignore[union-attr]


def test_one_lost_syn_on_a_quiet_service_is_one_failure_not_a_partition() -> None:
    """No connection open, nothing else connecting: a single connect timeout (Linux's
    first SYN retransmission comes after 1 s) ejected the endpoint for 30 s at once, as
    if its cluster were partitioned. A second timeout with nothing answering since the
    first is that evidence."""
    u = make({"east": 2, "west": 1}, connect_timeout_s=1.0)
    clock = u._clock
    assert isinstance(clock, FakeClock)
    west = u.hosts[("127.0.2.1", 8080)]
    u.health_result(west, None, HC)  # its last probe passed...
    clock.now += 3  # ...3 s ago, and no client came since
    u.connect_failed(west, "timeout")
    assert not west.ejected and west.consecutive_failures == 1
    clock.now += 2
    u.health_result(west, None, HC)  # it answered since: that was one lost SYN
    clock.now += 2
    u.connect_failed(west, "timeout")
    assert not west.ejected and west.consecutive_failures == 2
    clock.now += 4  # nothing answered since that timeout: partitioned
    u.connect_failed(west, "timeout")
    assert west.ejected
    u = make({"east": 1, "west": 1}, connect_timeout_s=1.0)
    west = u.hosts[("127.0.2.1", 8080)]
    u.connect_failed(west, "timeout (per try)")  # an HTTP request unanswered all along
    assert west.ejected
    u.update(targets({"east": 1}))  # west leaves while a connect to it is under way
    u.connect_failed(west, "timeout")  # its timeout: no host of west is left in the set
    assert west.consecutive_failures == 2


def test_one_unanswered_udp_flow_on_a_quiet_service_is_not_a_partition() -> None:
    """A UDP flow open to the endpoint is no evidence of its own: one lost datagram on a
    quiet service is a lost SYN's like. A second with nothing answering since, or
    another flow open to the cluster, is."""
    u = make({"east": 1, "west": 1}, connect_timeout_s=1.0)
    clock = u._clock
    assert isinstance(clock, FakeClock)
    east, west = u.hosts[("127.0.1.1", 8080)], u.hosts[("127.0.2.1", 8080)]
    u.answered(west)  # the service does reply
    u.answered(east)
    flow = Conn()
    u.connect_ok(east, flow, reset_failures=False)
    clock.now += 3
    assert not u.flow_unanswered(east, flow) and not east.ejected
    clock.now += 2
    assert u.flow_unanswered(east, flow) and east.ejected  # nothing answered since
    assert east.stats.attempts["timeout"] == 1
    u = make({"east": 1, "west": 1}, connect_timeout_s=1.0)
    clock = u._clock
    assert isinstance(clock, FakeClock)
    east, west = u.hosts[("127.0.1.1", 8080)], u.hosts[("127.0.2.1", 8080)]
    u.answered(west)
    flow, other = Conn(), Conn()
    u.connect_ok(east, flow, reset_failures=False)
    u.connect_ok(east, other, reset_failures=False)
    clock.now += 3
    assert u.flow_unanswered(east, flow) and east.ejected  # another flow waits there too


def test_a_silent_cluster_tells_the_ejected_endpoints_connections() -> None:
    u = make({"east": 2, "west": 2}, connect_timeout_s=1.0)
    clock = u._clock
    assert isinstance(clock, FakeClock)
    east = [h for h in u.hosts.values() if h.cluster == "east"]
    on_ejected, on_sibling = Conn(), Conn()
    u.connect_ok(east[0], on_ejected, reset_failures=False)  # HTTP: no sign of life yet
    u.connect_ok(east[1], on_sibling, reset_failures=False)
    u.connect_failed(east[0], "timeout (per try)")  # a response timeout counts the same
    assert east[0].ejected and on_ejected.told_silent and not on_sibling.told_silent
    clock.now += 0.5
    u.response_status(east[1], 200)
    u.connect_failed(east[1], "timeout")
    assert not east[1].ejected and not on_sibling.told_silent  # east answered just now
    west = [h for h in u.hosts.values() if h.cluster == "west"]
    u.health_result(west[1], None, HC)  # a probe that passed is an answer too
    u.connect_failed(west[0], "timeout")
    assert not west[0].ejected


def test_a_silent_cluster_leaves_the_connections_of_an_endpoint_kept_in_alone() -> None:
    """Told the cluster was silent, the HTTP proxy fails a request still waiting for its
    answer and retries it: right for an ejected endpoint, but one that
    max_ejection_percent keeps in is still used, and its slow answers are answers (a sole
    endpoint's 3 s request got a 502 after 1.5 s, the endpoint never ejected)."""
    u = make({"east": 1, "west": 1}, connect_timeout_s=1.0)  # 50 %: one of two at most
    east, west = u.hosts[("127.0.1.1", 8080)], u.hosts[("127.0.2.1", 8080)]
    on_east, on_west = Conn(), Conn()
    u.connect_ok(east, on_east, reset_failures=False)
    u.connect_ok(west, on_west, reset_failures=False)
    u.connect_failed(west, "timeout")
    assert west.ejected and on_west.told_silent
    u.connect_failed(east, "timeout")
    assert not east.ejected and not on_east.told_silent


def test_a_silent_cluster_is_not_ejected_with_outlier_ejection_off() -> None:
    u = make({"east": 1}, outlier=OutlierConfig(consecutive_failures=0))
    host = next(iter(u.hosts.values()))
    u.connect_failed(host, "timeout")
    assert not host.ejected and u.pick() is host


def test_max_ejection_percent_bounds_ejections(caplog: pytest.LogCaptureFixture) -> None:
    u = make({"east": 4}, outlier=OutlierConfig(consecutive_failures=1, max_ejection_percent=50))
    hosts = list(u.hosts.values())
    with caplog.at_level(logging.WARNING, "mcsproxy.upstream"):
        for h in hosts:
            u.connect_failed(h, "refused")
    assert sum(h.ejected for h in hosts) == 2
    assert sum("not ejected" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(("hosts", "percent", "ejectable"), [
    (4, 50, 2), (3, 50, 1), (5, 50, 2), (10, 25, 2), (1, 50, 0), (1, 100, 1), (2, 50, 1),
])
def test_max_ejection_percent_is_never_exceeded(hosts: int, percent: int,
                                                ejectable: int) -> None:
    u = make({"east": hosts}, outlier=OutlierConfig(consecutive_failures=1,
                                                    max_ejection_percent=percent))
    for h in list(u.hosts.values()):
        u.connect_failed(h, "refused")
    assert sum(h.ejected for h in u.hosts.values()) == ejectable


def test_an_endpoint_back_from_draining_still_returns_from_its_ejection() -> None:
    u = make({"east": 2}, outlier=OutlierConfig(consecutive_failures=1, base_ejection_s=30))
    clock = u._clock
    assert isinstance(clock, FakeClock)
    host = u.hosts[("127.0.1.1", 8080)]
    u.connect_ok(host, Conn())  # keeps it draining when removed
    u.connect_failed(host, "refused")
    assert host.ejected
    u.update([t for t in targets({"east": 2}) if t.address != "127.0.1.1"])
    clock.now += 31  # its ejection runs out while it is gone
    u.pick()
    u.update(targets({"east": 2}))
    assert u.hosts[("127.0.1.1", 8080)] is host
    u.pick()
    assert host.healthy and ("127.0.1.1", 8080) in {u.pick().key for _ in range(4)}  # type: ignore[union-attr]


def test_affinity_holds_in_panic() -> None:
    # Every endpoint fails its active checks: the level is in panic and pick chooses among
    # all of them, so a client must still stay on one.
    u = make({"east": 3})
    u.update(targets({"east": 3}), affinity_timeout_s=60)
    for h in list(u.hosts.values()):
        for _ in range(3):
            u.health_result(h, "refused", HC)
    assert u.plan.panic == (True,)
    assert len({u.pick("10.0.0.7") for _ in range(12)}) == 1


def test_affinity_follows_local_first_back_to_the_local_cluster() -> None:
    """Clients that spilled to west while east was down stayed there (8 of 8, their
    affinity refreshed by each connection) once east was healthy and took 100 %."""
    u = make({"east": 2, "west": 1}, locality="local-first")
    u.update(targets({"east": 2, "west": 1}), affinity_timeout_s=10800)
    east = [h for h in u.hosts.values() if h.cluster == "east"]

    def health(host: object, failure: str | None) -> None:
        for _ in range(3):
            u.health_result(host, failure, HC)  # type: ignore[arg-type]

    for h in east:
        health(h, "refused")
    assert u.plan.loads == (0, 100)
    west = u.pick("10.0.0.7")
    assert west is not None and west.cluster == "west"
    health(east[0], None)
    assert u.plan.loads == (70, 30)  # west still takes load: the client stays
    assert all(u.pick("10.0.0.7") is west for _ in range(8))
    health(east[1], None)
    assert u.plan.loads == (100, 0)  # west takes none: the client comes home
    home = u.pick("10.0.0.7")
    assert home in east and all(u.pick("10.0.0.7") is home for _ in range(8))


def test_affinity_sticks_until_timeout_and_leaves_an_unhealthy_host() -> None:
    u = make({"east": 3})
    u.update(targets({"east": 3}), affinity_timeout_s=60)
    clock = u._clock
    assert isinstance(clock, FakeClock)
    first = u.pick("10.1.1.1")
    assert all(u.pick("10.1.1.1") is first for _ in range(20))
    others = {u.pick("10.9.9.9") for _ in range(1)} | {u.pick() for _ in range(5)}
    assert len(others | {first}) > 1
    clock.now += 59
    assert u.pick("10.1.1.1") is first  # each use refreshes the timer
    clock.now += 61
    after = [u.pick("10.1.1.1") for _ in range(3)]
    assert after[0] is after[1] is after[2]  # a new stickiness, not necessarily the same
    assert first is not None
    for _ in range(3):
        u.health_result(after[0], "refused", HC)  # type: ignore[arg-type]
    moved = u.pick("10.1.1.1")
    assert moved is not after[0] and u.pick("10.1.1.1") is moved


def test_update_keeps_state_and_removed_hosts_get_nothing_new() -> None:
    u = make({"east": 2, "west": 1})
    east1 = u.hosts[("127.0.1.1", 8080)]
    east1.times_ejected = 3
    conn = Conn()
    u.connect_ok(east1, conn)
    u.update(targets({"east": 2}))
    assert u.hosts[("127.0.1.1", 8080)] is east1 and east1.times_ejected == 3
    west = targets({"east": 0, "west": 1})[0]
    u.update([t for t in targets({"east": 2}) if t.address != "127.0.1.1"])
    assert east1.removed and east1 in u.draining and not conn.aborted
    assert {u.pick().key for _ in range(10)} == {("127.0.1.2", 8080)}  # type: ignore[union-attr]
    u.release(east1, conn)
    assert not u.draining
    assert west.cluster == "west"


async def test_drain_grace_aborts_connections_of_removed_hosts() -> None:
    u = make({"east": 2}, drain_grace_s=0.01)
    host = u.hosts[("127.0.1.1", 8080)]
    conn = Conn()
    u.connect_ok(host, conn)
    u.update(targets({"east": 0, "x": 0}))
    assert not conn.aborted
    await asyncio.wait_for(conn.aborted_event.wait(), 2)


async def test_a_second_removal_gets_a_whole_drain_grace() -> None:
    u = make({"east": 2}, drain_grace_s=0.3)
    host = u.hosts[("127.0.1.1", 8080)]
    conn = Conn()
    u.connect_ok(host, conn)
    gone = [t for t in targets({"east": 2}) if t.address != "127.0.1.1"]
    u.update(gone)
    await asyncio.sleep(0.15)
    u.update(targets({"east": 2}))  # back: the first removal's grace is void
    u.update(gone)
    await asyncio.sleep(0.25)  # past the first grace, within the second
    assert not conn.aborted
    await asyncio.wait_for(conn.aborted_event.wait(), 2)


def test_empty_set_picks_nothing() -> None:
    u = make({})
    assert u.pick() is None and u.pick("1.2.3.4") is None


def test_least_connections_prefers_idle_hosts() -> None:
    u = make({"east": 2}, lb_policy="least-connections")
    busy = u.hosts[("127.0.1.1", 8080)]
    for _ in range(5):
        u.connect_ok(busy, Conn())
    assert {u.pick().key for _ in range(20)} == {("127.0.1.2", 8080)}  # type: ignore[union-attr]


@st.composite
def pick_scenarios(draw: st.DrawFn) -> dict[str, object]:
    sizes = draw(st.lists(st.integers(0, 3), min_size=2, max_size=3))
    spec = dict(zip(("east", "west", "north"), sizes, strict=False))
    n = sum(sizes)
    down = st.sampled_from([False, False, True])  # mostly up: failover has somewhere to go
    return {"spec": spec, "down": draw(st.lists(down, min_size=n, max_size=n)),
            "locality": draw(st.sampled_from(["spread", "local-first"])),
            "threshold": draw(st.sampled_from([0, 50, 100])),
            "tried": draw(st.integers(0, n)), "last_try": draw(st.booleans()),
            "affinity": draw(st.booleans()), "seed": draw(st.integers(0, 1000))}


@settings(max_examples=300, deadline=None)
@given(pick_scenarios())
def test_pick_invariants(sc: dict[str, object]) -> None:
    """Whatever the health, locality, panic threshold and the hosts already tried: never
    a host tried, nothing only when every host was tried, only healthy hosts while no
    level is in panic, the last try away from the tried clusters while one has a healthy
    host, and under local-first a remote host only while the local level takes < 100 %."""
    u = make(sc["spec"], locality=sc["locality"],  # type: ignore[arg-type]
             panic_threshold_percent=sc["threshold"])
    if sc["affinity"]:
        u.update(targets(sc["spec"]), affinity_timeout_s=60)  # type: ignore[arg-type]
    hosts = list(u.hosts.values())
    for host, down in zip(hosts, sc["down"], strict=True):  # type: ignore[call-overload]
        for _ in range(3 if down else 0):
            u.health_result(host, "refused", HC)
    tried = random.Random(sc["seed"]).sample(hosts, sc["tried"])  # type: ignore[arg-type]
    rest = [h for h in hosts if h not in tried]
    tried_clusters = {h.cluster for h in tried}
    for _ in range(4):
        host = u.pick("10.0.0.7", tried, bool(sc["last_try"]))
        if host is None:
            assert not rest
            continue
        assert host not in tried
        if not any(u.plan.panic) and any(h.healthy for h in rest):
            assert host.healthy
        if sc["last_try"] and tried and any(
                h.healthy and h.cluster not in tried_clusters for h in rest):
            assert host.cluster not in tried_clusters
        if sc["locality"] == "local-first" and not tried and host.cluster != "east":
            assert u.plan.loads[0] < 100 or not any(h.cluster == "east" for h in hosts)


def test_endpoints_added_by_one_update_are_logged_in_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    # A line per endpoint made a start with 10,000 services of 30 endpoints write 300,000.
    with caplog.at_level(logging.INFO, "mcsproxy.upstream"):
        u = make({"east": 20, "west": 10})
        u.update(targets({"east": 20, "west": 11}))
    added = [r.getMessage() for r in caplog.records if "added" in r.getMessage()]
    assert added == [
        "upstream ns/s:http: endpoints 127.0.1.1:8080(east) (priority 0), 127.0.1.2:8080(east) "
        "(priority 0), 127.0.1.3:8080(east) (priority 0) added, and 27 more",
        "upstream ns/s:http: endpoint 127.0.2.11:8080(west) (priority 0) added",
    ]


def test_an_endpoint_without_connections_holds_no_set_of_its_own() -> None:
    # bench/results/memory.md: ~720 B per endpoint in its Host, 216 B of them an empty set
    # for connections most endpoints of a big clusterset never get.
    config, rng = ProxyConfig(), random.Random(1)
    spec = {"east": 10, "west": 10, "north": 10}

    def build(i: int) -> UpstreamSet:
        u = UpstreamSet(f"ns/s{i}:http", "east", config, rng=rng)
        u.update(targets(spec))
        return u

    assert traced_bytes_each(build, 100) / 30 < 600  # was 716 interpreted, 847 compiled
    u = make({"east": 2})
    first, second = u.hosts.values()
    conn = Conn()
    u.connect_ok(first, conn)
    assert first.active == 1 and second.active == 0 and not second.conns
    u.release(first, conn)
    u.connect_ok(second, Conn())
    assert first.active == 0 and second.active == 1
    assert first.conns is not second.conns


def test_a_cluster_going_dark_logs_its_health_changes_counted_not_each(
        caplog: pytest.LogCaptureFixture) -> None:
    # Every endpoint of a cluster that goes dark flips: a line (and a status page event)
    # each was 30,000 lines in 100 s at 1,000 services of 30 endpoints.
    u = make({"east": 101})
    clock = u._clock
    assert isinstance(clock, FakeClock)
    clock.now = 1e6  # an interval of the process-wide limit of its own
    hosts = list(u.hosts.values())
    with caplog.at_level(logging.INFO, "mcsproxy.upstream"):
        for host in hosts[:100]:
            for _ in range(HC.unhealthy_threshold):
                u.health_result(host, "timeout", HC)
        said = [r.getMessage() for r in caplog.records if "unhealthy (active" in r.getMessage()]
        assert len(said) == 20 and all(not h.active_up for h in hosts[:100])
        clock.now += 1.0
        for _ in range(HC.unhealthy_threshold):
            u.health_result(hosts[100], "timeout", HC)
    last = caplog.records[-1].getMessage()
    assert "127.0.1.101:8080(east) unhealthy (active check: timeout)" in last
    assert last.endswith("(80 more endpoint health changes not logged before it)")
