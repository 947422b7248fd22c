"""The access log: one line per proxied connection or HTTP request, off by default.

`--access-log -` (stderr) or `--access-log PATH`, `--access-log-format text|json`. The
event loop only appends a tuple of fields to a bounded list; a writer task formats and
writes batches in a worker thread, so a slow disk or a blocked stderr never stalls the
proxy. When the list is full, records are dropped and counted
(`mcsproxy_accesslog_records_total{outcome="dropped"}`) rather than blocking.

A file is written with one `write(2)` per batch on an `O_APPEND` descriptor, so the
processes of `--workers N` sharing it never interleave inside a line. Before each batch
the path is checked: when logrotate (or anyone) has renamed or removed the file, a new
one is opened there, so no SIGHUP or copytruncate is needed. A write that fails (full
disk) loses the rest of its batch, counted as dropped; the next batch starts on a new
line, so every record counted written is one whole line.

Writes run on a daemon thread, not asyncio's executor: a write that never returns (an
NFS server gone, a stderr pipe nobody reads) would otherwise be joined at loop shutdown
and keep the gateway from exiting after SIGTERM. Stopping waits STOP_TIMEOUT_S for the
last batch, then counts it as not written and leaves the thread behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from mcsproxy.tasks import cancel_and_wait, in_daemon_thread, spawn

log = logging.getLogger("mcsproxy.accesslog")

QUEUE_MAX = 8192  # records waiting to be written
FLUSH_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 5.0  # for the last batch and the close at stop
FORMATS = ("text", "json")

# The fields of one record, in order; "-" stands for "none" in the text format.
FIELDS = ("time", "kind", "client", "listener", "upstream", "cluster", "endpoint",
          "outcome", "attempts", "connect_ms", "duration_ms", "bytes_to_upstream",
          "bytes_to_client", "method", "path", "status")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def format_text(record: dict[str, Any]) -> str:
    parts = []
    for name in FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if name == "time":
            value = _iso(value)
        elif isinstance(value, float):
            value = f"{value:.3f}"
        text = str(value)
        if not text or any(c in text for c in ' "\\=') or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{name}={text}")
    return " ".join(parts)


def format_json(record: dict[str, Any]) -> str:
    out = {k: record[k] for k in FIELDS if record.get(k) is not None}
    out["time"] = _iso(record["time"])
    return json.dumps(out, separators=(",", ":"))


class AccessLog:
    """Component: the writer task; `record(**fields)` is what the proxies call."""

    def __init__(self, target: str, fmt: str = "text", queue_max: int = QUEUE_MAX,
                 stop_timeout: float = STOP_TIMEOUT_S) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.target = target
        self.format = format_json if fmt == "json" else format_text
        self.queue_max = queue_max
        self.stop_timeout = stop_timeout
        self.pending: list[dict[str, Any]] = []
        self.dropped = 0
        self.write_failed = 0
        self.written = 0
        self._fd: int | None = None  # the file's descriptor (None: stderr, or stopped)
        self._ident: tuple[int, int] | None = None  # its (st_dev, st_ino)
        self._torn = False  # the last write failed mid-line
        # One batch at a time, and never a close under a write: stop() flushes while a
        # cancelled writer task's thread may still be writing, and a descriptor closed
        # under it could be reused by another file the gateway opens.
        self._lock = threading.Lock()
        self._reopen_failed = False
        # Records lost since writes began to fail (0 while they succeed): the failure and
        # the recovery are each logged once, not a warning per batch (5 a second on a
        # full disk, for as long as it stays full).
        self._losing = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def record(self, **fields: Any) -> None:
        """Queue one record (never blocks; drops and counts when the queue is full)."""
        if len(self.pending) >= self.queue_max:
            self.dropped += 1
            return
        fields.setdefault("time", time.time())
        self.pending.append(fields)
        if len(self.pending) == 1:
            self._wake.set()

    async def start(self) -> None:
        if self.target != "-":
            # Opening once at start is the only blocking file call made on the loop.
            try:
                self._open()
            except OSError as exc:  # the bare "[Errno 2] ... 'x/a.log'" named no flag
                raise OSError(exc.errno, f"--access-log {self.target}: cannot open: "
                                         f"{exc.strerror or exc}") from None
        self._tasks.append(spawn(self._writer(), name="access log writer"))

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_INTERVAL_S)  # gather a batch
            await self.flush()

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        await in_daemon_thread(lambda: self._write(batch), "access log write")

    def _open(self) -> None:
        fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        st = os.fstat(fd)
        self._fd, self._ident, self._torn = fd, (st.st_dev, st.st_ino), False

    def _follow_rotation(self) -> None:
        """Reopen the path when the open file is no longer the one there."""
        try:
            st = os.stat(self.target)
            if (st.st_dev, st.st_ino) == self._ident:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return  # cannot tell (a directory's permissions): keep the open file
        old = self._fd
        try:
            self._open()
        except OSError as exc:
            if not self._reopen_failed:
                log.warning("access log: %s was moved or removed and cannot be opened again "
                            "(%s); writing on to the old file", self.target, exc)
            self._reopen_failed = True
            return
        self._reopen_failed = False
        if old is not None:
            os.close(old)
        log.info("access log: %s was moved or removed; writing to a new file there",
                 self.target)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        # The counters are this thread's own (under the lock): no race with record().
        with self._lock:
            lines = [(self.format(r) + "\n").encode() for r in batch]
            if self.target == "-":
                try:
                    sys.stderr.write(b"".join(lines).decode())
                    sys.stderr.flush()
                except (OSError, ValueError) as exc:
                    self._lost(len(batch), exc)
                    return
                self._wrote(len(batch))
                return
            if self._fd is None:  # stopped
                self.write_failed += len(batch)
                return
            self._follow_rotation()
            prefix = b"\n" if self._torn else b""
            data = memoryview(prefix + b"".join(lines))
            done = 0
            try:
                while done < len(data):
                    done += os.write(self._fd, data[done:])
            except OSError as exc:
                if done:
                    self._torn = data[done - 1] != ord("\n")
                whole, end = 0, len(prefix)
                for line in lines:
                    end += len(line)
                    if end > done:
                        break
                    whole += 1
                self.written += whole
                self._lost(len(batch) - whole, exc)
                return
            self._torn = False
            self._wrote(len(batch))

    def _lost(self, n: int, exc: BaseException) -> None:
        """`n` records of a batch not written (under the lock)."""
        self.write_failed += n
        if not self._losing:
            log.warning("access log: cannot write to %s (%s): records are dropped and "
                        "counted until a write succeeds", self.target, exc)
        self._losing += n

    def _wrote(self, n: int) -> None:
        """A whole batch of `n` records written (under the lock)."""
        self.written += n
        if self._losing:
            log.warning("access log: writing to %s again; %d records were lost",
                        self.target, self._losing)
            self._losing = 0

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        left = len(self.pending)
        try:
            async with asyncio.timeout(self.stop_timeout):
                await self.flush()
                # waits for a write in flight: off the loop
                await in_daemon_thread(self._close, "access log close")
        except TimeoutError:
            # The thread may still write its batch one day: these are counted as not
            # written since nobody can tell, and the process is exiting anyway.
            self.write_failed += left
            log.warning("access log: a write to %s has not returned in %g s; stopping "
                        "without it (%d records not written)", self.target,
                        self.stop_timeout, left)

    def _close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
