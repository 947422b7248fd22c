"""Kubernetes-mode propagation: an endpoint change in a provider's API server → the imported
EndpointSlice written to every consumer's API server.

Three Kubernetes API emulators (tests/kube_emulator, real HTTP on loopback) and the
controller with KubeClusterClients (kubernetes-asyncio, list + watch) run in one process
on one core, so the figures include the emulators' own work (JSON, HTTP, watch fan-out)
and are an upper bound for the controller's share. N services are exported from cluster
"a" into namespaces present everywhere; each change replaces one member slice in "a"
and waits (event-driven, no polling) until the new address is in the imported slice in
"b" and in "c".

    python bench/controlplane/kube_propagation.py           # 200 services, 3 x 100 changes
    python bench/controlplane/kube_propagation.py --smoke   # seconds; CI runs this
Results: bench/results/kube-propagation.{md,json} (smoke: kube-propagation-smoke.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controlplane.clusters.kube import KubeClusterClient, KubeTimings  # noqa: E402
from controlplane.controller import Controller  # noqa: E402
from controlplane.reconcile import slice_name_prefix  # noqa: E402
from mcsproxy.compiled import interpreter  # noqa: E402
from mcsproxy.model import ServiceKey  # noqa: E402
from mcsproxy.tasks import cancel_and_wait, spawn  # noqa: E402
from tests.kube_emulator import KubeEmulator  # noqa: E402
from tests.test_controller_kube_support import (  # noqa: E402
    SLICES,
    member_slice,
    namespace,
    service,
    service_export,
)

CLUSTERS = ("a", "b", "c")
NS = "bench"
CHANGE_TIMEOUT_S = 10.0


def cpu_seconds() -> float:
    with open(f"/proc/{os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(services: int, changes: int) -> dict[str, Any]:
    emus = {c: KubeEmulator() for c in CLUSTERS}
    for emu in emus.values():
        await emu.start()
        emu.put_object(namespace(NS))
    provider = emus["a"]
    for i in range(services):
        provider.put_object(service(f"svc-{i}", NS))
        provider.put_object(member_slice(f"svc-{i}", [f"10.1.{i // 250}.{i % 250 + 1}"], NS))
        provider.put_object(service_export(f"svc-{i}", NS))
    timings = KubeTimings(request_timeout_s=5.0, probe_interval_s=5.0)
    clients = [KubeClusterClient(c, emus[c].api_client(), timings) for c in CLUSTERS]
    controller = Controller(clients)
    started = time.perf_counter()
    await controller.start()
    initial_s = time.perf_counter() - started
    run = spawn(controller.run(), name="bench controller")
    first: list[float] = []
    both: list[float] = []
    cpu_before = cpu_seconds()
    try:
        for n in range(changes):
            i = n % services
            address = f"10.9.{n // 250}.{n % 250 + 1}"
            name = slice_name_prefix(ServiceKey(NS, f"svc-{i}"), "a") + "-0"

            def written(cluster: str, name: str = name, address: str = address) -> bool:
                obj = emus[cluster].get_object(SLICES, name, NS)
                return bool(obj) and obj["endpoints"][0]["addresses"] == [address]

            t0 = time.perf_counter()
            provider.put_object(member_slice(f"svc-{i}", [address], NS))
            seen: dict[str, float] = {}

            async def wait(cluster: str, check: Any = written, seen: Any = seen) -> None:
                await emus[cluster].wait_for(lambda: check(cluster), CHANGE_TIMEOUT_S)
                seen[cluster] = time.perf_counter()

            await asyncio.gather(wait("b"), wait("c"))
            first.append(min(seen.values()) - t0)
            both.append(max(seen.values()) - t0)
    finally:
        cpu = cpu_seconds() - cpu_before
        await cancel_and_wait([run])
        await controller.close()
        for emu in emus.values():
            await emu.stop()
    return {
        "services": services, "changes": changes, "initial_reconcile_s": initial_s,
        "first_consumer_p50_ms": 1000 * statistics.median(first),
        "all_consumers_p50_ms": 1000 * statistics.median(both),
        "all_consumers_p99_ms": 1000 * percentile(both, 0.99),
        "all_consumers_max_ms": 1000 * max(both),
        "cpu_ms_per_change": 1000 * cpu / changes,
    }


def report(rows: list[dict[str, Any]], summary: dict[str, Any], pinned: str) -> str:
    lines = [
        "# Kubernetes-mode propagation (provider API server → consumer API servers)",
        "",
        f"Python {platform.python_version()}, {pinned}. Emulators and controller share "
        "the process: latencies and CPU include the emulators' HTTP/JSON/watch work.",
        "",
        "| rep | services | changes | initial reconcile s | first consumer p50 ms | "
        "both consumers p50 ms | p99 ms | max ms | CPU ms/change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['services']} | {r['changes']} | {r['initial_reconcile_s']:.2f} | "
            f"{r['first_consumer_p50_ms']:.1f} | {r['all_consumers_p50_ms']:.1f} | "
            f"{r['all_consumers_p99_ms']:.1f} | {r['all_consumers_max_ms']:.1f} | "
            f"{r['cpu_ms_per_change']:.2f} |")
    lines += ["", f"Median of {len(rows)} repetitions: both consumers p50 "
              f"{summary['all_consumers_p50_ms']:.1f} ms, p99 "
              f"{summary['all_consumers_p99_ms']:.1f} ms, CPU "
              f"{summary['cpu_ms_per_change']:.2f} ms per change.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.services, args.changes, args.repetitions = 20, 10, 1
    pinned = "unpinned"
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
        pinned = "pinned to core 1 (emulators and controller together)"
    rows = [asyncio.run(measure(args.services, args.changes))
            for _ in range(args.repetitions)]
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]
               if k not in ("services", "changes")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kube-propagation-smoke" if args.smoke else "kube-propagation"
    (out / f"{stem}.json").write_text(json.dumps(
        {"rows": rows, "median": summary, "pinning": pinned,
         "python": interpreter()}, indent=2) + "\n")
    text = report(rows, summary, pinned)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
