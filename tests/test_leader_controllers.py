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
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.test_controller_kube_support import (
    FAST,
    clusterset,
    export_web,
    kube_controller,
    member_slice,
    namespace,
    write_kubeconfig,
)

LEASES = "leases.coordination.k8s.io"


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
