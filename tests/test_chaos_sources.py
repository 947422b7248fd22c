"""Faults in what feeds the gateway: its file source disappears, the controller is killed
while writing, the API server (the emulator) answers 500s, hangs and sends 410 storms.
Clients keep being served from the last good state; the state converges after the fault."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mcsproxy.config import ProxyConfig
from mcsproxy.manifests import ManifestError
from mcsproxy.model import ServiceKey
from mcsproxy.proxy import ProxyManager
from mcsproxy.sources.file import parse_file_text
from mcsproxy.sources.kube import KubeSource
from mcsproxy.sources.kube_watch import WatchTimings
from mcsproxy.store import SnapshotStore
from tests.chaos.support import GatewayProcess, Port, Svc, Tally, wait_until, write_imports
from tests.kube_emulator import KubeEmulator
from tests.proxy_fixtures import NO_HEALTH, Backend, ask
from tests.test_reconcile_support import eslice, export, namespace, service

ECHO = Port("echo", 7, 7010)


async def tcp_load(ip: str, port: int, tally: Tally, stop: asyncio.Event,
                   seen: set[str] | None = None) -> None:
    while not stop.is_set():
        try:
            name = await ask(ip, port)
            tally.ok += 1
            if seen is not None:
                seen.add(name)
        except (OSError, TimeoutError, ConnectionError) as exc:
            tally.fail(repr(exc))


async def test_file_source_disappears_last_good_state_serves(tmp_path: Path) -> None:
    b1 = await Backend("one", "127.77.5.1", 7010, "east").start()
    b2 = await Backend("two", "127.77.5.2", 7010, "east").start()
    folder = tmp_path / "imports"
    folder.mkdir()
    write_imports(folder / "all.yaml",
                  [Svc("echo", "127.240.77.30", [ECHO], {"east": [("127.77.5.1", True)]})])
    gw = GatewayProcess(f"file:{folder}", "--health-interval", "0")
    tally, stop, seen = Tally(), asyncio.Event(), set[str]()
    load = None
    try:
        await gw.start()
        await gw.wait_line("listener 127.240.77.30:7/TCP serving")
        load = asyncio.create_task(tcp_load("127.240.77.30", 7, tally, stop, seen))
        await wait_until(lambda: tally.ok >= 10, "load running")
        shutil.rmtree(folder)
        await gw.wait_line("no such file or directory; keeping the last good objects")
        served = tally.ok
        await wait_until(lambda: tally.ok >= served + 50, "still served without a source")
        status, detail = await gw.admin_get("/readyz")
        assert status == 200 and detail["services"] == 1, detail  # type: ignore[index]

        folder.mkdir()  # back, with the endpoint moved
        write_imports(folder / "all.yaml",
                      [Svc("echo", "127.240.77.30", [ECHO], {"east": [("127.77.5.2", True)]})])
        await gw.wait_line("the path is back")
        await wait_until(lambda: "two" in seen, "the new state served")
        stop.set()
        await asyncio.wait_for(load, 5)
        assert tally.failed == 0, tally.errors
        print(f"\nchaos: fault=file-source-gone requests={tally.ok} failures=0 budget=0")
    finally:
        stop.set()
        if load is not None:
            await asyncio.gather(load, return_exceptions=True)
        await gw.stop()
        await b1.stop()
        await b2.stop()


# -- the controller killed while writing ---------------------------------------------------
def write_members(root: Path, generation: int, services: int = 25) -> None:
    """Three members exporting `services` services; addresses move with `generation`."""
    for ci, cluster in enumerate(("a", "b", "c"), start=1):
        docs = [namespace()]
        for s in range(services):
            name = f"svc{s}"
            docs += [service(name), export(name),
                     eslice(f"{name}-x", [f"10.{ci}.{generation % 250}.{s + 1}"], svc=name)]
        folder = root / cluster
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".members.tmp"
        tmp.write_text(yaml.safe_dump_all(docs))
        os.replace(tmp, folder / "members.yaml")


def controller(clusters: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mcsproxy", "controller", "--clusters-dir", str(clusters),
         "--output-dir", str(out), "--log-level", "warning", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def check_consistent(out: Path) -> dict[str, dict[str, object]]:
    """Every output file parses and validates as the gateway reads it; → docs by file."""
    found: dict[str, dict[str, object]] = {}
    for path in sorted(out.rglob("*.yaml")):
        text = path.read_text()
        try:
            parse_file_text(text, str(path), "check")
        except ManifestError as exc:
            raise AssertionError(f"inconsistent output after a kill: {exc}") from None
        found[str(path.relative_to(out))] = yaml.safe_load(text)
    return found


def test_controller_killed_while_writing_then_restarted_converges(tmp_path: Path) -> None:
    clusters, out, fresh = tmp_path / "clusters", tmp_path / "out", tmp_path / "fresh"
    kills = 0
    for generation in range(4):
        write_members(clusters, generation)
        started = time.time_ns()
        proc = controller(clusters, out)
        try:
            # SIGKILL as soon as its first file of this round lands: mid-way through the
            # burst of ~375 writes (polled: another process's files have no event).
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline and not any(
                    p.stat().st_mtime_ns >= started for p in out.rglob("*.yaml")):
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            proc.stderr.close()
        assert "Traceback" not in err, err
        check_consistent(out)
    assert kills == 4
    ips_before = {k: v["spec"]["ips"] for k, v in check_consistent(out).items()
                  if v["kind"] == "ServiceImport"}
    assert ips_before, "the killed controllers wrote imports"

    final = controller(clusters, out, "--once")
    assert final.wait(30) == 0, final.stderr.read().decode() if final.stderr else ""
    final.stderr.close()  # type: ignore[union-attr]
    reference = controller(clusters, fresh, "--once")
    assert reference.wait(30) == 0
    reference.stderr.close()  # type: ignore[union-attr]
    converged, expected = check_consistent(out), check_consistent(fresh)
    assert sorted(converged) == sorted(expected)  # no stale object, none missing
    for name, doc in expected.items():
        if doc["kind"] == "EndpointSlice":
            assert converged[name]["endpoints"] == doc["endpoints"], name
    # ClusterSetIPs stay what they were before the crashes (read back, not re-allocated).
    for name, ips in ips_before.items():
        assert converged[name]["spec"]["ips"] == ips, name
    print(f"\nchaos: fault=controller-sigkill kills={kills} inconsistent_outputs=0 "
          f"converged_objects={len(converged)}")


# -- the API server misbehaving --------------------------------------------------------------
FAST = WatchTimings(request_timeout_s=0.5, watch_timeout_s=2.0, idle_margin_s=0.3,
                    backoff_initial_s=0.02, backoff_max_s=0.2, not_served_retry_s=0.2,
                    page_size=2)
MCS = "multicluster.x-k8s.io"
TOKEN = "s3cr3t-chaos-token-0123456789"


def kube_import(name: str, ip: str) -> dict[str, object]:
    return {"apiVersion": f"{MCS}/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": "chaos"},
            "spec": {"type": "ClusterSetIP", "ips": [ip],
                     "ports": [{"name": "echo", "protocol": "TCP", "port": 7}]}}


def kube_slice(name: str, cluster: str, address: str) -> dict[str, object]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{cluster}", "namespace": "chaos", "labels": {
                "multicluster.kubernetes.io/service-name": name,
                "multicluster.kubernetes.io/source-cluster": cluster}},
            "addressType": "IPv4",
            "ports": [{"name": "echo", "protocol": "TCP", "port": 7010}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}]}


async def test_api_server_500s_hangs_and_410_storms(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    backends = [await Backend(f"k{i}", f"127.77.6.{i}", 7010, "east").start() for i in (1, 2)]
    store = SnapshotStore("east")
    tally, stop, seen = Tally(), asyncio.Event(), set[str]()
    async with KubeEmulator(token=TOKEN, bookmark_interval=0.1) as emu:
        emu.put_object(kube_import("echo", "127.240.77.31"))
        emu.put_object(kube_slice("echo", "west", "127.77.6.1"))
        source = KubeSource("east", kubeconfig=str(emu.kubeconfig(tmp_path / "kubeconfig")),
                            timings=FAST)
        task = asyncio.create_task(source.run(store))
        manager: ProxyManager | None = None
        load = None
        try:
            async with asyncio.timeout(5):
                await store.loaded.wait()
            manager = ProxyManager(ProxyConfig(health=NO_HEALTH), store)  # serves from here
            await manager.start()
            await asyncio.wait_for(manager.wait_applied(store.current.version), 5)
            load = asyncio.create_task(tcp_load("127.240.77.31", 7, tally, stop, seen))
            status = store.sources[source.name]

            # 500s on every request, the watches cut: the last good state serves.
            emu.fail_next(None, 500)
            emu.drop_watches()
            await wait_until(lambda: not status.connected, "500s noticed")
            served = tally.ok
            await wait_until(lambda: tally.ok >= served + 30, "served through the 500s")
            emu.clear_faults()
            await wait_until(lambda: status.connected, "reconnected after the 500s")

            # A hang: requests time out, nothing changes for clients.
            emu.hang()
            emu.drop_watches()
            await wait_until(lambda: not status.connected, "hang noticed", timeout=8)
            served = tally.ok
            await wait_until(lambda: tally.ok >= served + 30, "served through the hang")
            emu.hang(False)

            # A 410 storm: history forgotten again and again while the endpoint moves.
            for i in range(5):
                emu.put_object(kube_slice("echo", "west", f"127.77.6.{1 + (i + 1) % 2}"))
                emu.expire_history()
                emu.drop_watches()
                await asyncio.sleep(0.05)  # the storm's pace
            await wait_until(lambda: status.connected and any(
                e.address == "127.77.6.2" for e in
                store.current.services[ServiceKey("chaos", "echo")].endpoints),
                "converged after the 410 storm", timeout=8)
            await wait_until(lambda: "k2" in seen, "the moved endpoint served")
            stop.set()
            await asyncio.wait_for(load, 5)
            assert tally.failed == 0, tally.errors
            assert sum(r.relists_gone for r in source.reflectors) >= 1
            print(f"\nchaos: fault=api-500-hang-410 requests={tally.ok} failures=0 budget=0")
        finally:
            stop.set()
            if load is not None:
                await asyncio.gather(load, return_exceptions=True)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if manager is not None:
                await manager.stop()
            for b in backends:
                await b.stop()
    assert TOKEN not in caplog.text, "the bearer token reached the log"
