"""KubeEmulator: a small Kubernetes API server over real HTTP, for driving real clients in tests."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
import json
import math
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from aiohttp import web
from kubernetes_asyncio.client import ApiClient, Configuration

from .selectors import Predicate, SelectorError, field_selector, label_selector
from .store import BUILTIN_GROUPS, ApiError, Obj, ResourceType, Store

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            409: "Conflict", 410: "Expired", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable", 504: "Timeout"}
# Paged lists: each keeps the first page's snapshot for its continue tokens (which may be
# used again, as a real server's); the least recently used beyond this many are
# forgotten, and their tokens answer 410.
MAX_LIST_SNAPSHOTS = 64
_EXPIRED_CONTINUE = ("The provided continue parameter is too old to display a consistent "
                     "list result. You can start a new list without the continue parameter.")
_DEFAULT_TYPES = [  # group, versions, plural, kind, namespaced, status subresource
    ("", ["v1"], "namespaces", "Namespace", False, True),
    ("", ["v1"], "services", "Service", True, True),
    ("", ["v1"], "endpoints", "Endpoints", True, False),
    ("", ["v1"], "secrets", "Secret", True, False),
    ("", ["v1"], "configmaps", "ConfigMap", True, False),
    ("discovery.k8s.io", ["v1"], "endpointslices", "EndpointSlice", True, False),
    ("multicluster.x-k8s.io", ["v1alpha1", "v1beta1"], "serviceexports", "ServiceExport",
     True, True),
    ("multicluster.x-k8s.io", ["v1alpha1", "v1beta1"], "serviceimports", "ServiceImport",
     True, True),
    ("networking.karmada.io", ["v1alpha1"], "multiclusterservices", "MultiClusterService",
     True, True),
    ("coordination.k8s.io", ["v1"], "leases", "Lease", True, False),
]


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    user: str | None = None  # the client certificate's CN, when one authenticated it


@dataclass(frozen=True, slots=True)
class _ListSnapshot:
    """What a paged list's later pages are served from: the first page's state."""

    rtype: ResourceType
    rv: int
    items: list[Obj]  # stored objects are replaced on change, never mutated: no copy


@dataclass(slots=True)
class _Fault:
    remaining: int | None  # None: until clear_faults()
    status: int
    method: str | None
    path: str | None

    def matches(self, request: web.Request) -> bool:
        return ((self.method is None or request.method == self.method.upper())
                and (self.path is None or self.path in request.path))


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


_X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's; the ssl module has no name for it
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
# `openssl ca` is the one openssl command that sets an end date to the second. The
# extensions are a kubeadm client certificate's: Python 3.13's default contexts
# (VERIFY_X509_STRICT) refuse one without an authority key identifier, and a CA without
# a key usage.
_CA_CONFIG = """\
[ca]
default_ca = ca_default
[ca_default]
database = {dir}/index.txt
new_certs_dir = {dir}
rand_serial = yes
default_md = sha256
policy = policy_any
unique_subject = no
x509_extensions = client_cert
[policy_any]
commonName = supplied
[client_cert]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _asn1_time(when: datetime.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%SZ")


def _common_name(peer: dict[str, Any]) -> str | None:
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.status(), status=error.code)


class KubeEmulator:
    """Serves the Kubernetes REST API for registered resources from memory.

    Data survives `stop()`/`start()`; the port is reused on restart.

    Authentication: while `tokens` is not empty, a request needs `Authorization: Bearer T`
    for a T in it, else it is answered 401 (counted in `unauthorized`). A test rotates
    credentials by changing the set; `token` (in it from the start) is the one kubeconfig()
    and api_client() use. `tls=True` serves HTTPS with a self-signed certificate for the
    host, its CA file at `ca_file`, as an in-cluster client needs; rotate_certificate()
    makes a new one (a new CA) for the next start().

    Client certificates (tls=True): issue_client_certificate() signs them with a client CA of
    the emulator's own. As kube-apiserver does, a valid one authenticates the request as its
    CN (`Request.user`), whatever `tokens` say, and an expired one is answered 401; one
    from another CA fails the handshake. `handshake_expiry=True` refuses an expired one in
    the handshake too (a TLS alert), as a TLS-terminating proxy in front would.
    rotate_client_ca() makes a new client CA for the next start().
    """

    def __init__(self, *, token: str | None = None, history: int = 1000,
                 bookmark_interval: float = 60.0, watch_queue: int = 10_000,
                 tls: bool = False, handshake_expiry: bool = False):
        self.store = Store(history, watch_queue)
        self.token = token
        self.tokens: set[str] = {token} if token else set()
        self.unauthorized = 0
        self.tls = tls
        self.handshake_expiry = handshake_expiry
        self._certs: Path | None = None  # removed with the emulator object
        self.bookmark_interval = bookmark_interval
        self.requests: list[Request] = []
        self.host, self.port = "127.0.0.1", 0
        self._faults: list[_Fault] = []
        self._hold: _Fault | None = None  # whose answers wait for release_answers()
        self._answers = asyncio.Event()
        self._released = asyncio.Event()
        self._released.set()
        self._stopping = False
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._lists: collections.OrderedDict[str, _ListSnapshot] = collections.OrderedDict()
        for group, versions, plural, kind, namespaced, status in _DEFAULT_TYPES:
            for version in versions:
                self.register(group, version, plural, kind, namespaced=namespaced, status=status)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Serve on host:port (port 0 picks one; a restart reuses the previous port)."""
        self.host, self.port = host or self.host, self.port if port is None else port
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port,
                          ssl_context=self._ssl_context() if self.tls else None).start()
        self.port = self._runner.addresses[0][1]
        self._stopping = False
        return self.url

    async def stop(self) -> None:
        """The API server goes away: watches end, hung requests are dropped, data is kept."""
        if self._runner is None:
            return
        self._stopping = True
        self._released.set()
        self.drop_watches()
        server = self._runner.server
        await self._runner.cleanup()
        self._runner = None
        # A client reconnecting as the listener closed can have its connection accepted
        # and reach the server only after the server's shutdown: nothing closed it, and
        # its transport was collected in some later test (a ResourceWarning that failed
        # it). Give those a moment to arrive, then cut them.
        await asyncio.sleep(0.01)
        if server is not None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    async def __aenter__(self) -> KubeEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate a client trusts for this (tls=True) emulator, once started."""
        assert self._certs is not None, "not a started tls=True emulator"
        return self._certs / "ca.crt"

    def _ssl_context(self) -> ssl.SSLContext:
        """A self-signed certificate for the host (made once: a restart keeps it)."""
        if self._certs is None:
            self._certs = Path(tempfile.mkdtemp(prefix="kube-emulator-"))
            weakref.finalize(self, shutil.rmtree, self._certs, True)
            self.rotate_certificate()
            self.rotate_client_ca()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca_file, self._certs / "tls.key")
        context.load_verify_locations(self._certs / "client-ca.crt")
        context.verify_mode = ssl.CERT_OPTIONAL  # token clients send none
        if not self.handshake_expiry:  # kube-apiserver checks the dates per request
            context.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
        return context

    def rotate_certificate(self) -> None:
        """A new key and self-signed certificate (a new CA): served from the next start()."""
        assert self._certs is not None, "not a started tls=True emulator"
        _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=kube-emulator",
                 "-addext", f"subjectAltName=IP:{self.host}",
                 "-keyout", self._certs / "tls.key", "-out", self.ca_file)

    def rotate_client_ca(self) -> None:
        """A new client CA: certificates from the old one fail the handshake from the next
        start()."""
        assert self._certs is not None, "not a started tls=True emulator"
        ca = self._certs / "client-ca"
        shutil.rmtree(ca, ignore_errors=True)
        ca.mkdir()
        (ca / "index.txt").write_text("")
        (ca / "openssl.cnf").write_text(_CA_CONFIG.format(dir=ca))
        _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=kube-emulator-clients",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",  # strict: a CA's must
                 "-keyout", ca / "ca.key", "-out", self._certs / "client-ca.crt")

    def issue_client_certificate(self, directory: Path, name: str,
                                 lifetime_s: float) -> tuple[Path, Path]:
        """A client certificate for user `name` (CN), valid for `lifetime_s` from now (whole
        seconds, rounded down): its certificate and key files in `directory`."""
        assert self._certs is not None, "not a started tls=True emulator"
        ca = self._certs / "client-ca"
        directory.mkdir(parents=True, exist_ok=True)
        cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        now = datetime.datetime.now(datetime.UTC)
        _openssl("req", "-new", *_EC, "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
        _openssl("ca", "-batch", "-notext", "-config", ca / "openssl.cnf",
                 "-cert", self._certs / "client-ca.crt", "-keyfile", ca / "ca.key",
                 "-startdate", _asn1_time(now - datetime.timedelta(minutes=1)),
                 "-enddate", _asn1_time(now + datetime.timedelta(seconds=lifetime_s)),
                 "-in", csr, "-out", cert)
        csr.unlink()
        return cert, key

    # -- client helpers ------------------------------------------------------------------
    def kubeconfig(self, path: str | Path, context_name: str = "emulator",
                   namespace: str = "default") -> Path:
        """Write a kubeconfig that kubernetes_asyncio.config.load_kube_config accepts."""
        user = {"token": self.token} if self.token else {}
        cluster: dict[str, Any] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority"] = str(self.ca_file)
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": context_name,
               "clusters": [{"name": context_name, "cluster": cluster}],
               "users": [{"name": context_name, "user": user}],
               "contexts": [{"name": context_name, "context": {
                   "cluster": context_name, "user": context_name, "namespace": namespace}}]}
        path = Path(path)
        path.write_text(yaml.safe_dump(doc))
        return path

    def client_configuration(self) -> Configuration:
        config = Configuration(host=self.url)
        if self.tls:
            config.ssl_ca_cert = str(self.ca_file)
        if self.token:
            config.api_key["BearerToken"] = f"Bearer {self.token}"
        return config

    def api_client(self) -> ApiClient:
        """A client for this emulator; use `async with` so its session gets closed."""
        return ApiClient(self.client_configuration())

    # -- resources and direct access -----------------------------------------------------
    def register(self, group: str, version: str, plural: str, kind: str, *,
                 namespaced: bool = True, status: bool = False) -> ResourceType:
        """Serve another resource; registering a new version shares the existing storage."""
        return self.store.register(group, version, plural, kind, namespaced=namespaced,
                                   status=status)

    def put_object(self, obj: Obj) -> Obj:
        """Store `obj` as given (creationTimestamp, status, ...), found by apiVersion/kind."""
        version = obj["apiVersion"].rpartition("/")[2]
        rtype = self.store.by_kind(obj["apiVersion"], obj["kind"])
        return rtype.present(self.store.put(rtype, obj), version)

    def get_object(self, resource: str, name: str, namespace: str | None = None) -> Obj | None:
        """`resource` as kubectl spells it: `services`, `serviceimports.multicluster.x-k8s.io`."""
        rtype = self.store.by_name(resource)
        try:
            return rtype.present(self.store.get(rtype, namespace or "", name), rtype.versions[0])
        except ApiError:
            return None

    def delete_object(self, resource: str, name: str, namespace: str | None = None) -> bool:
        """Delete as the API server would (finalizers only mark it); False when missing."""
        rtype = self.store.by_name(resource)
        try:
            self.store.delete(rtype, namespace or "", name)
        except ApiError:
            return False
        return True

    def list_objects(self, resource: str, namespace: str | None = None) -> list[Obj]:
        rtype = self.store.by_name(resource)
        everything = label_selector(None)
        return [rtype.present(obj, rtype.versions[0])
                for obj in self.store.list(rtype, namespace, everything, everything)]

    # -- fault injection -----------------------------------------------------------------
    def fail_next(self, n: int | None = 1, status: int = 500, *, method: str | None = None,
                  path: str | None = None) -> None:
        """Answer the next n matching requests (n=None: all, until cleared) with `status`."""
        self._faults.append(_Fault(n, status, method, path))

    def clear_faults(self) -> None:
        self._faults.clear()

    def hold_answers(self, *, method: str | None = None, path: str | None = None) -> None:
        """Matching requests take effect at once but are answered only on release_answers():
        the client then gets the answer after the watch events of later changes."""
        self._hold = _Fault(None, 200, method, path)
        self._answers.clear()

    def release_answers(self) -> None:
        self._hold = None
        self._answers.set()

    def hang(self, enabled: bool = True) -> None:
        """While enabled, requests (watches included) wait without an answer."""
        if enabled:
            self._released.clear()
        else:
            self._released.set()

    def expire_history(self) -> None:
        """Forget the event history: any watch resume answers ERROR 410 Expired."""
        self.store.expire_history()

    def restore_backup(self) -> None:
        """As after an etcd restore: the resourceVersion counter starts over below every
        version handed out (the objects stay), so a watch resumed from one of those is
        answered 504 "Too large resource version", as the API server does."""
        self.store.expire_history()
        self.store.rv = 0
        self.store.compacted = 0
        self.drop_watches()

    def send_watch_event(self, resource: str, kind: str, obj: Obj) -> None:
        """Send (kind, obj) as it is on every open watch of `resource`, e.g. an ERROR event
        whose Status object is not the API server's usual shape."""
        rtype = self.store.by_name(resource)
        for watcher in list(self.store.watchers):
            if watcher.rtype is rtype:
                watcher.push(kind, obj)

    def lose_events(self, enabled: bool = True) -> None:
        """While enabled, changes are stored but no watch ever sees them, open or resumed
        later: only a list finds them, as after an event lost on the way."""
        self.store.lose_events = enabled

    def drop_watches(self, *, abort: bool = False) -> None:
        """End every open watch stream: cleanly, or by resetting the connection."""
        for watcher in list(self.store.watchers):
            watcher.end("abort" if abort else "close")

    @property
    def watch_count(self) -> int:
        return len(self.store.watchers)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until predicate() holds; re-checked whenever a request or watch changes."""
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                if predicate():
                    return
                await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- HTTP ----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        user = _common_name(peer) if peer else None
        self.requests.append(Request(request.method, request.path, dict(request.query), user))
        self._notify()
        try:
            if (peer and not self.handshake_expiry  # else checked once, by the handshake
                    and time.time() >= ssl.cert_time_to_seconds(peer["notAfter"])):
                self.unauthorized += 1
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if (self.tokens and user is None
                    and not self._authorized(request.headers.get("Authorization"))):
                self.unauthorized += 1
                raise ApiError(401, "Unauthorized", "Unauthorized")
            await self._released.wait()
            if self._stopping:
                return self._drop(request)
            for fault in self._faults:
                if fault.remaining != 0 and fault.matches(request):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    reason = _REASONS.get(fault.status, "InternalError")
                    raise ApiError(fault.status, reason, f"injected fault ({fault.status})")
            response = await self._dispatch(request)
            if self._hold is not None and self._hold.matches(request):
                await self._answers.wait()
            return response
        except ApiError as error:
            return _error_response(error)
        except SelectorError as error:
            return _error_response(ApiError(400, "BadRequest", str(error)))
        finally:
            self._notify()

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme == "Bearer" and token in self.tokens

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        not_found = ApiError(404, "NotFound", "the server could not find the requested resource")
        if parts == ["version"]:
            return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-emu"})
        if parts[:1] == ["api"] and len(parts) == 1:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"],
                                      "serverAddressByClientCIDRs": []})
        if parts[:1] == ["apis"] and len(parts) <= 2:
            groups = self._groups()
            if len(parts) == 1:
                return web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                          "groups": list(groups.values())})
            if parts[1] not in groups:
                raise not_found
            return web.json_response({"kind": "APIGroup", "apiVersion": "v1",
                                      **groups[parts[1]]})
        if parts[:1] == ["api"]:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"]:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise not_found
        if not rest:
            return self._resource_list(group, version) or _error_response(not_found)
        namespace = None
        nested = self.store.lookup(group, version, rest[2]) if len(rest) >= 3 else None
        if rest[0] == "namespaces" and nested is not None and nested.namespaced:
            namespace, rest = rest[1], rest[2:]
        rtype = self.store.lookup(group, version, rest[0])
        if (rtype is None or len(rest) > 3 or (rtype.namespaced and namespace is None
                                               and len(rest) > 1)
                or (len(rest) == 3 and not (rest[2] == "status" and rtype.status))):
            raise not_found
        name = rest[1] if len(rest) > 1 else None
        return await self._verb(request, rtype, version, namespace, name, len(rest) == 3)

    async def _verb(self, request: web.Request, rtype: ResourceType, version: str,
                    namespace: str | None, name: str | None,
                    status_only: bool) -> web.StreamResponse:
        query, method, ns = request.query, request.method, namespace or ""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not valid JSON") from None

        if method == "DELETE":
            body = _delete_options(body, query)

        def reply(obj: Obj, code: int = 200) -> web.Response:
            return web.json_response(rtype.present(obj, version), status=code)

        if name is None:
            labels = label_selector(query.get("labelSelector"))
            fields = field_selector(query.get("fieldSelector"))
            if method == "GET" and _truthy(query.get("watch")):
                return await self._watch(request, rtype, version, namespace, labels, fields)
            if method == "GET":
                return self._list(rtype, version, namespace, labels, fields, query)
            if method == "POST" and (namespace is not None or not rtype.namespaced):
                return reply(self.store.create(rtype, ns, body), 201)
            if method == "DELETE":
                items = self.store.list(rtype, namespace, labels, fields)
                for obj in items:
                    self.store.delete(rtype, obj["metadata"].get("namespace", ""),
                                      obj["metadata"]["name"], body)
                return self._list_response(rtype, version, items, {})
        elif method == "GET":
            return reply(self.store.get(rtype, ns, name))
        elif method == "PUT":
            return reply(self.store.update(rtype, ns, name, body, status_only=status_only))
        elif method == "PATCH":
            return reply(self.store.patch(rtype, ns, name, request.content_type, body,
                                          status_only=status_only))
        elif method == "DELETE" and not status_only:
            deleted, obj = self.store.delete(rtype, ns, name, body)
            return reply(obj, 200 if deleted else 202)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _list(self, rtype: ResourceType, version: str, namespace: str | None,
              labels: Predicate, fields: Predicate, query: Any) -> web.Response:
        """A list, in pages of `limit`: as kube-apiserver serves them, every page of one list
        comes from the first page's state and carries its resourceVersion (a change made
        between pages is for the watch from that version to see). A continue token whose
        snapshot is gone (MAX_LIST_SNAPSHOTS newer lists, or its version compacted: see
        expire_history) answers 410 Expired."""
        try:
            limit = int(query.get("limit") or 0)
            token = query.get("continue")
            ident, start = (json.loads(base64.urlsafe_b64decode(token)) if token
                            else (None, 0))
            start = int(start)
        except (ValueError, TypeError):
            raise ApiError(400, "BadRequest", "invalid limit or continue token") from None
        if ident is None:
            snapshot = _ListSnapshot(rtype, self.store.rv,
                                     self.store.list(rtype, namespace, labels, fields))
        else:
            ident = str(ident)
            snapshot = self._lists.get(ident)
            if snapshot is None or snapshot.rv < self.store.compacted:
                raise ApiError(410, "Expired", _EXPIRED_CONTINUE)
            if snapshot.rtype is not rtype:
                raise ApiError(400, "BadRequest", "the continue token is another resource's")
        items = snapshot.items[start:]
        meta: Obj = {}
        if 0 < limit < len(items):
            ident = ident or uuid.uuid4().hex
            self._lists[ident] = snapshot
            self._lists.move_to_end(ident)
            while len(self._lists) > MAX_LIST_SNAPSHOTS:
                self._lists.popitem(last=False)
            key = json.dumps([ident, start + limit]).encode()
            meta = {"continue": base64.urlsafe_b64encode(key).decode(),
                    "remainingItemCount": len(items) - limit}
            items = items[:limit]
        return self._list_response(rtype, version, items, meta, snapshot.rv)

    def _list_response(self, rtype: ResourceType, version: str, items: list[Obj],
                       meta: Obj, rv: int | None = None) -> web.Response:
        # Built-in lists carry bare items; custom resource lists carry apiVersion/kind.
        if rtype.group not in BUILTIN_GROUPS:
            items = [rtype.present(obj, version) for obj in items]
        return web.json_response({
            "apiVersion": rtype.api_version(version), "kind": rtype.list_kind,
            "metadata": {"resourceVersion": str(self.store.rv if rv is None else rv), **meta},
            "items": items})

    async def _watch(self, request: web.Request, rtype: ResourceType, version: str,
                     namespace: str | None, labels: Predicate,
                     fields: Predicate) -> web.StreamResponse:
        query = request.query
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            watcher = self.store.watch(rtype, namespace, labels, fields,
                                       query.get("resourceVersion"))
        except ApiError as error:
            if error.code != 410:
                raise
            await response.prepare(request)  # the API server answers 200 and an ERROR event
            await response.write(_line("ERROR", error.status()))
            await response.write_eof()
            return response
        self._notify()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(query.get("timeoutSeconds") or math.inf)
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        next_bookmark = loop.time() + self.bookmark_interval if bookmarks else math.inf
        try:
            await response.prepare(request)
            while watcher.stop is None:
                if watcher.pending:
                    kind, obj = watcher.pending.popleft()
                    await response.write(_line(kind, obj if kind == "ERROR"
                                               else rtype.present(obj, version)))
                    continue
                now = loop.time()
                if now >= deadline:
                    break
                if now >= next_bookmark:
                    await response.write(_line("BOOKMARK", {
                        "kind": rtype.kind, "apiVersion": rtype.api_version(version),
                        "metadata": {"resourceVersion": str(self.store.rv)}}))
                    next_bookmark = now + self.bookmark_interval
                    continue
                watcher.wakeup.clear()
                wait = min(deadline, next_bookmark) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wakeup.wait(), None if wait == math.inf
                                           else wait)
        finally:
            self.store.watchers.discard(watcher)
            self._notify()
        if watcher.stop == "abort":
            return self._drop(request)
        await response.write_eof()
        return response

    # -- discovery -----------------------------------------------------------------------
    def _groups(self) -> dict[str, Obj]:
        groups: dict[str, Obj] = {}
        for (group, version, _), _rtype in self.store.types.items():
            if not group:
                continue
            gv = {"groupVersion": f"{group}/{version}", "version": version}
            entry = groups.setdefault(group, {"name": group, "versions": [],
                                              "preferredVersion": gv})
            if gv not in entry["versions"]:
                entry["versions"].append(gv)
        return groups

    def _resource_list(self, group: str, version: str) -> web.Response | None:
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                 "watch"]
        resources = []
        for (g, v, _), rtype in self.store.types.items():
            if (g, v) != (group, version):
                continue
            base = {"namespaced": rtype.namespaced, "kind": rtype.kind}
            resources.append({"name": rtype.plural, "singularName": rtype.kind.lower(),
                              "verbs": verbs, **base})
            if rtype.status:
                resources.append({"name": f"{rtype.plural}/status", "singularName": "",
                                  "verbs": ["get", "patch", "update"], **base})
        if not resources:
            return None
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion":
                                  f"{group}/{version}" if group else version,
                                  "resources": resources})


def _delete_options(body: Any, query: Any) -> Any:
    """DeleteOptions from the body, with what the query may give instead (client-go and
    kubernetes_asyncio send `propagationPolicy` as a parameter)."""
    options = dict(body) if isinstance(body, dict) else {}
    if "propagationPolicy" in query:
        options.setdefault("propagationPolicy", query["propagationPolicy"])
    if "orphanDependents" in query:
        options.setdefault("orphanDependents", _truthy(query["orphanDependents"]))
    return options if options or body is not None else body
