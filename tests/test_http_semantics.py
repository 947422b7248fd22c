"""RFC 9110/9112 message semantics end to end, with real sockets: what a client may send
after a request that closes the connection."""

from __future__ import annotations

from tests.http_support import RawClient, publish, start_backends
from tests.proxy_fixtures import Clusterset


async def test_nothing_is_answered_after_a_request_that_closes_the_connection() -> None:
    # RFC 9112 9.6: after a request with Connection: close (or an HTTP/1.0 one without
    # keep-alive) no further request is processed, and the answer saying close is the
    # last. The bytes after it used to get a 400 "Data after Connection: close" of their
    # own, which the client would take for the answer to its next request.
    [backend] = await start_backends({"east": 1}, 199)
    cs = Clusterset("east")
    publish(cs, "closes", "127.199.0.1", [backend])
    proxy = await cs.proxy()
    try:
        for first in (b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                      b"GET /a HTTP/1.0\r\n\r\n"):
            client = await RawClient.open("127.199.0.1", 80)
            client.send(b"GET /0 HTTP/1.1\r\nHost: a\r\n\r\n" + first +
                        b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
            answers = [await client.response() for _ in range(2)]
            assert [(r.status, r.body) for r in answers] == [(200, b"east-1")] * 2
            assert answers[1].headers[b"connection"] == b"close"
            assert await client.reader.read() == b""  # nothing after: the close
            await client.close()
        assert [u for _, u, _ in backend.requests] == [b"/0", b"/a"] * 2
    finally:
        await proxy.stop()
        await backend.stop()
