"""The gateway's configuration: one object of grouped dataclasses, validated once."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
CLUSTER_ID_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


class ConfigError(ValueError):
    pass


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' → (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port out of range: {port}")
    return host, port


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


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[str, int] = ("127.0.0.1", 9901)


@dataclass(frozen=True)
class GatewayConfig:
    cluster_id: str
    sources: tuple[str, ...]
    dns: DnsConfig = field(default_factory=DnsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not CLUSTER_ID_RE.match(self.cluster_id) or len(self.cluster_id) > 253:
            raise ConfigError(f"--cluster-id {self.cluster_id!r} is not an RFC-1123 name")
        if not self.sources:
            raise ConfigError("at least one --source is required")
