"""The admin listener (aiohttp): health, readiness, metrics, the active configuration,
endpoints, `/explain`, and the live status page at `/`.

Kept off the data path: aiohttp is fine here and too slow for the proxy. Listens on
loopback by default; anywhere else it warns, since it shows the whole configuration.
Connections are capped and slow request heads cut off (`AdminConfig.limits`, webguard).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as render_metrics
from prometheus_client.metrics_core import Metric

from mcsproxy.config import ConfigError, is_loopback
from mcsproxy.gc_pause import collector_off
from mcsproxy.jsonstream import stream_json_list
from mcsproxy.model import ImportedService, ServiceKey
from mcsproxy.observability.families import drop_gradually
from mcsproxy.observability.workers import health_scope
from mcsproxy.tokenfile import TokenFile, TokenFileError
from mcsproxy.webguard import (
    ConnectionGuard,
    harden_for_browsers,
    refuse_cross_site,
    refuse_without_token,
    serve,
)

if TYPE_CHECKING:
    from mcsproxy.gateway import Gateway
    from mcsproxy.observability.families import Families

log = logging.getLogger("mcsproxy.admin")

GATEWAY_KEY = web.AppKey("gateway", object)
STATIC_DIR = Path(__file__).parent / "admin_static"
STATIC_FILES = {"status.js": "text/javascript", "status.css": "text/css",
                "controller.html": "text/html"}
DEMO_TIMEOUT_S = 5.0
# gzip for a scrape that accepts it (Prometheus always does): level 1 compressed 84 MB of
# the gateway's counters and histograms 25x in 0.13 s of CPU, level 6 36x in 0.48 s.
METRICS_GZIP_LEVEL = 1
# A /metrics answer not written in this time is cut off, its connection closed: a client
# that asked and stopped reading held the whole text (158 MB at 6,000 services of 2
# ports in 3 clusters) for as long as it kept the connection, each such request its own
# scrape's. Prometheus gives up after its scrape timeout (10 s by default) itself.
METRICS_WRITE_TIMEOUT_S = 60.0
# Scrapes whose text requests are still writing (or gzipping) at once: a new scrape waits
# for one to end (at most METRICS_WRITE_TIMEOUT_S). Clients that each asked, stopped
# reading and asked again made a scrape each, every text held until the timeout.
METRICS_TEXTS_HELD = 2
# Series per part of the exposition (_render): ~0.5-5 MB of text, a few ms to write.
METRICS_PART_SERIES = 5000
FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}
# What the kubelet's probes and Prometheus read: open even with --admin-token-file.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def readiness(gateway: Gateway) -> tuple[bool, dict[str, object]]:
    store = gateway.store
    snapshot = store.current
    sources = {
        name: {
            "synced": st.synced,
            "connected": st.connected,
            "objects": st.objects,
            "error": st.error,
        }
        for name, st in store.sources.items()
    }
    # A listener that cannot bind leaves readiness alone: it is one ClusterSetIP:port, and
    # failing the probe would take DNS and every other service off the node with it.
    proxy = gateway.proxy
    ready = store.loaded.is_set() and not gateway.stopping
    detail: dict[str, object] = {
        "ready": ready,
        "cluster_id": gateway.config.cluster_id,
        "snapshot_version": snapshot.version,
        "snapshot_age_s": round(time.time() - snapshot.built_at, 3) if snapshot.built_at else None,
        "services": len(snapshot.services),
        "sources": sources,
        "listeners_failing": proxy.failing_listeners() if proxy is not None else [],
        "stopping": gateway.stopping,
        # Live asyncio tasks of this process: flat over hours, or something leaks
        # (bench/soak watches it).
        "tasks": len(asyncio.all_tasks()),
    }
    return ready, detail


def field_names(cls: type) -> tuple[str, ...] | None:
    """A dataclass's field names, None for any other class; looked up once per class
    (`dataclasses.fields` for every endpoint made most of a dump's cost)."""
    try:
        return FIELD_NAMES[cls]
    except KeyError:
        names = (tuple(f.name for f in dataclasses.fields(cls))
                 if dataclasses.is_dataclass(cls) else None)
        FIELD_NAMES[cls] = names
        return names


def jsonable(value: Any) -> Any:
    """Snapshot and config dataclasses as plain JSON data (tuples → lists)."""
    if value is None or isinstance(value, str | int | float):
        return value
    names = field_names(type(value))
    if names is not None:
        return {name: jsonable(getattr(value, name)) for name in names}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list | set | frozenset):
        return [jsonable(v) for v in value]
    return value


def service_json(service: ImportedService) -> dict[str, Any]:
    out = jsonable(service)
    out["key"] = str(service.key)
    out["locality"] = service.locality
    return out  # type: ignore[no-any-return]


def _gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]  # type: ignore[return-value]


def _service_arg(request: web.Request) -> ServiceKey | None:
    text = request.query.get("service")
    if text is None:
        return None
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name:
        raise web.HTTPBadRequest(text=f"service must be namespace/name, got {text!r}\n")
    return ServiceKey(ns, name)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    ready, detail = readiness(_gateway(request))
    return web.json_response(detail, status=200 if ready else 503)


async def config_dump(request: web.Request) -> web.StreamResponse:
    """The active snapshot (every service, or `?service=ns/name`) and the configuration,
    written as it is serialised (mcsproxy/jsonstream.py)."""
    gateway = _gateway(request)
    snapshot = gateway.store.current  # immutable: later snapshots do not change it
    key = _service_arg(request)
    if key is not None and key not in snapshot.services:
        raise web.HTTPNotFound(text=f"no service {key} in snapshot v{snapshot.version}\n")
    keys = sorted(snapshot.services) if key is None else [key]
    head = json.dumps({"version": snapshot.version, "built_at": snapshot.built_at})
    services = ((service_json(s), 1 + len(s.endpoints))
                for s in (snapshot.services[k] for k in keys))
    return await stream_json_list(
        request, f'{{"snapshot": {head[:-1]}, "services": [', services,
        lambda: f']}}, "config": {json.dumps(jsonable(gateway.config))}}}\n')


async def workers_active(gateway: Gateway) -> dict[str, dict[str, int]]:
    """The other --workers processes' open connections: upstream set name → "addr:port"
    → count, asked of the workers now (empty without workers). A host's own `active`
    counts this process's only."""
    workers = gateway.observer.workers
    if workers is None:
        return {}
    await gateway.observer.gather()  # refreshes the workers' connection counts
    return workers.active


async def endpoints(request: web.Request) -> web.StreamResponse:
    """Every endpoint the proxy balances over, with its health and connections."""
    gateway = _gateway(request)
    key = _service_arg(request)
    proxy = gateway.proxy
    if proxy is None:
        raise web.HTTPNotFound(text="no proxy runs here (--no-proxy)\n")
    if key is not None and key not in gateway.store.current.services:
        # As /config_dump and /explain: a mistyped name read as a service without endpoints.
        raise web.HTTPNotFound(text=f"no service {key} in the snapshot\n")
    others = await workers_active(gateway)  # asks the workers: their ejections too
    workers = gateway.observer.workers
    others_ejected = workers.ejected if workers is not None else {}
    upstreams = sorted(proxy.upstreams.items(), key=lambda kv: str(kv[0]))

    def rows() -> Iterator[tuple[dict[str, Any], int]]:
        for ukey, upstream in upstreams:
            if key is not None and ukey.service != key:
                continue
            upstream.expire_due()
            extra = others.get(upstream.name, {})
            elsewhere = others_ejected.get(upstream.name, {})
            for host in (*upstream.hosts.values(), *upstream.draining):
                hp = f"{host.address}:{host.port}"
                row: dict[str, Any] = {
                    "service": str(ukey.service), "port": ukey.port_name,
                    "protocol": ukey.protocol, "upstream": upstream.name,
                    "address": host.address, "target_port": host.port,
                    "cluster": host.cluster, "priority": host.level, "ready": host.ready,
                    "healthy": host.healthy, "active_check_up": host.active_up,
                    "ejected": host.ejected,
                    "ejected_for_s": round(upstream.ejected_for_s(host), 1),
                    "times_ejected": host.times_ejected,
                    "consecutive_failures": host.consecutive_failures,
                    "draining": host.removed,
                    "active_connections": host.active + extra.get(hp, 0),
                }
                if workers is not None:
                    # Worker index → seconds of ejection left, for each other process that
                    # keeps this endpoint out (`ejected` is this process's own).
                    row["ejected_by_workers"] = {
                        str(i): left for i, left in sorted(elsewhere.get(hp, {}).items())}
                yield row, 1

    scope = json.dumps(health_scope(gateway.config.proxy.workers))
    return await stream_json_list(request, f'{{"health_scope": {scope}, "endpoints": [',
                                  rows(), lambda: "]}\n")


async def explain_handler(request: web.Request) -> web.Response:
    from mcsproxy.observability.explain import explain

    gateway = _gateway(request)
    key = _service_arg(request)
    if key is None:
        raise web.HTTPBadRequest(
            text="usage: /explain?service=namespace/name[&port=P][&format=text]\n")
    text_format = request.query.get("format", "json")
    if text_format not in ("json", "text"):
        # format=txt answered JSON without a word: the typo looked like a broken page.
        raise web.HTTPBadRequest(text=f"format must be text or json, not {text_format!r}\n")
    service = gateway.store.current.services.get(key)
    if service is None:
        raise web.HTTPNotFound(text=f"no service {key} in the snapshot\n")
    port = request.query.get("port")
    if port is not None and not any(port in (p.name, str(p.port)) for p in service.ports):
        raise web.HTTPNotFound(text=f"service {key} has no port {port!r}\n")
    proxy = gateway.proxy
    upstreams = None
    if proxy is not None:
        upstreams = {(u.port_name, u.protocol): s for u, s in proxy.upstreams.items()
                     if u.service == key}
    others = await workers_active(gateway) if proxy is not None else {}
    workers = gateway.observer.workers
    result = explain(service, port, gateway.config.cluster_id, gateway.config.proxy, upstreams,
                     others, workers.ejected if workers is not None else {})
    if text_format == "text":
        lines = []
        for p in result["ports"]:
            lines.append(f"{result['service']} port {p['port'].get('name') or p['port']['port']}"
                         f"/{p['port']['protocol']}:")
            lines += [f"  {w}" for w in p["words"]]
        lines += [f"  {w}" for w in result.get("words", []) if not result["ports"]]
        return web.Response(text="\n".join(lines) + "\n")
    return web.json_response(result)


def _render(families: Families, process: CollectorRegistry) -> list[bytes]:
    """The exposition text in parts of at most METRICS_PART_SERIES series (Family.exposition,
    the bytes prometheus-client writes, 5-6 times faster): sorted, joined and encoded in
    single calls that hold the interpreter, one family of 30,000 histograms (~60 MB of
    text) stopped the loop for 0.15-0.25 s, and the whole text of 1.01M series 0.3-0.5 s.
    A family's HELP and TYPE lines come once, before its first part. `families` (the
    scrape's own) is emptied a family at a time as it goes: freed whole on the loop, its
    500,000 series took 36-46 ms."""
    with collector_off():  # see gc_pause: its garbage has no cycles, and there is a lot
        parts = []
        for family in families:
            parts += family.exposition(METRICS_PART_SERIES)
            family.values.clear()
        parts.append(render_metrics(process))
        return parts


class SharedScrape:
    """One gather and render of /metrics at a time, shared by the requests that wait for it.

    Each scrape is seconds of CPU with many services, and the render holds the GIL in its
    thread: scrapes sent at once (any client may hold 64 admin connections) ran in up to
    six threads together, each taking its share of the interpreter from the loop the
    proxy and DNS run on. Now a request that arrives while a scrape is under way waits
    for it to end, and every request that waited shares the next one, which begins after
    they all arrived: no answer is older than its request. At most METRICS_TEXTS_HELD
    scrapes' texts are held by requests writing them."""

    __slots__ = ("_freed", "_held", "_lock", "_parts", "_seq", "_started", "_waiting")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._seq = 0  # counts arrivals and scrape starts, in order
        self._parts: Exposition | None = None  # the last scrape's text, while any waits
        self._started = -1  # the sequence number at which that scrape began
        self._waiting = 0
        self._held = 0  # texts some request holds (TextHold.users > 0)
        self._freed: asyncio.Future[None] | None = None  # a scrape waits for a text to go

    @asynccontextmanager
    async def answer(self, scrape: Callable[[], Awaitable[Exposition]],
                     gzipped: bool) -> AsyncIterator[list[bytes]]:
        """One request's text, gzipped or not, held (and counted) until the block ends."""
        exposition = await self._shared(scrape)
        hold = exposition.hold
        try:
            parts = await exposition.gzipped() if gzipped else exposition.plain
            del exposition  # the plain text goes with the last request that writes it
            yield parts
        finally:
            hold.users -= 1
            if not hold.users:
                self._held -= 1
                if self._freed is not None and not self._freed.done():
                    self._freed.set_result(None)

    async def _shared(self, scrape: Callable[[], Awaitable[Exposition]]) -> Exposition:
        self._seq += 1
        arrived = self._seq
        self._waiting += 1
        try:
            async with self._lock:
                if self._parts is None or self._started < arrived:
                    while self._held >= METRICS_TEXTS_HELD:
                        self._freed = asyncio.get_running_loop().create_future()
                        await self._freed
                    self._seq += 1
                    started = self._seq
                    self._parts = None
                    parts = await scrape()
                    self._parts, self._started = parts, started
                # Counted before the caller may be cancelled: no await until its `try`.
                hold = self._parts.hold
                if not hold.users:
                    self._held += 1
                hold.users += 1
                return self._parts
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._parts = None  # megabytes of text: kept only for requests waiting


class TextHold:
    """How many requests hold one scrape's text (apart from it: counting must not keep it)."""

    __slots__ = ("users",)

    def __init__(self) -> None:
        self.users = 0


class Exposition:
    """One scrape's text in parts, and its gzip encoding, made once (in a thread: zlib lets
    go of the interpreter) for all the requests that share the scrape and accept it."""

    __slots__ = ("_gzip", "hold", "plain")

    def __init__(self, plain: list[bytes]) -> None:
        self.plain = plain
        self._gzip: asyncio.Future[list[bytes]] | None = None
        self.hold = TextHold()

    async def gzipped(self) -> list[bytes]:
        if self._gzip is None:
            self._gzip = asyncio.ensure_future(asyncio.to_thread(gzip_parts, self.plain))
        return await asyncio.shield(self._gzip)  # a request that leaves stops no other's


def gzip_parts(parts: list[bytes]) -> list[bytes]:
    compressor = zlib.compressobj(METRICS_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [chunk for chunk in map(compressor.compress, parts) if chunk]
    out.append(compressor.flush())
    return out


def accepts_gzip(request: web.Request) -> bool:
    """Whether Accept-Encoding names gzip with a weight above 0 (RFC 9110 12.5.3)."""
    for item in request.headers.get("Accept-Encoding", "").split(","):
        coding, *params = (p.strip() for p in item.split(";"))
        if coding.lower() in ("gzip", "x-gzip"):
            weights = [p.partition("=")[2] for p in params if p.lower().startswith("q=")]
            try:
                return not weights or float(weights[0]) > 0
            except ValueError:
                return False
    return False


async def _scrape(gateway: Gateway, process: CollectorRegistry) -> Exposition:
    # The cyclic collector off until this scrape's series are freed (gc_pause, and
    # Observer.gather): turned on between gather and render, its next collection scanned
    # them all, a stop of the loop.
    with collector_off():
        families = await gateway.observer.gather()
        # Rendered off the loop: prometheus-client takes ~10 us a series, and 2,000
        # services x 3 clusters are 200,000 of them; on the loop DNS and the proxy stopped
        # for those seconds (measured: a DNS answer 4.5 s late). `families` is this
        # scrape's own copy, emptied by the render.
        return Exposition(await asyncio.to_thread(_render, families, process))


async def metrics(request: web.Request) -> web.StreamResponse:
    if request.method == "HEAD":  # no body, and no gathering for one (see stream_json_list)
        return web.Response(headers={"Content-Type": CONTENT_TYPE_LATEST})
    gateway = _gateway(request)
    process = request.app[PROCESS_KEY]
    # Not compressed, a scrape of 6,000 services of 2 ports in 3 clusters sent 158 MB
    # to each Prometheus, which always asks for gzip: 8.3 MB now.
    gzipped = accepts_gzip(request)
    headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    response = web.StreamResponse(headers=headers)
    async with request.app[SCRAPE_KEY].answer(lambda: _scrape(gateway, process),
                                              gzipped) as parts:
        response.content_length = sum(map(len, parts))
        await response.prepare(request)
        try:
            async with asyncio.timeout(METRICS_WRITE_TIMEOUT_S):
                for part in parts:
                    await response.write(part)  # waits while the scraper's socket is full
                await response.write_eof()
        except TimeoutError:
            gateway.admin.guard.count("answer_timeout", f"/metrics not read within "
                                      f"{METRICS_WRITE_TIMEOUT_S:g} s")
            if request.transport is not None:
                request.transport.abort()  # and what it holds of the text with it
        except ConnectionError:
            pass  # the scraper left (its own scrape timeout): no traceback in the log
    return response


async def api_status(request: web.Request) -> web.StreamResponse:
    from mcsproxy.observability.status import (
        active_connections,
        status_parts,
        traffic_by_cluster,
    )

    gateway = _gateway(request)
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="since must be an integer\n") from None
    # The families are needed only for the traffic table and a total: they are freed
    # before the answer is written, with the cyclic collector off until then (see
    # metrics()). Not while writing: a client that stops reading would hold it off.
    with collector_off():
        families = await gateway.observer.gather()
        traffic = await traffic_by_cluster(families)
        active = active_connections(families)
        await drop_gradually(families)  # at once, 500,000 series stopped the loop 40 ms
        del families
    ready, detail = readiness(gateway)
    rows, rest = status_parts(gateway, traffic, active, ready, detail, since)
    return await stream_json_list(request, '{"services": [', rows,
                                  lambda: f"], {json.dumps(rest())[1:]}\n")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html",
                            headers={"Cache-Control": "no-cache"})


async def static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers={"Content-Type": STATIC_FILES[name],
                                                        "Cache-Control": "no-cache"})


async def demo_relay(request: web.Request) -> web.Response:
    """The demo's control API, relayed so the page's buttons stay same-origin."""
    url = _gateway(request).config.admin.demo_control
    if url is None:
        raise web.HTTPNotFound(text="not started by mcsproxy demo (no --demo-control)\n")
    path = "/clusters"
    if request.method == "POST":
        path += f"/{request.match_info['name']}/{request.match_info['action']}"
    try:
        async with ClientSession(timeout=ClientTimeout(total=DEMO_TIMEOUT_S)) as http, \
                http.request(request.method, url.rstrip("/") + path) as resp:
            return web.Response(body=await resp.read(), status=resp.status,
                                content_type="application/json")
    except (ClientError, TimeoutError) as exc:
        raise web.HTTPBadGateway(text=f"demo control at {url}: {exc}\n") from None


PROCESS_KEY = web.AppKey("process_metrics", CollectorRegistry)
SCRAPE_KEY = web.AppKey("shared_scrape", SharedScrape)


class SourceMetrics:
    """The sources' own metrics (a `registry` of prometheus-client metrics: the kube
    source's watch state and rejected objects, the controlplane source's propagation
    latency), as a collector of the process registry. They were never rendered: the
    README's source_kube_* families were missing from every /metrics."""

    def __init__(self, sources: Iterable[object]) -> None:
        self.registries = [r for r in (getattr(s, "registry", None) for s in sources)
                           if isinstance(r, CollectorRegistry)]

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; collect() runs at each scrape

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            for metric in registry.collect():
                # No `<name>_created` series, which prometheus-client adds to counters and
                # histograms by default: the gateway exports none (nor the controller).
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
                yield metric


def token_required(token: TokenFile) -> Middleware:
    """Middleware: every path but OPEN_PATHS answers 401 without `token` (a bearer token,
    as the controller's --serve-token-file): /config_dump and /api/status name every
    service, endpoint and flag, and the DaemonSet's admin port is on the node IP."""

    @web.middleware
    async def require_token(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            refuse_without_token(token, request, "--admin-token-file")
        return await handler(request)

    return require_token


class AdminServer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # The demo's kill/restore buttons POST here: no other site's page may.
        middlewares: list[Middleware] = [refuse_cross_site]
        if gateway.config.admin.token_file is not None:
            try:  # read now: a missing or empty file stops the start, not the first request
                middlewares.append(token_required(TokenFile(gateway.config.admin.token_file)))
            except TokenFileError as exc:
                raise ConfigError(f"--admin-token-file: {exc}") from None
        self.app = harden_for_browsers(web.Application(middlewares=middlewares))
        self.app[GATEWAY_KEY] = gateway
        process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=process)
        process.register(SourceMetrics(gateway.sources))  # type: ignore[arg-type]
        self.app[PROCESS_KEY] = process
        self.app[SCRAPE_KEY] = SharedScrape()
        r = self.app.router
        r.add_get("/", index)
        r.add_get("/static/{name}", static)
        r.add_get("/healthz", healthz)
        r.add_get("/readyz", readyz)
        r.add_get("/metrics", metrics)
        r.add_get("/config_dump", config_dump)
        r.add_get("/endpoints", endpoints)
        r.add_get("/explain", explain_handler)
        r.add_get("/api/status", api_status)
        r.add_get("/demo/clusters", demo_relay)
        r.add_post("/demo/clusters/{name}/{action:kill|restore}", demo_relay)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None
        self.guard = ConnectionGuard("admin", gateway.config.admin.limits)

    async def start(self) -> None:
        host, port = self.gateway.config.admin.listen
        if not is_loopback(host) and self.gateway.config.admin.token_file is None:
            log.warning("admin listener on non-loopback address %s: anyone who reaches it "
                        "can read the configuration; restrict it or use --admin-token-file",
                        host)
        self._runner, self.bound = await serve(self.app, (host, port), self.guard,
                                               "--admin-listen")
        log.info("admin listening on %s:%d", *self.bound)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
