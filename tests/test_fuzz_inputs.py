"""Bad input, generated (hypothesis): the HTTP request path over the smuggling grammar
against a real listener, DNS over TCP framing, YAML manifests and EndpointSlices, and the
controller stream's messages. Each gets a clean answer or a clean drop; nothing crashes,
nothing hangs, and the last good state keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import dnslib
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcsproxy.config import DnsConfig, HttpConfig
from mcsproxy.dns.server import DnsServer
from mcsproxy.manifests import ManifestError, parse_endpoint_slice, parse_service_import
from mcsproxy.sources.controlplane import ControlplaneSource, StreamProtocolError
from mcsproxy.sources.file import parse_file_text
from mcsproxy.store import SnapshotStore
from tests.chaos.support import Port, SlowHttp, Svc, import_documents
from tests.dns_support import make_query
from tests.http_support import HTTP_PORT
from tests.proxy_fixtures import Clusterset, endpoint

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
READ_TIMEOUT_S = 3.0


class LoopThread:
    """An event loop in a thread, so hypothesis (synchronous) can drive real servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# -- HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_listener() -> Iterator[tuple[str, int]]:
    lt = LoopThread()
    cs = Clusterset()
    state: dict[str, Any] = {}

    async def up() -> None:
        state["backend"] = await SlowHttp("fz", "127.77.9.1", 8096).start()
        cs.publish("web", "127.240.77.60", [HTTP_PORT], [endpoint("127.77.9.1", "east", 8096)])
        # Short timeouts: a request left incomplete must end within READ_TIMEOUT_S.
        state["manager"] = await cs.proxy(idle_timeout_s=1.0, http=HttpConfig(
            header_timeout_s=0.5, keepalive_timeout_s=0.5, per_try_timeout_s=0.5,
            request_timeout_s=1.0))
        await cs.served(state["manager"])

    async def down() -> None:
        await state["manager"].stop()
        await state["backend"].stop()

    lt.run(up())
    try:
        yield ("127.240.77.60", 80)
    finally:
        lt.run(down())
        lt.close()


TOKENS = st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding",
                          "Transfer-Encoding ", " Transfer-Encoding", "Host", "Connection",
                          "Expect", "Upgrade", "X-Other"])
VALUES = st.sampled_from(["0", "5", "-1", "1e3", "18446744073709551616", "chunked",
                          "chunked, identity", "identity", "Chunked", "close", "keep-alive",
                          "100-continue", "websocket", "web", "\tchunked", "5, 5", "",
                          "a b", "u@web", "web:1:2", "[::1]:80"])
LINE_ENDS = st.sampled_from(["\r\n", "\n", "\r"])
BODIES = st.sampled_from(["", "hello", "5\r\nhello\r\n0\r\n\r\n", "0\r\n\r\n",
                          "ffffffffffffffff\r\n", "3\r\nabc\r\n", "G"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "G E T",
                                   "\x00GET"]))
    target = draw(st.sampled_from(["/", "/x?y=1", "*", "http://evil/", "evil:80", "",
                                   "/" + "a" * 9000, "/\x7f"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1",
                                    "HTTP/9"]))
    end = draw(LINE_ENDS)
    headers = draw(st.lists(st.tuples(TOKENS, VALUES), max_size=6))
    if draw(st.booleans()):
        headers.insert(0, ("Host", "web"))
    fold = draw(st.booleans())
    lines = [f"{method} {target} {version}"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
        if fold and name == "Transfer-Encoding":
            lines.append(" chunked")  # obs-fold
    head = end.join(lines) + end + end
    return (head + draw(BODIES)).encode("latin-1")


def exchange(addr: tuple[str, int], raw: bytes) -> bytes:
    """Send and read until the gateway closes, which its timeouts bound (no half-close:
    a client's EOF abandons its requests, as nginx does)."""
    with socket.create_connection(addr, timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(raw)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


@FUZZ
@given(raw=requests())
def test_http_request_path_never_crashes_or_hangs(http_listener: tuple[str, int],
                                                  raw: bytes) -> None:
    try:
        got = exchange(http_listener, raw)
    except ConnectionResetError:
        got = b""  # closed with our bytes unread: a drop, not a hang
    except TimeoutError:
        pytest.fail(f"connection hung on {raw[:200]!r}")
    if got:
        assert got.startswith(b"HTTP/1.1 "), got[:100]
        status = int(got[9:12])
        assert status < 500 or status == 501 or status == 505, (raw[:200], got[:200])
        # Anything the endpoint answered was a well-framed request it got from us.
    # The listener still serves a good request afterwards.
    ok = exchange(http_listener, b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:100]


# -- DNS over TCP framing --------------------------------------------------------------------
@pytest.fixture(scope="module")
def dns_listener() -> Iterator[tuple[str, int]]:
    lt = LoopThread()
    store = SnapshotStore("east")
    store.register_source("t")
    store.mark_synced("t")
    store.commit()
    server = DnsServer(DnsConfig(listen=("127.0.0.1", 0), tcp_idle_timeout_s=1.0), store)
    lt.run(server.start())
    try:
        assert server.bound is not None
        yield server.bound
    finally:
        lt.run(server.stop())
        lt.close()


QUERY = make_query("web.test.svc.clusterset.local.")
FRAMES = st.one_of(
    st.just(len(QUERY).to_bytes(2, "big") + QUERY),  # a good one
    st.just(b"\x00"),  # half a length prefix
    st.just(b"\x00\x00"),  # zero length
    st.just(b"\xff\xff" + QUERY),  # a giant length, never filled
    st.binary(min_size=0, max_size=40).map(lambda b: len(b).to_bytes(2, "big") + b),  # junk
    st.binary(min_size=1, max_size=8),  # raw noise
)


@FUZZ
@given(frames=st.lists(FRAMES, min_size=1, max_size=5), drip=st.booleans())
def test_dns_tcp_framing(dns_listener: tuple[str, int], frames: list[bytes],
                         drip: bool) -> None:
    data = b"".join(frames)
    with socket.create_connection(dns_listener, timeout=READ_TIMEOUT_S) as sock:
        if drip:  # a slow drip: byte by byte
            for i in range(len(data)):
                sock.send(data[i:i + 1])
        else:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"DNS TCP connection hung on {data[:80]!r}")
    # Whatever came back is framed answers, each one parseable.
    while got:
        assert len(got) >= 2
        size = int.from_bytes(got[:2], "big")
        answer, got = got[2:2 + size], got[2 + size:]
        if len(answer) == size and size >= 12:
            dnslib.DNSRecord.parse(answer)
    with socket.create_connection(dns_listener, timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(len(QUERY).to_bytes(2, "big") + QUERY)
        size = int.from_bytes(sock.recv(2, socket.MSG_WAITALL), "big")
        assert dnslib.DNSRecord.parse(sock.recv(size, socket.MSG_WAITALL)).header.rcode == 3


# -- manifests -------------------------------------------------------------------------------
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
              st.text(max_size=20), st.just("x" * 100_000)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
GOOD = import_documents([Svc("web", "127.240.77.61", [Port("web", 80, 8080)],
                             {"east": [("10.0.0.1", True)]})])


@st.composite
def damaged(draw: st.DrawFn) -> dict[str, Any]:
    """A good ServiceImport or EndpointSlice with a field dropped or replaced by junk."""
    doc = json.loads(json.dumps(draw(st.sampled_from(GOOD))))
    paths = [("metadata",), ("metadata", "name"), ("metadata", "labels"), ("spec",),
             ("spec", "ports"), ("spec", "ips"), ("spec", "type"), ("endpoints",),
             ("ports",), ("addressType",), ("apiVersion",), ("kind",)]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if isinstance(parent, dict) and path[-1] in parent:
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JUNK)
    return doc


@FUZZ
@given(doc=damaged())
def test_damaged_manifests_get_a_clear_error(doc: dict[str, Any]) -> None:
    parse = parse_service_import if doc.get("kind") == "ServiceImport" else parse_endpoint_slice
    try:
        parse(doc)
    except ManifestError as exc:
        assert str(exc)
    try:
        text = yaml.safe_dump_all([doc])
    except yaml.YAMLError:
        return
    try:
        parse_file_text(text, "fuzz.yaml", "file:fuzz")
    except ManifestError as exc:
        assert "fuzz.yaml" in str(exc)  # says where


def test_ten_thousand_documents_load() -> None:
    # Written as text (yaml.safe_dump of 10 000 documents alone takes seconds).
    docs = []
    for i in range(5000):
        docs.append(f"""apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {{name: s{i}, namespace: big}}
spec:
  type: ClusterSetIP
  ips: [127.241.{i // 250}.{i % 250 + 1}]
  ports: [{{name: web, protocol: TCP, port: 80}}]
""")
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s{i}-east
  namespace: big
  labels: {{multicluster.kubernetes.io/service-name: s{i},
           multicluster.kubernetes.io/source-cluster: east}}
addressType: IPv4
ports: [{{name: web, protocol: TCP, port: 8080}}]
endpoints: [{{addresses: [10.1.{i // 250}.{i % 250 + 1}], conditions: {{ready: true}}}}]
""")
    objects = parse_file_text("---\n".join(docs), "big.yaml", "file:big")
    assert len(objects) == 10_000


# -- the controller stream -----------------------------------------------------------------
MESSAGES = st.one_of(
    st.binary(max_size=50),
    JUNK.map(lambda j: json.dumps(j).encode()),
    st.fixed_dictionaries({"type": st.sampled_from(["snapshot", "delta", "members",
                                                    "heartbeat", "other"])},
                          optional={"version": JUNK, "from": JUNK, "epoch": JUNK,
                                    "objects": JUNK, "upsert": JUNK, "delete": JUNK,
                                    "members": JUNK, "more": JUNK}
                          ).map(lambda m: json.dumps(m).encode()),
)


@FUZZ
@given(lines=st.lists(MESSAGES, min_size=1, max_size=4))
def test_stream_messages_are_rejected_cleanly_and_keep_the_last_state(
        lines: list[bytes]) -> None:
    store = SnapshotStore("east")
    source = ControlplaneSource("http://127.0.0.1:1", "east")
    status = store.register_source(source.name)
    good = {"type": "snapshot", "version": 1, "epoch": "e1", "objects": GOOD}
    source._handle(json.dumps(good).encode(), store, status)
    before = store.current
    assert len(before.services) == 1
    for line in lines:
        # A rejected message ends the session (it reconnects and resyncs); the store stays.
        with contextlib.suppress(StreamProtocolError):
            source._handle(line, store, status)
    # Junk never takes the served state away: either unchanged, or a valid new one.
    assert store.current is before or store.current.version > before.version
