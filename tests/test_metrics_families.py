"""Merging worker reports: counters and histograms add up, state gauges stay the main
process's, and a restarted worker's old counts are kept so totals never go backwards."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from mcsproxy.observability.families import Families
from mcsproxy.observability.stats import (
    CONNECT_BUCKETS,
    DNS_BUCKETS,
    REQUEST_BUCKETS,
    Buckets,
    ClusterStats,
    DnsStats,
    answer_labels,
)
from mcsproxy.observability.workers import WorkerReporter, WorkerReports

FAKE_MAIN_PID = 1  # an abstract socket name no real gateway uses


def families(connections: float, active: float, endpoints: float) -> Families:
    f = Families()
    f.counter("mcsproxy_proxy_connections", "c", ["cluster"]).add(["east"], connections)
    f.gauge("mcsproxy_upstream_active_connections", "a", summed=True).add((), active)
    f.gauge("mcsproxy_upstream_endpoints", "e").add((), endpoints)
    b = Buckets((0.1, 1.0))
    b.observe(0.05)
    f.histogram("mcsproxy_upstream_connect_duration_seconds", "h", [], b.bounds) \
        .observe_buckets((), b)
    return f


@pytest.mark.parametrize("bounds", [REQUEST_BUCKETS, CONNECT_BUCKETS, DNS_BUCKETS, (1.0,)])
def test_histograms_bucket_as_bisect_does(bounds: tuple[float, ...]) -> None:
    """Buckets.observe scans the bounds from the smallest: on every bound, just below and
    above it, and at the ends, it counts in bisect_left's bucket (Prometheus' le)."""
    values = [0.0, 1e-9, 1e9, float("inf")] + [
        v for bound in bounds for v in (bound * (1 - 1e-12), bound, bound * (1 + 1e-12))]
    buckets = Buckets(bounds)
    expected = [0] * (len(bounds) + 1)
    for v in values:
        buckets.observe(v)
        expected[bisect.bisect_left(bounds, v)] += 1
        assert buckets.counts == expected, v
    assert buckets.sum == sum(values) and buckets.count == len(values)


class FakeWorker:
    """What a worker's Observer gives its WorkerReporter: a fresh copy of `families` on
    every report (the reporter empties what it sends)."""

    def __init__(self, families: Families) -> None:
        self.families = families

    async def collect(self) -> tuple[Families, Iterator[tuple[str, dict[str, int]]]]:
        return Families.from_json(self.families.to_json()), iter(())


async def test_worker_reports_merge_and_survive_a_restart() -> None:
    worker = FakeWorker(families(5, 2, 1))
    reporter = WorkerReporter(1, worker.collect, main_pid=FAKE_MAIN_PID)
    reporter.pid = 1001
    reports = WorkerReports(2, main_pid=FAKE_MAIN_PID)
    await reporter.start()
    try:
        main = families(3, 1, 1)
        await reports.merge_into(main)
        assert reports.reporting == 1
        assert main["mcsproxy_proxy_connections"].total() == 8
        assert main["mcsproxy_upstream_active_connections"].total() == 3  # summed gauge
        assert main["mcsproxy_upstream_endpoints"].total() == 1  # the main process's view
        assert main["mcsproxy_upstream_connect_duration_seconds"].total() == 2
        text = generate_latest(main).decode()
        assert 'mcsproxy_proxy_connections_total{cluster="east"} 8.0' in text
        assert 'mcsproxy_upstream_connect_duration_seconds_bucket{le="0.1"} 2.0' in text

        # The worker restarts (new pid, counting from zero): its old 5 are kept.
        reporter.pid = 1002
        worker.families = families(1, 0, 1)
        main = families(3, 1, 1)
        await reports.merge_into(main)
        assert main["mcsproxy_proxy_connections"].total() == 3 + 5 + 1
    finally:
        await reporter.stop()
    # A worker that does not answer counts with its last report.
    main = families(3, 1, 1)
    await reports.merge_into(main)
    assert reports.reporting == 0
    assert main["mcsproxy_proxy_connections"].total() == 3 + 5 + 1
    assert main["mcsproxy_upstream_active_connections"].total() == 1


def test_dns_memo_hits_are_labelled_from_the_answer_bytes() -> None:
    # Header after the ID: flags (NXDOMAIN), counts, then the question as asked.
    tail = bytes([0x81, 0x83]) + bytes([0, 1, 0, 0, 0, 1, 0, 0]) + \
        b"\x03www\x07example\x00" + bytes([0, 33, 0, 1])
    assert answer_labels(tail) == ("SRV", "NXDOMAIN")
    stats = DnsStats()
    stats.memo_hits[tail] = 3
    stats.count_answer("tcp", b"\x00\x01" + tail)
    stats.count_answer("udp", None)
    stats.fold()
    assert stats.counts == {("udp", "SRV", "NXDOMAIN"): 3, ("tcp", "SRV", "NXDOMAIN"): 1,
                            ("udp", "other", "dropped"): 1}
    assert stats.memo_hits == {}


def test_every_histogram_shares_its_bucket_bounds() -> None:
    # Compiled, a bounds constant typed as a fixed-length tuple is a C struct of doubles,
    # boxed anew (a tuple and 15 floats, 520 B) for each histogram: a ClusterStats took
    # 1.9 KiB instead of 0.9, 9 MiB more at 3,000 services x 3 clusters.
    one, other = ClusterStats(), ClusterStats()
    assert one.connect_time.bounds is other.connect_time.bounds is CONNECT_BUCKETS
    assert one.request_time.bounds is other.request_time.bounds is REQUEST_BUCKETS
    assert DnsStats().latency["built"].bounds is DNS_BUCKETS


def tricky_families() -> Families:
    """Label values and help that need escaping, labels sorting around `le`, values that
    floatToGoString writes in Go's ways (exponents from 1e6 on, +Inf, NaN, bools)."""
    f = Families()
    odd = ["a\\b", 'q"x', "n\nl", "plain", "ünï", ""]
    values: list[float] = [0, 1, 999_999, 1_000_000, 123_456_789_012, -5, -2_000_000, 0.5,
                           1e-7, 1e20, float("inf"), float("-inf"), float("nan"), True,
                           1_234_567.5]
    counter = f.counter("mcsproxy_t_c", 'help with \\ and\nnewline "q"',
                        ["service", "port", "cluster", "outcome"])
    gauge = f.gauge("mcsproxy_t_g", "g", ["service", "priority"])
    hist = f.histogram("mcsproxy_t_h", "h", ["service", "port", "cluster"], CONNECT_BUCKETS)
    before_le = f.histogram("mcsproxy_t_h2", "h2", ["zeta", "alpha"], (0.5, 2.0))
    for i in range(300):
        service = odd[i % len(odd)] + f"ns/s{i * 7919 % 300}"
        counter.add([service, "p0", 'x"y' if i % 3 else "c0", "ok"], values[i % len(values)])
        gauge.add([service, str(i % 3)], values[(i + 1) % len(values)])
        b = Buckets(CONNECT_BUCKETS)
        for k in range(i % 4):
            b.observe(k / 7)
        hist.observe_buckets([service, "p", "c"], b)
        b2 = Buckets((0.5, 2.0))
        b2.observe(i / 100)
        before_le.observe_buckets([service, "x"], b2)
    f.gauge("mcsproxy_t_n", "no labels").add((), 12_345_678)
    b0 = Buckets((1.0,))
    b0.observe(0.3)
    f.histogram("mcsproxy_t_h0", "no labels", [], (1.0,)).observe_buckets((), b0)
    return f


@pytest.mark.parametrize("size", [7, 100, 10_000])
def test_the_exposition_is_what_prometheus_client_writes(size: int) -> None:
    # prometheus-client made a Sample and a labels dict per line and sorted and escaped
    # each line's labels anew: 11 s of CPU a scrape of 6,000 services of 2 ports in 3
    # clusters (1.55M lines). Family.exposition writes the same bytes, part by part.
    families = tricky_families()
    want = b"".join(generate_latest(piece) if i == 0 else
                    generate_latest(piece).split(b"\n", 2)[2]
                    for family in families for i, piece in enumerate(family.pieces(size)))
    got = [part for family in families for part in family.exposition(size)]
    assert b"".join(got) == want
    assert len(got) == sum(-(-len(family.values) // size) for family in families)
