"""The status page in headless Chromium, driven over the DevTools protocol (aiohttp's
websocket client; no browser-automation package): the services appear, a stopped
backend turns its cell red without a reload, and a screenshot is kept in tests/artifacts.

Needs Debian's `chromium` (apt-get install -y chromium); skipped when it is absent.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout

from mcsproxy.config import HealthConfig
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_metrics_support import service_yaml, start_gateway

HOST = "127.57.19.1"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,860",
         "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1")
DEADLINE_S = 15.0

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (apt-get install chromium)")


class Browser:
    """One headless Chromium and a DevTools session on its first page."""

    def __init__(self, proc: asyncio.subprocess.Process, http: ClientSession,
                 ws: Any) -> None:
        self.proc = proc
        self.http = http
        self.ws = ws
        self._ids = itertools.count(1)

    @classmethod
    async def launch(cls, profile: Path) -> Browser:
        assert CHROMIUM is not None
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        http = ClientSession(timeout=ClientTimeout(total=5))
        try:
            port_file = profile / "DevToolsActivePort"
            async with asyncio.timeout(DEADLINE_S):
                while not port_file.exists() or not port_file.read_text().strip():
                    assert proc.returncode is None, "chromium exited at start"
                    await asyncio.sleep(0.05)
                port = int(port_file.read_text().split()[0])
                while True:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                        pages = [t for t in await resp.json() if t["type"] == "page"]
                    if pages:
                        break
                    await asyncio.sleep(0.05)
            ws = await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await http.close()
            proc.kill()
            await proc.wait()
            raise
        return cls(proc, http, ws)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        async with asyncio.timeout(DEADLINE_S):
            while True:
                msg = json.loads((await self.ws.receive()).data)
                if msg.get("id") == msg_id:
                    assert "error" not in msg, msg
                    return msg["result"]  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + DEADLINE_S
        while not (value := await self.evaluate(expression)):
            assert time.monotonic() < deadline, f"page never showed {what}"
            await asyncio.sleep(0.1)
        return value

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def cell_state(service: str, cluster: str) -> str:
    return (f"document.querySelector('td.cell[data-service=\"{service}\"]"
            f"[data-cluster=\"{cluster}\"]')?.dataset.state")


async def test_status_page_shows_services_and_health_changes_live(tmp_path: Path) -> None:
    east = await Backend("east-1", "127.57.11.1", free_port("127.57.11.1"), "east").start()
    west = await Backend("west-1", "127.57.12.1", free_port("127.57.12.1"), "west").start()
    west2 = await Backend("west-2", "127.57.12.2", free_port("127.57.12.2"), "west").start()
    files = {
        "web": service_yaml("web", "127.240.57.11", [east, west], traffic="PreferClose"),
        "echo": service_yaml("echo", "127.240.57.12", [east, west, west2], port_name="echo",
                             port=7),
    }
    gw = await start_gateway(tmp_path, HOST, files=files,
                             health=HealthConfig(interval_s=0.2, timeout_s=0.2,
                                                 healthy_threshold=1, unhealthy_threshold=1))
    browser = await Browser.launch(tmp_path / "chromium-profile")
    try:
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=gw.admin + "/")
        await browser.wait_for(cell_state("test/web", "west") + " === 'healthy'",
                               "test/web healthy in west")
        text = await browser.evaluate("document.body.innerText")
        assert "test/web:web/TCP" in text and "test/echo:echo/TCP" in text
        assert "local-first" in text and "ready" in text
        headers = await browser.evaluate(
            "[...document.querySelectorAll('thead th')].map(th => th.dataset.cluster || '')")
        assert headers == ["", "east", "west"]  # the local cluster first

        # Traffic through the echo service shows up as a live split on the next refresh.
        for _ in range(9):
            await ask("127.240.57.12", 7)
        live = await browser.wait_for(
            "[...document.querySelectorAll('td.cell[data-service=\"test/echo\"] .nums')]"
            ".map(n => n.innerText).filter(t => t.includes('live')).join(' | ')",
            "a live split for test/echo")
        assert "live" in live

        # A backend stops: active checks mark it down and the page follows without a reload.
        refreshes = int(await browser.evaluate(
            "document.getElementById('updated').dataset.refreshes"))
        await west.stop()
        await browser.wait_for(cell_state("test/web", "west") + " === 'down'",
                               "test/web down in west")
        await browser.wait_for(cell_state("test/echo", "west") + " === 'degraded'",
                               "test/echo degraded in west")
        assert int(await browser.evaluate(
            "document.getElementById('updated').dataset.refreshes")) > refreshes
        events = await browser.evaluate("document.getElementById('events').innerText")
        assert "unhealthy (active check" in events
        assert await browser.evaluate(cell_state("test/web", "east")) == "healthy"
        await browser.screenshot(ARTIFACTS / "status_page.png")
    finally:
        await browser.close()
        await gw.stop()
        for b in (east, west, west2):
            await b.stop()


async def test_demo_buttons_work_and_another_sites_page_cannot_press_them(
        tmp_path: Path) -> None:
    """In a real browser: a page of another origin POSTs kill to the admin's demo relay and
    to the demo's control API (fetch in no-cors mode: no preflight, the browser sends it)
    and, before the Origin check, killed both clusters; now both answer 403 and nothing
    changes. The status page's own button (same origin) still kills and restores."""
    from aiohttp import web

    from mcsproxy.demo.runner import Demo

    ctl_host, gw_host, other_host = "127.76.5.1", "127.76.5.2", "127.76.5.3"
    demo = Demo(tmp_path / "demo")
    runners = [web.AppRunner(demo.control_app())]
    await runners[0].setup()
    ctl_port = free_port(ctl_host)
    await web.TCPSite(runners[0], ctl_host, ctl_port).start()
    control = f"http://{ctl_host}:{ctl_port}"
    gw = await start_gateway(tmp_path, gw_host, demo_control=control)

    async def other_page(request: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=f"""<script>
Promise.allSettled([
  fetch("{gw.admin}/demo/clusters/east/kill", {{method: "POST", mode: "no-cors"}}),
  fetch("{control}/clusters/west/kill", {{method: "POST", mode: "no-cors"}}),
]).then(() => {{ document.title = "sent"; }});
</script>""")

    other = web.Application()
    other.router.add_get("/", other_page)
    runners.append(web.AppRunner(other))
    await runners[1].setup()
    other_port = free_port(other_host)
    await web.TCPSite(runners[1], other_host, other_port).start()
    browser = await Browser.launch(tmp_path / "chromium-profile")
    try:
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=f"http://{other_host}:{other_port}/")
        await browser.wait_for("document.title === 'sent'", "the other site's requests sent")
        assert demo.backends.killed == set()

        await browser.call("Page.navigate", url=gw.admin + "/")
        east_button = "document.querySelector('#demo-clusters button[data-cluster=\"east\"]')"
        await browser.wait_for(f"{east_button}?.innerText === 'kill'", "the kill button")
        await browser.evaluate(f"{east_button}.click()")
        await browser.wait_for(f"{east_button}?.innerText === 'restore'", "east killed")
        assert demo.backends.killed == {"east"}
        await browser.evaluate(f"{east_button}.click()")
        await browser.wait_for(f"{east_button}?.innerText === 'kill'", "east restored")
        assert demo.backends.killed == set()
    finally:
        await browser.close()
        await gw.stop()
        for runner in runners:
            await runner.cleanup()
        await demo.backends.stop()  # restored east's pods hold the demo's fixed addresses
