"""`--vip-interface NAME`: keep exactly the current ClusterSetIPs on one interface.

In a cluster the gateway runs on the node's network (hostNetwork DaemonSet with
NET_ADMIN). Each ClusterSetIP is put on a dummy interface as a /32 (/128), so the node
accepts connections to it and the proxy's listeners get them; a pod's packet to a
ClusterSetIP reaches the node through the pod's default route. Addresses follow the
snapshots: a new import's address is added, a withdrawn one removed, and all of them go on
shutdown (the interface too when the gateway created it).

The interface is created as a `dummy` link when missing. A kernel without the dummy
driver (and test network namespaces) can name an existing interface instead, such as
`lo` inside a namespace. On an interface the gateway did not create it removes only host
addresses it added itself, or stale ones inside `--clusterset-cidr` (left by an earlier
run that was killed); the interface's other addresses (127.0.0.1/8, ::1, the node IP)
are never touched. Such leftovers are adopted at start and kept until a snapshot with
every source synced says which of them are stale: the sources are not read yet when the
interface is opened, and removing them then took every ClusterSetIP off the node until
its source delivered again (seconds, or the whole outage of an unreachable API server).

Two gateways can share one interface: a replacement gateway started on a node's network
before the old one is gone (a DaemonSet with maxSurge, a pod without the host ports that
keep the scheduler from placing its successor early, a gateway run by hand). Each
gateway holds an abstract Unix socket named after the interface while it runs (abstract
names live in the network namespace and vanish with the process, SIGKILL included), and
one that stops while another still holds such a name leaves the addresses and the
interface to it: the first to stop used to take every ClusterSetIP off the node while the
survivor, believing them present, never put them back. The last gateway to stop removes them. Each
resynchronisation looks the interface up again by name (and recreates it when it may),
so one deleted under a running gateway comes back.

Netlink through pyroute2. Its asyncio flavour cannot run on uvloop (no netlink datagram
transport), so the synchronous IPRoute runs in one dedicated worker thread: netlink calls
never block the event loop and are applied in order. Each snapshot costs work for its
changed services only; a failed call is retried with a full resynchronisation.

Without `--vip-interface` nothing here runs and the proxy binds its listeners with
IP_FREEBIND, for set-ups that route ClusterSetIPs to the node by other means.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mcsproxy.clustersetip import Network, parse_cidrs
from mcsproxy.model import ServiceKey, Snapshot
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("mcsproxy.vip")

IFA_F_NODAD = 0x02  # a ClusterSetIP is ours alone: no duplicate address detection
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
# Abstract Unix socket names "<prefix><ifname>/<random>", one per gateway using the
# interface, read back from /proc/net/unix (which lists the reader's network namespace).
OWNER_PREFIX = "mcsproxy-vip/"
PROC_NET_UNIX = "/proc/net/unix"


class VipError(OSError):
    """The interface cannot be used; the gateway refuses to start."""


def _host_prefix(ip: str) -> int:
    return 128 if ":" in ip else 32


class VipInterface:
    """A gateway component (start/stop) that owns the ClusterSetIPs on one interface."""

    def __init__(self, ifname: str, store: SnapshotStore,
                 clusterset_cidr: str = "127.240.0.0/16", *, create: bool = True) -> None:
        self.ifname = ifname
        self.store = store
        self.create = create
        self.pools: tuple[Network, ...] = parse_cidrs(clusterset_cidr)
        self.index: int | None = None
        self.created = False
        self.present: set[str] = set()  # host addresses of ours now on the interface
        self.adds = 0
        self.removes = 0
        self.error: str | None = None
        self._by_key: dict[ServiceKey, tuple[str, ...]] = {}
        self._wanted: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._resync = True
        self._complete = False  # a snapshot with every source synced has been seen
        self._wake = asyncio.Event()
        self._ipr: IPRoute | None = None
        self._owner: socket.socket | None = None  # our name among the interface's users
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[Any] | None = None

    # -- component -------------------------------------------------------------------
    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vip-netlink")
        try:
            await self._call(self._open)
        except BaseException:
            await self._close()
            raise
        self._on_snapshot(self.store.current, everything=True)
        self.store.subscribe(self._on_snapshot)
        self._task = spawn(self._sync_loop(), name=f"vip {self.ifname}")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        try:
            if self._ipr is not None:
                await self._call(self._remove_all)
        finally:
            await self._close()

    # -- snapshots → wanted addresses ------------------------------------------------
    def _on_snapshot(self, snapshot: Snapshot, everything: bool = False) -> None:
        keys: Iterable[ServiceKey] = snapshot.services if everything else snapshot.changed
        for key in keys:
            svc = snapshot.services.get(key)
            new = svc.ips if svc is not None and not svc.headless else ()
            if new and not all(map(self._may_hold, new)):
                refused = [ip for ip in new if not self._may_hold(ip)]
                log.warning("service %s: ClusterSetIP %s not put on %s: outside "
                            "--clusterset-cidr %s, or an address no ClusterSetIP may be",
                            key, ", ".join(refused), self.ifname,
                            ",".join(map(str, self.pools)))
                new = tuple(ip for ip in new if ip not in refused)
            old = self._by_key.get(key, ())
            if new == old:
                continue
            if new:
                self._by_key[key] = new
            else:
                self._by_key.pop(key, None)
            for ip in old:
                self._wanted[ip] -= 1
                if self._wanted[ip] <= 0:
                    del self._wanted[ip]
                    self._dirty.add(ip)
            for ip in new:
                self._wanted[ip] += 1
                if self._wanted[ip] == 1:
                    self._dirty.add(ip)
        if not self._complete and self.store.loaded.is_set():
            # Only now is an address on the link that no service wants known to be stale.
            self._complete = self._resync = True
            self._wake.set()
        if self._dirty:
            self._wake.set()

    @property
    def wanted(self) -> frozenset[str]:
        return frozenset(self._wanted)

    async def _sync_loop(self) -> None:
        delay = RETRY_INITIAL_S
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            resync, self._resync = self._resync, False
            try:
                await self._call(self._apply, dirty, resync, self._complete)
                delay = RETRY_INITIAL_S
                self.error = None
            except (NetlinkError, OSError) as exc:
                self.error = f"{self.ifname}: {exc}"
                log.error("vip interface %s: %s; resynchronising in %.1f s", self.ifname, exc,
                          delay)
                self._dirty |= dirty
                self._resync = True
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                self._wake.set()

    # -- netlink (runs in the worker thread only) --------------------------------------
    async def _call(self, func: Any, *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def _open(self) -> None:
        # Named before the link is touched: a gateway stopping beside this one from here
        # on sees it and leaves the addresses in place.
        self._owner = _hold_owner_name(self.ifname)
        self._ipr = IPRoute()
        self._attach()

    def _attach(self) -> None:
        """Look the interface up by name (create it when missing and allowed), set it up."""
        assert self._ipr is not None
        found = self._ipr.link_lookup(ifname=self.ifname)
        if not found:
            if not self.create:
                raise VipError(f"--vip-interface {self.ifname}: no such interface")
            try:
                self._ipr.link("add", ifname=self.ifname, kind="dummy")
            except NetlinkError as exc:
                raise VipError(
                    f"--vip-interface {self.ifname}: no such interface, and a dummy link "
                    f"cannot be created ({exc.args[1] if len(exc.args) > 1 else exc}); "
                    "create it, or name an existing interface such as lo") from None
            self.created = True
            found = self._ipr.link_lookup(ifname=self.ifname)
            log.info("vip interface %s created (dummy)", self.ifname)
        self.index = found[0]
        try:
            self._ipr.link("set", index=self.index, state="up")
        except NetlinkError as exc:
            raise VipError(f"--vip-interface {self.ifname}: cannot set it up: {exc}") from None

    def _may_hold(self, ip: str) -> bool:
        """Whether a ClusterSetIP may go on the interface. Whatever address an import
        names, the node accepted as its own: 169.254.169.254 (the cloud metadata service,
        which the kubelet and the node's pods ask), a node IP or a Service IP would have
        been answered by the gateway's listener instead, relaying to the import's
        endpoints. An address of a family --clusterset-cidr has a range for must be in it;
        one of another family (a v4-only range, a dual-stack controller) must at least be
        an address no host holds for itself."""
        addr = ipaddress.ip_address(ip)
        pool = next((p for p in self.pools if p.version == addr.version), None)
        if pool is not None:
            return addr in pool
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return False
        return not (addr.is_link_local or addr.is_loopback or addr.is_unspecified
                    or addr.is_multicast)

    def _ours(self, ip: str) -> bool:
        """A host address we may remove: one we added, or a stale one in our range."""
        if ip in self.present or self.created:
            return True
        addr = ipaddress.ip_address(ip)
        return any(addr in pool for pool in self.pools)

    def _dump(self) -> set[str]:
        assert self._ipr is not None
        return {
            a.get("address") for a in self._ipr.addr("dump", index=self.index)
            if a["prefixlen"] == (128 if a["family"] == socket.AF_INET6 else 32)
            and a.get("address")
        }

    def _apply(self, dirty: set[str], resync: bool, prune: bool) -> None:
        """Add and remove the `dirty` addresses; on `resync` compare the whole link. Our
        addresses no service wants are removed only when `prune` (the snapshot is
        complete); until then they are adopted, so a wanted one is never re-added."""
        assert self._ipr is not None
        wanted = self._wanted
        if resync:
            self._attach()  # the link may have been deleted and made again meanwhile
            on_link = self._dump()
            self.present = {ip for ip in on_link if ip in wanted or self._ours(ip)}
            dirty = dirty | set(wanted) | (self.present if prune else set())
        for ip in sorted(dirty):
            if ip in wanted and ip not in self.present:
                self._add(ip)
            elif ip not in wanted and ip in self.present:
                self._del(ip)

    def _add(self, ip: str) -> None:
        assert self._ipr is not None
        try:
            self._ipr.addr("add", index=self.index, address=ip, prefixlen=_host_prefix(ip),
                           flags=IFA_F_NODAD if ":" in ip else 0)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        self.present.add(ip)
        self.adds += 1
        log.info("vip %s/%d added on %s", ip, _host_prefix(ip), self.ifname)

    def _del(self, ip: str) -> None:
        assert self._ipr is not None
        try:
            self._ipr.addr("del", index=self.index, address=ip, prefixlen=_host_prefix(ip))
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                raise
        self.present.discard(ip)
        self.removes += 1
        log.info("vip %s/%d removed from %s", ip, _host_prefix(ip), self.ifname)

    def _remove_all(self) -> None:
        assert self._ipr is not None
        # Our own name goes first: of two gateways stopping together, one of them then
        # sees no other and cleans up.
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        others = _other_owners(self.ifname)
        if others:
            log.info("vip interface %s: %d other gateway(s) on this network use it; leaving "
                     "its %d addresses to them", self.ifname, others, len(self.present))
            self.present.clear()
            return
        if self.created:
            self._ipr.link("del", index=self.index)
            log.info("vip interface %s removed with its %d addresses", self.ifname,
                     len(self.present))
            self.present.clear()
            return
        for ip in sorted(self.present):
            self._del(ip)

    async def _close(self) -> None:
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        if self._ipr is not None and self._executor is not None:
            ipr, self._ipr = self._ipr, None
            await self._call(ipr.close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def _hold_owner_name(ifname: str) -> socket.socket:
    """Bind this gateway's abstract name for `ifname`; it lasts as long as the socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # Random, not the pid: every pod's gateway may be pid 1 in its own pid namespace.
        sock.bind(f"\0{OWNER_PREFIX}{ifname}/{os.urandom(8).hex()}")
    except OSError as exc:
        sock.close()
        raise VipError(f"--vip-interface {ifname}: cannot bind its owner socket: {exc}") from None
    return sock


def _other_owners(ifname: str) -> int:
    """How many other live gateways in this network namespace hold `ifname`'s name.

    Unreadable /proc counts as none: the addresses are removed, as before this check."""
    wanted = f"@{OWNER_PREFIX}{ifname}/"
    try:
        with open(PROC_NET_UNIX, encoding="ascii", errors="replace") as table:
            # Num RefCount Protocol Flags Type St Inode Path: the path is the 8th field.
            return sum(1 for line in table
                       if len(fields := line.split()) > 7 and fields[7].startswith(wanted))
    except OSError as exc:
        log.warning("vip interface %s: cannot read %s (%s); removing the addresses",
                    ifname, PROC_NET_UNIX, exc)
        return 0
