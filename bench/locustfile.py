"""locust users of a clusterset: resolve through the gateway's DNS, call HTTP and TCP services.

Each user behaves like an application pod: it resolves `<svc>.<ns>.svc.clusterset.local`
through the gateway's DNS over UDP (dnslib; answers cached for their TTL, as a stub
resolver does), keeps one HTTP/1.1 keep-alive connection to the HTTP service's
ClusterSetIP, and opens a new TCP connection per exchange with the echo service. A peer
without service discovery (HAProxy, nginx) is given fixed addresses instead. Backends
answer with their cluster's name, recorded per request, so the traffic split over time is
known. The rate is bounded (constant_throughput per user), the run time by locust's -t.

Configured by the MCSB_LOCUST environment variable (JSON), written by bench/failover/run.py:
  {"dns": "127.0.0.1:5399" | null, "http": "web.bench.svc.clusterset.local:80" | "IP:PORT",
   "tcp": "echo.bench.svc.clusterset.local:9000" | "IP:PORT" | null, "rate": 10,
   "timeout": 5, "log": "/tmp/.../requests.csv"}

    MCSB_LOCUST='{...}' locust -f bench/locustfile.py --headless -u 20 -r 100 -t 20s \
        --csv out/run
"""

from __future__ import annotations

import json
import os
import random
import socket
import time

import gevent
from dnslib import QTYPE, DNSRecord
from locust import User, between, constant_throughput, events, task

CONFIG: dict = json.loads(os.environ.get("MCSB_LOCUST", "{}"))
MAX_RESPONSE = 65536
# One row per request: (start wall time, kind, ok, latency ms, cluster or error).
RECORDS: list[tuple[float, str, int, float, str]] = []
MAX_RECORDS = 1_000_000  # a bound on memory whatever the configured rate and time


class HttpStatusError(Exception):
    """A 5xx answer: a failed request, but the keep-alive connection stays usable."""


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


class StubResolver:
    """A, over UDP to one server, cached until the answer's TTL runs out."""

    def __init__(self, server: str, timeout: float) -> None:
        self.server = split_hostport(server)
        self.timeout = timeout
        self.cache: dict[str, tuple[str, float]] = {}

    def resolve(self, name: str) -> str:
        hit = self.cache.get(name)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        started = time.perf_counter()
        exc: Exception | None = None
        try:
            address, ttl = self._query(name)
        except Exception as e:  # reported to locust as a failed DNS request, then raised
            exc = e
            raise
        finally:
            events.request.fire(request_type="DNS", name=name,
                                response_time=(time.perf_counter() - started) * 1000,
                                response_length=0, exception=exc, context={})
        self.cache[name] = (address, now + ttl)
        return address

    def _query(self, name: str) -> tuple[str, int]:
        query = DNSRecord.question(name, "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.sendto(query.pack(), self.server)
            reply = DNSRecord.parse(sock.recv(4096))
        if reply.header.id != query.header.id:
            raise OSError("DNS reply for another query")
        for rr in reply.rr:
            if rr.rtype == QTYPE.A:
                return str(rr.rdata), int(rr.ttl)
        raise OSError(f"no A record for {name} (rcode {reply.header.rcode})")


class ClustersetUser(User):
    wait_time = (constant_throughput(float(CONFIG["rate"])) if "rate" in CONFIG
                 else between(0.05, 0.1))

    def on_start(self) -> None:
        self.timeout = float(CONFIG.get("timeout", 5))
        self.resolver = StubResolver(CONFIG["dns"], 1.0) if CONFIG.get("dns") else None
        self.http_conn: socket.socket | None = None
        if "rate" in CONFIG:
            # Users spawn together; spread their phases so the load is steady, not bursts.
            gevent.sleep(random.uniform(0, 1 / float(CONFIG["rate"])))

    def on_stop(self) -> None:
        self._close_http()

    def address(self, target: str) -> tuple[str, int]:
        host, port = split_hostport(target)
        if self.resolver is not None and not host[0].isdigit():
            host = self.resolver.resolve(host)
        return host, port

    @task(3)
    def http(self) -> None:
        self._timed("http", self._http_once)

    @task(1)
    def tcp(self) -> None:
        if CONFIG.get("tcp"):
            self._timed("tcp", self._tcp_once)

    def _timed(self, kind: str, call) -> None:  # type: ignore[no-untyped-def]
        wall, started = time.time(), time.perf_counter()
        exc: Exception | None = None
        cluster = ""
        try:
            with gevent.Timeout(self.timeout, TimeoutError(f"no answer in {self.timeout}s")):
                cluster = call()
        except Exception as e:  # every failure is a failed request, recorded below
            exc = e
            if kind == "http" and not isinstance(e, HttpStatusError):
                self._close_http()
        latency = (time.perf_counter() - started) * 1000
        name = f"{kind} {cluster}" if exc is None else kind
        events.request.fire(request_type=kind.upper(), name=name, response_time=latency,
                            response_length=0, exception=exc, context={})
        if len(RECORDS) < MAX_RECORDS:
            RECORDS.append((wall, kind, int(exc is None), latency,
                            cluster if exc is None else type(exc).__name__))

    def _http_once(self) -> str:
        host = split_hostport(CONFIG["http"])[0]
        if self.http_conn is None:
            self.http_conn = socket.create_connection(self.address(CONFIG["http"]),
                                                      timeout=self.timeout)
        sock = self.http_conn
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed before the response head")
            buf += chunk
            if len(buf) > MAX_RESPONSE:
                raise ValueError("response head too large")
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"connection" and value.strip().lower() == b"close":
                close = True
        if length > MAX_RESPONSE:
            raise ValueError("response body too large")
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                raise ConnectionResetError("closed inside the response body")
            body += chunk
        if close:
            self._close_http()
        if status >= 500:
            raise HttpStatusError(f"HTTP {status}")
        return body.split(b" ", 1)[0].decode()

    def _tcp_once(self) -> str:
        with socket.create_connection(self.address(CONFIG["tcp"]), timeout=self.timeout) as s:
            s.sendall(b"ping\n")
            reply = b""
            while not reply.endswith(b"ping\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionResetError("closed before the echo")
                reply += chunk
                if len(reply) > MAX_RESPONSE:
                    raise ValueError("echo too large")
        return reply.split(b" ", 1)[0].decode()

    def _close_http(self) -> None:
        if self.http_conn is not None:
            self.http_conn.close()
            self.http_conn = None


@events.test_start.add_listener
def mark_started(**_kw: object) -> None:
    # The scenario runner times its fault from here, not from locust's (slow) import.
    if CONFIG.get("log"):
        with open(CONFIG["log"] + ".started", "w") as f:
            f.write(f"{time.time():.4f}\n")


@events.test_stop.add_listener
def write_records(**_kw: object) -> None:
    path = CONFIG.get("log")
    if not path:
        return
    with open(path, "w") as f:
        f.write("wall,kind,ok,latency_ms,cluster\n")
        for wall, kind, ok, latency, cluster in RECORDS:
            f.write(f"{wall:.4f},{kind},{ok},{latency:.3f},{cluster}\n")
