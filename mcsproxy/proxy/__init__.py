"""The gateway's proxy: TCP and UDP listeners on every ClusterSetIP x port."""

from mcsproxy.proxy.manager import ListenerKey, ProxyManager, UpstreamKey

__all__ = ["ListenerKey", "ProxyManager", "UpstreamKey"]
