"""`--source kube` with credentials that rotate and expire, against the API emulator.

Each test rotates what the emulator accepts while the gateway runs, then makes a change
that must still reach the gateway: an exec plugin's short-lived token (renewed before it
expires, or after a 401), the in-cluster service-account token file the kubelet rewrites,
a kubeconfig file rewritten when its Secret changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import config as kube_config

from mcsproxy.kubeclient import KubeconfigFile, new_client
from mcsproxy.sources import kube as kube_source
from mcsproxy.sources.kube import KubeSource
from mcsproxy.store import SnapshotStore
from tests.kube_auth_support import (
    ExecPlugin,
    exec_kubeconfig,
    service_account,
    user_kubeconfig,
    write_atomically,
)
from tests.kube_emulator import KubeEmulator
from tests.test_kube_source import FAST, WEB, Running, service_import, started


@contextlib.asynccontextmanager
async def gateway(emu: KubeEmulator, **kwargs: object) -> AsyncIterator[Running]:
    source = KubeSource("east", timings=FAST, **kwargs)  # type: ignore[arg-type]
    async with started(emu, source, SnapshotStore("east")) as run:
        yield run


async def reaches_gateway(run: Running) -> None:
    """A ServiceImport made now (on open watches that get cut) shows up in the store."""
    run.emu.drop_watches()  # the next watches are new requests, with new credentials
    run.emu.put_object(service_import("web"))
    await run.until(lambda: WEB in run.store.current.services, timeout=5)


def auth_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "401" in r.getMessage()]


async def test_an_exec_credential_is_renewed_before_it_expires(tmp_path: Path) -> None:
    plugin = ExecPlugin(tmp_path / "plugin", token="one", lifetime_s=1.0)
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.tokens = {"one"}
        kubeconfig = exec_kubeconfig(emu, tmp_path / "kubeconfig", plugin)
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            plugin.token = "two"
            emu.tokens = {"one", "two"}  # the issuer overlaps old and new
            await asyncio.sleep(1.2)  # every credential the plugin gave with "one" expired
            emu.tokens = {"two"}
            await reaches_gateway(run)
        assert emu.unauthorized == 0  # renewed in time: never refused
        assert plugin.runs >= 2


async def test_a_refused_exec_token_is_replaced_and_the_streak_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    old, new = "tok-old-0123456789", "tok-new-9876543210"
    plugin = ExecPlugin(tmp_path / "plugin", token=old)  # no expirationTimestamp
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.tokens = {old}
        kubeconfig = exec_kubeconfig(emu, tmp_path / "kubeconfig", plugin)
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            # Rotated at the server first; the plugin still hands out the old token a while.
            runs = plugin.runs
            emu.tokens = {new}
            emu.drop_watches()
            await emu.wait_for(lambda: plugin.runs >= runs + 2)  # asked again, to no avail
            # A streak longer than the warnings may be (below), however many watches run.
            await emu.wait_for(lambda: emu.unauthorized > 1 + len(run.source.reflectors))
            assert WEB not in run.store.current.services
            plugin.token = new
            await reaches_gateway(run)
            await run.until(lambda: run.status.connected)
    warnings = auth_warnings(caplog)
    # One for the client's streak, at most one per watch for its disconnection: not one
    # per refused request.
    assert len(warnings) <= 1 + len(run.source.reflectors) < emu.unauthorized, warnings
    assert sum("reloading them gave no others" in w for w in warnings) == 1, warnings
    assert sum("accepted again" in r.getMessage() for r in caplog.records) == 1
    assert old not in caplog.text and new not in caplog.text


async def test_a_rotated_exec_token_is_fetched_again_on_401_and_retried_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    plugin = ExecPlugin(tmp_path / "plugin", token="one")
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.tokens = {"one"}
        kubeconfig = exec_kubeconfig(emu, tmp_path / "kubeconfig", plugin)
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            plugin.token = "two"
            emu.tokens = {"two"}
            await reaches_gateway(run)
    assert auth_warnings(caplog) == []  # retried at once: no watch was seen disconnected
    assert 1 <= emu.unauthorized <= len(run.source.reflectors)


async def test_the_in_cluster_token_file_is_read_again_when_the_kubelet_rotates_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with KubeEmulator(tls=True, bookmark_interval=0.1) as emu:
        emu.tokens = {"one"}
        sa = service_account(tmp_path / "serviceaccount", emu, "one")
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", emu.host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(emu.port))
        async with gateway(emu, service_account_dir=sa) as run:
            assert run.source._api is not None
            assert run.source._api.configuration.host == emu.url
            service_account(sa, emu, "two")  # the kubelet's new token; the old one expires
            emu.tokens = {"two"}
            await reaches_gateway(run)


async def test_a_kubeconfig_rewritten_with_a_new_token_is_read_again(tmp_path: Path) -> None:
    async with KubeEmulator(token="one", bookmark_interval=0.1) as emu:
        kubeconfig = emu.kubeconfig(tmp_path / "kubeconfig")
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            # A kubeconfig mounted from a Secret: the kubelet swaps the file in one step.
            emu.token = "two"
            emu.kubeconfig(tmp_path / "kubeconfig.new").replace(kubeconfig)
            emu.tokens = {"two"}
            await reaches_gateway(run)


async def test_a_new_in_cluster_ca_gets_a_new_connection_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with KubeEmulator(tls=True, token="one", bookmark_interval=0.1) as emu:
        sa = service_account(tmp_path / "serviceaccount", emu, "one")
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", emu.host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(emu.port))
        async with gateway(emu, service_account_dir=sa) as run:
            # The API server comes back with a certificate from a new CA, which the
            # kubelet puts into ca.crt: the old pool's TLS context would never trust it.
            await emu.stop()
            emu.rotate_certificate()
            await emu.start()
            service_account(sa, emu, "one")
            await reaches_gateway(run)


@pytest.mark.parametrize("handshake_expiry", [False, True], ids=["401", "tls-alert"])
async def test_an_exec_client_certificate_is_renewed_before_it_expires(
        tmp_path: Path, handshake_expiry: bool) -> None:
    async with KubeEmulator(tls=True, handshake_expiry=handshake_expiry,
                            bookmark_interval=0.1) as emu:
        emu.tokens = {"not-used"}  # only the certificates authenticate
        certs = tmp_path / "certs"
        plugin = ExecPlugin(tmp_path / "plugin",
                            certificate=emu.issue_client_certificate(certs, "gw-1", 3.0))
        kubeconfig = exec_kubeconfig(emu, tmp_path / "kubeconfig", plugin)
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            plugin.certificate = emu.issue_client_certificate(certs, "gw-2", 3600.0)
            await asyncio.sleep(3.2)  # gw-1 expired
            seen = len(emu.requests)
            await reaches_gateway(run)
        assert emu.unauthorized == 0  # renewed in time: never refused
        assert {r.user for r in emu.requests[seen:]} == {"gw-2"}


async def test_client_certificate_files_rewritten_in_place_are_used_for_new_connections(
        tmp_path: Path) -> None:
    async with KubeEmulator(tls=True, bookmark_interval=0.1) as emu:
        emu.tokens = {"not-used"}
        cert, key = emu.issue_client_certificate(tmp_path / "tls", "gw-1", 3600.0)
        kubeconfig = user_kubeconfig(emu, tmp_path / "kubeconfig", {
            "client-certificate": str(cert), "client-key": str(key)})
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            await emu.wait_for(lambda: emu.watch_count == len(run.source.reflectors))
            # cert-manager (or the kubelet) renews: the same files, the kubeconfig untouched.
            new = emu.issue_client_certificate(tmp_path / "new", "gw-2", 3600.0)
            for source, target in ((new[1], key), (new[0], cert)):
                write_atomically(target, source.read_text())
            seen = len(emu.requests)
            await reaches_gateway(run)
        assert {r.user for r in emu.requests[seen:]} == {"gw-2"}


async def test_a_client_certificate_refused_in_the_handshake_is_fetched_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    certs = tmp_path / "certs"
    async with KubeEmulator(tls=True, bookmark_interval=0.1) as emu:
        emu.tokens = {"not-used"}
        plugin = ExecPlugin(tmp_path / "plugin",
                            certificate=emu.issue_client_certificate(certs, "gw-1", 3600.0))
        kubeconfig = exec_kubeconfig(emu, tmp_path / "kubeconfig", plugin)
        async with gateway(emu, kubeconfig=str(kubeconfig)) as run:
            # A new client CA: gw-1, valid by its dates, is refused in the handshake (TLS
            # 1.3 sends the alert after it, and asyncio reports "Server disconnected").
            await emu.stop()
            emu.rotate_client_ca()
            await emu.start()
            plugin.certificate = emu.issue_client_certificate(certs, "gw-2", 3600.0)
            seen = len(emu.requests)
            await reaches_gateway(run)
        assert {r.user for r in emu.requests[seen:]} == {"gw-2"}
    key = (certs / "gw-2.key").read_text().splitlines()[1]
    assert key not in caplog.text


async def test_a_kubeconfig_that_does_not_exist_is_named_as_missing(tmp_path: Path) -> None:
    """KUBECONFIG naming no file said "Invalid kube-config file. Expected key
    current-context", as if the file were there and wrong."""
    missing = tmp_path / "nope" / "config"
    with pytest.raises(kube_config.ConfigException, match=f"kubeconfig {missing}: no such file"):
        await new_client(KubeconfigFile(str(missing)))


async def test_a_kubeconfig_that_is_not_yaml_is_retried_and_then_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig half-written, or not YAML, raised yaml's ParserError, which the source
    did not expect: its task ended ("task source kube failed") and the gateway stayed not
    ready for good, whatever the file became. It is retried as a missing file is, its
    error (file and line) on /readyz; once the file is good the source syncs."""
    monkeypatch.setattr(kube_source, "CONFIG_RETRY_S", 0.05)
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text("apiVersion: v1\nclusters: [\n")
        with pytest.raises(kube_config.ConfigException, match=r"ParserError: .* line 3"):
            await new_client(KubeconfigFile(str(kubeconfig)))
        store = SnapshotStore("east")
        source = KubeSource("east", kubeconfig=str(kubeconfig), timings=FAST)
        task = asyncio.create_task(source.run(store))
        try:
            async with asyncio.timeout(5):
                while not (store.sources and "ParserError" in str(
                        next(iter(store.sources.values())).error)):
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a few retries
            assert not task.done()
            emu.kubeconfig(tmp_path / "kubeconfig.new").replace(kubeconfig)
            async with asyncio.timeout(5):
                await store.loaded.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
