"""The gateway's configuration: one object of grouped dataclasses, validated once."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field, fields

from mcsproxy.clustersetip import parse_cidrs

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
# \Z, not $: $ also matches before a final newline, and every caller uses .match().
CLUSTER_ID_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
# What Kubernetes asks of a namespace, a Service's name and an endpoint's hostname.
DNS_LABEL_RE = re.compile(rf"^{_LABEL}\Z")


class ConfigError(ValueError):
    pass


def require_finite(config: object, flag_prefix: str = "") -> None:
    """Every float setting is a number: NaN passes every < and <= check, and a NaN
    timeout later crashes the task that sleeps on it. Errors name the flag."""
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            name = f.name.removesuffix("_s").removesuffix("_qps").replace("_", "-")
            raise ConfigError(f"--{flag_prefix}{name} must be a finite number, not {value}")


_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def is_host(host: str) -> bool:
    """An IP address (IPv6 with an optional %zone) or an RFC 1123 host name. A name whose
    last label is all digits is neither: 999.1.1.1 is a mistyped address, not a name."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return (len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)
            and not labels[-1].isdigit())


def parse_host_port(value: str, what: str, *, destination: bool = False) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' → (host, port). HOST must be an IP address or a host
    name: a value no listener could ever use is a flag error (exit 2), not a bind
    failure found after the other listeners are up. A `destination` (an address to send
    to, not to listen on) may not have port 0, which asks for a port only in a bind."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if not is_host(host):
        raise ConfigError(f"{what} {value}: {host!r} is not an IP address or a host name")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port out of range: {port}")
    if destination and port == 0:
        raise ConfigError(f"{what} {value}: port 0 is not a port to send to")
    return host, port


def listen_error(exc: OSError, flag: str, where: str) -> OSError:
    """A listener's bind or resolve failure as one line naming the flag, the address and
    the reason: `--admin-listen 10.9.9.9:9901: Cannot assign requested address`. (asyncio
    words it "error while attempting to bind on address (...)" and a failed lookup
    names neither the flag nor the host.)"""
    errno = exc.errno if isinstance(exc.errno, int) else None
    # A socket.gaierror has a negative EAI_* code and its own text.
    reason = os.strerror(errno) if errno and errno > 0 else exc.strerror or str(exc)
    return OSError(errno, f"{flag} {where}: {reason}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DnsConfig:
    listen: tuple[str, int] = ("127.0.0.1", 5353)
    domain: str = "clusterset.local"
    upstream: tuple[str, int] | None = None
    upstream_timeout_s: float = 2.0
    edns_max_payload: int = 1232
    ttl_s: int = 5
    tcp_idle_timeout_s: float = 10.0
    tcp_max_connections: int = 1024
    # Clients whose names outside the zone are forwarded (mcsproxy.dns.guard).
    allow_from: tuple[str, ...] = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12",
                                   "192.168.0.0/16", "fc00::/7")
    rrl_qps: float = 0.0  # UDP answers per second per client /24 or /56; 0: unlimited

    def __post_init__(self) -> None:
        require_finite(self, "dns-")


@dataclass(frozen=True)
class WebLimits:
    """What one aiohttp listener (the admin API, the controller's --serve) lets clients
    hold: without them a client that opens many connections, or sends its request head a
    byte at a time (slowloris), keeps sockets and memory for ever. No flags: the admin
    API is a small, mostly local audience."""

    head_timeout_s: float = 10.0  # first byte of a request head (accept, for the first) to its end
    # Idle between requests; also the deadline, counted from the previous response, for
    # the next request's head to arrive complete (aiohttp's keep-alive timer).
    keepalive_timeout_s: float = 15.0
    max_connections: int = 256
    max_connections_per_client: int | None = None  # None: a quarter of max_connections

    def __post_init__(self) -> None:
        for name in ("head_timeout_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, not {value}")
        if self.max_connections < 1 or (self.max_connections_per_client is not None
                                        and self.max_connections_per_client < 1):
            raise ConfigError("connection limits must be >= 1")


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[str, int] = ("127.0.0.1", 9901)
    # `mcsproxy demo`'s control API: the status page shows kill/restore buttons and the
    # admin relays their POSTs to it (same origin for the browser).
    demo_control: str | None = None
    limits: WebLimits = field(default_factory=WebLimits)
    # --admin-token-file: every path but /healthz, /readyz and /metrics demands this
    # bearer token (the DaemonSet's admin port is on the node IP, which every pod reaches).
    token_file: str | None = None

    def __post_init__(self) -> None:
        if self.demo_control is not None and not re.fullmatch(
                r"http://[^/\s]+(:\d+)?/?", self.demo_control):
            raise ConfigError(f"--demo-control {self.demo_control!r}: expected http://HOST:PORT")


@dataclass(frozen=True)
class HealthConfig:
    """Active health checks: TCP connect, or HTTP GET for appProtocol http ports."""

    interval_s: float = 5.0  # 0 disables active checks
    timeout_s: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    jitter: float = 0.1  # fraction of the interval, so probes of many endpoints spread out
    http_path: str = "/"

    def __post_init__(self) -> None:
        require_finite(self, "health-")
        if self.interval_s < 0 or self.timeout_s <= 0:
            raise ConfigError("health interval must be >= 0 and timeout > 0")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ConfigError("health thresholds must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ConfigError("health jitter must be in [0, 1)")
        if not self.http_path.startswith("/"):
            raise ConfigError("--health-http-path must start with /")


@dataclass(frozen=True)
class OutlierConfig:
    """Passive outlier ejection on consecutive connect failures (Envoy's words)."""

    consecutive_failures: int = 5  # 0 disables ejection
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: int = 50

    def __post_init__(self) -> None:
        require_finite(self, "outlier-")
        if self.consecutive_failures < 0 or self.base_ejection_s <= 0:
            raise ConfigError("outlier failures must be >= 0 and base ejection time > 0")
        if self.max_ejection_s < self.base_ejection_s:
            raise ConfigError("max ejection time must be >= the base ejection time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ConfigError("--outlier-max-ejection-percent must be 0-100")


@dataclass(frozen=True)
class HttpConfig:
    """HTTP/1.1 reverse proxying of appProtocol http ports, and the Host-routed front door."""

    listen: tuple[str, int] | None = None  # --http-listen: the front door, off by default
    header_timeout_s: float = 10.0  # from the first byte (or accept) to the end of the head
    keepalive_timeout_s: float = 60.0  # idle downstream connection between requests
    per_try_timeout_s: float = 15.0  # one attempt: request sent until the response head
    request_timeout_s: float = 30.0  # every attempt together, until the response head
    max_retries: int = 2
    retry_budget_percent: int = 20  # retries in flight at most this share of requests
    retry_min_concurrency: int = 3  # ... but always this many (Envoy's default)
    retry_buffer_bytes: int = 64 * 1024  # idempotent bodies up to this size are replayable
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_uri_bytes: int = 8 * 1024
    pool_max_idle: int = 64  # idle keep-alive connections kept per endpoint
    pool_idle_timeout_s: float = 4.0  # below common backend keep-alive timeouts (5 s)
    cluster_header: str | None = None  # response header naming the serving cluster
    via: str = "mcsproxy"

    def __post_init__(self) -> None:
        require_finite(self, "http-")
        for name in ("header_timeout_s", "keepalive_timeout_s", "per_try_timeout_s",
                     "request_timeout_s", "pool_idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"HTTP {name.removesuffix('_s').replace('_', ' ')} must be > 0")
        if self.max_retries < 0 or not 0 <= self.retry_budget_percent <= 100:
            raise ConfigError("--http-max-retries must be >= 0, the retry budget 0-100 %")
        if self.retry_min_concurrency < 0 or self.retry_buffer_bytes < 0:
            raise ConfigError("HTTP retry concurrency and buffer must be >= 0")
        if self.max_header_bytes < 1024 or self.max_headers < 8 or self.max_uri_bytes < 256:
            raise ConfigError("HTTP limits too small (header bytes >= 1024, headers >= 8, "
                              "URI >= 256)")
        if self.pool_max_idle < 0:
            raise ConfigError("--http-pool-max-idle must be >= 0")
        token = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
        if self.cluster_header is not None and not token.match(self.cluster_header):
            raise ConfigError(f"--http-cluster-header {self.cluster_header!r} is not a "
                              "header name")
        if not token.match(self.via):
            raise ConfigError("the Via name must be a token")


LB_POLICIES = ("round-robin", "least-connections")
# Linux's limits: TCP_KEEPIDLE and TCP_KEEPINTVL take at most 32767 s, TCP_KEEPCNT 127
# probes; TCP_USER_TIMEOUT is milliseconds in an int.
TCP_KEEPALIVE_MAX_S = 32767
TCP_KEEPALIVE_MAX_PROBES = 127
TCP_USER_TIMEOUT_MAX_S = 2_000_000
KEEPALIVE_PROBES = (socket.IPPROTO_TCP, socket.TCP_KEEPCNT)


@dataclass(frozen=True)
class ProxyConfig:
    enabled: bool = True
    lb_policy: str = "round-robin"
    connect_timeout_s: float = 1.0
    connect_attempts: int = 3  # the first try plus retries on other endpoints
    idle_timeout_s: float = 3600.0  # 0 disables
    drain_grace_s: float | None = None  # None: removed endpoints' connections may finish
    # On SIGTERM: listeners close, in-flight connections and requests get this long.
    drain_timeout_s: float = 10.0
    udp_idle_timeout_s: float = 30.0
    udp_max_flows: int = 16384
    # TCP keepalive on both sides of every TCP and HTTP connection the proxy serves (its
    # clients' inherit it from the listening sockets): (seconds idle before the first
    # probe, seconds between probes, probes unanswered); None: off. And TCP_USER_TIMEOUT
    # on connections to endpoints: data unacknowledged this long ends the connection, as
    # does a receive window the endpoint keeps shut as long (nginx's proxy_send_timeout,
    # 60 s, ends that one too); 0: off. Not towards clients, which may stop reading for
    # minutes. Without them a stream whose peer went silent (a cut link, a dead node: no
    # RST) was held for the whole idle timeout (3600 s).
    tcp_keepalive: tuple[int, int, int] | None = (30, 10, 3)
    tcp_user_timeout_s: float = 60.0
    max_connections_per_listener: int = 0  # 0: unlimited
    max_connections_per_client: int = 0  # per client address and listener; 0: unlimited
    overprovisioning_factor: float = 1.4
    panic_threshold_percent: int = 50
    workers: int = 1
    worker_index: int = 0  # 0 is the supervising process; 1..N-1 serve the proxy only
    worker_argv: tuple[str, ...] = ()  # the gateway command line the supervisor re-runs
    health: HealthConfig = field(default_factory=HealthConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def keepalive_options(self) -> tuple[tuple[int, int, int], ...]:
        """setsockopt arguments that turn on TCP keepalive as --tcp-keepalive says: for
        the listening sockets (accepted connections inherit them) and every endpoint
        connection."""
        ka = self.tcp_keepalive
        if ka is None:
            return ()
        return ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, ka[0]),
                (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, ka[1]),
                (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, ka[2]))

    def endpoint_socket_options(self) -> tuple[tuple[int, int, int], ...]:
        """setsockopt arguments for every connection to an endpoint: keepalive, which
        finds a peer gone silent on an idle stream, and TCP_USER_TIMEOUT, which finds it
        while sent data waits for an acknowledgement (keepalive sends no probe then)."""
        options = self.keepalive_options()
        if self.tcp_user_timeout_s:
            # With a user timeout, Linux ends a connection whose keepalive probes go
            # unanswered by it, not by the probe count (tcp_keepalive_timer): one
            # setsockopt fewer per connection (~0.8k instructions, interpreted).
            user_timeout_ms = max(1, round(self.tcp_user_timeout_s * 1000))
            options = (*(o for o in options if o[:2] != KEEPALIVE_PROBES),
                       (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms))
        return options

    def __post_init__(self) -> None:
        require_finite(self)
        if self.lb_policy not in LB_POLICIES:
            raise ConfigError(f"--lb-policy must be one of {', '.join(LB_POLICIES)}")
        if self.connect_timeout_s <= 0 or self.connect_attempts < 1:
            raise ConfigError("--connect-timeout must be > 0 and --connect-attempts >= 1")
        if self.idle_timeout_s < 0 or self.udp_idle_timeout_s <= 0:
            raise ConfigError("idle timeouts must be >= 0 (UDP: > 0)")
        if self.drain_grace_s is not None and self.drain_grace_s < 0:
            raise ConfigError("--drain-grace must be >= 0")
        if self.drain_timeout_s < 0:
            raise ConfigError("--drain-timeout must be >= 0")
        if self.max_connections_per_listener < 0 or self.max_connections_per_client < 0:
            raise ConfigError("--max-connections-per-listener/-client must be >= 0")
        if self.udp_max_flows < 1:
            raise ConfigError("--udp-max-flows must be >= 1")
        if self.tcp_keepalive is not None and not (
                len(self.tcp_keepalive) == 3
                and 1 <= self.tcp_keepalive[0] <= TCP_KEEPALIVE_MAX_S
                and 1 <= self.tcp_keepalive[1] <= TCP_KEEPALIVE_MAX_S
                and 1 <= self.tcp_keepalive[2] <= TCP_KEEPALIVE_MAX_PROBES):
            raise ConfigError(f"--tcp-keepalive must be IDLE,INTERVAL,PROBES (seconds 1-"
                              f"{TCP_KEEPALIVE_MAX_S}, probes 1-{TCP_KEEPALIVE_MAX_PROBES}) "
                              "or off")
        if not 0 <= self.tcp_user_timeout_s <= TCP_USER_TIMEOUT_MAX_S:
            raise ConfigError(f"--tcp-user-timeout must be 0-{TCP_USER_TIMEOUT_MAX_S} s")
        if self.overprovisioning_factor < 1 or not 0 <= self.panic_threshold_percent <= 100:
            raise ConfigError("overprovisioning factor must be >= 1, panic threshold 0-100")
        if not 1 <= self.workers <= 256 or not 0 <= self.worker_index < self.workers:
            raise ConfigError("--workers must be 1-256")


@dataclass(frozen=True)
class GatewayConfig:
    cluster_id: str
    sources: tuple[str, ...]
    dns: DnsConfig = field(default_factory=DnsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    log_level: str = "info"
    # ClusterSetIPs the gateway allocates itself (Karmada services under --source kube);
    # also the range whose stale /32s --vip-interface may remove from a shared interface.
    clusterset_cidr: str = "127.240.0.0/16"
    vip_interface: str | None = None  # keep the ClusterSetIPs on this interface
    controlplane_token_file: str | None = None  # bearer token for --source controlplane:
    access_log: str | None = None  # "-" (stderr) or a path; None: off
    access_log_format: str = "text"  # or "json"

    def __post_init__(self) -> None:
        if self.access_log_format not in ("text", "json"):
            raise ConfigError("--access-log-format must be text or json")
        if not CLUSTER_ID_RE.match(self.cluster_id) or len(self.cluster_id) > 253:
            raise ConfigError(f"--cluster-id {self.cluster_id!r} is not an RFC-1123 name")
        if not self.sources:
            raise ConfigError("at least one --source is required")
        try:
            parse_cidrs(self.clusterset_cidr)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.vip_interface is not None and not re.fullmatch(r"[^\s/]{1,15}",
                                                                self.vip_interface):
            raise ConfigError(f"--vip-interface {self.vip_interface!r} is not an interface name")
