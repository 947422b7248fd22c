"""Runs the demo: backends in-process; controller and one gateway per cluster as children.

The controller and gateways are the real `mcsproxy` commands, started as subprocesses, so
the demo exercises exactly what a user deploys. A small control API on 127.0.0.1:9900
lets `mcsproxy demo kill|restore CLUSTER` (or a status page button) stop a cluster's
backends from another shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout, web

from mcsproxy.demo.backends import Backends
from mcsproxy.demo.clusterset import (
    CLUSTERS,
    CLUSTERSET_CIDR,
    CONTROL_URL,
    NAMESPACE,
    SERVICES,
    UNPRIVILEGED_PORT_OFFSET,
    DemoCluster,
    cluster_manifests,
)
from mcsproxy.demo.load import LoadGenerator
from mcsproxy.proxy.workers import WORKER_MAIN
from mcsproxy.tasks import cancel_and_wait, spawn
from mcsproxy.webguard import harden_for_browsers, refuse_cross_site

log = logging.getLogger("mcsproxy.demo")

START_DEADLINE_S = 15.0
STOP_GRACE_S = 5.0
# The gateways' --drain-timeout: open client connections must not outlast STOP_GRACE_S,
# or Ctrl-C waits for it and then kills the gateway anyway.
DRAIN_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 20  # of a failed child's log, in the start-up error


class DemoError(RuntimeError):
    pass


def can_bind_low_ports() -> bool:
    """Whether this process may bind the services' ports below 1024 (root,
    CAP_NET_BIND_SERVICE, a lowered net.ipv4.ip_unprivileged_port_start): trying is the
    one check that covers them all."""
    # An address of the clusterset range that no cluster's ClusterSetIPs come from.
    probe = str(ipaddress.ip_network(CLUSTERSET_CIDR)[1])
    for port in sorted({svc.port for svc in SERVICES if svc.port < 1024}):
        with socket.socket() as sock:
            try:
                sock.bind((probe, port))
            except PermissionError:
                return False
            except OSError:
                pass  # in use: the kernel checks the permission first, so it was granted
    return True


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children
            )
        finally:
            out.close()

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await proc.wait()
        except TimeoutError:
            log.warning("%s did not stop within %.0fs: killing it", self.name, STOP_GRACE_S)
            proc.kill()
            await proc.wait()


@dataclass
class Demo:
    workdir: Path
    with_load: bool = False
    low_ports: bool = True  # whether services may listen below 1024
    backends: Backends = field(default_factory=Backends)
    children: list[Child] = field(default_factory=list)
    imports: dict[str, dict[str, Any]] = field(default_factory=dict)  # cluster → svc → import
    load: LoadGenerator | None = None
    started_in_s: float = 0.0
    _runner: web.AppRunner | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def clusters_dir(self) -> Path:
        return self.workdir / "clusters"

    @property
    def output_dir(self) -> Path:
        return self.workdir / "out"

    def write_manifests(self) -> None:
        for c in CLUSTERS:
            folder = self.clusters_dir / c.name
            folder.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump_all(cluster_manifests(c, self.low_ports), sort_keys=False)
            (folder / "objects.yaml").write_text(text)

    def _mcsproxy(self, *args: str) -> list[str]:
        # Run through the gateway workers' entry, which asks for SIGTERM when this process
        # dies: a demo killed without a chance to stop its children (SIGKILL, OOM) must
        # not leave them holding its ports, or the next `mcsproxy demo` cannot start.
        return [sys.executable, "-c", WORKER_MAIN, str(os.getpid()), *args]

    async def start(self) -> None:
        started = time.monotonic()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.low_ports = can_bind_low_ports()
        self.write_manifests()
        await self.backends.start()
        controller = Child(
            "controller",
            self._mcsproxy("controller", "--clusters-dir", str(self.clusters_dir),
                           "--output-dir", str(self.output_dir),
                           "--clusterset-cidr", CLUSTERSET_CIDR,
                           *(f"--cluster-cidr={c.name}={c.clusterset_cidr}" for c in CLUSTERS)),
            self.workdir / "logs" / "controller.log",
        )
        await controller.start()
        self.children.append(controller)
        await self._wait_for_imports()
        for c in CLUSTERS:
            gateway = Child(
                f"gateway-{c.name}",
                self._mcsproxy("gateway", "--cluster-id", c.name,
                               "--source", f"file:{self.output_dir / c.name}",
                               "--dns-listen", c.dns_listen,
                               "--admin-listen", c.admin_listen,
                               # Quick health checks and short ejections make a kill and a
                               # restore visible within seconds.
                               "--health-interval", "1", "--health-timeout", "0.5",
                               "--outlier-base-ejection", "3",
                               "--drain-timeout", str(DRAIN_TIMEOUT_S),
                               # The status page shows kill/restore buttons for this API.
                               "--demo-control", CONTROL_URL),
                self.workdir / "logs" / f"gateway-{c.name}.log",
            )
            await gateway.start()
            self.children.append(gateway)
        await self._wait_for_gateways()
        await self._wait_for_listeners()
        await self._start_control_api()
        if self.with_load:
            self.load = LoadGenerator(self.imports)
            self._tasks.append(spawn(self.load.run(), name="demo load"))
        self.started_in_s = time.monotonic() - started

    async def _wait_for_imports(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            self._check_children()
            self.imports = {c.name: self._read_imports(c) for c in CLUSTERS}
            if all(len(v) == len(SERVICES) for v in self.imports.values()):
                return
            await asyncio.sleep(0.1)
        raise DemoError(f"the controller wrote no imports in {START_DEADLINE_S:.0f}s; "
                        + log_tail(self.workdir / "logs" / "controller.log"))

    def _read_imports(self, c: DemoCluster) -> dict[str, Any]:
        found: dict[str, Any] = {}
        folder = self.output_dir / c.name
        if not folder.is_dir():
            return found
        for path in folder.glob("*.y*ml"):
            with contextlib.suppress(OSError, yaml.YAMLError):
                for doc in yaml.safe_load_all(path.read_text()):
                    if isinstance(doc, dict) and doc.get("kind") == "ServiceImport":
                        found[doc["metadata"]["name"]] = doc
        return found

    async def _wait_for_gateways(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        pending = {c.name: c for c in CLUSTERS}
        async with ClientSession(timeout=ClientTimeout(total=1)) as http:
            while pending and time.monotonic() < deadline:
                self._check_children()
                for name, c in list(pending.items()):
                    with contextlib.suppress(OSError, asyncio.TimeoutError):
                        async with http.get(f"{c.admin_url}readyz") as resp:
                            if resp.status == 200:
                                del pending[name]
                if pending:
                    await asyncio.sleep(0.1)
        if pending:
            raise DemoError(f"gateways not ready in {START_DEADLINE_S:.0f}s: "
                            f"{', '.join(pending)}; " + "\n".join(
                                log_tail(self.workdir / "logs" / f"gateway-{name}.log")
                                for name in pending))

    async def _wait_for_listeners(self) -> None:
        """Every ClusterSetIP accepts connections. A gateway is ready even when one of its
        listeners failed to bind; the banner must not print commands that cannot work."""
        deadline = time.monotonic() + START_DEADLINE_S
        pending = [
            (c.name, f"{NAMESPACE}/{name}", ip, port["port"])
            for c in CLUSTERS
            for name, imp in self.imports[c.name].items()
            for ip in imp["spec"].get("ips", [])
            for port in imp["spec"].get("ports", [])
            if port.get("protocol", "TCP") == "TCP"
        ]
        while pending:
            self._check_children()
            cluster, svc, ip, port = pending[0]
            try:
                async with asyncio.timeout(1):
                    _, writer = await asyncio.open_connection(ip, port)
            except (OSError, TimeoutError) as exc:
                log_path = self.workdir / "logs" / f"gateway-{cluster}.log"
                # The gateway logs why a listener failed and carries on without it.
                if reason := _listen_error(log_path, ip, port):
                    raise DemoError(f"gateway-{cluster} cannot listen on {ip}:{port} "
                                    f"({svc}): {reason}; see {log_path}") from None
                if time.monotonic() >= deadline:
                    raise DemoError(f"gateway-{cluster} does not accept connections on "
                                    f"{ip}:{port} ({svc}): {exc or 'timed out'}") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            pending.pop(0)

    def _check_children(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is not None:
                raise DemoError(f"{child.name} exited with {child.proc.returncode}; "
                                + log_tail(child.log_path))

    # -- control API -----------------------------------------------------------------
    def control_app(self) -> web.Application:
        # On loopback, but any page open in the user's browser could POST a kill here.
        app = harden_for_browsers(web.Application(middlewares=[refuse_cross_site]))
        app.router.add_get("/clusters", self._list_clusters)
        app.router.add_post("/clusters/{name}/{action:kill|restore}", self._cluster_action)
        return app

    async def _start_control_api(self) -> None:
        self._runner = web.AppRunner(self.control_app(), access_log=None,
                                     handle_signals=False)
        await self._runner.setup()
        host, port = CONTROL_URL.removeprefix("http://").split(":")
        await web.TCPSite(self._runner, host, int(port), reuse_address=True).start()

    def cluster_states(self) -> dict[str, Any]:
        return {
            c.name: {
                "backends": "killed" if c.name in self.backends.killed else "running",
                "dns": c.dns_listen,
                "admin": c.admin_url,
            }
            for c in CLUSTERS
        }

    async def _list_clusters(self, request: web.Request) -> web.Response:
        return web.json_response(self.cluster_states())

    async def _cluster_action(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in {c.name for c in CLUSTERS}:
            return web.json_response({"error": f"no cluster {name!r}"}, status=404)
        if request.match_info["action"] == "kill":
            await self.backends.stop_cluster(name)
        else:
            await self.backends.start_cluster(name)
        return web.json_response(self.cluster_states())

    # -- shutdown --------------------------------------------------------------------
    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._runner is not None:
            await self._runner.cleanup()
        # All at once: each gateway may use its whole drain timeout.
        await asyncio.gather(*(child.stop() for child in self.children))
        await self.backends.stop()

    def banner(self) -> str:
        lines = [f"mcsproxy demo: clusters {', '.join(c.name for c in CLUSTERS)}; "
                 f"namespace {NAMESPACE}; started in {self.started_in_s:.1f}s; "
                 f"files and logs in {self.workdir}", ""]
        east = CLUSTERS[0]
        web, echo = (self.imports[east.name][name]["spec"] for name in ("web", "echo"))
        web_ip, echo_ip = web.get("ips", ["?"])[0], echo.get("ips", ["?"])[0]
        web_port, echo_port = web["ports"][0]["port"], echo["ports"][0]["port"]
        web_url = f"http://{web_ip}/" if web_port == 80 else f"http://{web_ip}:{web_port}/"
        if not self.low_ports:
            lines[-1:-1] = [f"Not allowed to bind ports below 1024 (not root): those services "
                            f"moved up by {UNPRIVILEGED_PORT_OFFSET} (web {web_port}, "
                            f"echo {echo_port})."]
        dns_host, dns_port = east.dns_listen.split(":")
        dns = f"@{dns_host} -p {dns_port}"
        lines += [
            "Try (as a pod in cluster east would):",
            f"  dig {dns} web.{NAMESPACE}.svc.clusterset.local",
            f"  dig {dns} db.{NAMESPACE}.svc.clusterset.local",
            f"  dig {dns} _tcp._tcp.echo.{NAMESPACE}.svc.clusterset.local SRV",
            f"  curl {web_url}          # web, PreferClose: served by east while healthy",
            f"  echo hello | nc -q1 {echo_ip} {echo_port}   # echo, spread over all three clusters",
            "",
            "Gateways (DNS / status page):",
        ]
        for c in CLUSTERS:
            lines.append(f"  {c.name:8} dns {c.dns_listen}   admin {c.admin_url}")
        lines += [
            "",
            "Watch failover:  mcsproxy demo kill east     then   mcsproxy demo restore east",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)


def log_tail(path: Path) -> str:
    """The end of a child's log for an error message: the reason is usually there."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if not lines:
        return f"{path} is empty"
    return f"the end of {path}:\n" + "\n".join(f"  | {line}" for line in lines)


def _listen_error(log_path: Path, ip: str, port: int) -> str | None:
    """Why the gateway logging to `log_path` could not listen on ip:port, if it said so."""
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if f"listener {ip}:{port}/TCP " in line and "cannot listen: " in line:
                return line.split("cannot listen: ", 1)[1]
    return None


async def run_demo(workdir: str | None, with_load: bool) -> int:
    own_dir = workdir is None
    path = Path(tempfile.mkdtemp(prefix="mcsproxy-demo-")) if own_dir else Path(workdir)
    demo = Demo(path, with_load=with_load)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal was closed. The children are in sessions of their own, so
    # nobody else tells them.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    keep = not own_dir
    try:
        try:
            await demo.start()
        except DemoError as exc:
            print(f"mcsproxy demo: {exc}", file=sys.stderr)
            if own_dir:
                keep = True  # the logs it names say more than the message can
                print(f"mcsproxy demo: files and logs kept in {path}", file=sys.stderr)
            return 1
        print(demo.banner(), flush=True)
        await stop.wait()
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print("\nstopping the demo", flush=True)
        return 0
    finally:
        await demo.stop()
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def control(action: str, cluster: str) -> int:
    """`mcsproxy demo kill|restore|status`: talk to a running demo's control API."""
    import json
    import urllib.error
    import urllib.request

    url = f"{CONTROL_URL}/clusters"
    req = urllib.request.Request(url if action == "status" else f"{url}/{cluster}/{action}",
                                 method="GET" if action == "status" else "POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            states = json.load(resp)
    except urllib.error.HTTPError as exc:
        print(f"mcsproxy demo: {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mcsproxy demo: no demo is running at {url} ({exc})", file=sys.stderr)
        return 1
    for name, state in states.items():
        print(f"{name:8} backends {state['backends']:8} dns {state['dns']:17} "
              f"admin {state['admin']}")
    return 0
