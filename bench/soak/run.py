"""Soak: the gateway under steady HTTP and TCP load with endpoint churn every second.

Every second the imports file changes (the web service's endpoints rotate, a second
service comes or goes), while keep-alive HTTP users and connect-per-request TCP users run.
Sampled each second from outside: the gateway's RSS (/proc/<pid>/status VmRSS), open
descriptors (/proc/<pid>/fd) and live asyncio tasks (/readyz "tasks"). Reported flat or
not: the median of the last fifth against the median of the first fifth after warm-up.
Then N idle TCP connections are opened and held, and the RSS they cost is reported.

Pinning: this script (load and backends) on core 0, the gateway alone on core 1.

    .venv/bin/python bench/soak/run.py                       # 10 minutes, 10 000 idle
    .venv/bin/python bench/soak/run.py --smoke               # 20 s, 1 000 idle
    .venv/bin/python bench/soak/run.py --duration 3600 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web  # noqa: E402

from bench.common import LOAD_CORE, PROXY_CORE, RESULTS, Procs, machine, wait_port  # noqa: E402
from tests.chaos.support import Port, Svc, write_imports  # noqa: E402

WEB_IP, ECHO_IP = "127.240.78.1", "127.240.78.2"
BACKENDS = [f"127.78.1.{i}" for i in (1, 2, 3)]
HTTP_PORT, TCP_PORT = 8080, 9000
FLAT_GROWTH = 0.10  # RSS may grow 10 % between the first and last fifth and count as flat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def imports(step: int) -> list[Svc]:
    live = [a for i, a in enumerate(BACKENDS) if i != step % 3]
    services = [
        Svc("web", WEB_IP, [Port("web", 80, HTTP_PORT, app_protocol="http")],
            {f"c{i}": [(a, True)] for i, a in enumerate(live)}, namespace="soak"),
        Svc("echo", ECHO_IP, [Port("echo", 9000, TCP_PORT)],
            {f"c{i}": [(a, True)] for i, a in enumerate(live)}, namespace="soak"),
    ]
    if step % 2:
        services.append(Svc("extra", "127.240.78.3", [Port("echo", 9000, TCP_PORT)],
                            {"c0": [(live[0], True)]}, namespace="soak"))
    return services


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def start_backends() -> list[object]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    servers: list[object] = [runner]
    for address in BACKENDS:
        await web.TCPSite(runner, address, HTTP_PORT, reuse_address=True).start()
        servers.append(await loop.create_server(Echo, address, TCP_PORT, reuse_address=True,
                                                backlog=4096))
    return servers


class Counts:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.errors: dict[str, int] = {}

    def fail(self, exc: BaseException | str) -> None:
        self.failed += 1
        key = exc if isinstance(exc, str) else type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1


async def http_user(http: ClientSession, counts: Counts, until: float) -> None:
    while time.monotonic() < until:
        try:
            async with http.get(f"http://{WEB_IP}/") as resp:
                await resp.read()
            if resp.status == 200:
                counts.ok += 1
            else:
                counts.fail(f"HTTP {resp.status}")
        except (ClientError, TimeoutError, OSError) as exc:
            counts.fail(exc)


async def tcp_user(counts: Counts, until: float) -> None:
    while time.monotonic() < until:
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(ECHO_IP, 9000)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            counts.ok += 1
        except (OSError, TimeoutError, AssertionError, asyncio.IncompleteReadError) as exc:
            counts.fail(exc)


def sample(pid: int, admin: str) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with urllib.request.urlopen(admin + "/readyz", timeout=2) as r:
        tasks = json.loads(r.read())["tasks"]
    return {"rss_mb": rss_kb / 1024, "fds": fds, "tasks": tasks}


async def churn(path: Path, until: float) -> int:
    step = 0
    while time.monotonic() < until:
        step += 1
        await asyncio.to_thread(write_imports, path, imports(step))
        await asyncio.sleep(1.0)  # the churn's pace
    return step


async def soak(pid: int, admin: str, path: Path, duration: float,
               samples: list[dict[str, float]]) -> tuple[Counts, int]:
    counts = Counts()
    t0 = time.monotonic()
    until = t0 + duration
    churner = asyncio.create_task(churn(path, until))
    async with ClientSession(connector=TCPConnector(limit=8),
                             timeout=ClientTimeout(total=5)) as http:
        users = [asyncio.create_task(http_user(http, counts, until)) for _ in range(8)]
        users += [asyncio.create_task(tcp_user(counts, until)) for _ in range(2)]
        while time.monotonic() < until:
            await asyncio.sleep(1.0)  # the sampling period
            row = await asyncio.to_thread(sample, pid, admin)
            row.update(t=round(time.monotonic() - t0, 1), ok=counts.ok, failed=counts.failed)
            samples.append(row)
        await asyncio.gather(*users)
    return counts, await churner


async def idle_connections(pid: int, n: int) -> dict[str, float]:
    """Open n TCP connections through the gateway and hold them: RSS per connection."""
    before = Path(f"/proc/{pid}/status").read_text()
    rss0 = int(next(line for line in before.splitlines() if line.startswith("VmRSS")).split()[1])
    writers = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for i in range(n):
            # Spread over source addresses: one address has ~28k ephemeral ports.
            _, writer = await asyncio.open_connection(
                ECHO_IP, 9000, local_addr=(f"127.79.{i // 250}.{i % 250 + 1}", 0))
            writers.append(writer)
        await asyncio.sleep(2.0)  # let the gateway finish the endpoint sides
        after = Path(f"/proc/{pid}/status").read_text()
        rss1 = int(next(line for line in after.splitlines()
                        if line.startswith("VmRSS")).split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    finally:
        for w in writers:
            w.close()
    return {"connections": n, "open_s": round(loop.time() - started, 1),
            "rss_before_mb": round(rss0 / 1024, 1), "rss_after_mb": round(rss1 / 1024, 1),
            "bytes_per_connection": round((rss1 - rss0) * 1024 / n), "gateway_fds": fds}


def verdict(samples: list[dict[str, float]], key: str) -> tuple[float, float, bool]:
    body = samples[max(1, len(samples) // 10):]  # skip warm-up
    fifth = max(1, len(body) // 5)
    first = statistics.median(s[key] for s in body[:fifth])
    last = statistics.median(s[key] for s in body[-fifth:])
    flat = last <= first * (1 + FLAT_GROWTH) + (2 if key != "rss_mb" else 0)
    return first, last, flat


def write(out: Path, result: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    samples: list[dict[str, float]] = result["samples"]  # type: ignore[assignment]
    lines = [f"# Soak: {result['duration_s']} s of load with endpoint churn every second",
             "", f"Machine: {result['machine']}; the gateway pinned to core {PROXY_CORE}, "
             f"load and backends to core {LOAD_CORE}. Smoke run: {result['smoke']}.", "",
             f"Requests: {result['ok']} ok, {result['failed']} failed "
             f"({result['errors'] or 'no errors'}); snapshot changes: {result['changes']}.", "",
             "| measure | first fifth | last fifth | flat |", "|---|---|---|---|"]
    for key, (first, last, flat) in result["verdicts"].items():  # type: ignore[attr-defined]
        lines.append(f"| {key} | {first:.1f} | {last:.1f} | {'yes' if flat else 'NO'} |")
    idle = result.get("idle")
    if idle:
        lines += ["", f"Idle connections: {idle['connections']} held through the gateway: RSS "
                  f"{idle['rss_before_mb']} → {idle['rss_after_mb']} MiB, "
                  f"{idle['bytes_per_connection']} bytes per connection (client and endpoint "
                  f"side), {idle['gateway_fds']} descriptors."]
    lines += ["", "Curve (one row per tenth of the run):", "",
              "| t (s) | RSS (MiB) | fds | tasks | ok | failed |", "|---|---|---|---|---|---|"]
    step = max(1, len(samples) // 10)
    for s in samples[::step] + ([samples[-1]] if samples else []):
        lines.append(f"| {s['t']} | {s['rss_mb']:.1f} | {s['fds']:.0f} | {s['tasks']:.0f} | "
                     f"{s['ok']:.0f} | {s['failed']:.0f} |")
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot([s["t"] for s in samples], [s["rss_mb"] for s in samples], label="RSS MiB")
        ax.plot([s["t"] for s in samples], [s["fds"] for s in samples], label="fds")
        ax.plot([s["t"] for s in samples], [s["tasks"] for s in samples], label="tasks")
        ax.set_xlabel("s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "soak.png")
        plt.close(fig)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="20 s and 1 000 idle connections")
    ap.add_argument("--duration", type=float, default=None, metavar="S")
    ap.add_argument("--idle", type=int, default=None, metavar="N",
                    help="idle connections held at the end (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    duration = args.duration or (20.0 if args.smoke else 600.0)
    idle = args.idle if args.idle is not None else (1000 if args.smoke else 10_000)
    # This process holds both ends of every idle connection (client and backend), the
    # gateway both of its own: 2N descriptors each, plus the load's. Root may raise the
    # hard limit; otherwise N shrinks to fit, and the report says so.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 2 * idle + 4096)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        want = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if 2 * idle + 4096 > hard:
            idle = max(0, (hard - 4096) // 2)
            print(f"RLIMIT_NOFILE hard limit {hard}: holding {idle} idle connections",
                  file=sys.stderr)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="mcsproxy-soak-") as tmp:
        path = Path(tmp) / "imports.yaml"
        write_imports(path, imports(0))
        admin_port = free_port()
        gateway = procs.start(
            PROXY_CORE, sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "c0",
            "--source", f"file:{path}", "--dns-listen", f"127.0.0.1:{free_port()}",
            "--admin-listen", f"127.0.0.1:{admin_port}", "--health-interval", "1",
            "--log-level", "warning", "--drain-timeout", "1")
        try:
            async def run() -> dict[str, object]:
                servers = await start_backends()
                try:
                    await asyncio.to_thread(wait_port, "127.0.0.1", admin_port)
                    await asyncio.to_thread(wait_port, ECHO_IP, 9000)
                    samples: list[dict[str, float]] = []
                    counts, changes = await soak(gateway.pid, f"http://127.0.0.1:{admin_port}",
                                                 path, duration, samples)
                    idle_result = await idle_connections(gateway.pid, idle) if idle else None
                finally:
                    for server in servers:
                        if isinstance(server, web.AppRunner):
                            await server.cleanup()
                        else:
                            server.close()  # type: ignore[attr-defined]
                return {"smoke": args.smoke, "duration_s": duration, "machine": machine(),
                        "ok": counts.ok, "failed": counts.failed, "errors": counts.errors,
                        "changes": changes, "samples": samples, "idle": idle_result,
                        "verdicts": {k: verdict(samples, k) for k in ("rss_mb", "fds", "tasks")}}

            result = asyncio.run(run())
        finally:
            procs.stop()
    write(args.out, result)
    print((args.out / "soak.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
