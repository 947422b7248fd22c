"""The controller's /metrics and status page: exports per member, conflicts by reason,
propagation latency, and the page at / (loaded in headless Chromium when present)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import yaml
from aiohttp import ClientSession, ClientTimeout

from controlplane.command import ControllerConfig, DirectoryControllerApp
from controlplane.metrics import ControllerMetrics
from tests.kube_auth_support import write_atomically
from tests.proxy_fixtures import free_port
from tests.test_metrics_support import parse_metrics, value
from tests.test_reconcile_support import eslice, export, namespace, service
from tests.test_status_page import ARTIFACTS, CHROMIUM, Browser

HOST = "127.57.59.1"


def write(path: Path, *docs: dict) -> None:
    """Replaced whole, as a ConfigMap volume is: the controller polls every 50 ms and
    could otherwise read the file truncated mid-write (east with no export, so no
    PortConflict in that reconcile) and the test would assert on that state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, yaml.safe_dump_all(docs, sort_keys=False))


async def test_controller_metrics_status_and_page(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    write(clusters / "east" / "web.yaml", namespace(), service(),
          eslice("web-x", ["127.0.1.1"]), export(created="2024-01-01T00:00:00Z"))
    # West exports the same service with another port: a PortConflict (oldest wins).
    write(clusters / "west" / "web.yaml", namespace(),
          service(ports=(("http", "TCP", 81),)), eslice("web-y", ["127.0.2.1"]),
          export(created="2024-02-01T00:00:00Z"))
    write(clusters / "south" / "ns.yaml", namespace())
    listen = (HOST, free_port(HOST))
    app = DirectoryControllerApp(ControllerConfig(clusters, out, serve=listen,
                                                  poll_interval_s=0.05))
    await app.start()
    task = asyncio.create_task(app.serve())
    base = f"http://{HOST}:{listen[1]}"
    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with http.get(base + "/status") as resp:
                        if resp.status == 200:
                            status = await resp.json()
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # A change propagates: one more endpoint in east.
            write(clusters / "east" / "web.yaml", namespace(), service(),
                  eslice("web-x", ["127.0.1.1", "127.0.1.2"]), export())
            deadline = time.monotonic() + 10
            while True:
                async with http.get(base + "/metrics") as resp:
                    m = parse_metrics(await resp.text())
                if value(m, "mcsproxy_controller_propagation_seconds_count", stage="written"):
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            async with http.get(base + "/status") as resp:
                status = await resp.json()
            async with http.get(base + "/") as resp:
                assert resp.status == 200 and "mcsproxy controller" in await resp.text()
        assert value(m, "mcsproxy_controller_conflicts", reason="PortConflict") == 1
        assert value(m, "mcsproxy_controller_exports", cluster="east") == 1
        assert value(m, "mcsproxy_controller_exports", cluster="south") == 0
        assert value(m, "mcsproxy_controller_member_connected", cluster="west") == 1
        assert value(m, "mcsproxy_controller_reconcile_seconds_count") >= 1
        assert status["exports"] == {"east": ["test/web"], "south": [], "west": ["test/web"]}
        assert [(c["service"], c["reasons"]) for c in status["conflicts"]] == [
            ("test/web", ["PortConflict"])]
        written = status["propagation"]["written"]
        assert written["count"] >= 1 and written["p99_s"] is not None

        if CHROMIUM is not None:
            browser = await Browser.launch(tmp_path / "chromium-profile")
            try:
                await browser.call("Page.navigate", url=base + "/")
                rows = await browser.wait_for(
                    "[...document.querySelectorAll('#members tbody tr')]"
                    ".map(r => r.dataset.cluster).join(',')", "member rows")
                assert rows == "east,south,west"
                text = await browser.evaluate("document.body.innerText")
                assert "PortConflict" in text and "all members answering" in text
                await browser.screenshot(ARTIFACTS / "controller_page.png")
            finally:
                await browser.close()
    finally:
        app.stop()
        await task


def test_controller_and_gateway_expose_no_created_series(tmp_path: Path) -> None:
    """The controller's /metrics had a `<name>_created` gauge beside every counter and
    histogram (22 series, prometheus_client's default) that the gateway's never had.
    Real processes: the switch is per process, so this one's state cannot hide it."""
    import subprocess
    import sys
    import urllib.request

    from tests.dns_support import EXAMPLES

    serve, admin = free_port(HOST), free_port(HOST)
    procs = [
        subprocess.Popen([sys.executable, "-m", "mcsproxy", "controller", "--clusters-dir",
                          str(EXAMPLES.parent / "clusters"), "--output-dir", str(tmp_path),
                          "--serve", f"{HOST}:{serve}", "--log-level", "warning"]),
        subprocess.Popen([sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id",
                          "cluster-a", "--source", f"controlplane:http://{HOST}:{serve}",
                          "--dns-listen", f"{HOST}:0", "--admin-listen", f"{HOST}:{admin}",
                          "--log-level", "warning"]),
    ]

    def scrape(port: int, family: str) -> str:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
                if family in text:
                    return text
            except OSError:
                pass
            assert all(p.poll() is None for p in procs), "a process exited"
            assert time.monotonic() < deadline, f"no {family} on :{port}"
            time.sleep(0.1)

    try:
        controller = scrape(serve, "mcsproxy_controller_propagation_seconds_count")
        # The controlplane source's own families too: never rendered before.
        gateway = scrape(admin, "mcsproxy_source_controlplane_propagation_seconds_count")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
    for text in (controller, gateway):
        created = [line for line in text.splitlines() if "_created" in line]
        assert created == [], created[:3]
    assert "mcsproxy_controller_services_reconciled_total" in controller  # counters remain


def test_a_propagation_past_the_last_bucket_is_valid_json() -> None:
    """A change written 11 s after it was seen fell in the +Inf bucket, and /status wrote
    it as a bare Infinity, which no JSON parser takes: the page failed on every refresh."""
    metrics = ControllerMetrics()
    metrics.propagation.labels("written").observe(0.002)
    metrics.propagation.labels("written").observe(11.0)
    summary = metrics.propagation_summary()
    assert summary["written"] == {"count": 2.0, "p50_s": 0.0025, "p99_s": None,
                                  "p99_above_s": 10.0}
    json.dumps(summary, allow_nan=False)


async def test_a_rejected_member_file_sets_the_input_error_gauge(tmp_path: Path) -> None:
    """A member file rejected whole keeps every object as it was, so the change carried
    nothing the controller was told of: mcsproxy_controller_member_input_error never got
    a series (nor the stream's members message the error)."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    write(clusters / "east" / "web.yaml", namespace(), service(),
          eslice("web-x", ["127.0.1.1"]), export())
    app = DirectoryControllerApp(ControllerConfig(clusters, out, poll_interval_s=0.05))
    await app.start()
    task = asyncio.create_task(app.serve())
    registry = app.metrics.registry

    async def input_error(want: float) -> None:
        deadline = time.monotonic() + 10
        while registry.get_sample_value("mcsproxy_controller_member_input_error",
                                        {"cluster": "east"}) != want:
            assert time.monotonic() < deadline, f"input error never {want}"
            await asyncio.sleep(0.05)

    try:
        await input_error(0)
        write_atomically(clusters / "east" / "bad.yaml", "kind: [\n")
        await input_error(1)
        assert app.controller is not None
        assert "bad.yaml" in app.controller.members()["east"]["error"]
        (clusters / "east" / "bad.yaml").unlink()
        await input_error(0)
    finally:
        app.stop()
        await task
