"""HTTP/1.1 reverse proxying for appProtocol http ports, and the Host-routed front door.

uvloop + httptools (llhttp, strict) Protocols: `server.ClientConnection` per client,
`server.Exchange` per request, `pool.UpstreamConn` per endpoint connection, pooled per
endpoint; `engine.HttpEngine` holds what they share; `frontdoor.FrontDoor` is the
`--http-listen` listener. Balancing, health and ejection come from `mcsproxy.upstream`.
"""

from mcsproxy.http.engine import HttpEngine, HttpRoute, serves_http

__all__ = ["HttpEngine", "HttpRoute", "serves_http"]
