"""Control-plane benchmark: synthetic clustersets of N services x 3 clusters x 10 endpoints.

Per size, in a fresh process pinned to one core (controller, stream server and one
gateway source share it, so the figures include their contention):
  - full reconcile: every key resolved, rendered and "written" (to in-memory clusters, so
    API/disk latency is excluded, as the target says), wall time and RSS growth;
  - the first gateway sync over the stream (snapshot parts → gateway store → DNS index);
  - one endpoint change, repeated: time until written to the consumer cluster and until
    applied by the gateway over the stream (its store swapped in a new snapshot and its
    DNS zone index updated; p50/p99), how many keys were reconciled per change (1 = no
    work proportional to the clusterset), and the garbage collector's pauses meanwhile.

    python bench/controlplane/bench_controlplane.py            # 1k, 10k, 50k
    python bench/controlplane/bench_controlplane.py --smoke    # seconds; CI runs this
    python bench/controlplane/bench_controlplane.py --sizes 50000 --changes 100 \
        --out /tmp/cp --profile /tmp/cp/prof      # where a change's time goes (pstats)
Results: bench/results/controlplane.{md,json} (smoke: controlplane-smoke.*).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controlplane.clusters import ChangeSet, Connection  # noqa: E402
from controlplane.clusters.state import ClusterObjects  # noqa: E402
from controlplane.controller import Controller  # noqa: E402
from controlplane.metrics import ControllerMetrics  # noqa: E402
from controlplane.resources import ObjectRef, parse_member_object  # noqa: E402
from controlplane.server import ControllerServer  # noqa: E402
from controlplane.stream import StreamHub  # noqa: E402
from mcsproxy.compiled import interpreter  # noqa: E402
from mcsproxy.dns.zone import ZoneIndex  # noqa: E402
from mcsproxy.model import ServiceKey, Snapshot  # noqa: E402
from mcsproxy.sources.controlplane import ControlplaneSource  # noqa: E402
from mcsproxy.store import SnapshotStore  # noqa: E402
from mcsproxy.tasks import cancel_and_wait, spawn  # noqa: E402

CLUSTERS = ("east", "west", "north")
ENDPOINTS = 10
NAMESPACES = 10
HOST = "127.50.0.1"
CHANGE_TIMEOUT_S = 10.0


class MemoryCluster:
    """A ClusterClient with no I/O: the bench measures the controller, not an API server."""

    def __init__(self, cluster_id: str, objects: ClusterObjects) -> None:
        self.cluster_id = cluster_id
        self.objects = objects
        self.connection = Connection(connected=True, since=time.time())
        self.written: dict[ObjectRef, Any] = {}
        self.wrote = asyncio.Event()

    async def sync(self) -> ChangeSet:
        return ChangeSet()

    async def watch(self, notify: Any) -> None:
        await asyncio.Event().wait()  # changes are injected by the bench

    async def read_published(self) -> list[Mapping[str, Any]]:
        return []

    async def apply(self, objects: Sequence[Mapping[str, Any]]) -> None:
        for obj in objects:
            meta = obj["metadata"]
            self.written[ObjectRef(obj["kind"], meta["namespace"], meta["name"])] = obj
        self.wrote.set()

    async def delete(self, refs: Sequence[ObjectRef]) -> None:
        for ref in refs:
            self.written.pop(ref, None)
        self.wrote.set()

    async def update_export_status(self, export: Mapping[str, Any]) -> None:
        self.wrote.set()

    async def close(self) -> None:
        return None


def slice_doc(i: int, c: int, generation: int = 0) -> dict[str, Any]:
    base = (i * ENDPOINTS) % 60000
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"svc-{i}-abc", "namespace": f"ns-{i % NAMESPACES}",
                     "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        # Every generation differs (the zone), so every change has something to write.
        "endpoints": [{"addresses": [f"10.{c}.{(base + j) // 250}.{(base + j) % 250 + 1}"],
                       "conditions": {"ready": (j + generation) % 7 != 0},
                       "zone": f"zone-{generation}"}
                      for j in range(ENDPOINTS)],
    }


def member_docs(c: int, n: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": f"ns-{k}"}} for k in range(NAMESPACES)]
    for i in range(n):
        ns = f"ns-{i % NAMESPACES}"
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": f"svc-{i}", "namespace": ns},
                     "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80}]}})
        docs.append(slice_doc(i, c))
        docs.append({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                     "metadata": {"name": f"svc-{i}", "namespace": ns,
                                  "creationTimestamp": f"2024-01-0{c + 1}T00:00:00Z"}})
    return docs


def load(cluster_id: str, docs: list[dict[str, Any]]) -> ClusterObjects:
    objects = ClusterObjects()
    parsed = {}
    for doc in docs:
        result = parse_member_object(doc, cluster_id)
        assert result is not None
        parsed[result[0]] = result[1]
    objects.replace_all(parsed, ChangeSet())
    return objects


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class GcPauses:
    """Collector pauses while installed: a full collection walks the whole heap (the
    controller's and the gateway's objects), so it shows up as per-change latency."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1000)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


async def measure(n: int, changes: int, profile: str | None = None) -> dict[str, Any]:
    rss_start = rss_mib()
    t = time.perf_counter()
    members = {c: MemoryCluster(c, load(c, member_docs(i, n))) for i, c in enumerate(CLUSTERS)}
    load_s = time.perf_counter() - t
    rss_loaded = rss_mib()
    metrics = ControllerMetrics()
    hub = StreamHub(metrics)
    controller = Controller(members.values(), cidrs="127.240.0.0/12", metrics=metrics,
                            publisher=hub)
    for c in CLUSTERS:
        hub.attach(c, controller.written.setdefault(c, {}))
    t = time.perf_counter()
    await controller.start()
    full_s = time.perf_counter() - t
    rss_reconciled = rss_mib()
    assert controller.imported_count == n

    server = ControllerServer(controller, hub, (HOST, 0))
    await server.start()
    assert server.bound is not None
    consumer = CLUSTERS[-1]
    store = SnapshotStore(consumer)
    source = ControlplaneSource(f"http://{HOST}:{server.bound[1]}", consumer)
    applied = asyncio.Event()
    probe: dict[str, ServiceKey | None] = {"key": None}
    # The gateway's DNS index is kept in step too: "applied" means answerable by DNS.
    zone = ZoneIndex("clusterset.local", 5)

    def on_snapshot(snapshot: Snapshot) -> None:
        zone.apply(snapshot)
        if probe["key"] in snapshot.changed:
            applied.set()

    store.subscribe(on_snapshot)
    t = time.perf_counter()
    tasks = [spawn(source.run(store), name="bench gateway source"),
             spawn(controller.run(), name="bench controller")]
    try:
        async with asyncio.timeout(600):
            await store.loaded.wait()
        gateway_sync_s = time.perf_counter() - t
        assert len(store.current.services) == n

        rng = random.Random(7)
        written_ms: list[float] = []
        applied_ms: list[float] = []
        reconciled_before = metrics.services_reconciled._value.get()
        target = members[consumer]
        profiler = cProfile.Profile() if profile else None
        gc_pauses = GcPauses().__enter__()
        if profiler is not None:
            profiler.enable()
        for generation in range(1, changes + 1):
            i = rng.randrange(n)
            source_cluster = CLUSTERS[generation % 2]  # a provider other than the consumer
            doc = slice_doc(i, CLUSTERS.index(source_cluster), generation)
            ref, spec = parse_member_object(doc, source_cluster)  # type: ignore[misc]
            key = ServiceKey(doc["metadata"]["namespace"], f"svc-{i}")
            probe["key"] = key
            applied.clear()
            target.wrote.clear()
            change = ChangeSet()
            started = time.perf_counter()
            members[source_cluster].objects.upsert(ref, spec, change)
            controller.on_change(source_cluster, change)
            async with asyncio.timeout(CHANGE_TIMEOUT_S):
                await target.wrote.wait()
                written_ms.append((time.perf_counter() - started) * 1000)
                await applied.wait()
                applied_ms.append((time.perf_counter() - started) * 1000)
        gc_pauses.__exit__()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)  # type: ignore[arg-type]
        per_change = (metrics.services_reconciled._value.get() - reconciled_before) / changes
    finally:
        await cancel_and_wait(tasks)
        await server.stop()
        await controller.close()
    return {
        "services": n, "clusters": len(CLUSTERS), "endpoints_per_slice": ENDPOINTS,
        "load_s": round(load_s, 3),
        "full_reconcile_s": round(full_s, 3),
        "full_reconcile_us_per_service": round(full_s / n * 1e6, 1),
        "rss_inputs_mib": round(rss_loaded - rss_start, 1),
        "rss_reconcile_mib": round(rss_reconciled - rss_loaded, 1),
        "gateway_initial_sync_s": round(gateway_sync_s, 3),
        "changes": changes,
        "keys_reconciled_per_change": per_change,
        "written_p50_ms": round(percentile(written_ms, 50), 3),
        "written_p99_ms": round(percentile(written_ms, 99), 3),
        "applied_p50_ms": round(percentile(applied_ms, 50), 3),
        "applied_p99_ms": round(percentile(applied_ms, 99), 3),
        "gc_full_collections": len(gc_pauses.pauses[2]),
        "gc_max_pause_ms": round(max((p for ps in gc_pauses.pauses.values() for p in ps),
                                     default=0.0), 1),
    }


def run_one(n: int, changes: int, profile: str | None = None) -> dict[str, Any]:
    import uvloop

    return uvloop.run(measure(n, changes, profile))


def child(n: int, changes: int, pin: bool, profile: str | None = None) -> dict[str, Any]:
    """Each size in a fresh process, so RSS figures do not include an earlier size."""
    cmd = [sys.executable, __file__, "--one", str(n), "--changes", str(changes)]
    if profile:
        cmd += ["--profile", f"{profile}.{n}"]
    if pin and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", "1", *cmd]
    # stderr passes through: a failing size shows why.
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict[str, Any]], pinned: bool) -> str:
    lines = [
        "# Control plane: reconcile and propagation",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, uvloop. Each size in its own process"
        f"{', pinned to core 1 (taskset -c 1)' if pinned else ' (not pinned)'}; controller, "
        "stream server and one gateway source share that core. Member clusters are "
        "in-memory (API/disk latency excluded). 3 clusters export every service, "
        f"{ENDPOINTS} endpoints per cluster per service. Applied = the gateway's store "
        "swapped in the snapshot with the change and its DNS zone index updated.",
        "",
        "| services | full reconcile (s) | µs/service | RSS inputs (MiB) | RSS reconcile "
        "(MiB) | gateway first sync (s) | keys reconciled/change | written p50/p99 (ms) | "
        "applied by gateway p50/p99 (ms) | GC during changes: full collections, longest "
        "pause (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['services']} | {r['full_reconcile_s']} | {r['full_reconcile_us_per_service']}"
            f" | {r['rss_inputs_mib']} | {r['rss_reconcile_mib']} | "
            f"{r['gateway_initial_sync_s']} | {r['keys_reconciled_per_change']:g} | "
            f"{r['written_p50_ms']} / {r['written_p99_ms']} | "
            f"{r['applied_p50_ms']} / {r['applied_p99_ms']} | "
            f"{r.get('gc_full_collections', '-')}, {r.get('gc_max_pause_ms', '-')} |")
    lines += ["", "Target: one endpoint change applied by a gateway over the stream in p99 < "
              "100 ms, flat across sizes (no work proportional to the clusterset).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny size, a few changes")
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--profile", metavar="PATH",
                        help="cProfile the change loop of each size into PATH.<size> "
                        "(pstats format); the figures then include the profiler's cost")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.changes, args.profile)))
        return 0
    sizes = [200] if args.smoke else [int(s) for s in args.sizes.split(",")]
    changes = 20 if args.smoke else args.changes
    pin = not args.no_pin
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        row = child(n, changes, pin, args.profile)
        print(json.dumps(row), flush=True)
        rows.append(row)
    stem = "controlplane-smoke" if args.smoke else "controlplane"
    pinned = pin and bool(shutil.which("taskset")) and (os.cpu_count() or 1) > 1
    (out / f"{stem}.md").write_text(report(rows, pinned))
    (out / f"{stem}.json").write_text(json.dumps({
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(),
                    "python": interpreter(), "pinned_core": 1 if pinned else None},
        "rows": rows,
        "median_applied_p99_ms": statistics.median(r["applied_p99_ms"] for r in rows),
    }, indent=2))
    print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
