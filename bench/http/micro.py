"""A repeatable cost measure of the HTTP proxy: instructions (or a profile) per request.

wrk's req/s and CPU figures move with whatever else the shared machine runs; this counts
work instead. It starts the nginx backend of bench/http/run.py and `mcsproxy gateway`
with the same flags (every feature on), under callgrind (`--mode callgrind`: instructions
per request, from zeroed counters after a warm-up) or cProfile (`--mode cprofile`: the
Python functions, written where --out says) or plain (`--mode cpu`: CPU µs per request).
A fixed number of keep-alive requests is sent by a client in another process, so the
figure covers the proxy alone.

    .venv/bin/python bench/http/micro.py --mode callgrind --requests 4000
    .venv/bin/python bench/http/micro.py --mode cprofile --out /tmp/http.prof
    .venv/bin/python bench/http/micro.py --tcp --conns 8 --requests 3000   # TCP, per connection
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import common as tcp  # noqa: E402
from mcsproxy import compiled  # noqa: E402

run_mod = tcp.script_module("bench/http/run.py")

BACKEND = ("127.0.0.1", 18581)
PROXY_IP = "127.240.251.9"
PATHS = {"100B": "/small", "64KiB": "/big"}


async def _one_conn(ip: str, port: int, request: bytes, n: int) -> int:
    reader, writer = await asyncio.open_connection(ip, port)
    done = 0
    try:
        for _ in range(n):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
            if m is None or not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response head: {head[:200]!r}")
            await asyncio.wait_for(reader.readexactly(int(m.group(1))), 30)
            done += 1
    finally:
        writer.close()
    return done


async def _short_conns(ip: str, port: int, request: bytes, n: int) -> int:
    """`--tcp`: a connection per request, closed by the endpoint (Connection: close)."""
    for _ in range(n):
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 30)
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {answer[:200]!r}")
        finally:
            writer.close()
    return n


async def load(ip: str, port: int, path: str, conns: int, per_conn: int, short: bool) -> int:
    close = "Connection: close\r\n" if short else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nUser-Agent: micro\r\n{close}\r\n".encode()
    one = _short_conns if short else _one_conn
    counts = await asyncio.gather(*(one(ip, port, request, per_conn) for _ in range(conns)))
    return sum(counts)


def client(ip: str, port: int, path: str, conns: int, total: int, short: bool = False) -> int:
    """The load, in a child process (so its instructions are not the proxy's)."""
    out = subprocess.run(
        [sys.executable, __file__, "--client", ip, str(port), path, str(conns),
         str(total // conns), "short" if short else "keep-alive"],
        capture_output=True, text=True, timeout=900, check=True)
    return int(out.stdout.strip())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        ip, port, path, conns, per, kind = sys.argv[2:8]
        print(asyncio.run(load(ip, int(port), path, int(conns), int(per), kind == "short")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("callgrind", "cprofile", "cpu"), default="callgrind")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--size", choices=tuple(PATHS), default="100B")
    ap.add_argument("--out", default="", help="profile (cprofile) or callgrind output file")
    ap.add_argument("--tcp", action="store_true",
                    help="the port as a plain TCP stream, a new connection per request: "
                         "the TCP proxy's cost per short connection")
    args = ap.parse_args()
    procs = tcp.Procs()
    with tempfile.TemporaryDirectory(prefix="mcsbench-micro-") as d:
        run = Path(d)
        run.chmod(0o755)
        try:
            return measure(procs, run, args)
        finally:
            procs.stop()


def gateway_env(mode: str) -> dict[str, str]:
    """cProfile sees no function of a compiled module: profile the sources."""
    env = dict(os.environ)
    if mode == "cprofile":
        env[compiled.INTERPRETED_ENV] = "1"
    return env


def measure(procs: tcp.Procs, run: Path, args: argparse.Namespace) -> int:
    (run / "www").mkdir()
    (run / "www" / "big").write_bytes(b"b" * 65536)
    (run / "backend.conf").write_text(run_mod.BACKEND_CONF.format(
        run=run, ip=BACKEND[0], port=BACKEND[1], body="x" * 99))
    procs.start(tcp.LOAD_CORE, "nginx", "-c", str(run / "backend.conf"), "-p", str(run))
    src = run / "src"
    src.mkdir()
    service = run_mod.SERVICE_YAML.format(name="micro", ip=PROXY_IP, port=BACKEND[1],
                                          bip=BACKEND[0], bport=BACKEND[1])
    if args.tcp:
        service = service.replace(", appProtocol: http", "")
    (src / "svc.yaml").write_text(service)
    out = args.out or str(run / ("callgrind.out" if args.mode == "callgrind" else "prof"))
    wrap: list[str] = []
    if args.mode == "callgrind":
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    py = [sys.executable, "-m", "cProfile", "-o", out] if args.mode == "cprofile" \
        else [sys.executable]
    gw = procs.start(tcp.PROXY_CORE, *wrap, *py, "-m", "mcsproxy", "gateway",
                     "--cluster-id", "local", "--source", f"file:{src}",
                     "--log-level", "warning", "--dns-listen", "127.0.0.1:0",
                     "--admin-listen", "127.0.0.1:0", "--health-http-path", "/small",
                     "--http-cluster-header", "x-mcs-cluster", "--drain-timeout", "1",
                     stderr=None, env=gateway_env(args.mode))
    tcp.wait_port(PROXY_IP, BACKEND[1], timeout=120)
    path = PATHS[args.size]
    client(PROXY_IP, BACKEND[1], path, args.conns, args.conns * 20, args.tcp)  # warm-up
    if args.mode == "callgrind":
        subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True,
                       capture_output=True)
    cpu0 = tcp.cpu_seconds(gw.pid)
    t0 = time.monotonic()
    n = client(PROXY_IP, BACKEND[1], path, args.conns, args.requests, args.tcp)
    wall = time.monotonic() - t0
    cpu = tcp.cpu_seconds(gw.pid) - cpu0
    unit = "conn" if args.tcp else "req"
    line = (f"{args.size}{' over TCP' if args.tcp else ''}: {n} {unit}s in {wall:.1f} s; "
            f"proxy CPU {cpu / n * 1e6:.1f} µs/{unit}")
    if args.mode == "callgrind":
        subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True,
                       capture_output=True)
        dumps = sorted(Path(out).parent.glob(Path(out).name + ".*"),
                       key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace") if dumps else ""
        m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if m:
            line += f"; {int(m.group(1)) / n:,.0f} instructions/{unit} (callgrind)"
    elif args.mode == "cprofile":
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=60)
        line += f"; profile in {out}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
