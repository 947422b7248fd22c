"""Controller memory per service, Kubernetes mode: N services exported by each of 3
members (one Service, one EndpointSlice of 10 endpoints and one ServiceExport each), the
members served by the project's Kubernetes API emulator in a child process, the
controller (controlplane.controller.Controller over KubeClusterClients) traced by
tracemalloc in another child: once at a first start (everything written), once after a
restart (everything read back, nothing written). Each figure is what the controller holds
once started, its watches open and idle, less what the process held before it was made.

    .venv/bin/python bench/memory/controller.py 500 [--top 12] [--host-prefix 127.75.0]

Also printed: the writes each start sent, and in a third, untraced restart the CPU
(time.process_time) of the start and of a full resync (every key reconciled against what
it wrote, and our objects relisted in every member and compared; nothing written).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import linecache
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CLUSTERS = ("a", "b", "c")
ENDPOINTS = 10


def member_objects(cluster_index: int, n: int) -> list[dict[str, Any]]:
    from tests.test_controller_kube_support import (
        member_slice,
        namespace,
        service,
        service_export,
    )
    found = [namespace(f"ns{i}") for i in range(10)]
    for i in range(n):
        ns, name = f"ns{i % 10}", f"svc{i}"
        found.append(service(name, ns))
        found.append(member_slice(name, [f"10.{cluster_index}.{i // 25}.{i % 25 * 10 + e + 1}"
                                         for e in range(ENDPOINTS)], ns))
        found.append(service_export(name, ns))
    return found


async def serve(n: int, prefix: str) -> None:
    """The members: an emulator each, filled, until stdin closes."""
    from tests.kube_emulator import KubeEmulator
    emulators = []
    for index, _cluster in enumerate(CLUSTERS):
        emu = KubeEmulator(history=100_000, watch_queue=100_000)
        await emu.start(f"{prefix}.{index + 1}", 0)
        for obj in member_objects(index + 1, n):
            emu.put_object(obj)
        emulators.append(emu)
    print(json.dumps([e.url for e in emulators]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for emu in emulators:
        await emu.stop()


def where(stat: tracemalloc.Statistic) -> str:
    frames = [f for f in stat.traceback
              if "/controlplane/" in f.filename or "/mcsproxy/" in f.filename]
    shown = frames[-4:] or list(stat.traceback)[-2:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} "
                       f"{linecache.getline(f.filename, f.lineno).strip()[:60]}"
                       for f in reversed(shown))


async def settle(controller: Any, clients: dict[str, Any]) -> None:
    """Until the echoes of the start's writes are in and nothing is dirty or written."""
    quiet, last = 0, -1
    while quiet < 10:
        await asyncio.sleep(0.2)
        writes = sum(c.writes for c in clients.values())
        busy = controller._dirty or controller._writers or controller._queued
        quiet = 0 if busy or writes != last else quiet + 1
        last = writes


async def resync_cpu(controller: Any, clients: dict[str, Any]) -> tuple[float, float, int]:
    """CPU of reconciling every key, and of relisting our objects everywhere (compared
    by the controller), with nothing to write."""
    from controlplane.clusters import ChangeSet
    before = sum(c.writes for c in clients.values())
    started = time.process_time()
    controller._mark(list(controller._known_keys()))
    await controller.flush()
    reconcile = time.process_time() - started
    started = time.process_time()
    for cluster, client in clients.items():
        for inf in client._informers:
            if inf.managed:
                changes = ChangeSet()
                await client._relist(inf, changes)
                controller.on_change(cluster, changes)
    await controller.flush()
    relist = time.process_time() - started
    await settle(controller, clients)
    return reconcile, relist, sum(c.writes for c in clients.values()) - before


async def measure(urls: list[str], n: int, top: int, resync: bool,
                  traced: bool = True) -> dict[str, Any]:
    from kubernetes_asyncio.client import ApiClient, Configuration

    from controlplane.clusters.kube import KubeClusterClient, KubeTimings
    from controlplane.controller import Controller
    from mcsproxy.tasks import cancel_and_wait, spawn

    gc.collect()
    if traced:
        tracemalloc.start(25)
    base = tracemalloc.get_traced_memory()[0]
    clients = {c: KubeClusterClient(c, ApiClient(Configuration(host=u)), KubeTimings())
               for c, u in zip(CLUSTERS, urls, strict=True)}
    controller = Controller(clients.values())
    started = time.process_time()
    await controller.start()
    start_cpu = time.process_time() - started
    running = spawn(controller.run(), name="controller")
    await settle(controller, clients)
    result: dict[str, Any] = {
        "writes": sum(c.writes for c in clients.values()),
        "start_cpu_s": round(start_cpu, 3),
    }
    if traced:
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        stats = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]).statistics("traceback")
        result["kib_per_service"] = round(held / n / 1024, 1)
        result["top"] = [(round(s.size / n / 1024, 2), s.count, where(s)) for s in stats[:top]]
        tracemalloc.stop()
    if resync:
        reconcile, relist, wrote = await resync_cpu(controller, clients)
        result["resync_cpu_s"] = {"reconcile": round(reconcile, 3), "relist": round(relist, 3),
                                  "writes": wrote}
    await cancel_and_wait([running])
    await controller.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("services", type=int)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--host-prefix", default="127.75.0")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the members' URLs, JSON
    parser.add_argument("--resync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--untraced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.services, args.host_prefix))
        return
    if args.measure:
        import uvloop
        uvloop.install()
        print(json.dumps(asyncio.run(measure(json.loads(args.measure), args.services,
                                             args.top, args.resync, not args.untraced))))
        return
    me = [sys.executable, __file__, str(args.services), "--top", str(args.top),
          "--host-prefix", args.host_prefix]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    members = subprocess.Popen([*me, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env)
    try:
        assert members.stdout is not None
        urls = members.stdout.readline().strip()
        for phase in ("first start", "restart"):
            out = subprocess.run([*me, "--measure", urls], capture_output=True,
                                 text=True, env=env, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"{phase}: {result['kib_per_service']} KiB per service traced, "
                  f"{result['writes']} writes")
            for kib, count, at in result["top"]:
                print(f"  {kib:7.2f} KiB/svc {count:8d}  {at}")
        # The CPU, untraced (tracemalloc costs far more than the work itself).
        out = subprocess.run([*me, "--measure", urls, "--resync", "--untraced"],
                             capture_output=True, text=True, env=env, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"restart untraced: start() CPU {result['start_cpu_s']} s, "
              f"{result['writes']} writes")
        print(f"  full resync CPU: {result['resync_cpu_s']}")
    finally:
        if members.stdin is not None:
            members.stdin.close()
        members.wait(timeout=30)


if __name__ == "__main__":
    main()
