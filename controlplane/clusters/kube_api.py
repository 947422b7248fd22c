"""Raw JSON requests and watch streams over a kubernetes-asyncio ApiClient.

The controller reads thousands of objects and only needs a few fields of each, so it asks
the client for undecoded responses (`_preload_content=False`) and parses JSON once,
instead of building the generated model classes and turning them back into dicts. Auth,
TLS and the kubeconfig handling stay the client's.

Every request has a timeout; a transport failure, a timeout or a 5xx becomes a
ClusterError, any other non-2xx answer a KubeApiError carrying the Status code and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient

from controlplane.clusters import ClusterError
from mcsproxy.backoff import describe_error

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
LIST_PAGE = 500


class KubeApiError(ClusterError):
    """The API server answered with an error Status (4xx)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): relist."""


class WatchRefused(ClusterError):
    """The API server answered a watch with an error other than 410 (an HTTP status, or
    an ERROR event in the stream): what the watch resumed from is not to be trusted."""


@contextlib.asynccontextmanager
async def fenced(fence: Callable[[], float] | None, what: str) -> AsyncIterator[None]:
    """Around a write: entered only while this replica certainly holds the lease, cut
    short once it may no longer (leader.py, fencing): after a pause, or renewals too slow,
    another may lead now. `fence` gives the seconds left; None: no limit."""
    left = math.inf if fence is None else fence()
    if left <= 0:
        raise ClusterError(f"{what} not sent: this controller's lease may have run out")
    try:
        async with asyncio.timeout(None if math.isinf(left) else left):
            yield
    except TimeoutError:
        raise ClusterError(f"{what} cut short: this controller's lease may have run "
                           "out") from None


def _status_error(code: int, body: bytes) -> ClusterError:
    try:
        status = json.loads(body)
        reason, message = str(status.get("reason", "")), str(status.get("message", ""))
    except (ValueError, AttributeError):
        reason, message = "", body[:200].decode("utf-8", "replace")
    if code >= 500 or code == 429:
        return ClusterError(f"API server answered {code} {reason}: {message}".rstrip(": "))
    return KubeApiError(code, reason, message)


class KubeApi:
    __slots__ = ("client", "name", "timeout_s")

    def __init__(self, client: ApiClient, name: str, timeout_s: float = 10.0) -> None:
        self.client = client
        self.name = name  # the cluster ID, for messages
        self.timeout_s = timeout_s

    async def _send(self, method: str, path: str, query: Mapping[str, Any] | None,
                    body: Any, content_type: str | None,
                    timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        return await self.client.call_api(
            path, method, query_params=list((query or {}).items()), header_params=headers,
            body=body, auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=timeout)

    async def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str | None = None,
                      timeout_s: float | None = None) -> Obj:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self._send(method, path, query, body, content_type,
                                        aiohttp.ClientTimeout(total=timeout_s))
                try:
                    data = await resp.read()
                finally:
                    resp.release()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ClusterError(f"{method} {path}: {describe_error(exc)}") from None
        if not 200 <= resp.status < 300:
            raise _status_error(resp.status, data)
        try:
            result = json.loads(data) if data else {}
        except ValueError:
            raise ClusterError(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(result, dict):
            raise ClusterError(f"{method} {path}: the answer is not a JSON object")
        return result

    async def list(self, path: str, label_selector: str | None = None) -> tuple[list[Obj], str]:
        """Every item (page by page) and the list's resourceVersion."""
        items: list[Obj] = []
        query: dict[str, Any] = {"limit": LIST_PAGE}
        if label_selector:
            query["labelSelector"] = label_selector
        while True:
            page = await self.request("GET", path, query=query)
            got = page.get("items") or []
            if not isinstance(got, list):
                raise ClusterError(f"GET {path}: items is not a list")
            items.extend(i for i in got if isinstance(i, dict))
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")
            query["continue"] = token

    async def watch(self, path: str, resource_version: str, *, label_selector: str | None,
                    timeout_s: float, idle_s: float) -> AsyncIterator[Obj]:
        """Watch events from `resource_version` until the server ends the stream.

        `idle_s` bounds the wait for the next line (bookmarks keep a healthy stream
        talking); WatchExpired on 410, ClusterError on any other failure.
        """
        query: dict[str, Any] = {"watch": "true", "resourceVersion": resource_version,
                                 "allowWatchBookmarks": "true",
                                 "timeoutSeconds": int(timeout_s)}
        if label_selector:
            query["labelSelector"] = label_selector
        timeout = aiohttp.ClientTimeout(sock_connect=self.timeout_s, sock_read=idle_s)
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._send("GET", path, query, None, None, timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ClusterError(f"watch {path}: {describe_error(exc)}") from None
        try:
            if resp.status == 410:
                raise WatchExpired(path)
            if not 200 <= resp.status < 300:
                raise WatchRefused(str(_status_error(resp.status, await resp.read())))
            yield {"type": "OPEN"}
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    # A broken stream is not yet a dead server: the caller reconnects, and
                    # only a failing reconnect marks the cluster stale.
                    yield {"type": "BROKEN", "error": describe_error(exc)}
                    return
                if not line:
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    raise ClusterError(f"watch {path}: an event is not JSON") from None
                if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                    raise ClusterError(f"watch {path}: malformed event")
                if event.get("type") == "ERROR":
                    code = event["object"].get("code")
                    if code == 410:
                        raise WatchExpired(path)
                    # An aggregated API server may send a Status of its own shape.
                    raise WatchRefused(str(_status_error(
                        code if isinstance(code, int) else 500,
                        json.dumps(event["object"]).encode())))
                yield event
        finally:
            resp.close()  # an unfinished stream cannot go back to the pool
