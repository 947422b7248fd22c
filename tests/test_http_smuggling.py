"""Request-smuggling shapes and limits: each answered with an error and the connection closed,
and no byte of it reaches the endpoint. Plus slowloris: 500 trickling connections are cut
at the header timeout while other clients are served."""

from __future__ import annotations

import asyncio
import resource
import time

import pytest

from mcsproxy.config import HttpConfig
from tests.http_support import RawClient, publish, start_backends
from tests.proxy_fixtures import Clusterset

H = b"Host: a\r\n"
SHAPES: list[tuple[str, bytes, int]] = [
    ("CL and TE", b"POST / HTTP/1.1\r\n" + H +
     b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE and CL", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    ("duplicate CL, same value", b"POST / HTTP/1.1\r\n" + H +
     b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("duplicate CL, different", b"POST / HTTP/1.1\r\n" + H +
     b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("CL list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("CL sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("CL negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -3\r\n\r\nabc", 400),
    ("CL hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("CL overflow", b"POST / HTTP/1.1\r\n" + H +
     b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("chunk size not hex", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk size negative", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk size overflow", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk size 0x", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    ("space after chunk size", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    ("chunk data too long", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n", 400),
    ("chunk bare LF", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n\tc\r\n\r\n", 400),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare LF in one header", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
    ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("tab before colon", b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400),
    ("TE gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 501),
    ("TE chunked, gzip", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked, gzip\r\n\r\nabc", 400),
    ("TE xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\nabc", 501),
    # two lines are one list (RFC 9110 5.3): it used to go on as `chunked` alone
    ("TE gzip, then chunked on a second line", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    ("TE twice", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE vertical tab", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("NUL in a value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("control char in a value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    ("bad header name", b"GET / HTTP/1.1\r\n" + H + b"X(y): a\r\n\r\n", 400),
    ("empty header name", b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n", 400),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    # not uri-host [":" port] (RFC 9112 3.2); more in test_http_frontdoor
    *[(f"invalid Host {host!r}", b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400)
      for host in (b"", b"exa mple.com:80", b"u@a", b"a/b", b"a:1:2", b"a:65536")],
    ("invalid target authority", b"GET http://a:1:2/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", 505),
    # RFC 9110 15.6.6 (HTTP/1.2 is served as 1.1: test_http_semantics)
    ("HTTP/3.0", b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    ("HTTP/1.10", b"GET / HTTP/1.10\r\n" + H + b"\r\n", 400),  # HTTP/DIGIT.DIGIT
    ("HTTP/0.9 in a request line", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    # llhttp parses these too; they went on as HTTP/1.1 (more in test_http_semantics)
    ("RTSP", b"GET / RTSP/1.0\r\n" + H + b"\r\n", 400),
    ("ICE", b"SOURCE / ICE/1.0\r\n" + H + b"\r\n", 400),
    ("lowercase method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    # absolute-form is accepted (test_http_semantics); with userinfo it is not
    ("userinfo in the target", b"GET http://u@evil.example/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("scheme other than http", b"GET ftp://evil.example/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 400),
    # llhttp parses nothing after a CONNECT's head: origin-form, it used to be forwarded
    # with its Content-Length and without its body (and answered twice)
    ("CONNECT origin-form", b"CONNECT /x HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
     400),
    ("Expect other than 100-continue", b"GET / HTTP/1.1\r\n" + H +
     b"Expect: 200-ok\r\n\r\n", 417),
    ("too many headers", b"GET / HTTP/1.1\r\n" + H +
     b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
    ("oversized header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 40000 + b"\r\n\r\n",
     431),
    ("oversized URI", b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
]


@pytest.fixture
async def proxied():
    [backend] = await start_backends({"east": 1}, 71)
    cs = Clusterset("east")
    publish(cs, "smuggle", "127.240.71.1", [backend])
    proxy = await cs.proxy()
    yield backend
    await proxy.stop()
    await backend.stop()


async def test_every_smuggling_shape_is_refused(proxied) -> None:
    backend = proxied
    for name, raw, status in SHAPES:
        client = await RawClient.open("127.240.71.1", 80)
        # A valid request first: the refusal must not disturb what came before it.
        client.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n" + raw)
        first = await client.response()
        assert first.status == 200, name
        r = await client.response()
        assert r.status == status, (name, r.status, r.body)
        assert r.body and r.headers.get(b"connection") == b"close", name
        assert await client.closed(), name
        await client.close()
        paths = [url for _, url, _ in backend.requests]
        assert paths == [b"/first"], (name, paths)  # nothing of the shape reached it
        backend.requests.clear()


async def test_body_bytes_never_become_a_second_request(proxied) -> None:
    backend = proxied
    client = await RawClient.open("127.240.71.1", 80)
    # The body of a Content-Length request holds what looks like a request: it stays a body.
    inner = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(inner)
                + inner)
    r = await client.response()
    assert r.body == inner
    assert [url for _, url, _ in backend.requests] == [b"/echo"]
    await client.close()


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} file descriptors")


async def test_slowloris_connections_cut_while_others_are_served() -> None:
    raise_fd_limit(4096)
    [backend] = await start_backends({"east": 1}, 72)
    cs = Clusterset("east")
    publish(cs, "loris", "127.240.72.1", [backend])
    proxy = await cs.proxy(http=HttpConfig(header_timeout_s=1.0))
    slow: list[RawClient] = []
    try:
        for i in range(500):
            c = await RawClient.open("127.240.72.1", 80)
            c.send(b"GET /%d HTTP/1.1\r\nHost: a\r\nX-Slow: " % i)  # never finished
            slow.append(c)
        started = time.monotonic()
        client = await RawClient.open("127.240.72.1", 80)
        deadline = started + 0.8
        served = 0
        while time.monotonic() < deadline:  # others are served while the 500 trickle
            for c in slow[::50]:
                c.send(b"v")
            r = await client.get("/")
            assert r.status == 200
            served += 1
        assert served >= 10
        results = await asyncio.gather(*(c.response(timeout=5) for c in slow))
        assert {r.status for r in results} == {408}
        assert all(await asyncio.gather(*(c.closed() for c in slow)))
        assert time.monotonic() - started < 3.0
        assert all(url == b"/" for _, url, _ in backend.requests)
        await client.close()
    finally:
        for c in slow:
            await c.close()
        await proxy.stop()
        await backend.stop()
