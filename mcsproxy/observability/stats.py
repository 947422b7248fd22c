"""Plain counters the data path increments; read only when metrics are collected.

No locks, no label lookups, no prometheus-client calls per packet: each proxy connection
holds the `ClusterStats` of the (service port, destination cluster) it uses and bumps
integers on it. Histograms are fixed bucket arrays, observed with a few float comparisons.
Compiled with the data path (mcsproxy.compiled): the compiled HTTP proxy reads and bumps
these per request with loads, not attribute look-ups.
"""

from __future__ import annotations

from collections.abc import Sequence

# Every bound tuple is typed `tuple[float, ...]`: compiled (mcsproxy.compiled), a tuple
# of fixed length is a C struct of doubles, boxed again (a new tuple and 15 floats, 520 B)
# each time it is passed on, so every histogram held its own copy: ~1 KiB more in each
# ClusterStats, 9 MiB at 3,000 services x 3 clusters. Variable length, it is one shared
# Python tuple. Likewise the label tuples.
# Upstream connects on loopback take ~100 us, across a WAN tens of ms, a dead one the
# connect timeout (1 s by default).
CONNECT_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                      0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# DNS answers built from the index take microseconds; forwarded ones an upstream RTT.
DNS_BUCKETS: tuple[float, ...] = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                                  0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# HTTP requests through the gateway: a loopback endpoint answers in a few hundred us, a
# remote cluster adds its RTT; 15 and 30 are the default per-try and request timeouts
# (--http-per-try-timeout, --http-request-timeout), so le="15" counts the requests no
# timeout touched and (15, 30] those a per-try timeout ended or retried.
REQUEST_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 30.0)
APPLY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                    0.5, 1.0, 2.5, 5.0, 10.0)

CONNECT_OUTCOMES: tuple[str, ...] = ("ok", "refused", "timeout", "error")


class Buckets:
    """A histogram as counts per bucket (not cumulative) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(bounds)
        self.counts: list[int] = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound >= value, as bisect_left, by a scan from the smallest: what the
        # data path times (connects, requests, DNS answers) mostly lands in the first
        # few buckets, and compiled (mcsproxy.compiled) a step is a float comparison
        # (bench/http/micro.py: a request's observation 1,320 -> 590 instructions).
        bounds = self.bounds
        i = 0
        n = len(bounds)
        while i < n and bounds[i] < value:
            i += 1
        counts = self.counts
        counts[i] = counts[i] + 1  # compiled, `+=` on an item is a generic in-place add
        self.sum += value

    def add(self, other: Buckets) -> None:
        """Add another histogram of the same bounds (a retired upstream set's)."""
        counts = self.counts
        for i, n in enumerate(other.counts):
            counts[i] += n
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile q (None with no observations)."""
        total = self.count
        if not total:
            return None
        rank = q * total
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += n
            if acc >= rank:
                return bound
        return float("inf")


def connect_outcome(reason: str) -> str:
    """A failed connect's reason folded into a bounded label value."""
    if reason in ("timeout", "connect timeout"):  # the TCP and the HTTP proxy's words
        return "timeout"
    if "refused" in reason.lower() or reason == "port unreachable":
        return "refused"
    return "error"


class ClusterStats:
    """One service port's traffic to one destination cluster."""

    __slots__ = ("attempts", "bytes_to_client", "bytes_to_upstream", "connect_time",
                 "connections", "ejections", "failed", "request_time", "requests")

    def __init__(self) -> None:
        self.attempts = dict.fromkeys(CONNECT_OUTCOMES, 0)  # connect attempts by outcome
        self.connections = 0  # client connections (or UDP flows) that reached this cluster
        self.failed = 0  # client connections whose last failed attempt was here
        # Bytes of connections that ended; live connections add theirs at collection time.
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self.ejections = 0
        self.connect_time = Buckets(CONNECT_BUCKETS)
        self.requests: dict[str, int] = {}  # HTTP requests by outcome (2xx ... error kind)
        # Each request counted in `requests` is timed here too (see Exchange.account).
        self.request_time = Buckets(REQUEST_BUCKETS)


class UpstreamStats:
    """One service port's counters: per destination cluster, and those without one."""

    __slots__ = ("clusters", "no_endpoint", "retries", "retry_budget_exhausted", "unrouted")

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterStats] = {}
        self.no_endpoint = 0  # client connections that found no endpoint at all
        self.retries = 0  # connect (or HTTP) attempts after the first
        self.retry_budget_exhausted = 0  # HTTP retries refused by the retry budget
        self.unrouted: dict[str, int] = {}  # HTTP requests no endpoint answered, by outcome

    def cluster(self, name: str) -> ClusterStats:
        stats = self.clusters.get(name)
        if stats is None:
            stats = self.clusters[name] = ClusterStats()
        return stats

    def absorb(self, other: UpstreamStats) -> None:
        """Add another set's counters to these (a retired upstream set's, for metrics)."""
        self.no_endpoint += other.no_endpoint
        self.retries += other.retries
        self.retry_budget_exhausted += other.retry_budget_exhausted
        _add_counts(self.unrouted, other.unrouted)
        for name, o in other.clusters.items():
            c = self.cluster(name)
            _add_counts(c.attempts, o.attempts)
            c.connections += o.connections
            c.failed += o.failed
            c.bytes_to_upstream += o.bytes_to_upstream
            c.bytes_to_client += o.bytes_to_client
            c.ejections += o.ejections
            c.connect_time.add(o.connect_time)
            _add_counts(c.requests, o.requests)
            c.request_time.add(o.request_time)


def _add_counts(into: dict[str, int], other: dict[str, int]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


# DNS ------------------------------------------------------------------------------------

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 35: "NAPTR", 41: "OPT", 64: "SVCB", 65: "HTTPS", 252: "AXFR",
          251: "IXFR", 255: "ANY"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
          5: "REFUSED", 16: "BADVERS"}
MEMO_HITS_FOLD_AT = 65536  # distinct answers counted before they are folded into labels
# Why the gateway answered a forwarded query SERVFAIL itself.
FORWARD_FAILURES: tuple[str, ...] = ("timeout", "pending_full", "client_limit")
# Why an upstream answer with a pending query's ID was dropped: its question differs from
# the one sent, or only in letter case (DNS 0x20).
FORWARD_MISMATCHES: tuple[str, ...] = ("question", "case")


def answer_labels(msg: bytes, offset: int = 0) -> tuple[str, str]:
    """(qtype, rcode) label values of an answer.

    `msg[offset:]` is a DNS message after its 2-byte ID (as the UDP memo stores answers):
    flags, four counts, then the question as it was asked (never compressed).
    """
    if len(msg) < offset + 10:
        return "other", "other"
    low = msg[offset + 1] & 0xF
    rcode = RCODES.get(low, "other")
    i = offset + 10
    end = len(msg)
    while i < end:
        n = msg[i]
        if n == 0:
            break
        if n & 0xC0:
            return "other", rcode
        i += n + 1
    if i + 3 > end:
        return "other", rcode
    qtype = QTYPES.get((msg[i + 1] << 8) | msg[i + 2], "other")
    # An extended rcode (BADVERS) keeps its high bits in the OPT record, which is the first
    # record after the question in an answer without answer or authority records: read
    # alone, the header's four bits said NOERROR.
    opt = i + 5
    if msg[offset + 4:offset + 8] == b"\0\0\0\0" and msg[opt:opt + 3] == b"\0\0\x29" \
            and opt + 6 <= end and msg[opt + 5]:
        rcode = RCODES.get(msg[opt + 5] << 4 | low, "other")
    return qtype, rcode


class DnsStats:
    """Queries by (transport, qtype, rcode) and answer latency.

    The UDP fast path answers repeated questions from a memo of answer bytes; it counts
    `memo_hits[answer] += 1` (the bytes' hash is cached, so that is one dict update) and
    the answers are read for their qtype and rcode only when folded, at collection time.
    """

    __slots__ = ("counts", "forward_failures", "forward_mismatches", "latency", "memo_hits")

    def __init__(self) -> None:
        self.memo_hits: dict[bytes, int] = {}
        self.counts: dict[tuple[str, str, str], int] = {}
        self.latency = {"built": Buckets(DNS_BUCKETS), "forwarded": Buckets(DNS_BUCKETS)}
        self.forward_failures = dict.fromkeys(FORWARD_FAILURES, 0)
        self.forward_mismatches = dict.fromkeys(FORWARD_MISMATCHES, 0)

    def count(self, transport: str, qtype: str, rcode: str, n: int = 1) -> None:
        key = (transport, qtype, rcode)
        self.counts[key] = self.counts.get(key, 0) + n

    def count_answer(self, transport: str, answer: bytes | None) -> None:
        """An answer with its ID (None: the query was dropped)."""
        if answer is None:
            self.count(transport, "other", "dropped")
        else:
            self.count(transport, *answer_labels(answer, 2))
        if len(self.memo_hits) >= MEMO_HITS_FOLD_AT:
            self.fold()

    def fold(self) -> None:
        # Cleared in place: the UDP fast path holds this very dict.
        hits = dict(self.memo_hits)
        self.memo_hits.clear()
        for tail, n in hits.items():
            self.count("udp", *answer_labels(tail), n)
