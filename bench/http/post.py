"""HTTP keep-alive POST with a short body: mcsproxy against HAProxy (and a revision before).

bench/http/run.py measures GET, whose request is a head alone. A request with a body
costs a proxy differently: the body comes in the read that brought its head (or after
it) and goes on to the endpoint with the head or after it. This runs wrk with a 100-byte
POST body (a JSON API call's size) against the peers run.py starts, with the same
pinning (load and nginx backend on core 0, the proxy alone on core 1), the peers
alternating, and counts the proxy's write system calls per request when `perf` can
(`perf stat -e syscalls:sys_enter_*`, one pass of its own before the timed ones).

    .venv/bin/python bench/http/post.py --reps 5 --baseline HEAD~1
    .venv/bin/python bench/http/post.py --chunked   # the body as one chunk and the last
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

run_mod = common.script_module("bench/http/run.py")

BODY_BYTES = 100
SYSCALLS = ("read", "write", "writev", "recvfrom", "sendto")
SCRIPT = f"""wrk.method = "POST"
wrk.body = string.rep("p", {BODY_BYTES})
wrk.headers["Content-Type"] = "application/json"
"""
# wrk adds Content-Length to any body it is given: a chunked request is written whole.
CHUNKED_SCRIPT = f"""local req = "POST /small HTTP/1.1\\r\\nHost: bench\\r\\n" ..
  "Content-Type: application/json\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n" ..
  "{BODY_BYTES:x}\\r\\n" .. string.rep("p", {BODY_BYTES}) .. "\\r\\n0\\r\\n\\r\\n"
request = function()
  return req
end
"""


def wrk_argv(ip: str, port: int, script: Path, seconds: float) -> list[str]:
    return ["taskset", "-c", run_mod.LOAD_CORE, "wrk", "-t1", f"-c{run_mod.WRK_CONNS}",
            f"-d{seconds:g}s", "-s", str(script), f"http://{ip}:{port}/small"]


def wrk_result(stdout: str) -> tuple[float, int]:
    """(requests per second, requests in all) from wrk's report; an error if any failed."""
    rate = re.search(r"Requests/sec:\s*([\d.]+)", stdout)
    total = re.search(r"(\d+) requests in ", stdout)
    if rate is None or total is None or "Non-2xx" in stdout or "Socket errors" in stdout:
        raise RuntimeError(f"wrk: {stdout[-500:]}")
    return float(rate.group(1)), int(total.group(1))


def wrk_post(ip: str, port: int, script: Path, seconds: float) -> float:
    out = subprocess.run(wrk_argv(ip, port, script, seconds), capture_output=True, text=True,
                         timeout=seconds + 30, check=True)
    return wrk_result(out.stdout)[0]


def syscalls_per_request(pid: int, ip: str, port: int, script: Path,
                         seconds: float) -> dict[str, float] | None:
    """The proxy's socket calls per request under wrk, by perf's tracepoints (None: no perf).

    wrk runs as perf's workload, so perf counts the proxy exactly while wrk runs, its
    counters set up before wrk starts: a perf attached beside wrk missed the first 0.7 s
    of a 1 s run on a loaded machine (1.14 reads per request counted instead of 2)."""
    if shutil.which("perf") is None:
        return None
    events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
    out = subprocess.run(["perf", "stat", "-x,", "-e", events, "-p", str(pid), "--",
                          *wrk_argv(ip, port, script, seconds)],
                         capture_output=True, text=True, timeout=seconds + 60, check=True)
    requests = wrk_result(out.stdout)[1]
    counts: dict[str, float] = {}
    for line in out.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2].rsplit("_", 1)[-1]] = int(fields[0]) / requests
    return counts or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--baseline", metavar="REV", help="also run mcsproxy at this revision")
    ap.add_argument("--chunked", action="store_true",
                    help="the body chunked (one chunk and the last) instead of Content-Length")
    ap.add_argument("--smoke", action="store_true", help="one short repetition")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    reps, secs = (1, 1.0) if args.smoke else (args.reps, args.seconds)
    procs = common.Procs()
    with tempfile.TemporaryDirectory(prefix="mcsbench-post-") as d:
        run = Path(d)
        script = run / "post.lua"
        script.write_text(CHUNKED_SCRIPT if args.chunked else SCRIPT)
        try:
            targets = run_mod.start_all(procs, run, baseline=args.baseline)
            results = measure(targets, script, reps, secs)
        finally:
            procs.stop()
    results["chunked"] = args.chunked
    results["baseline"] = args.baseline
    write(Path(args.out), results, args.smoke, reps, secs)
    return 0


def measure(targets: dict[str, dict[str, object]], script: Path, reps: int,
            secs: float) -> dict[str, object]:
    names = [n for n in ("mcsproxy", "baseline", "haproxy", "bare") if n in targets]
    syscalls = {n: syscalls_per_request(int(targets[n]["pid"]), str(targets[n]["ip"]),  # type: ignore[call-overload]
                                        int(targets[n]["port"]), script, secs)  # type: ignore[call-overload]
                for n in names}
    runs: list[dict[str, dict[str, float | None]]] = []
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        row: dict[str, dict[str, float | None]] = {}
        for name in order:
            t = targets[name]
            meter = common.CpuMeter(t["pid"])  # type: ignore[arg-type]
            rate = wrk_post(str(t["ip"]), int(t["port"]), script, secs)  # type: ignore[call-overload]
            spent = meter.per_unit(rate * secs)
            row[name] = {"req_s": rate, "cpu_us_per_req": spent["cpu"],
                         "user_us_per_req": spent["user"], "sys_us_per_req": spent["sys"]}
        runs.append(row)
        print(f"rep {rep + 1}/{reps}: " + ", ".join(
            f"{k}={v['req_s']:.0f}" for k, v in row.items()), file=sys.stderr)
    return {"runs": runs, "targets": names, "syscalls_per_req": syscalls,
            "body_bytes": BODY_BYTES, "data_path": common.data_path()}


def write(out: Path, results: dict[str, object], smoke: bool, reps: int, secs: float) -> None:
    runs: list[dict[str, object]] = results["runs"]  # type: ignore[assignment]
    names: list[str] = results["targets"]  # type: ignore[assignment]
    syscalls: dict[str, dict[str, float] | None] = results["syscalls_per_req"]  # type: ignore[assignment]
    label = {"mcsproxy": "mcsproxy", "baseline": "before", "haproxy": "HAProxy",
             "bare": "bare relay"}
    chunked = bool(results.get("chunked"))
    framing = "chunked (one chunk, then the last)" if chunked else "with Content-Length"
    lines = [
        f"# HTTP keep-alive POST, 100-byte body {framing}",
        "",
        f"wrk (1 thread, {run_mod.WRK_CONNS} keep-alive connections, POST /small with a "
        f"{results['body_bytes']}-byte body {framing}) and the nginx backend on core "
        f"{run_mod.LOAD_CORE}; "
        f"the proxy under test alone on core {run_mod.PROXY_CORE}, one worker. {reps} repetitions "
        f"of {secs:g} s, peers alternating; medians, ratios per repetition (lowest-highest). "
        f"mcsproxy's data path {results['data_path']}, every feature on as in http.md."
        + (f" The column before is mcsproxy at git revision {results['baseline']}, the same "
           "flags, in the same repetitions." if results.get("baseline") else ""),
        "",
        "| figure | " + " | ".join(label[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for field, title in (("req_s", "req/s"), ("cpu_us_per_req", "proxy CPU µs/req"),
                         ("user_us_per_req", "of which its own (user)"),
                         ("sys_us_per_req", "of which the kernel's (system)")):
        cells = [f"{common.median(runs, n, field):.4g}" for n in names]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for call in SYSCALLS:
        if any(s and s.get(call) for s in syscalls.values()):
            cells = [f"{s[call]:.2f}" if s and call in s else "—" for s in
                     (syscalls[n] for n in names)]
            lines.append(f"| {call} calls per request (perf) | " + " | ".join(cells) + " |")
    lines.append("")
    for other in names[1:]:
        rate = common.change_ratio(runs, "mcsproxy", other, "req_s", "req/s")
        cpu = common.change_ratio(runs, "mcsproxy", other, "cpu_us_per_req", "CPU per request")
        lines.append(f"mcsproxy / {label[other]}: {rate}, {cpu}.")
    out.mkdir(parents=True, exist_ok=True)
    stem = ("http-post-chunked" if chunked else "http-post") + ("-smoke" if smoke else "")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
