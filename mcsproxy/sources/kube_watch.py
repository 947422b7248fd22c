"""List + watch of one Kubernetes resource through kubernetes_asyncio, kept in step.

client-go's reflector and kopf's watching layer are the models. A (paged) list learns the
current state and a resourceVersion; a watch from that version follows the changes;
bookmarks move the version forward on quiet resources; a watch that ends is resumed from
the last version seen, without a relist. 410 Gone means the server's history no longer
reaches back that far: the resource is listed again and the handler diffs the new list
against what it holds, so deletions missed while away are applied and nothing is doubled.
A resource the server does not serve (404: its CRD is not installed) counts as empty and
is asked for again later; once listed, a 404 is an error like any other (the last good
view stays, retried with backoff), never a reason to drop what was seen. Every wait has
a timeout; failures back off exponentially with full jitter so a fleet of gateways does
not reconnect in step.

Requests go through the client's generated list functions with `_preload_content=False`:
the objects stay plain dicts (what mcsproxy.manifests validates) and the watch stream is
read line by line here, with a bound on the line length and a read timeout.

What the code does not expect never ends a reflector silently. An object that makes its
handler raise (an odd shape that slipped past validation) is skipped: logged once with its
kind, namespace and name, counted, and the watch goes on (its last good version keeps
serving). Anything else that escapes the loop (a watch line that cannot be decoded, a
list that cannot be taken apart, a client error of an unforeseen kind) is a failure of
the loop: the reflector reports `connected: false` with the error and relists after a
backoff step, until it works again; the handler keeps what it had meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from mcsproxy.backoff import Backoff, describe_error
from mcsproxy.gc_pause import collector_paused
from mcsproxy.logsetup import exception_line
from mcsproxy.sources.lines import read_lines

log = logging.getLogger("mcsproxy.sources.kube")

Obj = dict[str, Any]
MAX_LINE_BYTES = 64 * 1024 * 1024  # one watch event; a huge EndpointSlice is ~1 MB
PARSE_IN_THREAD_BYTES = 256 * 1024  # larger list pages are parsed off the event loop
BULK_ITEMS = 500  # a list this long is applied with the cyclic collector paused
# A watch that ends this soon without an event is suspicious (a proxy cutting streams,
# an overloaded server): the next one waits a backoff step instead of hammering.
SHORT_WATCH_S = 1.0


class ResourceGone(Exception):
    """410: the resourceVersion is older than the server's history; relist."""


class NotServed(Exception):
    """404 on a list: the server does not serve this resource (CRD not installed)."""


class Undecodable(Exception):
    """A watch line that is not a JSON event: what it said is unknown, so relist."""


MAX_REPORTED = 10_000  # objects remembered as already logged (then forgotten, all at once)


@dataclass(frozen=True, slots=True)
class Resource:
    group: str  # "" for the core group
    versions: tuple[str, ...]  # tried in order; the first one served is used
    plural: str
    label_selector: str | None = None

    def describe(self, version: str | None = None) -> str:
        gv = f"{self.group}/{version or self.versions[0]}" if self.group else "v1"
        selector = f" [{self.label_selector}]" if self.label_selector else ""
        return f"{self.plural}.{gv}{selector}"


@dataclass(frozen=True, slots=True)
class WatchTimings:
    request_timeout_s: float = 30.0  # a list page, or a watch's response headers
    watch_timeout_s: float = 300.0  # timeoutSeconds asked of the server, jittered +-20 %
    idle_margin_s: float = 30.0  # no byte for timeoutSeconds + this: the stream is dead
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    not_served_retry_s: float = 60.0
    page_size: int = 500


class Handler(Protocol):
    """Where a reflector's objects go. `replace` gets every object of a (re)list."""

    def replace(self, objects: Sequence[Obj]) -> None: ...
    def upsert(self, obj: Obj) -> None: ...
    def delete(self, obj: Obj) -> None: ...


class SkipLog:
    """Objects skipped because applying them raised: counted, each version logged once
    (a relist or a resumed watch brings the same one again)."""

    def __init__(self, on_skip: Callable[[], None] | None = None) -> None:
        self.count = 0
        self.on_skip = on_skip or (lambda: None)
        self._reported: set[tuple[str, ...]] = set()  # (namespace, name, resourceVersion)

    def skip(self, where: str, obj: Obj, exc: Exception, what: str = "object") -> None:
        self.count += 1
        self.on_skip()
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        ident = tuple(str(meta.get(f) or "") for f in ("namespace", "name", "resourceVersion"))
        name = f"{obj.get('kind') or 'object'} {ident[0] or '-'}/{ident[1] or '-'}"
        if ident in self._reported:
            log.debug("%s: skipped %s %s again: %s", where, what, name, describe_error(exc))
            return
        if len(self._reported) >= MAX_REPORTED:
            self._reported.clear()
        self._reported.add(ident)
        log.error("%s: skipped %s %s that could not be applied (%s); its last good version "
                  "keeps serving", where, what, name, exception_line(exc))


def object_uid(obj: Mapping[str, Any]) -> str:
    """metadata.uid, "" when missing."""
    meta = obj.get("metadata")
    uid = meta.get("uid") if isinstance(meta, Mapping) else None
    return uid if isinstance(uid, str) else ""


def recreated(served_uid: str | None, obj: Mapping[str, Any]) -> bool:
    """Whether `obj` is another object than the one whose version is served: the same
    name, another metadata.uid (deleted and created again; a relist after 410 shows no
    DELETED in between). A rejected version of such an object has no last good version
    to keep: the one served was the deleted object's."""
    uid = object_uid(obj)
    return bool(served_uid and uid and served_uid != uid)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}".strip()
    return describe_error(exc)


class Reflector:
    """Keeps one Handler in step with one resource; `run` until cancelled."""

    def __init__(
        self,
        api: ApiClient,
        resource: Resource,
        handler: Handler,
        *,
        timings: WatchTimings | None = None,
        on_state: Callable[[], None] | None = None,
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        self.resource = resource
        self.handler = handler
        self.timings = timings or WatchTimings()
        self.on_state = on_state or (lambda: None)
        self._custom = CustomObjectsApi(api)
        self._core = CoreV1Api(api)
        self._version_index = 0
        self.resource_version: str | None = None
        self.synced = False  # listed at least once (or found not served)
        self.connected = False
        self.served = True
        self.error: str | None = None
        self.lists = 0
        self.relists_gone = 0
        self.watches = 0
        self.events = 0
        self.skips = SkipLog(on_failed)  # events and listed objects skipped
        self._loop_error: str | None = None  # the last unexpected failure logged

    @property
    def failed_objects(self) -> int:
        return self.skips.count

    @property
    def version(self) -> str:
        return self.resource.versions[self._version_index]

    @property
    def name(self) -> str:
        return self.resource.describe(self.version)

    # -- the loop --------------------------------------------------------------------
    async def run(self) -> None:
        backoff = Backoff(self.timings.backoff_initial_s, self.timings.backoff_max_s)
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    backoff.reset()
                if await self._watch():
                    backoff.reset()
                    continue
                # A short, empty watch: resume after a backoff step, not at once.
                await asyncio.sleep(backoff.next())
            except ResourceGone:
                self.relists_gone += 1
                log.info("%s: resourceVersion %s expired (410); relisting", self.name,
                         self.resource_version)
                self.resource_version = None
            except NotServed:
                if await self._not_served():
                    backoff.reset()
                else:
                    await asyncio.sleep(backoff.next_full())
            except (ApiException, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                self._set_state(connected=False, error=_error_text(exc))
                # Full jitter: a fleet of gateways must not come back in step.
                await asyncio.sleep(backoff.next_full())
            except Exception as exc:  # the loop must outlive the unforeseen
                await self._loop_failed(exc, backoff)

    async def _loop_failed(self, exc: Exception, backoff: Backoff) -> None:
        """Something no branch above expects: whatever was being applied may be half
        done, so the state is relisted (diffed against what the handler holds) after a
        backoff step; the status says disconnected, with the error, until then."""
        error = describe_error(exc)
        if error != self._loop_error:
            self._loop_error = error
            log.error("%s: watch loop failed (%s); relisting after backoff", self.name,
                      exception_line(exc))
        self.resource_version = None
        self._set_state(connected=False, error=error)
        await asyncio.sleep(backoff.next_full())

    def _identified(self, obj: Obj, what: str) -> bool:
        """Every handler indexes metadata.name: an object without one is skipped."""
        meta = obj.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str) and meta["name"]:
            return True
        self.skips.skip(self.name, obj, ValueError("no metadata.name"), what)
        return False

    def _set_state(self, *, connected: bool, error: str | None) -> None:
        if connected != self.connected or error != self.error:
            if not connected and self.connected:
                log.warning("%s: disconnected (%s); serving what was last seen, retrying",
                            self.name, error)
            elif not connected and self.error is None and error is not None:
                # Failing before it ever connected (a dead or wrong API server at start):
                # said once, as a disconnect is. It said nothing, and a gateway that could
                # not reach its API server logged only "gateway started".
                log.warning("%s: cannot reach the API server (%s); retrying with backoff",
                            self.name, error)
            elif connected and not self.connected and self.lists:
                log.info("%s: connected", self.name)
            self.connected, self.error = connected, error
            if connected:
                self._loop_error = None
            self.on_state()

    async def _not_served(self) -> bool:
        """404 on every version: empty if it was never listed; False to back off."""
        if self._version_index + 1 < len(self.resource.versions):
            self._version_index += 1  # the next version may be served: try it at once
            return True
        if self.lists:
            # Listed before: an API server whose CRD handlers are not ready yet (restart,
            # CRD update) is likelier than a CRD removed, and removing one deletes its
            # objects first, which the watch has seen. Keep the last good view.
            self._version_index = 0
            self.resource_version = None
            self._set_state(connected=False, error="HTTP 404 Not Found (served before; "
                            "keeping the last objects)")
            return False
        if self.served or not self.synced:
            log.info("%s: not served by the API server (CRD not installed?); treating it as "
                     "empty and asking again every %.0f s", self.resource.describe(),
                     self.timings.not_served_retry_s)
        self.served = False
        self._version_index = 0
        self.resource_version = None
        self.handler.replace(())
        self.synced = True
        self._set_state(connected=True, error=None)
        await asyncio.sleep(self.timings.not_served_retry_s)
        return True

    # -- requests --------------------------------------------------------------------
    def _call(self, **kwargs: Any) -> Any:
        if self.resource.label_selector:
            kwargs["label_selector"] = self.resource.label_selector
        if self.resource.group:
            return self._custom.list_cluster_custom_object(
                self.resource.group, self.version, self.resource.plural,
                _preload_content=False, **kwargs)
        if self.resource.plural != "services":
            raise ValueError(f"core resource {self.resource.plural} is not supported")
        return self._core.list_service_for_all_namespaces(_preload_content=False, **kwargs)

    async def _list(self) -> None:
        items: list[Obj] = []
        token: str | None = None
        timeout = aiohttp.ClientTimeout(total=self.timings.request_timeout_s)
        while True:
            kwargs: dict[str, Any] = {"limit": self.timings.page_size,
                                      "_request_timeout": timeout}
            if token:
                kwargs["_continue"] = token
            response = await self._call(**kwargs)
            async with response:
                if response.status == 404:
                    raise NotServed()
                body = await response.read()
                if response.status == 410 and token:
                    # The continue token expired between pages: start the list over.
                    items, token = [], None
                    continue
                if response.status != 200:
                    raise ApiException(status=response.status, reason=_reason(body))
            page = await _loads(body)
            if not isinstance(page, dict) or not isinstance(page.get("items", []), list):
                raise ValueError("list response is not a Kubernetes list")
            items.extend(i for i in page.get("items") or ()
                         if isinstance(i, dict) and self._identified(i, "listed object"))
            meta = page.get("metadata") or {}
            token = meta.get("continue") if isinstance(meta, dict) else None
            if not token:
                break
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(rv, str) or not rv:
            raise ValueError("list response has no resourceVersion")
        with collector_paused(len(items) >= BULK_ITEMS):
            self.handler.replace(items)
        self.resource_version = rv
        self.lists += 1
        self.served = True
        first = not self.synced
        self.synced = True
        self._set_state(connected=True, error=None)
        if first:
            self.on_state()  # synced changed even if the connection state did not
        log.debug("%s: listed %d objects at resourceVersion %s", self.name, len(items), rv)

    async def _watch(self) -> bool:
        """Follow changes until the stream ends; False when it ended early and empty."""
        t = self.timings
        server_timeout = max(1, round(t.watch_timeout_s * random.uniform(0.8, 1.2)))
        timeout = aiohttp.ClientTimeout(
            sock_connect=t.request_timeout_s, sock_read=server_timeout + t.idle_margin_s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # sock_read bounds the stream's reads, minutes apart; an API server that takes
        # the request and never answers must be noticed within request_timeout_s.
        async with asyncio.timeout(t.request_timeout_s):
            response = await self._call(
                watch=True, resource_version=self.resource_version,
                allow_watch_bookmarks=True, timeout_seconds=server_timeout,
                _request_timeout=timeout)
        async with response:
            if response.status == 410:
                raise ResourceGone()
            if response.status == 404:
                raise NotServed()
            if response.status != 200:
                async with asyncio.timeout(t.request_timeout_s):  # not wait_for: lines.py
                    body = await response.content.read(4096)
                raise ApiException(status=response.status, reason=_reason(body))
            self.watches += 1
            self._set_state(connected=True, error=None)
            # Each read is bounded by sock_read above.
            events = await read_lines(response.content, self._event, max_bytes=MAX_LINE_BYTES)
        return events > 0 or loop.time() - started >= SHORT_WATCH_S

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise Undecodable(f"undecodable watch event: {describe_error(exc)}") from None
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise ValueError("watch event without an object")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise ResourceGone()
            raise ApiException(status=code if isinstance(code, int) else 500,
                               reason=str(obj.get("message") or obj.get("reason") or ""))
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            if self._identified(obj, "watch event of"):
                try:
                    if kind == "DELETED":
                        self.handler.delete(obj)
                    else:
                        self.handler.upsert(obj)
                except Exception as exc:  # one object must not end the watch
                    self.skips.skip(self.name, obj, exc, "watch event of")
        elif kind != "BOOKMARK":
            log.warning("%s: ignoring watch event of type %r", self.name, kind)
            return
        self.events += 1
        if isinstance(rv, str) and rv:
            self.resource_version = rv


def _reason(body: bytes) -> str:
    """The message of a `kind: Status` body, or the start of whatever came instead."""
    try:
        status = json.loads(body)
        return str(status.get("message") or status.get("reason"))
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


async def _loads(body: bytes) -> Any:
    if len(body) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(json.loads, body)
    return json.loads(body)
