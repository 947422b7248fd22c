"""`--workers N`: each extra proxy process reports its counters to the main one.

A worker serves one JSON document (its pid, its metric families, its active connections
per endpoint) to whoever connects to its abstract Unix socket
`@mcsproxy-<main pid>-worker-<index>` (Linux; no file to create or clean up). The main
process's admin asks every worker when `/metrics` or the status page is read, so totals
are exact at scrape time, not a second late. Counters of a worker that restarted are kept
from its last report (`retired`), so the sums never go backwards; what a dying worker
counted after its last report is lost. Like the main process's own, the retired counters
of a service port are exported only while it is served and forgotten once it has been gone
for RETIRED_KEEP_S: they used to stay in /metrics for good, so every worker restart under
service churn added the series of services long withdrawn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from mcsproxy.observability.families import Families, Family

log = logging.getLogger("mcsproxy.observability.workers")

FETCH_TIMEOUT_S = 1.0
# A service port's counters of sets (or worker processes) gone are added to its series as
# long as it comes back within this long (longer than any scrape interval).
RETIRED_KEEP_S = 600.0
REPORT_MAX_BYTES = 64 * 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024


def socket_name(main_pid: int, index: int) -> str:
    return f"\0mcsproxy-{main_pid}-worker-{index}"


class WorkerReporter:
    """In a worker: answers each connection with `report()` as JSON, then closes."""

    def __init__(self, index: int, report: Callable[[], dict[str, Any]],
                 main_pid: int | None = None) -> None:
        self.index = index
        self.report = report
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
            writer.write(json.dumps(self.report(), separators=(",", ":")).encode())
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            log.debug("worker report not delivered: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def fetch_report(main_pid: int, index: int) -> dict[str, Any] | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            await asyncio.get_running_loop().sock_connect(sock, socket_name(main_pid, index))
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            # Until EOF (the worker closes after its report): one read() returns whatever
            # has arrived, and a report of some 100 KB (a few dozen services) arrives in
            # pieces, more so when the worker is descheduled mid-write. The truncated
            # JSON used to count as "did not report", so the worker's last full report
            # stood in, and its newer counts were missing from every such scrape.
            data = bytearray()
            while chunk := await reader.read(READ_CHUNK_BYTES):
                data += chunk
                if len(data) > REPORT_MAX_BYTES:
                    log.warning("worker %d report exceeds %d bytes; ignored", index,
                                REPORT_MAX_BYTES)
                    return None
        return json.loads(data)  # type: ignore[no-any-return]
    except (OSError, TimeoutError, ValueError) as exc:
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
        self.last: dict[int, Families] = {}
        self.retired = Families()
        self._clock = clock
        self._gone_at: dict[tuple[str, str], float] = {}  # retired (service, port) not served

        self.reporting = 0
        self.active: dict[str, dict[str, int]] = {}  # upstream → "addr:port" → connections

    async def merge_into(self, families: Families) -> None:
        """Ask every worker, then add their families (and the retired counters) to ours.

        A worker that does not answer this time counts with its last report's counters, so
        a slow worker never makes a total dip."""
        reports = await asyncio.gather(*(fetch_report(self.main_pid, i) for i in self.indices))
        self.reporting = 0
        self.active = {}
        for index, report in zip(self.indices, reports, strict=True):
            if report is None:
                if index in self.last:
                    families.merge(self.last[index], counters_only=True)
                continue
            fresh = Families.from_json(report["families"])
            if self.pids.get(index, report["pid"]) != report["pid"] and index in self.last:
                self.retired.merge(self.last[index], counters_only=True)
            self.pids[index] = report["pid"]
            self.last[index] = fresh
            self.reporting += 1
            families.merge(fresh)
            for upstream, hosts in report.get("active", {}).items():
                mine = self.active.setdefault(upstream, {})
                for host, n in hosts.items():
                    mine[host] = mine.get(host, 0) + n
        families.merge(self._served_retired(served_ports(families)), counters_only=True)

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


def served_ports(families: Families) -> set[tuple[str, str]]:
    """The (service, port) label pairs of every series a live process exports."""
    out: set[tuple[str, str]] = set()
    for fam in families:
        at = _service_port_at(fam)
        if at is not None:
            out.update((key[at[0]], key[at[1]]) for key in fam.values)
    return out
