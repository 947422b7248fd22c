"""Upstream sets: endpoint eligibility, priority levels, balancing, health and ejection.

The piece every proxy shares (TCP, UDP, HTTP): see `UpstreamSet` for the interface and
`balance` for the pure arithmetic it runs on.
"""

from mcsproxy.upstream.balance import (
    AffinityTable,
    LoadPlan,
    Target,
    eligible_targets,
    priority_load,
    priority_of,
)
from mcsproxy.upstream.health import HealthChecker, probe_http, probe_tcp
from mcsproxy.upstream.upstream_set import Host, UpstreamSet

__all__ = [
    "AffinityTable",
    "HealthChecker",
    "Host",
    "LoadPlan",
    "Target",
    "UpstreamSet",
    "eligible_targets",
    "priority_load",
    "priority_of",
    "probe_http",
    "probe_tcp",
]
