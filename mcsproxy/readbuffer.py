"""The one receive buffer that reads passing their bytes straight on share.

A TCP direction that carries bulk data (proxy/tcp.py, BulkReader) and the body of an
HTTP response read whole from an endpoint (http/pool.py, UpstreamConn) are read into
READ and handed to the other side's transport.write in the same callback: no bytes
object is allocated and filled per read, and the bytes the kernel just wrote are sent
from where they are (callgrind, 64 KiB HTTP responses: 192k -> 69k instructions per
request, most of it the two copies of each body a bytes read and the parser made).

When that transport could not send everything and queued the rest, its queue still
points into this memory: `detach` gives it to the transport and takes a fresh buffer for
the next read (only under backpressure).
"""

from __future__ import annotations

from typing import Final

# Bytes read from a socket at once.
READ_BUFFER_BYTES: Final = 256 * 1024


class ReadBuffer:
    __slots__ = ("data", "view")

    def __init__(self) -> None:
        self.data = bytearray(READ_BUFFER_BYTES)
        self.view = memoryview(self.data)

    def detach(self) -> None:
        self.data = bytearray(READ_BUFFER_BYTES)
        self.view = memoryview(self.data)


READ: Final = ReadBuffer()
