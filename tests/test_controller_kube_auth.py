"""The Kubernetes-mode controller with credentials that rotate and expire.

A member's exec plugin token, the host cluster's in-cluster service-account token and a
member Secret's kubeconfig token are rotated at the API emulator while the controller
runs; an export made afterwards must still be imported into the other members.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controlplane.clusters.kube_app import KubeControllerApp, KubeControllerConfig
from tests.kube_auth_support import ExecPlugin, service_account, use_exec_plugin
from tests.kube_emulator import KubeEmulator
from tests.test_controller_kube_secrets import NS, member_secret, running, serving, until
from tests.test_controller_kube_support import (
    FAST,
    clusterset,
    export_web,
    kube_controller,
    namespace,
    write_kubeconfig,
)


async def test_a_member_exec_token_is_fetched_again_when_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with clusterset(("a", "b")) as cs:
        for c in ("a", "b"):
            cs[c].put_object(namespace("demo"))
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        plugin = ExecPlugin(tmp_path / "plugin", token="tok-b-one")
        use_exec_plugin(kubeconfig, "b", plugin)
        cs["b"].tokens = {"tok-b-one"}
        app = kube_controller(kubeconfig, "x", clusters=("a", "b"))
        async with running(app) as task:
            await until(app.led.is_set, task, "never led")
            runs = plugin.runs
            cs["b"].tokens = {"tok-b-two"}  # rotated at the server first
            cs["b"].drop_watches()
            # The plugin is asked again on 401, still handing out the old token a while.
            await until(lambda: plugin.runs >= runs + 2, task, "the plugin was not asked again")
            plugin.token = "tok-b-two"
            export_web(cs, "b", ["10.2.0.1"])
            await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task,
                        "b's export made after the rotation never imported into a")
    refused = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.WARNING and "401" in r.getMessage()]
    assert sum("reloading them gave no others" in m for m in refused) == 1, refused
    assert len(refused) < cs["b"].unauthorized, refused  # not one per refused request
    assert "tok-b-" not in caplog.text


async def test_a_member_exec_token_is_renewed_before_it_expires(tmp_path: Path) -> None:
    async with clusterset(("a", "b")) as cs:
        for c in ("a", "b"):
            cs[c].put_object(namespace("demo"))
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        plugin = ExecPlugin(tmp_path / "plugin", token="one", lifetime_s=1.0)
        use_exec_plugin(kubeconfig, "b", plugin)
        cs["b"].tokens = {"one"}
        app = kube_controller(kubeconfig, "x", clusters=("a", "b"))
        async with running(app) as task:
            await until(app.led.is_set, task, "never led")
            plugin.token = "two"
            cs["b"].tokens = {"one", "two"}
            await until(lambda: plugin.runs >= 3, task, "the plugin was not asked again")
            cs["b"].tokens = {"two"}
            cs["b"].drop_watches()
            export_web(cs, "b", ["10.2.0.1"])
            await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task,
                        "b's export made after the rotation never imported into a")
        assert cs["b"].unauthorized == 0


async def test_the_host_service_account_token_is_read_again_when_rotated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with clusterset(("a", "b", "c")) as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        host = KubeEmulator(tls=True, token="host-one")
        await host.start()
        try:
            sa = service_account(tmp_path / "serviceaccount", host, "host-one")
            monkeypatch.delenv("KUBECONFIG", raising=False)
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host.host)
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(host.port))
            for c in ("a", "b"):
                host.put_object(member_secret(f"member-{c}", c, cs[c].kubeconfig(
                    tmp_path / f"member-{c}", "member").read_bytes()))
            app = KubeControllerApp(KubeControllerConfig(
                member_secrets=NS, lease_namespace=NS, lease_duration_s=3.0,
                identity="in-cluster", timings=FAST, service_account_dir=sa))
            async with running(app) as task:
                await until(lambda: serving(app) == {"a", "b"}, task, "never served a, b")
                service_account(sa, host, "host-two")  # the kubelet rotates the token
                host.tokens = {"host-two"}  # and the old one expires
                host.drop_watches()
                host.put_object(member_secret("member-c", "c", cs["c"].kubeconfig(
                    tmp_path / "member-c", "member").read_bytes()))
                await until(lambda: serving(app) == {"a", "b", "c"}, task,
                            "a member Secret added after the rotation was never seen")
                assert app.elector is not None and app.elector.is_leader
        finally:
            await host.stop()


async def test_a_member_secret_updated_with_a_new_token_is_used(tmp_path: Path) -> None:
    async with clusterset(("a", "b")) as cs:
        for c in ("a", "b"):
            cs[c].put_object(namespace("demo"))
        host = KubeEmulator()
        await host.start()
        try:
            cs["b"].token, cs["b"].tokens = "b-one", {"b-one"}
            for c in ("a", "b"):
                host.put_object(member_secret(f"member-{c}", c, cs[c].kubeconfig(
                    tmp_path / f"member-{c}", "member").read_bytes()))
            app = KubeControllerApp(KubeControllerConfig(
                kubeconfig=host.kubeconfig(tmp_path / "host", "host"), member_secrets=NS,
                lease_duration_s=3.0, identity="secrets", timings=FAST))
            async with running(app) as task:
                await until(lambda: serving(app) == {"a", "b"}, task, "never served a, b")
                cs["b"].token, cs["b"].tokens = "b-two", {"b-two"}
                cs["b"].drop_watches()
                host.put_object(member_secret("member-b", "b", cs["b"].kubeconfig(
                    tmp_path / "member-b", "member").read_bytes()))
                export_web(cs, "b", ["10.2.0.1"])
                await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task,
                            "b's export made after the new token never imported into a")
        finally:
            await host.stop()
