"""The access log: one line per proxied connection or HTTP request, off by default.

`--access-log -` (stderr) or `--access-log PATH`, `--access-log-format text|json`. The
event loop only appends a tuple of fields to a bounded list; a writer task formats and
writes batches in a worker thread, so a slow disk or a blocked stderr never stalls the
proxy. When the list is full, records are dropped and counted
(`mcsproxy_accesslog_dropped_total`) rather than blocking.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any

from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("mcsproxy.accesslog")

QUEUE_MAX = 8192  # records waiting to be written
FLUSH_INTERVAL_S = 0.2
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

    def __init__(self, target: str, fmt: str = "text", queue_max: int = QUEUE_MAX) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.target = target
        self.format = format_json if fmt == "json" else format_text
        self.queue_max = queue_max
        self.pending: list[dict[str, Any]] = []
        self.dropped = 0
        self.write_failed = 0
        self.written = 0
        self._file: IO[str] | None = None
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
        if self.target == "-":
            self._file = sys.stderr
        else:
            # Opening once at start is the only blocking file call made on the loop.
            try:
                self._file = open(self.target, "a", encoding="utf-8")  # noqa: SIM115
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
        if not batch or self._file is None:
            return
        await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        assert self._file is not None
        text = "".join(self.format(r) + "\n" for r in batch)
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.warning("access log: cannot write %d records: %s", len(batch), exc)
            self.write_failed += len(batch)  # this thread's own counter: no race with record()
            return
        self.written += len(batch)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await self.flush()
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None
