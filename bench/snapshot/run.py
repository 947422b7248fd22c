"""Snapshot swap benchmark: 10 000 services x 3 clusters x 10 endpoints into the store and
the DNS zone index.

Measured, in one process (no peers: this is our own budget, under 2 s and 1 KiB per
endpoint): loading the objects into the store (what a source does), the first commit
(building every ImportedService) with the DNS responder's subscriber applying it, an
incremental commit after one slice changes, memory per endpoint (RSS growth over the
whole thing, objects included), and the cost of the first and of a repeated query per
name through the responder (the UDP memo, which makes a repeat cheaper still, is not in
the way here). Both ways of packing DNS answers are run: lazily (the default: on first
query) and eagerly. Half the services are headless with StatefulSet-style hostnames.

    .venv/bin/python bench/snapshot/run.py           # full size, both modes
    .venv/bin/python bench/snapshot/run.py --smoke   # 500 services; proves it still runs
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mcsproxy.config import DnsConfig  # noqa: E402
from mcsproxy.dns.responder import Responder  # noqa: E402
from mcsproxy.manifests import ImportSpec, SliceSpec  # noqa: E402
from mcsproxy.model import Endpoint, EndpointPort, ServiceKey, ServicePort  # noqa: E402
from mcsproxy.store import ObjectId, SnapshotStore  # noqa: E402

CLUSTERS = ("cluster-a", "cluster-b", "cluster-c")
PORTS = (ServicePort("http", "TCP", 80), ServicePort("grpc", "TCP", 9090))
EP_PORTS = (EndpointPort("http", "TCP", 8080), EndpointPort("grpc", "TCP", 9090))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def objects(services: int, endpoints: int):  # type: ignore[no-untyped-def]
    for i in range(services):
        ns, name = f"ns{i % 100}", f"svc{i}"
        key = ServiceKey(ns, name)
        headless = i % 2 == 1
        ip = () if headless else (f"127.240.{i // 250 % 256}.{i % 250 + 1}",)
        yield ObjectId("bench", "ServiceImport", ns, name), ImportSpec(
            key, "Headless" if headless else "ClusterSetIP", ip, PORTS, "None", 10800, None,
            {}, CLUSTERS)
        for c, cluster in enumerate(CLUSTERS):
            eps = tuple(
                Endpoint(
                    address=(addr := f"10.{c}.{i // 250 % 256}.{(i % 250) * 0 + e + 1}"),
                    addresses=(addr,), family=4, cluster=cluster, ports=EP_PORTS,
                    hostname=f"{name}-{e}" if headless else None,
                )
                for e in range(endpoints)
            )
            yield ObjectId("bench", "EndpointSlice", ns, f"{name}-{cluster}"), SliceSpec(
                key, cluster, eps)


def query(name: str) -> bytes:
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + wire + b"\x00\x01\x00\x01"


def run_mode(services: int, endpoints: int, eager: bool) -> dict[str, float]:
    gc.collect()
    rss0 = rss_bytes()
    store = SnapshotStore("cluster-a")
    responder = Responder(DnsConfig(), store.loaded, eager=eager)
    store.subscribe(responder.apply)
    store.register_source("bench")
    t0 = time.perf_counter()
    for oid, spec in objects(services, endpoints):
        store.upsert(oid, spec)
    store.mark_synced("bench")
    t1 = time.perf_counter()
    store.commit()
    t2 = time.perf_counter()
    gc.collect()
    rss1 = rss_bytes()
    # One slice of one headless service changes: commit + zone update.
    key = ServiceKey("ns1", "svc1")
    oid = ObjectId("bench", "EndpointSlice", "ns1", "svc1-cluster-a")
    old = store._objects[oid]
    assert isinstance(old, SliceSpec)
    store.upsert(oid, replace(old, endpoints=old.endpoints[:-1]))
    t3 = time.perf_counter()
    store.commit()
    t4 = time.perf_counter()
    assert store.current.changed == {key}
    # First and repeated query costs, through the responder (no sockets).
    names = [f"svc{i}.ns{i % 100}.svc.clusterset.local" for i in range(0, services, 97)]
    names += [f"svc{i}-3.cluster-b.svc{i}.ns{i % 100}.svc.clusterset.local"
              for i in range(1, services, 98)]
    packets = [query(n) for n in names]
    t5 = time.perf_counter()
    for p in packets:
        assert responder.respond(p, False)[3] & 0x0F == 0  # type: ignore[index]
    t6 = time.perf_counter()
    for p in packets:
        responder.respond(p, False)
    t7 = time.perf_counter()
    total_endpoints = services * len(CLUSTERS) * endpoints
    return {
        "eager": eager,
        "services": services,
        "endpoints": total_endpoints,
        "load_objects_s": t1 - t0,
        "build_and_swap_s": t2 - t1,
        "incremental_commit_ms": (t4 - t3) * 1000,
        "rss_growth_mib": (rss1 - rss0) / 2**20,
        "bytes_per_endpoint": (rss1 - rss0) / total_endpoints,
        "first_query_us": (t6 - t5) * 1e6 / len(packets),
        "repeat_query_us": (t7 - t6) * 1e6 / len(packets),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10, help="per cluster")
    ap.add_argument("--mode", choices=("lazy", "eager"), help="run one mode (internal)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    services = 500 if args.smoke else args.services
    asyncio.set_event_loop(asyncio.new_event_loop())  # the store's Event wants a loop
    if args.mode:
        print(json.dumps(run_mode(services, args.endpoints, args.mode == "eager")))
        return 0
    results = []
    for mode in ("lazy", "eager"):  # each in a fresh process, so RSS growth is its own
        out = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--services", str(services),
             "--endpoints", str(args.endpoints)],
            capture_output=True, text=True, check=True, timeout=600,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python " \
              f"{sys.version.split()[0]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot.json").write_text(json.dumps(
        {"benchmark": "snapshot", "smoke": args.smoke, "machine": machine,
         "results": results}, indent=2) + "\n")
    lines = [
        f"# Snapshot swap: {services:,} services x {len(CLUSTERS)} clusters x "
        f"{args.endpoints} endpoints" + (" (SMOKE)" if args.smoke else ""),
        "",
        f"Machine: {machine}; one process, unpinned. Targets: build and swap < 2 s, "
        "< 1 KiB per endpoint. Half the services headless.",
        "",
        "| DNS packing | load objects s | build + swap s | one-slice commit ms | "
        "RSS MiB | B/endpoint | first query µs | repeat query µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {'eager' if r['eager'] else 'lazy'} | {r['load_objects_s']:.2f} | "
            f"{r['build_and_swap_s']:.2f} | {r['incremental_commit_ms']:.2f} | "
            f"{r['rss_growth_mib']:.0f} | {r['bytes_per_endpoint']:.0f} | "
            f"{r['first_query_us']:.1f} | {r['repeat_query_us']:.1f} |")
    (args.out / "snapshot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
