"""Large admin answers written as they are built, the loop given back as they go.

The admin listener shares its loop with the gateway's proxy and DNS. An answer covering
every service of a large clusterset, built and serialised whole, stopped both for as
long as that took: with 10,000 services of 30 endpoints, /config_dump 7.4-8.9 s,
/endpoints 2.1 s, /api/status 1.0 s (which the status page asks for every 1.5 s).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any, Final

from aiohttp import web

# Units of work (a service, a port, an endpoint) done between two turns of the loop:
# ~10 ms of building and serialising.
WORK_PER_TURN: Final = 300


class Turns:
    """Counts units of work; says when WORK_PER_TURN of them were done since the last
    turn of the loop it said was due."""

    __slots__ = ("work",)

    def __init__(self) -> None:
        self.work = 0

    def due(self, units: int) -> bool:
        self.work += units
        if self.work < WORK_PER_TURN:
            return False
        self.work = 0
        return True


async def stream_json_list(request: web.Request, prefix: str,
                           items: Iterable[tuple[Any, int]],
                           suffix: Callable[[], str]) -> web.StreamResponse:
    """Answer `prefix`, the JSON of each item of `items` comma-separated, then `suffix()`.

    `items` gives (JSON-able value, units of work it cost) and is best a generator, so
    that the building happens between the turns too; `suffix` is called after it ends,
    so it may hold what the items gathered. The loop is given a turn whenever the items
    written since the last one cost WORK_PER_TURN units."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    if request.method == "HEAD":
        # aiohttp sends what a StreamResponse writes after a HEAD's head too: the next
        # answer on that connection was read from the middle of this body.
        await response.write_eof()
        return response
    try:
        await response.write(prefix.encode())
        batch: list[str] = []
        turns = Turns()
        separator = ""
        for item, units in items:
            batch.append(json.dumps(item))
            if turns.due(units):
                await response.write((separator + ", ".join(batch)).encode())
                batch, separator = [], ", "
                await asyncio.sleep(0)
        if batch:
            await response.write((separator + ", ".join(batch)).encode())
        await response.write(suffix().encode())
        await response.write_eof()
    except ConnectionError:
        pass  # the client left mid-answer: nobody to tell
    return response
