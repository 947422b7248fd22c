"""One line per event, key=value, levels respected."""

from __future__ import annotations

import logging
import os
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def setup_logging(level: str, worker: int | None = None) -> None:
    """`worker`: the index of this process under `--workers N` (N > 1), written on every
    line, since the workers share one stderr; None for a process that runs alone."""
    tag = "" if worker is None else f"worker={worker} "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        OneLineFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s %(message)s",
                         datefmt="%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # aiohttp's access log is per request: our own access log owns that job.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp's server logs each malformed request to the admin API with a traceback:
    # anyone who can reach the port could fill the log. One line a second, with a count.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RateLimit) for f in server_log.filters):
        server_log.addFilter(RateLimit(1.0))


class OneLineFormatter(logging.Formatter):
    """A record's message on one line, whatever text from outside it holds.

    Messages quote what clients and member clusters send: request paths (URL-decoded by
    aiohttp), header values, names. A CR/LF in one wrote a second line that looked like a
    record of its own (any level, any logger), and an ANSI escape recolored or hid lines
    on a terminal. Characters that are not printable are written escaped, as repr() does
    (`\\n`, `\\x1b`); a traceback (exc_info, debug) still follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():
            record.message = escape_unprintable(message)
        return super().formatMessage(record)


def escape_unprintable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RateLimit(logging.Filter):
    """Lets one record through per `interval_s`; the next one says how many were dropped."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last = -float("inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.dropped += 1
            return False
        self.last = now
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} similar records dropped)"
            self.dropped = 0
        return True


def exception_line(exc: BaseException) -> str:
    """`Type: message (file:line)`, the line where `exc` was raised: an unexpected error in
    one log line, the full traceback being for --log-level debug."""
    message = " ".join(str(exc).split())  # a multi-line message would break the one line
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    tb = exc.__traceback__
    if tb is None:
        return text
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{text} ({_short_path(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"


def _short_path(path: str) -> str:
    """`path` relative to the sys.path entry it is under (mcsproxy/dns/forward.py rather
    than a site-packages path; the longest entry wins, as imports resolve it)."""
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or "."), "")
        if path.startswith(root) and len(root) > len(best):
            best = root
    return path[len(best):]
