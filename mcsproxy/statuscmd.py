"""`mcsproxy status [--admin URL]`: the status page as tables in the terminal.

Reads the admin listener's /api/status once (the same JSON the page polls) and prints
the gateway summary, one row per service port with a column per cluster, and the most
recent events.

Exit codes, so a script or a probe can act on it: 0 the gateway is ready, 1 its status
could not be read (refused, timed out, an HTTP error, not a gateway's answer), 2 a bad
flag (as every mcsproxy command), 3 read but not ready (no snapshot yet, or stopping):
what /readyz answers 503 for.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from mcsproxy.tokenfile import TokenFile

TIMEOUT_S = 5.0
EXIT_READY, EXIT_UNREADABLE, EXIT_NOT_READY = 0, 1, 3


def fetch_status(admin: str, token: TokenFile | None = None) -> dict[str, Any]:
    url = admin.rstrip("/") + "/api/status"
    headers = {"Authorization": token.authorization()} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
        return json.load(resp)  # type: ignore[no-any-return]


def cell_text(cell: dict[str, Any] | None) -> str:
    if not cell or not cell.get("endpoints"):
        return "-"
    text = f"{cell['healthy']}/{cell['endpoints']}"
    if cell.get("ejected"):
        text += f" ({cell['ejected']} ejected)"
    if "expected_share" in cell:
        text += f" {cell['expected_share']:g}%"
    if cell.get("active"):
        text += f" {cell['active']:g} open"
    total = cell.get("connections", 0) + cell.get("requests", 0)
    if total:
        text += f" {total:g} total"
    if cell.get("failed"):  # as the page shows them: every attempt failed, this cluster last
        text += f" {cell['failed']:g} failed"
    return text


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def render(status: dict[str, Any], events: int = 10) -> str:
    g = status["gateway"]
    local = g["cluster_id"]
    age = g.get("snapshot_age_s")
    lines = [
        f"gateway {local}: {'ready' if g['ready'] else 'NOT READY'}, snapshot "
        f"v{g['snapshot_version']}" + (f" ({age:.0f}s old)" if age is not None else "")
        + f", {g['services']} services, {g['active_connections']:g} open connections"
        + (f", {g['workers']} proxy processes" if g.get("workers", 1) > 1 else ""),
    ]
    if g.get("health_scope"):
        lines.append(g["health_scope"])
    for name, s in status["sources"].items():
        lines.append(f"source {name}: {'connected' if s['connected'] else 'DISCONNECTED'}, "
                     f"{'synced' if s['synced'] else 'not synced'}, {s['objects']} objects"
                     + (f", error: {s['error']}" if s.get("error") else ""))
    lines.append("")
    clusters = status["clusters"]
    header = ["SERVICE", "LOCALITY", *[c + (" (local)" if c == local else "")
                                       for c in clusters]]
    rows = [header]
    for svc in status["services"]:
        name = f"{svc['service']}:{svc['port']}/{svc['protocol']}"
        locality = "headless" if svc["headless"] else svc["locality"]
        if svc.get("panic"):
            locality += " PANIC"
        rows.append([name, locality, *[cell_text(svc["clusters"].get(c)) for c in clusters]])
    if len(rows) > 1:
        lines += table(rows)
        lines.append("cells: healthy/total endpoints, expected share of new connections, "
                     "open connections, connections (HTTP: requests) so far, failed "
                     "(every endpoint tried failed)")
    else:
        lines.append("no services")
    recent = status["events"][-events:] if events else []
    if recent:
        lines += ["", "RECENT EVENTS"]
        for e in recent:
            stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            lines.append(f"{stamp} {e['kind']:9} {e['subject']}: {e['text']}")
    return "\n".join(lines)


def run_status(admin: str, events: int = 10, raw: bool = False,
               token: TokenFile | None = None) -> int:
    """Print the status; the exit code says whether the gateway is ready (see above).
    `token`: the gateway's --admin-token-file, sent as a bearer token."""
    url = f"{admin.rstrip('/')}/api/status"
    try:
        status = fetch_status(admin, token)
    except urllib.error.HTTPError as exc:
        print(f"mcsproxy status: {admin} answered {exc.code}", file=sys.stderr)
        return EXIT_UNREADABLE
    except http.client.HTTPException as exc:  # BadStatusLine: that port does not speak HTTP
        first = " ".join(str(exc).split())[:80] or type(exc).__name__
        print(f"mcsproxy status: cannot read {url}: not an HTTP answer: {first}",
              file=sys.stderr)
        return EXIT_UNREADABLE
    except (OSError, ValueError) as exc:
        print(f"mcsproxy status: cannot read {url}: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        ready = status["gateway"]["ready"] is True
        text = json.dumps(status, indent=2) if raw else render(status, events)
    except (KeyError, TypeError, AttributeError, ValueError):
        # A traceback said nothing of the address: another service's JSON on that port.
        print(f"mcsproxy status: {url} is not a gateway's status (is {admin} the "
              "gateway's --admin-listen?)", file=sys.stderr)
        return EXIT_UNREADABLE
    print(text)
    return EXIT_READY if ready else EXIT_NOT_READY
