"""`mcsproxy demo --load`: steady, rate-limited traffic through every gateway.

Each consumer cluster's clients call `web` (HTTP) and `echo` (TCP) through their own
gateway's ClusterSetIPs; every couple of seconds one line shows where the answers came
from, so a kill/restore shows up as a shifting split.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout

REQUESTS_PER_SECOND = 20  # per (consumer cluster, service)
REPORT_EVERY_S = 2.0
ECHO_PREFIX = re.compile(rb"^\[[^@\]]+@([a-z0-9-]+)\] ")


class LoadGenerator:
    def __init__(self, imports: dict[str, dict[str, Any]]) -> None:
        self.targets: list[tuple[str, str, str, int]] = []  # consumer, service, ip, port
        for consumer, services in imports.items():
            for name in ("web", "echo"):
                spec = services[name]["spec"]
                if spec.get("ips"):
                    self.targets.append((consumer, name, spec["ips"][0], spec["ports"][0]["port"]))
        self.window: dict[tuple[str, str], Counter[str]] = {}

    async def _http(self, http: ClientSession, ip: str, port: int) -> str:
        async with http.get(f"http://{ip}:{port}/") as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            return str(json.loads(await resp.text())["cluster"])

    async def _echo(self, ip: str, port: int) -> str:
        # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel (Ctrl-C) that
        # arrives as the wait completes (gh-86296), and the demo would not stop.
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(ip, port)
        try:
            writer.write(b"ping\n")
            async with asyncio.timeout(2):
                line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        m = ECHO_PREFIX.match(line)
        return m.group(1).decode() if m else "bad reply"

    async def _drive(self, http: ClientSession, consumer: str, svc: str, ip: str,
                     port: int) -> None:
        interval = 1 / REQUESTS_PER_SECOND
        while True:
            started = time.monotonic()
            try:
                served_by = await (self._http(http, ip, port) if svc == "web"
                                   else self._echo(ip, port))
            except (OSError, ClientError, TimeoutError) as exc:
                served_by = f"error:{type(exc).__name__}"
            self.window.setdefault((consumer, svc), Counter())[served_by] += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def report(self) -> str:
        parts = []
        for (consumer, svc), counts in sorted(self.window.items()):
            total = sum(counts.values()) or 1
            split = " ".join(f"{k} {100 * v // total}%" for k, v in counts.most_common())
            parts.append(f"{consumer}→{svc}: {split}")
        self.window = {}
        return " | ".join(parts)

    async def run(self) -> None:
        async with ClientSession(timeout=ClientTimeout(total=2)) as http:
            drivers = [asyncio.create_task(self._drive(http, *t), name=f"load {t[0]} {t[1]}")
                       for t in self.targets]
            try:
                while True:
                    await asyncio.sleep(REPORT_EVERY_S)
                    print(time.strftime("%H:%M:%S"), self.report(), flush=True)
            finally:
                for d in drivers:
                    d.cancel()
                await asyncio.gather(*drivers, return_exceptions=True)
