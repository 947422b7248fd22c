"""Every benchmark in one command (`make bench`), then one dated summary with ratios and plots.

Runs, in order, each as its own process with its own pinning (stated in its results):
DNS (dnsperf vs knot, dnsdist), TCP (iperf3 and connection rate vs HAProxy and direct),
HTTP (wrk keep-alive vs HAProxy, nginx and direct), the snapshot swap, the control plane at
1k/10k/50k services (`--quick`: 1k/10k), Kubernetes-mode propagation, and the failover
scenarios under locust load vs HAProxy. Each writes bench/results/<name>.md and .json;
this then writes bench/results/<date>.md and <date>.json with the machine, the ratio
tables and PNG plots (ratios, control-plane scale, failover timelines), and prints the
tables.

    .venv/bin/python bench/run_all.py                 # everything (~20 minutes on 2 cores)
    .venv/bin/python bench/run_all.py --quick         # without the 50k-service size
    .venv/bin/python bench/run_all.py --smoke --out /tmp/b   # seconds per benchmark
    .venv/bin/python bench/run_all.py --only dns,failover
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import LOAD_CORE, PROXY_CORE, RESULTS, machine, peer_versions  # noqa: E402

Row = tuple[str, str, float | None, str, float | None, float | None, str]


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    stem: str  # results file stem of a full run; smoke runs of most add "-smoke"
    smoke_stem: str
    tools: tuple[str, ...] = ()
    timeout_s: int = 900
    args: tuple[str, ...] = ()  # passed to the script, e.g. a variant of its workload


BENCHES = (
    Bench("dns", "bench/dns/run.py", "dns", "dns", ("dnsperf",)),
    Bench("tcp", "bench/tcp/run.py", "tcp", "tcp-smoke", ("iperf3", "haproxy", "nginx", "wrk")),
    Bench("http", "bench/http/run.py", "http", "http-smoke", ("haproxy", "nginx", "wrk")),
    Bench("http-post", "bench/http/post.py", "http-post", "http-post-smoke",
          ("haproxy", "nginx", "wrk")),
    Bench("http-post-chunked", "bench/http/post.py", "http-post-chunked",
          "http-post-chunked-smoke", ("haproxy", "nginx", "wrk"), args=("--chunked",)),
    Bench("snapshot", "bench/snapshot/run.py", "snapshot", "snapshot"),
    Bench("controlplane", "bench/controlplane/bench_controlplane.py", "controlplane",
          "controlplane-smoke", timeout_s=2400),
    Bench("kube-propagation", "bench/controlplane/kube_propagation.py", "kube-propagation",
          "kube-propagation-smoke"),
    Bench("failover", "bench/failover/run.py", "failover", "failover-smoke", ("haproxy",)),
)


def run_bench(b: Bench, out: Path, smoke: bool, quick: bool) -> dict[str, object]:
    missing = [t for t in (*b.tools, "taskset") if shutil.which(t) is None]
    if missing:
        print(f"== {b.name}: skipped, missing {', '.join(missing)}", flush=True)
        return {"status": f"skipped: missing {', '.join(missing)}"}
    argv = [sys.executable, str(ROOT / b.script), *b.args, "--out", str(out)]
    if smoke:
        argv.append("--smoke")
    elif b.name == "controlplane" and quick:
        argv += ["--sizes", "1000,10000"]
    print(f"== {b.name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, timeout=b.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {b.timeout_s} s"}
    took = time.monotonic() - started
    stem = b.smoke_stem if smoke else b.stem
    path = out / f"{stem}.json"
    if proc.returncode != 0 or not path.exists():
        return {"status": f"failed (exit {proc.returncode})", "seconds": took}
    return {"status": "ok", "seconds": took, "data": json.loads(path.read_text()),
            "md": f"{stem}.md"}


def earlier(b: Bench, out: Path, smoke: bool) -> dict[str, object]:
    stem = b.smoke_stem if smoke else b.stem
    path = out / f"{stem}.json"
    if not path.exists():
        return {"status": "no results"}
    return {"status": "ok (results of an earlier run)", "data": json.loads(path.read_text()),
            "md": f"{stem}.md"}


# Each summariser turns one benchmark's JSON into rows:
# (benchmark, figure, mcsproxy value, peer, peer value, mcsproxy / peer, better-when).

def dns_rows(d: dict) -> list[Row]:
    rows: list[Row] = []
    med, ratios = d["median"], d.get("ratio_mcsproxy_over", {})
    for peer, r in ratios.items():
        rows.append(("DNS", "A queries/s at saturation", med["mcsproxy"]["qps"], peer,
                     med[peer]["qps"], r["qps"], "higher"))
        rows.append(("DNS", "server CPU µs/query", med["mcsproxy"]["cpu_us_per_query"], peer,
                     med[peer]["cpu_us_per_query"], r["cpu_us_per_query"], "lower"))
    return rows


def tcp_rows(d: dict) -> list[Row]:
    s = d["summary"]
    rows: list[Row] = []
    for key, label, better in (("bulk1.gbit_s", "iperf3 1 stream Gbit/s", "higher"),
                               ("bulk8.gbit_s", "iperf3 8 streams Gbit/s", "higher"),
                               ("conn.conn_s", "new connections/s", "higher"),
                               ("conn.cpu_us_per_conn", "proxy CPU µs/connection", "lower"),
                               ("lat.p99_us", "p99 µs per connection", "lower")):
        if key not in s:
            continue
        v = s[key]
        rows.append(("TCP", label, v["mcsproxy"], "HAProxy tuned", v["haproxy-tuned"],
                     v["ratio_tuned"], better))
        rows.append(("TCP", label, v["mcsproxy"], "HAProxy", v["haproxy"], v["ratio_default"],
                     better))
        if v.get("ratio_bare") is not None:  # results from before that peer was measured
            rows.append(("TCP", label, v["mcsproxy"], "bare uvloop relay", v["bare"],
                         v["ratio_bare"], better))
    return rows


def http_rows(d: dict) -> list[Row]:
    s = d["summary"]
    rows: list[Row] = []
    for size in ("100B", "64KiB"):
        for field, label, better in (("req_s", "req/s", "higher"),
                                     ("cpu_us_per_req", "proxy CPU µs/req", "lower"),
                                     ("p99_us", "p99 µs", "lower")):
            v = s.get(f"{size}.{field}")
            if v is None:
                continue
            for peer, key in (("HAProxy", "haproxy"), ("nginx", "nginx"),
                              ("HAProxy + features", "haproxy-features"),
                              ("bare uvloop + httptools relay", "bare")):
                if key not in v:  # results from before that peer was measured
                    continue
                rows.append(("HTTP", f"{size} keep-alive {label}", v["mcsproxy"], peer, v[key],
                             v[f"ratio_{key.replace('-', '_')}"], better))
    return rows


SUMMARISERS: dict[str, Callable[[dict], list[Row]]] = {
    "dns": dns_rows, "tcp": tcp_rows, "http": http_rows}


def fmt(v: object, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def own_lines(name: str, d: dict) -> list[str]:
    """Benchmarks without a peer: our own budgets, quoted as figures."""
    if name == "snapshot":
        lazy = next(r for r in d["results"] if not r["eager"])
        return [f"- Snapshot swap, {lazy['services']:,} services / {lazy['endpoints']:,} "
                f"endpoints: build + swap {lazy['build_and_swap_s']:.2f} s, one-slice commit "
                f"{lazy['incremental_commit_ms']:.1f} ms, {lazy['bytes_per_endpoint']:.0f} "
                "B/endpoint (targets: < 2 s, < 1 KiB)."]
    if name == "controlplane":
        return [f"- Control plane, {r['services']:,} services: full reconcile "
                f"{r['full_reconcile_s']:.2f} s, one endpoint change reconciles "
                f"{r['keys_reconciled_per_change']:g} key, written p99 {r['written_p99_ms']} ms, "
                f"applied by a gateway p50/p99 {r['applied_p50_ms']} / {r['applied_p99_ms']} ms."
                for r in d["rows"]]
    if name == "kube-propagation":
        m = d.get("median", {})
        return [f"- Kubernetes-mode propagation ({d['rows'][0]['services']} services, "
                f"provider → consumer emulators): all consumers p50 "
                f"{fmt(m.get('all_consumers_p50_ms'))} ms, p99 "
                f"{fmt(m.get('all_consumers_p99_ms'))} ms, CPU "
                f"{fmt(m.get('cpu_ms_per_change'))} ms per change."]
    return []


def failover_lines(d: dict) -> list[str]:
    lines = ["| scenario | proxy | failed / requests | failed after fault | after "
             "connect timeout + 1 check | recovery s |", "|---|---|---|---|---|---|"]
    for r in d["results"]:
        rec = r["recovery_s"]
        lines.append(f"| {r['scenario']} | {r['target']} | {r['failed']} / {r['requests']} | "
                     f"{r['failed_after_fault']} | {r['failed_after_grace']} | "
                     f"{'not recovered' if rec is None else format(rec, '.2f')} |")
    for s, why in d.get("skipped", {}).items():
        lines.append(f"\n{s}: skipped ({why}).")
    return lines


def plot_ratios(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r[5] is not None]
    if not shown:
        return
    labels = [f"{r[0]} {r[1]} vs {r[3]}" for r in shown]
    # Plot "how many times better than the peer" so every bar reads the same way.
    values = [r[5] if r[6] == "higher" else 1 / r[5] for r in shown]  # type: ignore[operator]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1.2))
    ax.barh(range(len(shown)), values,
            color=["#55a868" if v >= 1 else "#c44e52" for v in values])
    ax.axvline(1, color="black", linewidth=1)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mcsproxy vs peer, >1 = mcsproxy better (throughput ratio, or inverse of "
                  "CPU/latency ratio)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_controlplane(d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = d["rows"]
    xs = [r["services"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, label in (("written_p99_ms", "written p99"), ("applied_p50_ms", "applied p50"),
                       ("applied_p99_ms", "applied by gateway p99")):
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("services (x 3 clusters x 10 endpoints)")
    ax.set_ylabel("ms per endpoint change")
    ax.legend(fontsize=8)
    ax.set_title("Control plane: one change, propagation latency by clusterset size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_summary(out: Path, runs: dict[str, dict[str, object]], smoke: bool, stamp: str,
                  quick: bool) -> Path:
    info = machine()
    versions = peer_versions()
    rows: list[Row] = []
    for name, summarise in SUMMARISERS.items():
        data = runs.get(name, {}).get("data")
        if data:
            rows += summarise(data)  # type: ignore[arg-type]
    title = f"{stamp}{'-smoke' if smoke else ''}"
    lines = [
        f"# mcsproxy benchmarks, {stamp}" + (" (SMOKE: not a measurement)" if smoke else ""),
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['arch']}), kernel "
        f"{info['kernel']}, Python {info['python']} + uvloop.",
        "Peers: " + "; ".join(f"{k}: {v}" for k, v in versions.items() if v) + ".",
        f"Pinning: load generators and backends on core {LOAD_CORE}, the server under test "
        f"alone on core {PROXY_CORE} (`taskset`), one worker/thread each; the control-plane "
        f"benchmarks run pinned to core {PROXY_CORE}. Ratios are mcsproxy ÷ peer per "
        "repetition, median of the repetitions; peers run alternating in the same minutes.",
        "",
        "| benchmark | figure | mcsproxy | peer | peer value | mcsproxy ÷ peer | better |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {f} | {fmt(m)} | {p} | {fmt(pv)} | {fmt(r)}x | {better} |"
              for b, f, m, p, pv, r, better in rows]
    ratios_png = f"{title}-ratios.png"
    plot_ratios(rows, out / ratios_png)
    if (out / ratios_png).exists():
        lines += ["", f"![ratios]({ratios_png})"]
    lines += ["", "## Own budgets (no peer)", ""]
    for name in ("snapshot", "controlplane", "kube-propagation"):
        data = runs.get(name, {}).get("data")
        if data:
            lines += own_lines(name, data)  # type: ignore[arg-type]
    cp = runs.get("controlplane", {}).get("data")
    if cp:
        plot_controlplane(cp, out / f"{title}-controlplane.png")  # type: ignore[arg-type]
        lines += ["", f"![control plane]({title}-controlplane.png)"]
        if quick:
            lines.append("(`--quick`: the 50k-service size was not run.)")
    fo = runs.get("failover", {}).get("data")
    if fo:
        lines += ["", "## Failover under steady locust load, vs HAProxy", ""]
        lines += failover_lines(fo)  # type: ignore[arg-type]
        stem = "failover-smoke" if smoke else "failover"
        for png in sorted(out.glob(f"{stem}-*.png")):
            dated = f"{title}-{png.name.removeprefix(stem + '-')}"
            shutil.copyfile(png, out / dated)
            lines += ["", f"![{png.stem}]({dated})"]
    lines += ["", "## Runs", ""]
    for name, r in runs.items():
        detail = f" (details: [{r['md']}]({r['md']}))" if r.get("md") else ""
        took = f", {r['seconds']:.0f} s" if "seconds" in r else ""
        lines.append(f"- {name}: {r['status']}{took}{detail}")
    md = out / f"{title}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{title}.json").write_text(json.dumps({
        "date": stamp, "smoke": smoke, "quick": quick, "machine": info, "versions": versions,
        "pinning": {"load": LOAD_CORE, "proxy": PROXY_CORE},
        "ratios": [dict(zip(("benchmark", "figure", "mcsproxy", "peer", "peer_value", "ratio",
                             "better"), r, strict=True)) for r in rows],
        "runs": {n: {k: v for k, v in r.items() if k != "data"} for n, r in runs.items()},
        "results": {n: r.get("data") for n, r in runs.items()},
    }, indent=1))
    print("\n".join(lines))
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="every benchmark in its smoke mode")
    ap.add_argument("--quick", action="store_true", help="skip the 50k-service control plane")
    ap.add_argument("--only", help="comma-separated: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--skip", default="", help="comma-separated names to leave out")
    ap.add_argument("--summary-only", action="store_true",
                    help="run nothing: rebuild the dated summary from the results in --out")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = {b.name for b in BENCHES}
    only = set(args.only.split(",")) if args.only else names
    skip = set(filter(None, args.skip.split(",")))
    unknown = (only | skip) - names
    if unknown:
        ap.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    chosen = [b for b in BENCHES if b.name in only - skip]
    if args.summary_only:
        runs = {b.name: earlier(b, args.out, args.smoke) for b in chosen}
    else:
        runs = {b.name: run_bench(b, args.out, args.smoke, args.quick) for b in chosen}
    write_summary(args.out, runs, args.smoke, stamp, args.quick)
    failed = [n for n, r in runs.items() if not str(r["status"]).startswith(("ok", "skipped"))]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
