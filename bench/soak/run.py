"""Soak: the gateway under steady HTTP and TCP load with endpoint churn every second.

Every second the imports file changes (the web service's endpoints rotate, a second
service comes or goes), while keep-alive HTTP users and connect-per-request TCP users run.
Sampled each second from outside: the gateway's RSS (/proc/<pid>/status VmRSS), open
descriptors (/proc/<pid>/fd) and live asyncio tasks (/readyz "tasks"). Reported flat or
not: the median of the last fifth against the median of the first fifth after warm-up.
Then N idle TCP connections are opened and held, and the RSS they cost is reported.

Descriptors: every idle connection costs the gateway two (client and endpoint side), so N
needs 2N + headroom under its RLIMIT_NOFILE. The harness raises its hard limit towards
fs.nr_open when it may (root with CAP_SYS_RESOURCE); when it may not and one process cannot
hold 2N, the idle part runs on a fresh gateway with just enough `--workers` (SO_REUSEPORT
spreads the connections) and sums RSS and descriptors over its processes. The client ends
are held by a child process, so this one holds only the backend ends.

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
FD_HEADROOM = 512  # a gateway's own descriptors beside the idle connections (~40 measured)
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
    live = 0  # endpoint sides open now: the idle part waits for all N to arrive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        Echo.live += 1

    def connection_lost(self, exc: Exception | None) -> None:
        Echo.live -= 1

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


def family(pid: int) -> list[int]:
    """The gateway and its proxy workers (its children)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(next(line for line in status.splitlines()
                          if line.startswith("VmRSS")).split()[1])
    return total


def fd_count(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def sample(pid: int, admin: str) -> dict[str, float]:
    pids = family(pid)
    rss_kb_ = rss_kb(pids)
    fds = fd_count(pids)
    with urllib.request.urlopen(admin + "/readyz", timeout=2) as r:
        tasks = json.loads(r.read())["tasks"]
    return {"rss_mb": rss_kb_ / 1024, "fds": fds, "tasks": tasks}


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


def hold(n: int) -> int:
    """Child mode: open n TCP connections through the gateway, say so, hold them until
    stdin closes. Its own process, so the client ends do not count against the
    descriptors of the one holding the backend ends."""
    async def run() -> None:
        writers = []
        for i in range(n):
            # Spread over source addresses: bind() before connect() picks a port unique
            # to the source address, ~28k of them (ip_local_port_range) per address.
            _, writer = await asyncio.open_connection(
                ECHO_IP, 9000, local_addr=(f"127.79.{i // 250}.{i % 250 + 1}", 0))
            writers.append(writer)
        print(f"held {n}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        for w in writers:
            w.close()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(run())
    return 0


async def idle_connections(pid: int, n: int) -> dict[str, float]:
    """Open n TCP connections through the gateway and hold them: RSS per connection."""
    pids = family(pid)
    rss0, fds0 = rss_kb(pids), fd_count(pids)
    live0 = Echo.live
    loop = asyncio.get_running_loop()
    started = loop.time()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--hold", str(n), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(max(60.0, n / 100)):
            line = await holder.stdout.readline()
            if line.strip() != f"held {n}".encode():
                raise RuntimeError(f"the holder opened fewer than {n} connections: {line!r}")
            # Every endpoint side arrived (the gateway connected each one onwards).
            while Echo.live - live0 < n:
                await asyncio.sleep(0.1)
        open_s = loop.time() - started
        await asyncio.sleep(2.0)  # let the allocator settle before reading RSS
        rss1, fds = rss_kb(pids), fd_count(pids)
        per_process = [fd_count([p]) for p in pids]
        endpoint_sides = Echo.live - live0
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            async with asyncio.timeout(30):
                await holder.wait()
        except TimeoutError:
            holder.kill()
            await holder.wait()
    return {"connections": n, "endpoint_sides": endpoint_sides, "open_s": round(open_s, 1),
            "gateway_processes": len(pids),
            "rss_before_mb": round(rss0 / 1024, 1), "rss_after_mb": round(rss1 / 1024, 1),
            "bytes_per_connection": round((rss1 - rss0) * 1024 / n),
            "gateway_fds_before": fds0, "gateway_fds": fds, "fds_per_process": per_process}


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
             f"load and backends to core {LOAD_CORE}. Smoke run: {result['smoke']}. "
             f"RLIMIT_NOFILE {result['nofile']} ({result['nofile_how']}).", "",
             f"Requests: {result['ok']} ok, {result['failed']} failed "
             f"({result['errors'] or 'no errors'}); snapshot changes: {result['changes']}.", "",
             "| measure | first fifth | last fifth | flat |", "|---|---|---|---|"]
    for key, (first, last, flat) in result["verdicts"].items():  # type: ignore[attr-defined]
        lines.append(f"| {key} | {first:.1f} | {last:.1f} | {'yes' if flat else 'NO'} |")
    idle = result.get("idle")
    if idle:
        where = (f"a fresh gateway of {idle['gateway_processes']} processes (--workers; one "
                 f"process's descriptor limit cannot hold both sides of all of them)"
                 if idle["fresh_gateway"] else "the soak's gateway")
        lines += ["", f"Idle connections: {idle['connections']} held through {where}, "
                  f"{idle['endpoint_sides']} endpoint sides arrived at the backends "
                  f"(opened in {idle['open_s']} s): RSS {idle['rss_before_mb']} → "
                  f"{idle['rss_after_mb']} MiB, {idle['bytes_per_connection']} bytes per "
                  f"connection (client and endpoint side), descriptors "
                  f"{idle['gateway_fds_before']} → {idle['gateway_fds']}."]
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


def raise_nofile(want: int) -> tuple[int, str]:
    """Raise this process's RLIMIT_NOFILE (soft and hard) to `want`, capped at fs.nr_open;
    the gateway and the holder inherit it. Returns the limit now in force and how it was
    got (the hard limit only rises with CAP_SYS_RESOURCE, root or not)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    want = min(max(want, hard), nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        if want == hard:
            return want, f"the hard limit, soft was {soft}"
        return want, f"raised from {soft}/{hard} to {want}"
    except (ValueError, OSError) as exc:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard, f"hard limit {hard} kept ({exc}; fs.nr_open {nr_open})"


def listening(ip: str, port: int) -> int:
    """Listening sockets on ip:port (one per proxy process under SO_REUSEPORT)."""
    local = f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1] == local and r.split()[3] == "0A")


def start_gateway(procs: Procs, path: Path, workers: int) -> tuple[int, str]:
    """The gateway on PROXY_CORE; returns its pid and admin URL once every proxy process
    listens on the echo service (SO_REUSEPORT would send nothing to a late worker)."""
    admin_port = free_port()
    extra = ["--workers", str(workers)] if workers > 1 else []
    gateway = procs.start(
        PROXY_CORE, sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "c0",
        "--source", f"file:{path}", "--dns-listen", f"127.0.0.1:{free_port()}",
        "--admin-listen", f"127.0.0.1:{admin_port}", "--health-interval", "1",
        "--log-level", "warning", "--drain-timeout", "1", *extra)
    wait_port("127.0.0.1", admin_port)
    wait_port(ECHO_IP, 9000)
    deadline = time.monotonic() + 30
    while listening(ECHO_IP, 9000) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} proxy processes did not all listen")
        time.sleep(0.1)
    return gateway.pid, f"http://127.0.0.1:{admin_port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="20 s and 1 000 idle connections")
    ap.add_argument("--duration", type=float, default=None, metavar="S")
    ap.add_argument("--idle", type=int, default=None, metavar="N",
                    help="idle connections held at the end (0: skip)")
    ap.add_argument("--idle-workers", type=int, default=None, metavar="W",
                    help="hold the idle connections on a fresh gateway with --workers W "
                         "(default: the soak's gateway if its descriptor limit allows 2N, "
                         "else the fewest workers that do)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--hold", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hold is not None:
        return hold(args.hold)
    duration = args.duration or (20.0 if args.smoke else 600.0)
    idle = args.idle if args.idle is not None else (1000 if args.smoke else 10_000)
    # The gateway holds 2 descriptors per idle connection, this process 1 (the backend
    # end) plus the load's; both run under the limit set here.
    nofile, nofile_how = raise_nofile(2 * idle + 4096)
    if idle + 4096 > nofile:
        raise SystemExit(f"RLIMIT_NOFILE {nofile} cannot hold {idle} backend ends here")
    idle_workers = args.idle_workers or -(-(2 * idle + FD_HEADROOM) // nofile)
    if idle_workers > 1:
        print(f"RLIMIT_NOFILE {nofile} ({nofile_how}): {idle} idle connections on a gateway "
              f"with --workers {idle_workers}", file=sys.stderr)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(LOAD_CORE)})
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="mcsproxy-soak-") as tmp:
        path = Path(tmp) / "imports.yaml"
        write_imports(path, imports(0))
        try:
            async def run() -> dict[str, object]:
                servers = await start_backends()
                try:
                    pid, admin = await asyncio.to_thread(start_gateway, procs, path, 1)
                    samples: list[dict[str, float]] = []
                    counts, changes = await soak(pid, admin, path, duration, samples)
                    idle_result = None
                    if idle:
                        if idle_workers > 1:  # one process cannot hold 2N descriptors
                            procs.stop()
                            pid, _ = await asyncio.to_thread(start_gateway, procs, path,
                                                             idle_workers)
                        idle_result = await idle_connections(pid, idle)
                        idle_result["fresh_gateway"] = idle_workers > 1
                finally:
                    for server in servers:
                        if isinstance(server, web.AppRunner):
                            await server.cleanup()
                        else:
                            server.close()  # type: ignore[attr-defined]
                return {"smoke": args.smoke, "duration_s": duration, "machine": machine(),
                        "nofile": nofile, "nofile_how": nofile_how,
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
