"""`--workers N`: each extra proxy process reports its counters to the main one.

A worker serves its report (its pid, its metric families, its active connections per
endpoint, the endpoints it has ejected) to whoever connects to its abstract Unix socket
`@mcsproxy-<main pid>-worker-<index>` (Linux; no file to create or clean up). The main
process's admin asks every worker when `/metrics` or the status page is read, so totals
are exact at scrape time, not a second late. Counters of a worker that restarted are kept
from its last report (`retired`), so the sums never go backwards; what a dying worker
counted after its last report is lost. Like the main process's own, the retired counters
of a service port are exported only while it is served and forgotten once it has been gone
for RETIRED_KEEP_S: they used to stay in /metrics for good, so every worker restart under
service churn added the series of services long withdrawn.

A report is newline-delimited JSON, made and read a line at a time with a turn of the
loop between lines, as both processes proxy on that loop: a first line {"pid", "index"}
sent at once (a worker that cannot answer is known within FETCH_TIMEOUT_S), then lines
{"family": ...} of at most REPORT_PART_SERIES series each and {"active": ...} of at most
REPORT_PART_UPSTREAMS upstream sets each, {"ejected": ...} when it has ejected any, and
last {"end": true}: a report cut short is
no report. Made and read whole, the report of 10,000 services (360,000 series) stopped
the loops for 1.7-2.6 s (both ends measured in one process), longer than the 1 s the
main process waited for it: from about 5,000 services on, a worker's counters were
missing from most scrapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from mcsproxy.gc_pause import collector_off
from mcsproxy.observability.families import Families, Family

log = logging.getLogger("mcsproxy.observability.workers")

# A worker's first line, from connecting; and its whole report (it collects its families
# first, a few upstream sets per turn of its loop: seconds at 10,000 services).
FETCH_TIMEOUT_S = 1.0
REPORT_TIMEOUT_S = 10.0
# A service port's counters of sets (or worker processes) gone are added to its series as
# long as it comes back within this long (longer than any scrape interval).
RETIRED_KEEP_S = 600.0
REPORT_MAX_BYTES = 64 * 1024 * 1024
# Series per {"family"} line and upstream sets per {"active"} line: ~0.5 MB, a few ms to
# make or read.
REPORT_PART_SERIES = 5000
REPORT_PART_UPSTREAMS = 1000
REPORT_LINE_MAX_BYTES = 16 * 1024 * 1024

# What a worker has ejected: upstream set → "addr:port" → seconds of ejection left.
Ejections = dict[str, dict[str, float]]


@dataclass
class WorkerReport:
    pid: int
    families: Families
    active: dict[str, dict[str, int]]  # upstream set → "addr:port" → open connections
    # Its {"family"} lines as they came: what WorkerReports keeps of a report until the
    # next, as bytes, which the cyclic collector never scans (the parsed families, some
    # objects a series, it would, in every collection until the next scrape).
    family_lines: list[bytes]
    ejected: Ejections = field(default_factory=dict)


def report_lines(families: Families,
                 active: Iterable[tuple[str, dict[str, int]]],
                 ejected: Ejections | None = None) -> Iterator[bytes]:
    """The lines of a report after its first (see the module docstring). `families` (the
    report's own) is emptied as it goes, so that its series are freed as they are sent.
    `ejected`: the worker's ejections, one {"ejected"} line (few: only ejected endpoints)."""
    for family in families:
        for piece in family.pieces(REPORT_PART_SERIES):
            yield _line({"family": piece.to_json()})
        family.values.clear()
    part: dict[str, dict[str, int]] = {}
    for upstream, hosts in active:
        part[upstream] = hosts
        if len(part) >= REPORT_PART_UPSTREAMS:
            yield _line({"active": part})
            part = {}
    if part:
        yield _line({"active": part})
    if ejected:
        yield _line({"ejected": ejected})
    yield _line({"end": True})


def _line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def health_scope(workers: int) -> str | None:
    """What the health and ejection state shown covers, said wherever it is shown when
    there are workers: each process ejects on the failures it sees; a report carries
    counters, connections and ejections, and only /endpoints and /explain show the
    workers' ejections, per endpoint (`ejected_by_workers`). None with one process."""
    if workers <= 1:
        return None
    return (f"health and ejections shown are the main process's; the other {workers - 1} "
            f"of the {workers} proxy processes eject on the failures they see themselves, "
            "listed per endpoint by /endpoints and /explain (ejected_by_workers)")


def socket_name(main_pid: int, index: int) -> str:
    return f"\0mcsproxy-{main_pid}-worker-{index}"


class WorkerReporter:
    """In a worker: answers each connection with its report, then closes. `collect`
    gives the worker's families and active connections (collected with turns of the
    loop: Observer.worker_report)."""

    def __init__(self, index: int,
                 collect: Callable[[], Awaitable[tuple[Families,
                                                       Iterable[tuple[str, dict[str, int]]]]]],
                 main_pid: int | None = None,
                 ejections: Callable[[], Ejections] | None = None) -> None:
        self.index = index
        self.collect = collect
        self.ejections = ejections  # the worker's ejections, read as each report is made
        self.pid = os.getpid()  # the main process tells a restarted worker by it
        self.main_pid = os.getppid() if main_pid is None else main_pid
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(socket_name(self.main_pid, self.index))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Without the cyclic collector: see Observer.gather.
            with collector_off():
                async with asyncio.timeout(REPORT_TIMEOUT_S):
                    writer.write(_line({"pid": self.pid, "index": self.index}))
                    families, active = await self.collect()
                    ejected = self.ejections() if self.ejections is not None else None
                    for line in report_lines(families, active, ejected):
                        writer.write(line)
                        await writer.drain()
                        await asyncio.sleep(0)  # drain() returns at once below its limit
        except (OSError, TimeoutError) as exc:
            log.debug("worker report not delivered: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def fetch_report(main_pid: int, index: int) -> WorkerReport | None:
    """A worker's report, read a line at a time; None when it did not answer in time, or
    its report was cut short or malformed (the caller keeps its last one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(REPORT_TIMEOUT_S):
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                await asyncio.get_running_loop().sock_connect(sock, socket_name(main_pid, index))
                reader, writer = await asyncio.open_unix_connection(
                    sock=sock, limit=REPORT_LINE_MAX_BYTES)
                first = json.loads(await reader.readline())
            report = WorkerReport(int(first["pid"]), Families(), {}, [])
            size = 0
            while line := await reader.readline():
                size += len(line)
                if size > REPORT_MAX_BYTES:
                    log.warning("worker %d report exceeds %d bytes; ignored", index,
                                REPORT_MAX_BYTES)
                    return None
                part = json.loads(line)
                if "family" in part:
                    report.families.add_json(part["family"])
                    report.family_lines.append(line)
                elif "active" in part:
                    report.active.update(part["active"])
                elif "ejected" in part:
                    report.ejected.update(part["ejected"])
                elif part.get("end") is True:
                    return report
                await asyncio.sleep(0)
        log.debug("worker %d report cut short", index)
        return None
    except (OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        log.debug("worker %d did not report: %s", index, exc)
        return None
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()


class WorkerReports:
    """In the main process: the latest report of every worker, plus the retired counters."""

    def __init__(self, workers: int, main_pid: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.indices = range(1, workers)
        self.main_pid = os.getpid() if main_pid is None else main_pid
        self.pids: dict[int, int] = {}
        self.last: dict[int, list[bytes]] = {}  # each worker's last report: its family lines
        self.retired = Families()
        self._clock = clock
        self._gone_at: dict[tuple[str, str], float] = {}  # retired (service, port) not served

        self.reporting = 0
        self.active: dict[str, dict[str, int]] = {}  # upstream → "addr:port" → connections
        # upstream → "addr:port" → worker index → seconds of ejection left, as last asked
        self.ejected: dict[str, dict[str, dict[int, float]]] = {}
        # One merge at a time: a merge awaits between parts, and two interleaved (a scrape
        # and the status page) both retired a restarted worker's last report.
        self._merging = asyncio.Lock()

    async def merge_into(self, families: Families) -> None:
        """Ask every worker, then add their families (and the retired counters) to ours,
        REPORT_PART_SERIES series per turn of the loop.

        A worker that does not answer this time counts with its last report's counters, so
        a slow worker never makes a total dip."""
        async with self._merging:
            await self._merge_into(families)

    async def _merge_into(self, families: Families) -> None:
        reports = await asyncio.gather(*(fetch_report(self.main_pid, i) for i in self.indices))
        self.reporting = 0
        self.active = {}
        self.ejected = {}
        for index, report in zip(self.indices, reports, strict=True):
            if report is None:
                if index in self.last:
                    last = await families_from_lines(self.last[index])
                    await merge_gradually(families, last, counters_only=True)
                continue
            if self.pids.get(index, report.pid) != report.pid and index in self.last:
                self.retired.merge(await families_from_lines(self.last[index]),
                                   counters_only=True)
            self.pids[index] = report.pid
            self.last[index] = report.family_lines
            self.reporting += 1
            await merge_gradually(families, report.families)
            for upstream, hosts in report.active.items():
                mine = self.active.setdefault(upstream, {})
                for host, n in hosts.items():
                    mine[host] = mine.get(host, 0) + n
            for upstream, ejected in report.ejected.items():
                for host, left in ejected.items():
                    self.ejected.setdefault(upstream, {}).setdefault(host, {})[index] = left
        if any(fam.values for fam in self.retired):
            served = await served_ports(families)
            families.merge(self._served_retired(served), counters_only=True)

    def _served_retired(self, served: set[tuple[str, str]]) -> Families:
        """The retired series of the service ports served now (and those without a service);
        those of a port gone for RETIRED_KEEP_S are dropped from `retired`."""
        now = self._clock()
        gone_at: dict[tuple[str, str], float] = {}
        out = Families()
        for fam in self.retired:
            at = _service_port_at(fam)
            mine = out.family(fam.name, fam.kind, fam.help, fam.labels, summed=fam.summed,
                              bounds=fam.bounds)
            for key, value in list(fam.values.items()):
                port = (key[at[0]], key[at[1]]) if at is not None else None
                if port is None or port in served:
                    mine.values[key] = value
                    continue
                since = gone_at[port] = self._gone_at.get(port, now)
                if now - since > RETIRED_KEEP_S:
                    del fam.values[key]
                    del gone_at[port]
        self._gone_at = gone_at
        return out


def _service_port_at(fam: Family) -> tuple[int, int] | None:
    if "service" in fam.labels and "port" in fam.labels:
        return fam.labels.index("service"), fam.labels.index("port")
    return None


async def served_ports(families: Families) -> set[tuple[str, str]]:
    """The (service, port) label pairs of every series a live process exports, read
    REPORT_PART_SERIES series per turn of the loop."""
    out: set[tuple[str, str]] = set()
    for fam in families:
        at = _service_port_at(fam)
        if at is None:
            continue
        service, port = at
        keys = iter(fam.values)
        while chunk := list(islice(keys, REPORT_PART_SERIES)):
            out.update((key[service], key[port]) for key in chunk)
            await asyncio.sleep(0)
    return out


async def families_from_lines(lines: list[bytes]) -> Families:
    """The families of a report's {"family"} lines, a line per turn of the loop."""
    out = Families()
    for line in lines:
        out.add_json(json.loads(line)["family"])
        await asyncio.sleep(0)
    return out


async def merge_gradually(into: Families, other: Families, *, counters_only: bool = False) -> None:
    """Families.merge, REPORT_PART_SERIES series per turn of the loop. Empties `other`
    as it goes (freed whole, 360,000 series took 30-40 ms of the loop)."""
    for family in other:
        for piece in family.pieces(REPORT_PART_SERIES):
            into.merge_family(piece, counters_only=counters_only)
            await asyncio.sleep(0)
        family.values.clear()
