"""deploy/grafana/mcsproxy-dashboard.json parses, and every metric it queries is in the
gateway's or the controller's exposition after real traffic (no dashboard panel that
can only ever say "no data" because of a renamed metric); every query, evaluated
against that scrape, returns series carrying the labels its legend shows, and the
per-cluster panels show every cluster that carried traffic, TCP or HTTP."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import yaml
from aiohttp import ClientSession, ClientTimeout

from controlplane.command import ControllerConfig, DirectoryControllerApp
from tests.dns_support import make_query, udp_exchange
from tests.http_support import HttpBackend, RawClient
from tests.promql_support import evaluate
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import parse_metrics, service_yaml, start_gateway
from tests.test_reconcile_support import eslice, export, namespace, service

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / \
    "mcsproxy-dashboard.json"
HOST = "127.57.69.1"
METRIC_RE = re.compile(r"\b(mcsproxy_[a-z0-9_]+)")


def declared(exposition: str) -> set[str]:
    """Sample names a query may use: every family's, histogram parts included."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query."""
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"], t.get("legendFormat", ""))
            for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "service"}
    exprs = []
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


async def test_every_dashboard_metric_is_exposed(tmp_path: Path) -> None:
    exprs = dashboard_queries()
    wanted = {m for e in exprs for m in METRIC_RE.findall(e)}
    assert len(wanted) > 25

    # A TCP service only west serves, an HTTP one only east serves: each cluster is in
    # one protocol's counters only.
    west = await Backend("west-1", "127.57.61.1", free_port("127.57.61.1"), "west").start()
    east = await HttpBackend("east-1", "127.57.62.1", "east").start()
    gw = await start_gateway(tmp_path, HOST, access_log=str(tmp_path / "access.log"),
                             files={"db": service_yaml("db", "127.240.57.61", [west]),
                                    "web": service_yaml("web", "127.240.57.62", [east],
                                                        app_protocol="http")})
    clusters = tmp_path / "clusters"
    (clusters / "east").mkdir(parents=True)
    (clusters / "east" / "web.yaml").write_text(yaml.safe_dump_all(
        [namespace(), service(), eslice("web-x", ["127.0.1.1"]), export()]))
    listen = (HOST, free_port(HOST))
    app = DirectoryControllerApp(ControllerConfig(clusters, tmp_path / "out", serve=listen))
    await app.start()
    task = asyncio.create_task(app.serve())
    try:
        await ask("127.240.57.61", 80)
        client = await RawClient.open("127.240.57.62", 80)
        assert (await client.get("/")).status == 200
        await client.close()
        client = await RawClient.open("127.240.57.62", 80)  # refused before a service
        assert (await client.get("/", host="h:65536")).status == 400
        await client.close()
        await udp_exchange(gw.dns, make_query("db.test.svc.clusterset.local"))
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:
            async with http.get(gw.admin + "/metrics") as resp:
                text = await resp.text()
                exposed = declared(text)
            async with asyncio.timeout(10):
                while True:
                    try:
                        async with http.get(f"http://{HOST}:{listen[1]}/metrics") as resp:
                            controller = await resp.text()
                            exposed |= declared(controller)
                            text += controller
                            break
                    except OSError:
                        await asyncio.sleep(0.05)
    finally:
        app.stop()
        await task
        await gw.stop()
        await east.stop()
        await west.stop()
    assert sorted(wanted - exposed) == []

    samples = parse_metrics(text)
    for title, expr, legend in dashboard_targets():
        result = evaluate(expr, samples)
        # Series made by the first conflict or failed write only.
        assert result or title in ("Conflicts by reason", "Write errors"), \
            f"{title}: {expr} returns nothing"
        shown = set(re.findall(r"\{\{(\w+)\}\}", legend))
        for series in result:
            assert shown <= {k for k, _ in series}, f"{title}: {expr} has no {shown}"
        # HTTP-only queries show east alone, the controller's clusters are members.
        if "by (cluster" in expr and re.search(r"mcsproxy_(proxy|upstream)_", expr):
            clusters = {dict(s).get("cluster") for s in result}
            assert {"east", "west"} <= clusters, f"{title}: {expr} shows only {clusters}"


# Gauges every gateway (one per node with the DaemonSet) or controller replica reports
# for the same clusterset-wide state: summed across the scrape targets they count that
# state once per gateway. "Endpoints by state" summed them and showed, with 3 gateways,
# 3 times the endpoints each cluster has.
REPLICATED_GAUGES = {
    "mcsproxy_upstream_endpoints",
    "mcsproxy_upstream_expected_share_percent",
    "mcsproxy_upstream_priority_load_percent",
    "mcsproxy_upstream_panic",
    "mcsproxy_snapshot_version",
    "mcsproxy_snapshot_age_seconds",
    "mcsproxy_source_connected",
    "mcsproxy_source_synced",
    "mcsproxy_gateway_ready",
    "mcsproxy_controller_member_connected",
    "mcsproxy_controller_conflicts",
    "mcsproxy_controller_exports",
}
AGGREGATION_RE = re.compile(r"\b(sum|avg|min|max)(?: by \(([^)]*)\))? \(\s*(mcsproxy_\w+)")


def test_state_every_gateway_reports_is_not_summed_across_gateways() -> None:
    seen = set()
    for title, expr, _ in dashboard_targets():
        for op, by, metric in AGGREGATION_RE.findall(expr):
            if metric not in REPLICATED_GAUGES:
                continue
            seen.add(metric)
            labels = {label.strip() for label in by.split(",")}
            assert op != "sum" or "instance" in labels, (
                f"{title}: {expr} adds up {metric} of every gateway; sum per instance first, "
                "then avg/min/max across them"
            )
    assert "mcsproxy_upstream_endpoints" in seen
