"""Where snapshots come from: `file:PATH`, `kube`, `controlplane:URL`."""

from __future__ import annotations

from typing import Protocol

from mcsproxy.store import SnapshotStore


class Source(Protocol):
    name: str

    async def run(self, store: SnapshotStore) -> None:
        """Feed the store until cancelled; mark_synced once the initial state is in."""


class SourceSpecError(ValueError):
    pass


def make_source(spec: str, cluster_id: str, *, clusterset_cidr: str | None = None,
                controlplane_token_file: str | None = None) -> Source:
    """Build a source from its `--source` spelling."""
    kind, _, arg = spec.partition(":")
    if kind == "kube" and not arg:
        from mcsproxy.sources.kube import KubeSource

        if clusterset_cidr is None:
            return KubeSource(cluster_id)
        return KubeSource(cluster_id, clusterset_cidr=clusterset_cidr)
    if kind == "file" and arg:
        from mcsproxy.sources.file import FileSource

        return FileSource(arg)
    if kind == "controlplane" and arg:
        from mcsproxy.sources.controlplane import ControlplaneSource
        from mcsproxy.tokenfile import TokenFile, TokenFileError

        try:
            token = (TokenFile(controlplane_token_file) if controlplane_token_file
                     else None)
            return ControlplaneSource(arg, cluster_id, token=token)
        except TokenFileError as exc:
            raise SourceSpecError(f"--controlplane-token-file: {exc}") from None
        except ValueError as exc:
            raise SourceSpecError(str(exc)) from None
    raise SourceSpecError(
        f"unknown source {spec!r}: expected file:PATH, kube or controlplane:http://HOST:PORT"
    )
