"""No open doors: DNS is not an open resolver and rate-limits answers per client network,
the HTTP front door never proxies to an address a client names, the admin listener stays
on loopback unless told (and warns), and credentials never reach the logs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import dnslib
import yaml

from mcsproxy.config import DnsConfig
from mcsproxy.dns.server import DnsServer
from mcsproxy.store import SnapshotStore
from tests.chaos.support import (
    GatewayProcess,
    Port,
    SlowHttp,
    Svc,
    wait_until,
    write_imports,
)
from tests.dns_support import make_query
from tests.kube_emulator import KubeEmulator
from tests.proxy_fixtures import free_port


class Upstream(asyncio.DatagramProtocol):
    """A resolver that answers everything with 192.0.2.1 and counts what it was asked."""

    def __init__(self) -> None:
        self.asked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.asked += 1
        reply = dnslib.DNSRecord.parse(data).reply()
        reply.add_answer(dnslib.RR(str(reply.q.qname), rdata=dnslib.A("192.0.2.1")))
        self.transport.sendto(reply.pack(), addr)


@contextlib.contextmanager
def client_socket(source: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A non-blocking UDP socket on source, for the loop's sock_* calls."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        yield sock


async def receive(sock: socket.socket, timeout: float) -> dnslib.DNSRecord | None:
    """The next answer on sock, or None if none came within timeout."""
    try:
        async with asyncio.timeout(timeout):
            return dnslib.DNSRecord.parse(await asyncio.get_running_loop().sock_recv(sock, 4096))
    except TimeoutError:
        return None


async def udp_ask(server: tuple[str, int], name: str, source: str = "127.0.0.1",
                  timeout: float = 1.0) -> dnslib.DNSRecord | None:
    with client_socket(source) as sock:
        await asyncio.get_running_loop().sock_sendto(sock, make_query(name), server)
        return await receive(sock, timeout)


async def dns_server(**config: object) -> tuple[DnsServer, Upstream, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(Upstream,
                                                              local_addr=("127.0.0.1", 0))
    store = SnapshotStore("east")
    store.register_source("test")
    store.mark_synced("test")
    store.commit()
    server = DnsServer(DnsConfig(listen=("127.0.0.1", 0),
                                 upstream=transport.get_extra_info("sockname")[:2],
                                 **config), store)  # type: ignore[arg-type]
    await server.start()
    return server, upstream, transport


async def test_dns_forwards_only_for_allowed_client_networks() -> None:
    server, upstream, transport = await dns_server(allow_from=("10.0.0.0/8",))
    try:
        assert server.bound is not None
        outside = await udp_ask(server.bound, "example.com.")
        assert outside is not None and dnslib.RCODE.get(outside.header.rcode) == "REFUSED"
        assert upstream.asked == 0 and server.allow.refused == 1
        # The zone is answered to anyone (NXDOMAIN here: nothing is imported).
        zone = await udp_ask(server.bound, "web.test.svc.clusterset.local.")
        assert zone is not None and dnslib.RCODE.get(zone.header.rcode) == "NXDOMAIN"
    finally:
        await server.stop()
        transport.close()
    server, upstream, transport = await dns_server()  # the default: loopback is allowed
    try:
        assert server.bound is not None
        inside = await udp_ask(server.bound, "example.com.")
        assert inside is not None and str(inside.rr[0].rdata) == "192.0.2.1"
        assert upstream.asked == 1
    finally:
        await server.stop()
        transport.close()


async def test_dns_response_rate_limit_per_client_network() -> None:
    server, _upstream, transport = await dns_server(rrl_qps=10)
    try:
        assert server.bound is not None and server.rrl is not None
        loop = asyncio.get_running_loop()
        with client_socket() as sock:
            for i in range(100):
                await loop.sock_sendto(sock, make_query(f"n{i}.test.svc.clusterset.local."),
                                       server.bound)
            answers = []
            try:
                async with asyncio.timeout(0.5):  # bounded: whatever came back by then
                    while True:
                        answers.append(dnslib.DNSRecord.parse(await loop.sock_recv(sock, 4096)))
            except TimeoutError:
                pass
        full = [a for a in answers if not a.header.tc]
        truncated = [a for a in answers if a.header.tc]
        # A burst of 10 plus what refills while 100 queries arrive; half the rest slip
        # through truncated (a real client retries over TCP), the other half are dropped.
        assert 10 <= len(full) <= 20, len(full)
        assert truncated and len(truncated) + server.rrl.dropped + len(full) >= 100
        assert server.rrl.dropped >= 35
        # Another /24 has its own budget.
        other = await udp_ask(server.bound, "web.test.svc.clusterset.local.", "127.0.9.1")
        assert other is not None and not other.header.tc
        assert len(server.rrl) == 2
    finally:
        await server.stop()
        transport.close()


async def test_dns_rrl_truncated_answers_send_stub_resolvers_to_tcp() -> None:
    """The slipped answer must be one glibc follows over TCP: it ignores an answer whose
    question does not match its own, and takes an empty NOERROR with neither AA, RA nor
    an additional record for a referral. A response sent to us is never answered."""
    server, _upstream, transport = await dns_server(rrl_qps=0.01)  # a burst of 1
    zone_name = "web.test.svc.clusterset.local."
    response = bytearray(make_query(zone_name))
    response[2] |= 0x80  # QR
    packets = [
        make_query(zone_name),  # the burst: answered
        make_query(zone_name),  # over the limit from here: every 2nd one slips
        make_query(zone_name, edns=1232),
        bytes(response),
        bytes(response),  # its turn to slip, but a response gets nothing
        make_query(zone_name),
        make_query("WEB.test.svc.clusterset.local."),
        make_query("example.com."),
        make_query("example.com."),
    ]
    try:
        assert server.bound is not None and server.rrl is not None
        loop = asyncio.get_running_loop()
        with client_socket() as sock:
            answers: dict[int, dnslib.DNSRecord] = {}
            for i, packet in enumerate(packets):
                await loop.sock_sendto(sock, packet, server.bound)
                if (answer := await receive(sock, 0.2)) is not None:
                    answers[i] = answer
        assert sorted(answers) == [0, 2, 6, 8]
        assert not answers[0].header.tc
        for i in (2, 6, 8):
            reply, query = answers[i], dnslib.DNSRecord.parse(packets[i])
            assert reply.header.tc and reply.header.id == query.header.id
            assert reply.questions == query.questions and reply.rr == reply.auth == []
            assert dnslib.RCODE.get(reply.header.rcode) == "NOERROR"
        assert [r.rtype for r in answers[2].ar] == [dnslib.QTYPE.OPT] and answers[6].ar == []
        assert answers[6].header.aa and not answers[6].header.ra
        assert answers[8].header.ra and not answers[8].header.aa  # forwarded names
        assert (server.rrl.slipped, server.rrl.dropped) == (3, 5)
    finally:
        await server.stop()
        transport.close()


async def test_front_door_is_not_an_open_proxy(tmp_path: Path) -> None:
    backend = await SlowHttp("inside", "127.77.7.1", 8090).start()
    bait = await SlowHttp("bait", "127.77.7.2", 8091).start()  # never imported
    path = tmp_path / "imports.yaml"
    write_imports(path, [Svc("web", "127.240.77.40", [Port("web", 80, 8090, app_protocol="http")],
                             {"east": [("127.77.7.1", True)]})])
    front = free_port("127.0.0.1")
    gw = GatewayProcess(f"file:{path}", "--http-listen", f"127.0.0.1:{front}",
                        "--health-interval", "0")
    try:
        await gw.start()
        await gw.wait_ready()
        await gw.wait_line("HTTP front door on")
        attempts = {
            "absolute-form": b"GET http://127.77.7.2:8091/ HTTP/1.1\r\nHost: 127.77.7.2:8091\r\n",
            "CONNECT": b"CONNECT 127.77.7.2:8091 HTTP/1.1\r\nHost: 127.77.7.2:8091\r\n",
            "Host of an IP": b"GET / HTTP/1.1\r\nHost: 127.77.7.2:8091\r\n",
            "Host outside the zone": b"GET / HTTP/1.1\r\nHost: example.com\r\n",
        }
        for what, head in attempts.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", front)
            writer.write(head + b"\r\n")
            status_line = await asyncio.wait_for(reader.readline(), 3)
            writer.close()
            status = int(status_line.split()[1])
            assert 400 <= status < 500, (what, status_line)
        assert bait.served == 0
        # The same front door does serve the imported service.
        reader, writer = await asyncio.open_connection("127.0.0.1", front)
        writer.write(b"GET / HTTP/1.1\r\nHost: web.chaos.svc.clusterset.local\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 3)
        writer.close()
        assert b" 200 " in line, (line, gw.log)
    finally:
        await gw.stop()
        await backend.stop()
        await bait.stop()


async def test_admin_on_loopback_by_default_and_warns_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "imports.yaml"
    write_imports(path, [])
    gw = GatewayProcess(f"file:{path}", "--no-proxy")
    gw.cmd.remove("--admin-listen")
    gw.cmd.remove("127.0.0.1:0")  # the admin's: the DNS one is "--dns-listen 127.0.0.1:0"
    gw.cmd += ["--dns-listen", "127.0.0.1:0", "--admin-listen",
               f"127.0.0.1:{free_port('127.0.0.1')}"]
    from mcsproxy.cli import build_parser
    default = build_parser().parse_args(["gateway", "--cluster-id", "x", "--source", "kube"])
    assert default.admin_listen.startswith("127.0.0.1:")
    exposed = GatewayProcess(f"file:{path}", "--no-proxy")
    exposed.cmd[exposed.cmd.index("--admin-listen") + 1] = "0.0.0.0:0"
    try:
        await gw.start()
        assert "non-loopback" not in gw.log
        await exposed.start()
        assert "admin listener on non-loopback address 0.0.0.0" in exposed.log
    finally:
        await gw.stop()
        await exposed.stop()


TOKEN = "s3cr3t-controller-token-9876543210"


async def test_controller_kube_mode_never_logs_its_token(tmp_path: Path) -> None:
    async with KubeEmulator(token=TOKEN) as a, KubeEmulator(token=TOKEN) as b:
        merged: dict[str, list[object]] = {"clusters": [], "users": [], "contexts": []}
        for name, emu in (("a", a), ("b", b)):
            doc = yaml.safe_load(emu.kubeconfig(tmp_path / f"kc.{name}", name).read_text())
            for key in merged:
                merged[key] += doc[key]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config",
                                              "current-context": "a", **merged}))
        b.fail_next(None, 401)  # an error path too: the refusal is logged, the token not
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcsproxy", "controller", "--kubeconfig", str(kubeconfig),
            "--contexts", "a,b", "--no-leader-elect", "--log-level", "debug",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            # Both members were talked to, b refusing (polled: another process's progress).
            await wait_until(lambda: len(a.requests) >= 3 and len(b.requests) >= 3,
                             "requests to both members", timeout=15)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 15)
        text = out.decode(errors="replace")
        assert "DEBUG" in text, text[-2000:]  # the most talkative level was on
        assert TOKEN not in text
        assert TOKEN[:12] not in text


async def test_demo_kill_and_restore_refuse_requests_from_other_sites_pages(
        tmp_path: Path) -> None:
    """Any page open in the user's browser can POST to loopback (a form, or a no-cors
    fetch: no preflight). The demo's control API and the admin relay of its buttons did
    whatever such a POST asked; now a request naming another origin, a cross-site fetch
    or a Host that is not an address (DNS rebinding) gets 403. The CLI, the relay and the
    page's own buttons (same origin) still work."""
    from aiohttp import ClientSession, ClientTimeout, web

    from mcsproxy.demo.runner import Demo
    from tests.proxy_fixtures import free_port
    from tests.test_metrics_support import start_gateway

    host = "127.76.4.1"
    demo = Demo(tmp_path / "demo")
    runner = web.AppRunner(demo.control_app())
    await runner.setup()
    port = free_port(host)
    await web.TCPSite(runner, host, port).start()
    control = f"http://{host}:{port}"
    gw = await start_gateway(tmp_path, "127.76.4.2", demo_control=control)

    def cross_site(base: str) -> list[dict[str, str]]:
        rebound = f"rebound.attacker.example:{base.rsplit(':', 1)[1]}"
        return [{"Origin": "https://attacker.example"},
                {"Origin": "null"},  # a sandboxed frame or a file:// page
                {"Sec-Fetch-Site": "cross-site"},
                {"Host": rebound, "Origin": f"http://{rebound}"}]

    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:
            for base, path in ((control, "/clusters"), (gw.admin, "/demo/clusters")):
                for headers in cross_site(base):
                    async with http.post(f"{base}{path}/east/kill", headers=headers) as resp:
                        assert resp.status == 403, (base, headers)
                        assert "cross-site" in await resp.text()
            assert demo.backends.killed == set()

            # The CLI (no Origin) and the page's own button (its origin) are served.
            async with http.post(f"{control}/clusters/east/kill") as resp:
                assert resp.status == 200
            assert demo.backends.killed == {"east"}
            async with http.post(f"{gw.admin}/demo/clusters/east/restore",
                                 headers={"Origin": gw.admin,
                                          "Sec-Fetch-Site": "same-origin"}) as resp:
                assert resp.status == 200
            assert demo.backends.killed == set()
            async with http.get(f"{control}/clusters",
                                headers={"Origin": "https://attacker.example"}) as resp:
                assert resp.status == 200  # reading is harmless: no CORS header, no access
    finally:
        await gw.stop()
        await runner.cleanup()
        await demo.backends.stop()  # restored east's pods hold the demo's fixed addresses


async def test_admin_controller_and_demo_pages_cannot_be_framed_or_sniffed(
        tmp_path: Path) -> None:
    """The admin page's kill/restore buttons are same-origin requests, which the
    cross-site check lets through: a page on any site could load the admin page in an
    invisible frame and have the user click them (clickjacking). Every answer of the
    admin, the controller and the demo's control API, errors too, now forbids framing
    and content sniffing."""
    from aiohttp import ClientSession, ClientTimeout, web

    from controlplane.metrics import ControllerMetrics
    from controlplane.server import ControllerServer
    from controlplane.stream import StreamHub
    from mcsproxy.demo.runner import Demo
    from tests.test_metrics_support import start_gateway

    demo_runner = web.AppRunner(Demo(tmp_path / "demo").control_app())
    await demo_runner.setup()
    demo_host = "127.81.3.1"
    demo_port = free_port(demo_host)
    await web.TCPSite(demo_runner, demo_host, demo_port).start()
    gw = await start_gateway(tmp_path, "127.81.3.2")
    hub = StreamHub(heartbeat_s=0.1)
    controller = ControllerServer(None, hub, ("127.81.3.3", 0), metrics=ControllerMetrics())
    await controller.start()
    assert controller.bound is not None
    controller_url = "http://{}:{}".format(*controller.bound)
    urls = [f"{gw.admin}{path}" for path in
            ("/", "/static/status.js", "/api/status", "/healthz", "/metrics", "/no-such-page",
             "/explain", "/explain?service=a/b&format=<b>")]
    urls += [f"{controller_url}{path}" for path in ("/", "/static/status.css", "/status",
                                                    "/v1/stream?cluster=<b>")]
    urls += [f"http://{demo_host}:{demo_port}/clusters"]
    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:
            for url in urls:
                async with http.get(url) as resp:
                    await resp.read()
                    assert resp.headers.get("X-Frame-Options") == "DENY", url
                    assert "frame-ancestors 'none'" in resp.headers.get(
                        "Content-Security-Policy", ""), url
                    assert resp.headers.get("X-Content-Type-Options") == "nosniff", url
    finally:
        await controller.stop()
        await gw.stop()
        await demo_runner.cleanup()


async def test_text_from_clients_cannot_forge_log_lines(tmp_path: Path) -> None:
    """aiohttp URL-decodes the path the cross-site refusal logs: `%0d%0a` in it wrote a
    second line that read as an ERROR record of its own, and `%1b` an ANSI escape to the
    terminal. Every message is one line now, its control characters escaped."""
    path = tmp_path / "imports.yaml"
    write_imports(path, [])
    gw = GatewayProcess(f"file:{path}", "--no-proxy", "--demo-control", "http://127.81.6.9:1")
    forged = "2026-01-01T00:00:00 ERROR mcsproxy.admin FORGED"
    try:
        await gw.start()
        host, port = gw.ports["admin"]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /demo/clusters/x%0d%0a" + forged.replace(" ", "%20").encode()
                     + b"%1b[31m/kill HTTP/1.1\r\nHost: " + host.encode()
                     + b"\r\nOrigin: https://evil.example\r\nContent-Length: 0\r\n\r\n")
        assert b" 403 " in await asyncio.wait_for(reader.readline(), 3)
        writer.close()
        await gw.wait_line("cross-site")
        await gw.wait_line("FORGED")
    finally:
        await gw.stop()
    lines = gw.log.splitlines()
    assert not any(line.startswith(forged) for line in lines), gw.log
    assert "\x1b" not in gw.log
    refused = next(line for line in lines if "cross-site" in line)
    assert f"/demo/clusters/x\\r\\n{forged}\\x1b[31m/kill" in refused


async def test_pages_of_a_rebound_domain_cannot_read_the_admin_or_controller(
        tmp_path: Path) -> None:
    """A domain rebound to 127.0.0.1 is same-origin to its own page: in the user's
    browser, it read /config_dump (the whole configuration), /api/status and the
    controller's /status, 200 each. A browser's request (Fetch Metadata, Origin) must now
    name an IP address or localhost as Host; other clients reach them by any name."""
    from aiohttp import ClientSession, ClientTimeout

    from controlplane.metrics import ControllerMetrics
    from controlplane.server import ControllerServer
    from controlplane.stream import StreamHub
    from tests.test_metrics_support import start_gateway

    gw = await start_gateway(tmp_path, "127.81.8.1")
    controller = ControllerServer(None, StreamHub(heartbeat_s=0.1), ("127.81.8.2", 0),
                                  metrics=ControllerMetrics())
    await controller.start()
    assert controller.bound is not None
    bases = [gw.admin, "http://{}:{}".format(*controller.bound)]
    pages = [(bases[0], p) for p in ("/", "/config_dump", "/api/status", "/endpoints")]
    pages += [(bases[1], p) for p in ("/", "/status")]
    browser = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    try:
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:
            for base, path in pages:
                port = base.rsplit(":", 1)[1]
                for headers, refused in (
                        ({**browser, "Host": f"rebound.attacker.example:{port}"}, True),
                        ({"Origin": f"http://rebound.attacker.example:{port}",
                          "Host": f"rebound.attacker.example:{port}"}, True),
                        ({**browser, "Host": f"localhost:{port}"}, False),
                        (browser, False),  # Host: the address asked
                        ({"Host": f"gateway.example:{port}"}, False)):  # not a browser
                    async with http.get(base + path, headers=headers) as resp:
                        body = await resp.text()
                        assert (resp.status == 403) == refused, (path, headers, resp.status)
                        if refused:
                            assert "cross-site" in body
    finally:
        await controller.stop()
        await gw.stop()


async def test_admin_token_file_closes_all_but_probes_and_metrics(tmp_path: Path) -> None:
    """The DaemonSet puts the admin listener on the node IP, which every pod reaches, and
    no NetworkPolicy selects a host-network pod: any pod read /config_dump (every service,
    endpoint and flag). With --admin-token-file only /healthz, /readyz and /metrics answer
    without the bearer token; `mcsproxy status --token-file` sends it."""
    from aiohttp import ClientSession, ClientTimeout

    path = tmp_path / "imports.yaml"
    write_imports(path, [])
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-s3cr3t\n")
    gw = GatewayProcess(f"file:{path}", "--no-proxy", "--admin-token-file", str(token_file))
    gw.cmd[gw.cmd.index("--admin-listen") + 1] = "127.81.9.1:0"
    try:
        await gw.start()
        await gw.wait_ready()
        assert "non-loopback" not in gw.log  # a token answers the warning
        async with ClientSession(timeout=ClientTimeout(total=5)) as http:
            for open_path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(gw.admin + open_path) as resp:
                    assert resp.status == 200, open_path
            for closed in ("/", "/config_dump", "/api/status", "/endpoints",
                           "/explain?service=a/b", "/static/status.js"):
                for auth in ({}, {"Authorization": "Bearer wrong"}):
                    async with http.get(gw.admin + closed, headers=auth) as resp:
                        assert resp.status == 401, (closed, auth)
                        assert resp.headers["WWW-Authenticate"] == "Bearer"
            async with http.get(gw.admin + "/config_dump",
                                headers={"Authorization": "Bearer admin-s3cr3t"}) as resp:
                assert resp.status == 200
        cli = [sys.executable, "-m", "mcsproxy", "status", "--admin", gw.admin]
        without = await asyncio.create_subprocess_exec(*cli, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(without.communicate(), 15)
        assert without.returncode == 1 and b"answered 401" in err
        with_token = await asyncio.create_subprocess_exec(
            *cli, "--token-file", str(token_file), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(with_token.communicate(), 15)
        assert with_token.returncode == 0 and out, err
    finally:
        await gw.stop()
    bad = GatewayProcess(f"file:{path}", "--no-proxy", "--admin-token-file",
                         str(tmp_path / "missing"))
    proc = await asyncio.create_subprocess_exec(*bad.cmd, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2 and b"--admin-token-file" in err, err
