"""mcsproxy: the gateway and the controller of a Kubernetes Multi-Cluster Services clusterset."""

from mcsproxy import compiled

# Before any data-path module is imported: a stale compiled build must not run.
compiled.install()
