"""Kubernetes API clients whose credentials are reloaded as they rotate or expire.

kubernetes-asyncio reads credentials when a configuration is loaded, and then keeps them:
an `exec` plugin's token is sent after it expired, for ever, a kubeconfig is never read
again, and the in-cluster token file is re-read at most once a minute, a 401 or not. Production
credentials do not last:

- the in-cluster service-account token is bound: the kubelet rewrites the file about
  hourly and the old token expires later;
- a kubeconfig `exec` plugin (EKS, GKE, AKS) hands out tokens valid for minutes, saying
  until when in the ExecCredential's `status.expirationTimestamp`, or a client certificate
  (kubernetes-asyncio keeps no expiry for that one);
- a kubeconfig file mounted from a Secret is rewritten when the Secret changes, and so are
  the client certificate and key files it names (cert-manager, the kubelet's own).

A client made here keeps its credentials current itself:

- Before a request: when the files behind them changed (token file, kubeconfig, and the
  CA, client certificate and key files in use; one stat each) or the credential is about
  to expire (an exec token's expiry or the client certificate's end date, whichever comes
  first; a fifth of its lifetime before, at most EXPIRY_MARGIN_S), they are reloaded first.
- On 401: they are reloaded (token file re-read, plugin run again, kubeconfig re-read) and,
  when that gave other credentials, the request is sent once more at once. Otherwise the
  401 goes to the caller, which retries with its own backoff, reloading again each time.
  A TLS failure, or a connection closed before any answer while a client certificate is
  presented, counts as such a refusal too (TLS 1.3 sends a refused certificate's alert
  after the handshake, and asyncio drops it: the request ends as "Server disconnected");
  it is retried at once only when the reload gave other credentials, and logged only then.
  A streak of 401s is logged once (info when a reload helped at once, a warning
  when it did not, then its end); a token never reaches the log.
- A reload that fails or gives nothing new is not tried again for RELOAD_PAUSE_S: a dead
  plugin is not run for every request.

An open watch is not cut when its token expires: the API server authenticates a request
when it starts, and the next watch carries the current credentials. New TLS material (a
client certificate from a plugin, a new CA) gets a new connection pool; the old one is
closed OLD_POOL_CLOSE_S later (or with the client): a stream still open on it then breaks
and reconnects through the new one.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import ClientSSLError, ServerDisconnectedError
from cryptography import x509
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.client.rest import RESTClientObject
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

log = logging.getLogger("mcsproxy.kubeclient")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXPIRY_MARGIN_S = 300.0  # renew an exec credential this long before it expires, at most
EXPIRY_MARGIN_SHARE = 0.2  # ... and at most this share of its lifetime
RELOAD_PAUSE_S = 1.0
OLD_POOL_CLOSE_S = 600.0  # a replaced connection pool is closed this much later
# What the connection pool is built from: a change needs a new pool.
_POOL_FIELDS = ("host", "ssl_ca_cert", "cert_file", "key_file", "verify_ssl",
                "tls_server_name", "proxy")
_AUTH = "authorization"  # the header key kubernetes-asyncio's auth settings use


class CredentialSource:
    """Where a client's configuration comes from; `load` may be called again and again."""

    describe = "kubernetes credentials"

    async def load(self, configuration: Configuration) -> float | None:
        """Fill `configuration` afresh; the credential's expiry (epoch seconds) if known."""
        raise NotImplementedError

    def stamp(self) -> Hashable:
        """Changes when the files behind the credentials change (cheap: stat only)."""
        return None


def _stat(path: Path | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the kubelet's ..data symlink swap
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _exec_expiry(loader: Any) -> float | None:
    expiry = getattr(loader, "exec_plugin_expiry", None)
    return expiry.timestamp() if expiry is not None else None


def _not_after(cert_file: str | None) -> float | None:
    """The end date (epoch seconds) of the first certificate in a PEM file; None when
    there is none or it cannot be read (the TLS setup reports that)."""
    if not cert_file:
        return None
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


async def _load(source: CredentialSource, configuration: Configuration) -> float | None:
    """source.load, and the credential's expiry: the exec token's or the client
    certificate's end date (from a plugin, a kubeconfig file or its data), the earlier."""
    ends = [t for t in (await source.load(configuration),
                        _not_after(configuration.cert_file)) if t is not None]
    return min(ends, default=None)


class InCluster(CredentialSource):
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, `token` and `ca.crt`."""

    def __init__(self, directory: Path | str = SERVICE_ACCOUNT_DIR) -> None:
        self.directory = Path(directory)
        self.describe = f"service account token {self.directory / 'token'}"

    async def load(self, configuration: Configuration) -> float | None:
        # try_refresh_token=False: the library's own hook re-reads once a minute and never
        # on a 401; the client below does both.
        InClusterConfigLoader(token_filename=str(self.directory / "token"),
                              cert_filename=str(self.directory / "ca.crt"),
                              try_refresh_token=False).load_and_set(configuration)
        return None

    def stamp(self) -> Hashable:
        return _stat(self.directory / "token"), _stat(self.directory / "ca.crt")


class KubeconfigFile(CredentialSource):
    """A kubeconfig file (None: $KUBECONFIG or ~/.kube/config) and context."""

    def __init__(self, path: str | Path | None, context: str | None = None) -> None:
        self.path = str(path) if path else kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        self.context = context
        self.describe = f"kubeconfig {self.path}" + (f" context {context}" if context else "")

    async def load(self, configuration: Configuration) -> float | None:
        paths = [Path(p).expanduser() for p in self.path.split(os.pathsep) if p]
        if not any(p.exists() for p in paths):
            # The library reads a missing file as an empty one and says "Invalid kube-config
            # file. Expected key current-context", as if the file were there and wrong.
            raise kube_config.ConfigException(f"kubeconfig {self.path}: no such file")
        loader = await kube_config.load_kube_config(
            config_file=self.path, context=self.context, client_configuration=configuration,
            persist_config=False)
        return _exec_expiry(loader)

    def stamp(self) -> Hashable:
        return tuple(_stat(Path(p).expanduser()) for p in self.path.split(os.pathsep) if p)


class KubeconfigDict(CredentialSource):
    """A kubeconfig already read (a member Secret's): only an exec plugin can renew it."""

    def __init__(self, doc: Mapping[str, Any], context: str | None = None,
                 describe: str = "kubeconfig") -> None:
        self.doc = copy.deepcopy(dict(doc))
        self.context = context
        self.describe = describe

    async def load(self, configuration: Configuration) -> float | None:
        loader = await kube_config.load_kube_config_from_dict(
            config_dict=copy.deepcopy(self.doc), context=self.context,
            client_configuration=configuration)
        return _exec_expiry(loader)


class RefreshingApiClient(ApiClient):
    """An ApiClient that reloads its credentials from `source` (see the module doc)."""

    def __init__(self, source: CredentialSource, configuration: Configuration,
                 stamp: Hashable, expires: float | None) -> None:
        files = _tls_files(configuration)  # before the pool reads them
        super().__init__(configuration)
        self.source = source
        self.generation = 0  # counts reloads that changed something
        self.reloads = 0  # reloads tried
        self._stamp = stamp, files
        self._renew_at = float("inf")
        self._set_expiry(expires)
        self._quiet_until = 0.0
        self._reloading = asyncio.Lock()
        self._refusals = 0  # 401s in the current streak
        self._told = False  # the streak's reload-and-retry was logged
        self._stuck = False  # ... and that reloading did not help
        self._reload_error: str | None = None
        self._pool_key = _pool_key(configuration, files)
        self._old_pools: list[RESTClientObject] = []
        self._closing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        pools, self._old_pools = self._old_pools, []
        for pool in pools:
            await pool.close()
        await super().close()

    def _retire(self, pool: RESTClientObject) -> None:
        """The replaced pool's open streams end on their own; what is left is closed
        later (the reflectors then reconnect through the new pool)."""
        self._old_pools.append(pool)
        asyncio.get_running_loop().call_later(OLD_POOL_CLOSE_S, self._close_old, pool)

    def _close_old(self, pool: RESTClientObject) -> None:
        if pool in self._old_pools:
            self._old_pools.remove(pool)
            task = asyncio.ensure_future(pool.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- credentials -----------------------------------------------------------------
    def _set_expiry(self, expires: float | None) -> None:
        if expires is None:
            self._renew_at = float("inf")
        else:
            lifetime = max(0.0, expires - time.time())
            self._renew_at = expires - min(EXPIRY_MARGIN_S, EXPIRY_MARGIN_SHARE * lifetime)

    def _due(self) -> str | None:
        now = time.time()
        if now < self._quiet_until:
            return None
        if now >= self._renew_at:
            return "about to expire"
        if (self.source.stamp(), _tls_files(self.configuration)) != self._stamp:
            return "changed on disk"
        return None

    async def _reload(self, why: str, generation: int) -> bool:
        """Reload unless another request did since `generation`; True when the
        credentials now differ from those of `generation`."""
        async with self._reloading:  # one at a time: concurrent 401s share one reload
            if self.generation != generation:
                return True
            if time.time() < self._quiet_until:
                return False
            return await self._reload_now(why)

    async def _reload_now(self, why: str) -> bool:
        self.reloads += 1
        fresh = Configuration()
        stamp = self.source.stamp()
        try:
            expires = await _load(self.source, fresh)
            files = _tls_files(fresh)  # before the pool reads them
            pool_key = _pool_key(fresh, files)
            pool = RESTClientObject(fresh) if pool_key != self._pool_key else None
        except Exception as exc:  # the loaders fail in many ways (even AssertionError)
            self._quiet_until = time.time() + RELOAD_PAUSE_S
            text = str(exc) or type(exc).__name__
            if text != self._reload_error:
                log.error("%s: reloading the credentials (%s) failed: %s; keeping the "
                          "current ones", self.source.describe, why, text)
            self._reload_error = text
            return False
        if self._reload_error is not None:
            log.info("%s: credentials reloaded again", self.source.describe)
            self._reload_error = None
        self._stamp = stamp, files
        self._set_expiry(expires)
        changed = fresh.api_key != self.configuration.api_key or pool is not None
        if not changed:
            self._quiet_until = time.time() + RELOAD_PAUSE_S
            return False
        self.configuration.api_key = dict(fresh.api_key)
        self.configuration.api_key_prefix = dict(fresh.api_key_prefix)
        if pool is not None:
            for name in _POOL_FIELDS:
                setattr(self.configuration, name, getattr(fresh, name))
            self._retire(self.rest_client)
            self.rest_client, self._pool_key = pool, pool_key
        self.generation += 1
        log.debug("%s: credentials reloaded (%s)", self.source.describe, why)
        return True

    def _authorize(self, headers: dict[str, Any]) -> None:
        token = self.configuration.api_key.get("BearerToken")
        if token:
            prefix = self.configuration.api_key_prefix.get("BearerToken")
            headers[_AUTH] = f"{prefix} {token}" if prefix else token
        else:
            headers.pop(_AUTH, None)

    def _answered(self, status: int) -> None:
        """Anything but a 401 and a 5xx (a proxy's, perhaps) ends a streak of refusals."""
        if self._refusals and status < 500:
            (log.info if self._stuck else log.debug)(
                "%s: credentials accepted again after %d refused requests",
                self.source.describe, self._refusals)
            self._refusals, self._told, self._stuck = 0, False, False

    async def _refused(self, generation: int, *, reload: bool) -> bool:
        """A 401 for credentials of `generation`: True when there are others to try."""
        if reload and generation != self.generation:
            # Sent with credentials a concurrent request's reload has already replaced:
            # retried with the current ones, and no refusal of those. Counted, it began a
            # new streak after the one the reload had ended (its end logged twice).
            return True
        self._refusals += 1
        retry = reload and await self._reload("refused with 401", generation)
        if retry:
            if not self._told:  # concurrent requests meet the same rotation
                self._told = True
                log.info("%s: the API server refused the credentials (401 Unauthorized): "
                         "reloaded them, retrying", self.source.describe)
        elif not self._stuck:
            self._stuck = True
            log.warning("%s: the API server refuses the credentials (401 Unauthorized) and "
                        "reloading them gave no others; retrying with backoff, reloading "
                        "again each time", self.source.describe)
        else:
            log.debug("%s: refused again (401), %d in a row", self.source.describe,
                      self._refusals)
        return retry

    # -- requests --------------------------------------------------------------------
    async def request(self, method: str, url: str, query_params: Any = None,
                      headers: dict[str, Any] | None = None, post_params: Any = None,
                      body: Any = None, _preload_content: bool = True,
                      _request_timeout: Any = None) -> Any:
        headers = {} if headers is None else headers
        why = self._due()
        if why is not None:
            await self._reload(why, self.generation)
        for attempt in (1, 2):
            generation = self.generation
            self._authorize(headers)  # the current credentials, whatever was computed before
            try:
                response = await super().request(
                    method, url, query_params=query_params, headers=headers,
                    post_params=post_params, body=body, _preload_content=_preload_content,
                    _request_timeout=_request_timeout)
            except (ClientSSLError, ServerDisconnectedError) as exc:
                if (attempt == 2 or (isinstance(exc, ServerDisconnectedError)
                                     and not self.configuration.cert_file)
                        or not await self._reload(type(exc).__name__, generation)):
                    raise  # the caller's backoff and log; most are not about credentials
                log.info("%s: the API server closed the connection (%s); reloaded the "
                         "credentials, which differ now: retrying", self.source.describe,
                         type(exc).__name__)
                continue
            except ApiException as exc:  # _preload_content=True: non-2xx raises
                if exc.status != 401:
                    self._answered(exc.status)
                    raise
                if not await self._refused(generation, reload=attempt == 1):
                    raise
                continue
            if response.status != 401:
                self._answered(response.status)
                return response
            if not await self._refused(generation, reload=attempt == 1):
                return response
            response.close()  # unread: the connection cannot go back to the pool
        raise AssertionError("unreachable")


def _tls_files(configuration: Configuration) -> tuple[Any, ...]:
    """The stats of the CA, client certificate and key files: a file rewritten in place
    (whatever names it: a kubeconfig, a plugin) needs a new pool."""
    return tuple(_stat(f) if f else None for f in (
        configuration.ssl_ca_cert, configuration.cert_file, configuration.key_file))


def _pool_key(configuration: Configuration, files: tuple[Any, ...]) -> tuple[Any, ...]:
    """What the connection pool is built from, the files' stats included."""
    return tuple(getattr(configuration, name) for name in _POOL_FIELDS) + files


async def new_client(source: CredentialSource) -> RefreshingApiClient:
    """A client for `source`; ConfigException, OSError or ValueError when it cannot be
    configured. The loaders fail in many more ways (a kubeconfig that is not YAML raised
    yaml's ParserError, which the gateway's kube source did not expect: the source task
    died and the gateway stayed not ready for good, the controller printed a traceback):
    those become a ConfigException with their type and text (yaml's names the file and
    line), which the callers prefix with the source."""
    configuration = Configuration()
    stamp = source.stamp()
    try:
        expires = await _load(source, configuration)
    except (kube_config.ConfigException, OSError, ValueError):
        raise
    except Exception as exc:  # KeyError, TypeError, yaml.YAMLError, even AssertionError
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise kube_config.ConfigException(f"{type(exc).__name__}: {text}") from exc
    return RefreshingApiClient(source, configuration, stamp, expires)
