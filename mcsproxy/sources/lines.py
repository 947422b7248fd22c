"""Reading a long-lived response one newline-terminated message at a time.

Both streams a gateway follows send one JSON document a line: a Kubernetes watch and the
controller's stream. Lines are cut from whatever chunks arrive (readany, not readline, so
a line can be larger than aiohttp's read buffer), and a line that never ends is an error
rather than unbounded memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp


class LineTooLong(ValueError):
    """More than the allowed bytes arrived without a newline."""


class LineTooSlow(TimeoutError):
    """A line begun was not completed within the allowed time."""


async def read_lines(
    content: aiohttp.StreamReader,
    on_line: Callable[[bytes], None],
    *,
    max_bytes: int,
    read_timeout_s: float | None = None,
    line_timeout_s: float | None = None,
) -> int:
    """Call `on_line` with each non-blank line until the stream ends; return how many.

    `read_timeout_s` bounds each wait for the next chunk; leave it None only when the
    response already has a socket read timeout. `line_timeout_s` bounds the time a line
    may take to complete once begun: a peer trickling a byte at a time, never a newline,
    passes every chunk timeout and is never given up otherwise.
    """
    loop = asyncio.get_running_loop()
    buffer = bytearray()
    scanned = 0  # the bytes of `buffer` already searched for a newline
    count = 0
    begun = 0.0  # when the incomplete line in `buffer` began
    while True:
        # Not asyncio.wait_for: on Python 3.11, when a chunk and a cancel arrive in the
        # same loop turn it returns the chunk and drops the cancel, and a task following
        # a stream for ever never ends (a gateway's source outliving its shutdown).
        async with asyncio.timeout(read_timeout_s):
            chunk = await content.readany()
        if not chunk:
            return count
        if not buffer:
            begun = loop.time()
        buffer += chunk
        while (end := buffer.find(b"\n", scanned)) >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            scanned = 0
            begun = loop.time()  # what is left of the chunk begins the next line
            if line.strip():
                on_line(line)
                count += 1
        scanned = len(buffer)
        if scanned > max_bytes:
            raise LineTooLong(f"message longer than {max_bytes} bytes without a newline")
        if buffer and line_timeout_s is not None and loop.time() - begun > line_timeout_s:
            raise LineTooSlow(f"a message begun was not completed in {line_timeout_s:g} s")
