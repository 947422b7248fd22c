"""ClusterSetIP allocation: moved to mcsproxy.clustersetip, which the gateway shares."""

from mcsproxy.clustersetip import (
    DEFAULT_CIDR,
    FAMILY_NAMES,
    AllocationError,
    ClusterSetIPAllocator,
    Network,
    parse_cidrs,
)

__all__ = ["DEFAULT_CIDR", "FAMILY_NAMES", "AllocationError", "ClusterSetIPAllocator",
           "Network", "parse_cidrs"]
