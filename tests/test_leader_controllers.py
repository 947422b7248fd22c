"""Two controllers in Kubernetes mode on one Lease: one writes, the other takes over; and
the `mcsproxy controller --kubeconfig --contexts` and `--member-secrets` wiring."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from controlplane.clusters.kube_app import KubeControllerApp, KubeControllerConfig
from controlplane.clusters.kube_holds import HOLDS_CONFIGMAP, holds_json
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.test_controller_kube_support import (
    EXPORTS,
    FAST,
    Clusterset,
    clusterset,
    export_web,
    kube_controller,
    member_slice,
    namespace,
    service,
    service_export,
    write_kubeconfig,
)
from tests.test_reconcile_support import colliding_names

LEASES = "leases.coordination.k8s.io"
TINY = "127.241.0.0/29"  # six addresses: two names share a first probe


def export(cs: Clusterset, cluster: str, name: str) -> None:
    cs[cluster].put_object(service(name))
    cs[cluster].put_object(member_slice(name, ["10.1.0.1"]))
    cs[cluster].put_object(service_export(name))


def import_ips(cs: Clusterset, cluster: str, name: str) -> list[str] | None:
    return cs.imports(cluster).get(name, {}).get("spec", {}).get("ips")


def held(cs: Clusterset) -> list[tuple[str, str]]:
    obj = cs["a"].get_object("configmaps", HOLDS_CONFIGMAP, "kube-system")
    return [] if obj is None else [(h["ip"], h["service"]) for h in holds_json(obj)["holds"]]


async def test_one_controller_writes_and_the_other_takes_over(tmp_path: Path) -> None:
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "a", ["10.1.0.1"])
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        one, two = kube_controller(kubeconfig, "one"), kube_controller(kubeconfig, "two")
        first = spawn(one.run(), name="controller one")
        await asyncio.wait_for(one.led.wait(), 10)
        second = spawn(two.run(), name="controller two")
        try:
            await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.1"}
                                      for c in cs.emulators))
            # Several renewals later the standby has still not led.
            renewals = sum(1 for r in cs["a"].requests if r.method == "PUT")
            await cs["a"].wait_for(lambda: sum(1 for r in cs["a"].requests
                                               if r.method == "PUT") >= renewals + 3)
            assert two.elector is not None and two.elector.terms == 0
            assert not two.led.is_set()
            stopped = time.monotonic()
            one.stop()
            await first
            await asyncio.wait_for(two.led.wait(), 5)
            assert time.monotonic() - stopped < 1.5  # released: no need to wait it out
            lease = cs["a"].get_object(LEASES, "mcsproxy-controller", "kube-system")
            assert lease is not None and lease["spec"]["holderIdentity"] == "two"
            # The new leader follows changes.
            cs["a"].put_object(member_slice("web", ["10.1.0.1", "10.1.0.2"]))
            await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.1.0.1", "10.1.0.2"}
                                      for c in cs.emulators))
        finally:
            one.stop()
            two.stop()
            await cancel_and_wait([first, second])


async def test_a_new_leader_keeps_holding_a_released_address(tmp_path: Path) -> None:
    """`gone` is unexported under leader one; after the handover a new service whose hash
    lands on the same address gets another one (before: it got that one)."""
    gone, new, ip = colliding_names(TINY, "demo")
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export(cs, "a", gone)
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        one = kube_controller(kubeconfig, "one", clusterset_cidr=TINY)
        two = kube_controller(kubeconfig, "two", clusterset_cidr=TINY)
        first = spawn(one.run(), name="controller one")
        await asyncio.wait_for(one.led.wait(), 10)
        second = spawn(two.run(), name="controller two")
        try:
            await cs.wait(lambda: import_ips(cs, "b", gone) == [ip])
            cs["a"].store.delete(cs["a"].store.by_name(EXPORTS), "demo", gone)
            await cs.wait(lambda: import_ips(cs, "b", gone) is None)
            await cs["a"].wait_for(lambda: held(cs) == [(ip, f"demo/{gone}")])
            one.stop()
            await first
            await asyncio.wait_for(two.led.wait(), 5)
            export(cs, "a", new)
            await cs.wait(lambda: import_ips(cs, "b", new) is not None)
            assert import_ips(cs, "b", new) != [ip]
            # Exported again, `gone` takes its own address back: no longer held.
            export(cs, "a", gone)
            await cs.wait(lambda: import_ips(cs, "b", gone) == [ip])
            await cs["a"].wait_for(lambda: held(cs) == [])
        finally:
            one.stop()
            two.stop()
            await cancel_and_wait([first, second])


@pytest.mark.parametrize("ours", [True, False])
async def test_a_damaged_or_foreign_holds_configmap_is_ignored(
        tmp_path: Path, ours: bool, caplog: pytest.LogCaptureFixture) -> None:
    labels = {"app.kubernetes.io/managed-by": "controller.mcsproxy.io"} if ours else {}
    damaged = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": HOLDS_CONFIGMAP, "namespace": "kube-system",
                            "labels": labels},
               "data": {"holds.json": "{not json"}}
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        cs["a"].put_object(damaged)
        export_web(cs, "a", ["10.1.0.1"])
        app = kube_controller(write_kubeconfig(cs, tmp_path / "kubeconfig"), "one")
        task = spawn(app.run(), name="controller")
        try:
            await cs.wait(lambda: import_ips(cs, "b", "web") is not None)
            ip = import_ips(cs, "b", "web")
            cs["a"].store.delete(cs["a"].store.by_name(EXPORTS), "demo", "web")
            await cs.wait(lambda: import_ips(cs, "b", "web") is None)
            if ours:  # replaced at the next release
                await cs["a"].wait_for(lambda: held(cs) == [(ip[0], "demo/web")])
            else:  # someone else's: read as nothing, never written
                export_web(cs, "a", ["10.1.0.1"])
                await cs.wait(lambda: import_ips(cs, "b", "web") == ip)
                obj = cs["a"].get_object("configmaps", HOLDS_CONFIGMAP, "kube-system")
                assert obj is not None and obj["data"] == damaged["data"]
        finally:
            app.stop()
            await cancel_and_wait([task])
    assert (f"configmap kube-system/{HOLDS_CONFIGMAP}: not a usable record" in caplog.text
            if ours else "is not managed by us" in caplog.text)


async def test_members_from_secrets(tmp_path: Path) -> None:
    async with clusterset(("a", "b")) as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "b", ["10.2.0.1"])
        for c, emu in cs.emulators.items():
            raw = emu.kubeconfig(tmp_path / f"member-{c}", "member").read_bytes()
            cs["a"].put_object({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": f"member-{c}", "namespace": "mcsproxy",
                             "labels": {"mcsproxy.io/member-cluster": c}},
                "data": {"kubeconfig": base64.b64encode(raw).decode()}})
        cs["a"].put_object({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": "unrelated", "namespace": "mcsproxy"},
                            "data": {}})
        host = cs["a"].kubeconfig(tmp_path / "host", "host")
        controller = KubeControllerApp(KubeControllerConfig(
            kubeconfig=host, member_secrets="mcsproxy", lease_duration_s=3.0,
            identity="in-cluster", timings=FAST))
        task = spawn(controller.run(), name="secrets controller")
        try:
            await cs.wait(lambda: cs.addresses("a", "web") == {"10.2.0.1"})
            assert cs["a"].get_object(LEASES, "mcsproxy-controller", "mcsproxy")

            # Watches that expire (410 Gone) are listed again and counted, the member
            # Secrets' among them: nothing said how often that happened but an INFO line.
            def relists(cluster: str, resource: str) -> float:
                return controller.metrics.registry.get_sample_value(
                    "mcsproxy_controller_relists_gone_total",
                    {"cluster": cluster, "resource": resource}) or 0.0

            await cs["b"].wait_for(lambda: cs["b"].watch_count >= 5)
            for c in cs.emulators:
                cs[c].expire_history()
                cs[c].drop_watches()
            async with asyncio.timeout(5):
                while not (relists("", "secrets") and relists("b", "serviceexports")
                           and relists("a", "serviceexports")):
                    await asyncio.sleep(0.02)
            assert relists("b", "endpointslices") >= 1
        finally:
            controller.stop()
            await cancel_and_wait([task])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
async def test_cli_kubernetes_mode_runs_and_stops_on_sigterm(tmp_path: Path, sig: str) -> None:
    # SIGHUP too: it used to kill the process outright, the Lease held until it expired.
    async with clusterset() as cs:
        for c in cs.emulators:
            cs[c].put_object(namespace("demo"))
        export_web(cs, "c", ["10.3.0.1"])
        kubeconfig = write_kubeconfig(cs, tmp_path / "kubeconfig")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcsproxy", "controller", "--kubeconfig", str(kubeconfig),
            "--contexts", "a,b,c", "--lease-namespace", "default", "--identity", "cli",
            "--log-level", "warning", stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        try:
            await cs.wait(lambda: all(cs.addresses(c, "web") == {"10.3.0.1"}
                                      for c in cs.emulators), timeout=20)
        finally:
            if proc.returncode is None:
                proc.send_signal(getattr(signal, sig))
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
        lease = cs["a"].get_object(LEASES, "mcsproxy-controller", "default")
        assert lease is not None and lease["spec"]["holderIdentity"] == ""  # released
