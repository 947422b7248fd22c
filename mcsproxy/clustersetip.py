"""ClusterSetIP allocation from --clusterset-cidr: one address per IP family per service,
stable for the import's life, never two services on one address.

Shared by the controller (ServiceImports it writes) and the gateway's kube source
(Karmada MultiClusterServices, which come with no ClusterSetIP), so it lives on the data
plane side of the import layers.

A new service starts probing at a hash of its key, so allocations do not depend on the
order services appear in and a restart that reads back nothing still tends to land on the
same addresses.

A released address is held for the service that had it: another service gets it only when
nothing else in the range is free, the longest released first. Clients may still hold it
from DNS, and a member may still hold the old ServiceImport while the new one is written,
so reusing it at once would send one service's traffic to another. The service itself
takes its address back if it is exported again. The holds, with when each address was
released, can be read out (`held()`) and put back (`restore_held()`), so that a restart
does not forget them (the controller keeps them in OUT or a ConfigMap: controlplane/holds.py).

Ranked allocation (`place`, `unplace`; the gateway's Karmada services): every gateway of a
cluster allocates on its own, started at its own time, and DNS answers from any of them,
so an address must be a function of the services that exist, not of the order they came
in: the services by rank (creationTimestamp, then key), each taking the first free
address from its hash. A new service ranked last (the usual: just created) moves nothing;
one ranked before others (an old Service made cross-cluster) or one that goes re-places
those ranked after it, which may move one that hashed to the same slot. Nothing is held:
a hold lives in one process only, and a gateway started later would not know it.
Addresses held outside the allocator (`foreign_changed`: the ClusterSetIPs of real
ServiceImports, written by an MCS controller from the same range, and of every other
import the gateway serves) are taken for every ranked key, as a ServiceImport wins its
name: one that arrives on a ranked key's address moves that key on, and one that goes
lets the oldest key that would have had it take it, so the addresses stay a function of
the services and the foreign addresses that exist, whatever order they came in.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator

from mcsproxy.model import ServiceKey

DEFAULT_CIDR = "127.240.0.0/16"
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
MAX_HELD = 65536  # released addresses remembered; past that the longest released is free
# Addresses indexed per displaced ranked key (those its probe reaches before its own); one
# further on (in a nearly full range) is looked at whenever an address is freed.
WANTS_INDEXED = 16

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllocationError(RuntimeError):
    pass


def parse_cidrs(text: str, flag: str = "--clusterset-cidr") -> tuple[Network, ...]:
    """'127.240.0.0/16' or a dual-stack '127.240.0.0/16,fd00:240::/112'; errors name `flag`."""
    pools: dict[int, Network] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=True)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
        if net.version in pools:
            raise ValueError(f"{flag}: two IPv{net.version} ranges")
        if net.num_addresses < 4:
            raise ValueError(f"{flag}: {net} is too small")
        pools[net.version] = net
    if not pools:
        raise ValueError(f"{flag}: no range given")
    return tuple(pools[v] for v in sorted(pools))


class ClusterSetIPAllocator:
    def __init__(self, pools: Iterable[Network], clock: Callable[[], float] = time.time,
                 *, hold_released: bool = True) -> None:
        self.pools: dict[int, Network] = {p.version: p for p in pools}
        self.hold_released = hold_released
        self._clock = clock  # wall clock: release times outlive the process
        self._owner: dict[str, ServiceKey] = {}
        self._by_key: dict[ServiceKey, tuple[str, ...]] = {}
        # Released address → (the service that had it, when), longest released first; and
        # back.
        self._held: dict[str, tuple[ServiceKey, float]] = {}
        self._held_by_key: dict[ServiceKey, set[str]] = {}
        self.held_changes = 0  # bumped on every change to the holds: a new count is saved
        # Ranked keys (place): their rank and the families they asked for; the last rank.
        self._rank: dict[ServiceKey, tuple[str, ServiceKey]] = {}
        self._families: dict[ServiceKey, tuple[str, ...]] = {}
        self._last_rank: tuple[str, ServiceKey] | None = None
        self._displaced: set[ServiceKey] = set()  # ranked, not at their probe's first address
        # Of those: address → the keys whose probe reaches it before their own address
        # (they would take it, were it free), and back; those indexed not (none yet, or
        # further than WANTS_INDEXED).
        self._wanting: dict[str, set[ServiceKey]] = {}
        self._wants: dict[ServiceKey, list[str]] = {}
        self._far: set[ServiceKey] = set()
        # Usable addresses imports this allocator did not make hold, and how many hold each.
        self._foreign: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def get(self, key: ServiceKey) -> tuple[str, ...]:
        return self._by_key.get(key, ())

    def reserve(self, key: ServiceKey, ips: Iterable[str]) -> None:
        """Take back what an earlier run gave `key`, where it is still ours to give."""
        kept = []
        for text in ips:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            pool = self.pools.get(ip.version)
            if (pool is None or ip not in pool or str(ip) in self._owner
                    or str(ip) in self._foreign):
                continue
            if any(ipaddress.ip_address(k).version == ip.version for k in kept):
                continue
            self._unhold(str(ip))
            self._owner[str(ip)] = key
            kept.append(str(ip))
        if kept:
            self._by_key[key] = tuple(kept)

    def ensure(self, key: ServiceKey, families: Iterable[str]) -> tuple[str, ...]:
        """The key's addresses for `families`, in their order, the Service's primary family
        first (those with a pool; else the first pool)."""
        wanted = self._versions(families)
        current = {ipaddress.ip_address(ip).version: ip for ip in self._by_key.get(key, ())}
        # Every missing family's address found before any is taken: a dual-stack service
        # whose second range is full must not keep the first's address it got meanwhile.
        found = {v: self._find(key, v) for v in wanted if v not in current}
        result = []
        for version in wanted:
            ip = current.pop(version, None) or self._take(found[version], key)
            result.append(ip)
        for dropped in current.values():
            self._free(dropped, key)
        self._by_key[key] = tuple(result)
        return self._by_key[key]

    def _versions(self, families: Iterable[str]) -> list[int]:
        """The IP versions `ensure` gives addresses of for `families`, in their order."""
        versions = {name: v for v, name in FAMILY_NAMES.items()}
        wanted = list(dict.fromkeys(versions[f] for f in families  # raw input: any type
                                    if isinstance(f, str) and f in versions
                                    and versions[f] in self.pools))
        return wanted or [min(self.pools)]

    def place(self, key: ServiceKey, families: Iterable[str], created: str,
              ) -> tuple[tuple[str, ...], set[ServiceKey]]:
        """Ranked allocation (see the module doc): the key's addresses, and the other keys
        whose addresses changed (to be published again; one left without an address has
        none in `get`). No address is free for `key` (`full_message` says so): none, and
        it stays ranked, to get one, reported among the moved keys, once a fresh
        placement would give it one (an older key goes, or an import elsewhere)."""
        rank, wanted = (created, key), tuple(families)
        if self._rank.get(key) == rank and self._families.get(key) == wanted:
            return self._by_key.get(key, ()), set()  # unchanged
        before = self._unrank(key)
        self._rank[key], self._families[key] = rank, wanted
        if before is None and (self._last_rank is None or rank > self._last_rank):
            self._last_rank = rank
            try:
                return self._ensure_ranked(key), set()
            except AllocationError:
                return (), set()  # ranked last in a full range
        self._last_rank = max(self._last_rank or rank, rank)
        # Re-ranked: those between its old and new rank may want its old address.
        moved = self._replace_from(min(rank, before or rank))
        moved.discard(key)
        return self._by_key.get(key, ()), moved

    def unplace(self, key: ServiceKey) -> set[ServiceKey]:
        """A ranked key goes: the keys whose addresses changed as the ones that want its
        addresses take them (_offer)."""
        if self._unrank(key) is None:
            return set()
        freed = list(self._by_key.get(key, ()))
        self.release(key)
        return self._offer(freed)

    def foreign_changed(self, old: Iterable[str], new: Iterable[str]) -> set[ServiceKey]:
        """An import this allocator did not make holds `new` instead of `old` (either may
        be empty): the ranked keys whose addresses changed (see the module doc). Several
        imports may hold one address (counted): it is free again when the last one goes."""
        # Those that come first, those that go after: each step leaves what a fresh
        # placement would give (_push_out counts on no address being freed meanwhile).
        moved: set[ServiceKey] = set()
        for ip in self._in_pools(new):
            self._foreign[ip] = self._foreign.get(ip, 0) + 1
            owner = self._owner.get(ip)
            if self._foreign[ip] == 1 and owner is not None and owner in self._rank:
                moved |= self._push_out(owner, ip)
        gone = []
        for ip in self._in_pools(old):
            count = self._foreign.get(ip, 0) - 1
            if count > 0:
                self._foreign[ip] = count
            elif self._foreign.pop(ip, None) is not None:
                gone.append(ip)
        return moved | self._offer(gone) if gone else moved

    def _in_pools(self, ips: Iterable[str]) -> list[str]:
        """Of `ips`, those `_find` could hand out, as `_owner` spells them."""
        usable = []
        for text in ips:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if self._usable(ip):
                usable.append(str(ip))
        return usable

    def _push_out(self, key: ServiceKey, ip: str) -> set[ServiceKey]:
        """`ip`, ranked `key`'s, is held outside now: `key` takes the next address of its
        probe that is neither held outside nor an older key's, and a newer key on that
        one moves on likewise, oldest first. No address is freed on the way, so no other
        key can want to move: a few probes per collision, where placing again every key
        ranked after `key` costs tens of ms each at 10,000 services (and a ServiceImport
        list that arrives after the Karmada services collides with hundreds of them when
        both come from one /16)."""
        version = ipaddress.ip_address(ip).version
        moved: set[ServiceKey] = set()
        del self._owner[ip]
        pending = [(self._rank[key], key)]
        while pending:
            # Each key in `pending` still lists the address it lost (`release` frees only
            # what a key owns), to be replaced in place: its families keep their order.
            rank, moving = heapq.heappop(pending)
            moved.add(moving)
            target = self._first_free(moving, version, rank)
            if target is None:
                # Its range is full: what the keys from it on get is decided as a fresh
                # placement decides it (one may be left without an address).
                return moved | self._replace_from(rank)
            pushed = self._owner.get(target)
            if pushed is not None:
                heapq.heappush(pending, (self._rank[pushed], pushed))
            self._owner[target] = moving
            self._by_key[moving] = tuple(
                target if ipaddress.ip_address(a).version == version else a
                for a in self._by_key[moving])
            self._note_displaced(moving)
        return moved

    def _first_free(self, key: ServiceKey, version: int,
                    rank: tuple[str, ServiceKey]) -> str | None:
        """The first address of `key`'s probe that a fresh ranked placement would give it:
        not held outside, nor by a key ranked before it (nor held for another)."""
        for ip in self._probe(key, version):
            if ip in self._foreign or ip in self._held:
                continue
            owner = self._owner.get(ip)
            if owner is None or (owner in self._rank and self._rank[owner] > rank):
                return ip
        return None

    def _offer(self, ips: list[str]) -> set[ServiceKey]:
        """`ips` are free now (a ranked key went, or an import elsewhere): the oldest key
        that would take one of them over its own address takes the first its probe comes
        to, which frees that key's own; and so on while any key wants a free one. Keys
        older than the one that moved want none of what it freed (it was theirs to take
        when they were placed), so this is what a fresh placement gives, at the cost of
        the keys that move. It re-placed every displaced key ranked after the first that
        moved: 10,000 services in a /16, 949 displaced, 1000 ServiceImports going one by
        one took 863,780 looks at a displaced key (11 s CPU); a service going, 780 keys
        placed again (16 ms)."""
        free = set(ips)
        moved: set[ServiceKey] = set()
        while free and (oldest := self._oldest_wanting(free)) is not None:
            rank, key = oldest
            if not self._by_key.get(key):
                # Without an address (a range was full): every family or none, which the
                # whole placement from it on decides.
                return moved | self._replace_from(rank, displaced_only=True)
            moved.add(key)
            taken = []
            for ip in self._by_key[key]:
                version = ipaddress.ip_address(ip).version
                better = next((a for a in self._probe(key, version) if a == ip or a in free),
                              ip)
                if better != ip:
                    free.discard(better)
                    free.add(ip)
                    del self._owner[ip]
                    self._owner[better] = key
                taken.append(better)
            self._by_key[key] = tuple(taken)
            self._note_displaced(key)
        return moved

    def _oldest_wanting(self, free: set[str]) -> tuple[tuple[str, ServiceKey],
                                                       ServiceKey] | None:
        """(rank, key) of the oldest ranked key that would take an address of `free`."""
        wanting = {k for ip in free for k in self._wanting.get(ip, ())}
        wanting.update(k for k in self._far if any(self._prefers(k, ip) for ip in free))
        return min(((self._rank[k], k) for k in wanting), default=None)

    def _prefers(self, key: ServiceKey, ip: str) -> bool:
        """Whether ranked `key` would take `ip` over its address of that family (it has
        none: the range was full; or it wants no address of that family)."""
        version = ipaddress.ip_address(ip).version
        if version not in self._versions(self._families[key]):
            return False
        current = next((a for a in self._by_key.get(key, ())
                        if ipaddress.ip_address(a).version == version), None)
        if current is None:
            return True
        return self._probe_step(key, version, ip) < self._probe_step(key, version, current)

    def _note_displaced(self, key: ServiceKey) -> None:
        """Whether ranked `key` is at the first address of its probe in every family (no
        address freed can give such a key a better one), and which it would take if
        freed (_wanting)."""
        self._unindex(key)
        ips = self._by_key.get(key, ())
        wants: list[str] = []
        far = not ips
        for ip in ips:
            for probed in self._probe(key, ipaddress.ip_address(ip).version):
                if probed == ip:
                    break
                if len(wants) == WANTS_INDEXED:
                    far = True
                    break
                wants.append(probed)
        if far:
            self._far.add(key)
        elif not wants:
            self._displaced.discard(key)
            return
        else:
            self._wants[key] = wants
            for ip in wants:
                self._wanting.setdefault(ip, set()).add(key)
        self._displaced.add(key)

    def _unindex(self, key: ServiceKey) -> None:
        self._displaced.discard(key)
        self._far.discard(key)
        for ip in self._wants.pop(key, ()):
            keys = self._wanting[ip]
            keys.discard(key)
            if not keys:
                del self._wanting[ip]

    def _unrank(self, key: ServiceKey) -> tuple[str, ServiceKey] | None:
        rank = self._rank.pop(key, None)
        self._families.pop(key, None)
        self._unindex(key)
        if rank is not None and rank == self._last_rank:
            self._last_rank = max(self._rank.values(), default=None)
        return rank

    def _replace_from(self, rank: tuple[str, ServiceKey], *,
                      displaced_only: bool = False) -> set[ServiceKey]:
        """Every ranked key from `rank` on released and placed again, in rank order (only
        those not at their first address, `displaced_only`: when a key left without an
        address may get one)."""
        candidates = self._displaced if displaced_only else self._rank.keys()
        later = sorted((self._rank[k], k) for k in candidates if self._rank[k] >= rank)
        bare = next((r for r, k in later if not self._by_key.get(k)), None)
        if displaced_only and bare is not None:
            # A key left without any address (one family's range was full: ensure gives
            # all or none) may want back another family's address a newer key took as its
            # first; so from it on, every key is placed again.
            later = sorted({*later, *((r, k) for k, r in self._rank.items() if r >= bare)})
        before = {k: self._by_key.get(k, ()) for _, k in later}
        for _, key in later:
            self.release(key)
        for _, key in later:
            try:
                self._ensure_ranked(key)
            except AllocationError:
                self._by_key.pop(key, None)  # ranked last in a full range: none for now
        return {k for k, ips in before.items() if self._by_key.get(k, ()) != ips}

    def full_message(self, families: Iterable[str]) -> str:
        """Why `place` gave no address for `families` (a range of theirs is full)."""
        names = ", ".join(str(self.pools[v]) for v in self._versions(families))
        return f"no address free in --clusterset-cidr {names}"

    def held(self) -> list[tuple[str, ServiceKey, float]]:
        """(address, the service that had it, when released), longest released first."""
        return [(ip, key, when) for ip, (key, when) in self._held.items()]

    def restore_held(self, holds: Iterable[tuple[str, ServiceKey, float]]) -> int:
        """Hold again what an earlier run held, where it is in a pool and not in use;
        merged with the current holds by release time. Returns how many were taken."""
        latest = dict(self._held)
        for text, key, when in holds:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if not self._usable(ip) or str(ip) in self._owner:
                continue  # another range now, or a foreign file: not ours to hold
            if str(ip) not in latest or latest[str(ip)][1] < when:  # the later release counts
                latest[str(ip)] = (key, when)
        ordered = sorted(latest.items(), key=lambda item: item[1][1])[-MAX_HELD:]
        before = dict(self._held)
        self._held.clear()
        self._held_by_key.clear()
        for ip, (key, when) in ordered:
            self._hold(ip, key, when)
        if self._held != before:
            self.held_changes += 1
        return len(self._held.keys() - before.keys())

    def _usable(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """One `_find` could hand out."""
        pool = self.pools.get(ip.version)
        if pool is None:
            return False
        offset = int(ip) - int(pool.network_address) - 1
        if not 0 <= offset < pool.num_addresses - 2:
            return False
        return not (ip.version == 4 and int(ip) & 0xFF in (0, 255))

    def release(self, key: ServiceKey) -> None:
        for ip in self._by_key.pop(key, ()):
            self._free(ip, key)

    def _free(self, ip: str, key: ServiceKey) -> None:
        if self._owner.get(ip) != key:
            return  # another's now (_push_out gave it on before `key` was placed again)
        del self._owner[ip]
        self._unhold(ip)
        if not self.hold_released:
            return
        self._hold(ip, key, self._clock())
        self.held_changes += 1
        if len(self._held) > MAX_HELD:
            self._unhold(next(iter(self._held)))

    def _hold(self, ip: str, key: ServiceKey, when: float) -> None:
        self._held[ip] = (key, when)
        self._held_by_key.setdefault(key, set()).add(ip)

    def _unhold(self, ip: str) -> None:
        held = self._held.pop(ip, None)
        if held is not None:
            self.held_changes += 1
            key = held[0]
            mine = self._held_by_key[key]
            mine.discard(ip)
            if not mine:
                del self._held_by_key[key]

    def _take(self, ip: str, key: ServiceKey) -> str:
        self._unhold(ip)
        self._owner[ip] = key
        return ip

    def _probe_start(self, key: ServiceKey, version: int) -> tuple[int, int, int]:
        """(first usable address, how many, the step `key`'s probe starts at)."""
        pool = self.pools[version]
        first = int(pool.network_address) + 1  # skip the network address
        usable = pool.num_addresses - 2  # and the broadcast (or last) one
        digest = hashlib.blake2b(str(key).encode(), digest_size=8).digest()
        return first, usable, int.from_bytes(digest, "big") % usable

    def _probe_step(self, key: ServiceKey, version: int, ip: str) -> int:
        """How far into `key`'s probe `ip` comes (0: the first address it tries)."""
        first, usable, start = self._probe_start(key, version)
        return (int(ipaddress.ip_address(ip)) - first - start) % usable

    def _probe(self, key: ServiceKey, version: int) -> Iterator[str]:
        """The addresses `key` tries in `version`'s pool, in order: from a hash of it on."""
        first, usable, start = self._probe_start(key, version)
        for step in range(usable):
            value = first + (start + step) % usable
            if version == 4 and value & 0xFF in (0, 255):
                continue  # x.y.z.0 and .255 confuse people and some tools
            yield str(ipaddress.ip_address(value))

    def _ensure_ranked(self, key: ServiceKey) -> tuple[str, ...]:
        """`ensure` for a ranked key, noting whether it got the first address of its
        probe in every family: no service going can give such a key a better one."""
        try:
            return self.ensure(key, self._families[key])
        finally:
            self._note_displaced(key)  # also without an address: its range was full

    def _find(self, key: ServiceKey, version: int) -> str:
        """The address `key` gets next in `version`'s pool (not taken yet)."""
        for ip in self._held_by_key.get(key, ()):
            if ipaddress.ip_address(ip).version == version:
                return ip  # exported again: its own address back
        pool = self.pools[version]
        for ip in self._probe(key, version):
            if ip not in self._owner and ip not in self._held and ip not in self._foreign:
                return ip
        for ip in self._held:  # nothing else is free: the longest released goes first
            if ipaddress.ip_address(ip).version == version and ip not in self._foreign:
                return ip
        usable = pool.num_addresses - 2
        raise AllocationError(f"--clusterset-cidr {pool} is full ({usable} addresses)")
