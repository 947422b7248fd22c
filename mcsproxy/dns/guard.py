"""Who may use the DNS listener for what: forwarding only for allowed client networks
(`--dns-allow-from`), and response rate limiting per client network (`--dns-rrl`).

The clusterset zone is answered to anyone who reaches the listener (CoreDNS forwards its
stub domain here from pod addresses we cannot list). Names outside the zone are forwarded
to `--dns-upstream` only for clients in the allowed networks, REFUSED otherwise, so the
gateway is never an open resolver.

Response rate limiting (as BIND's RRL, simplified): a token bucket per client /24 (IPv4)
or /56 (IPv6), refilled at QPS per second with a burst of QPS. Over the limit, every
SLIP-th answer goes out truncated (TC=1: a real client retries over TCP, which a spoofed
source cannot) and the others are dropped, so a reflection attack gains nothing. Only UDP
is limited. The table is bounded: when full, entries idle for a second are pruned, and a
prefix that still finds no room is answered unlimited (counted), never refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ALLOW_FROM = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
RRL_TABLE_MAX = 65536
RRL_SLIP = 2
MAX_CACHED_CLIENTS = 4096


def parse_networks(text: str | Iterable[str]) -> tuple[IpNetwork, ...]:
    """'10.0.0.0/8,fd00::/8' → networks; ValueError names the bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    nets = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"--dns-allow-from: {item!r} is not a CIDR") from None
    return tuple(nets)


class AllowList:
    """Client address → may it have names outside the zone forwarded? Cached per address."""

    __slots__ = ("_cache", "networks", "refused")

    def __init__(self, networks: Iterable[IpNetwork]) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}
        self.refused = 0

    def allows(self, address: str) -> bool:
        found = self._cache.get(address)
        if found is None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                found = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                found = any(ip in net for net in self.networks)
            if len(self._cache) >= MAX_CACHED_CLIENTS:
                self._cache.clear()
            self._cache[address] = found
        if not found:
            self.refused += 1
        return found


def client_prefix(address: str) -> str:
    """The network an answer budget is shared by: /24 for IPv4, /56 for IPv6. An IPv4
    client of a socket on `::` comes as ::ffff:a.b.c.d, whose first 56 bits are all zero:
    its own /24, or every IPv4 client would share one budget."""
    if ":" not in address:
        return address.rpartition(".")[0]
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped).rpartition(".")[0]
    return ip.packed[:7].hex()


class ResponseRateLimit:
    __slots__ = (
        "_buckets",
        "_last_prune",
        "_slip",
        "burst",
        "dropped",
        "qps",
        "slipped",
        "untracked",
    )

    def __init__(self, qps: float, burst: float | None = None) -> None:
        self.qps = qps
        self.burst = burst if burst is not None else max(1.0, qps)
        self._buckets: dict[str, list[float]] = {}  # prefix → [tokens, last refill]
        self._slip = 0
        self._last_prune = 0.0
        self.dropped = 0
        self.slipped = 0
        self.untracked = 0

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        prefix = client_prefix(address)
        bucket = self._buckets.get(prefix)
        if bucket is None:
            if len(self._buckets) >= RRL_TABLE_MAX and not self._prune(now):
                self.untracked += 1
                return True
            self._buckets[prefix] = [self.burst - 1.0, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.qps)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def limited(self, query: bytes, truncated: Callable[[bytes], bytes | None]) -> bytes | None:
        """What an over-limit client gets: every RRL_SLIP-th query `truncated(query)` (its
        question with TC set, see Responder.truncated), else nothing."""
        self._slip += 1
        answer = truncated(query) if self._slip % RRL_SLIP == 0 else None
        if answer is None:
            self.dropped += 1
        else:
            self.slipped += 1
        return answer

    def _prune(self, now: float) -> bool:
        if now - self._last_prune < 1.0:  # at most once a second: a flood of new prefixes
            return False  # must not make every packet walk the table
        self._last_prune = now
        stale = [p for p, b in self._buckets.items() if now - b[1] > 1.0]
        for prefix in stale:
            del self._buckets[prefix]
        return len(self._buckets) < RRL_TABLE_MAX

    def __len__(self) -> int:
        return len(self._buckets)
