"""--vip-interface inside network namespaces made by the test (root and iproute2 needed).

Namespace `a` runs a backend and the gateway (`--vip-interface lo`: this kernel has no
dummy link type); namespace `b` is a client joined to `a` by a veth pair, routing the
clusterset range through it. The kernel's view of the addresses is read with `ip`,
polled against a deadline (there is no event to wait on from outside the gateway).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxy_fixtures import Backend
from tests.test_metrics_support import service_yaml

CIDR = "198.18.0.0/16"
VIP = "198.18.5.7"
VIP2 = "198.18.5.8"
VIP6 = "fd00:198:18::7"
STALE = "198.18.9.9"  # left by an earlier run: inside the CIDR, so the gateway removes it
FOREIGN = "10.99.0.1"  # someone else's host address on the same interface: never touched
BACKEND_PORT = 18080

BACKEND = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {BACKEND_PORT}))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"backend-ok\\n")
    c.close()
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], 80), timeout=3) as c:
    print(c.recv(100).decode().strip())
"""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=10, check=check)


@dataclass
class Namespaces:
    a: str
    b: str

    def exec(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def host_addresses(self, ns: str, dev: str = "lo") -> set[str]:
        out = run("ip", "-n", ns, "-o", "addr", "show", "dev", dev, check=False).stdout
        return {f.split()[3] for f in out.splitlines() if len(f.split()) > 3}


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    # Sessions sharing a machine may each be given a namespace name prefix of their own.
    prefix = os.environ.get("MCSPROXY_TEST_NETNS_PREFIX", "mcsvip")
    tag = f"{os.getpid() % 100000}"
    ns = Namespaces(f"{prefix}{tag}a", f"{prefix}{tag}b")
    made: list[str] = []
    try:
        for name in (ns.a, ns.b):
            result = run("ip", "netns", "add", name, check=False)
            if result.returncode != 0:
                pytest.skip(f"ip netns add failed: {result.stderr.strip()}")
            made.append(name)
        run("ip", "-n", ns.a, "link", "add", "va", "type", "veth", "peer", "name", "vb",
            "netns", ns.b)
        for name, dev, addr in ((ns.a, "va", "10.251.0.1/30"), (ns.b, "vb", "10.251.0.2/30")):
            run("ip", "-n", name, "addr", "add", addr, "dev", dev)
            run("ip", "-n", name, "link", "set", dev, "up")
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "-n", ns.b, "route", "add", CIDR, "via", "10.251.0.1")
        yield ns
    finally:
        for name in made:
            run("ip", "netns", "del", name, check=False)


@pytest.fixture
def backend(netns: Namespaces) -> Iterator[None]:
    proc = subprocess.Popen(netns.exec(netns.a, sys.executable, "-c", BACKEND),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.communicate(timeout=5)  # reaps it and closes its pipe


def manifests(path: Path, vips: dict[str, str]) -> None:
    """One ClusterSetIP service per name; `ip` may be "v4,v6" for a dual-stack one."""
    backend = Backend("east-1", "127.0.0.1", BACKEND_PORT, "east")
    docs = [service_yaml(name, ips, [backend], port_name="http") for name, ips in vips.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("---\n".join(docs) or "\n")
    tmp.replace(path)


def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def gateway(netns: Namespaces, source: Path, interface: str,
            *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        netns.exec(netns.a, sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
                   "--source", f"file:{source}", "--vip-interface", interface,
                   "--clusterset-cidr", CIDR, "--dns-listen", "127.0.0.1:0",
                   "--admin-listen", "127.0.0.1:0", "--log-level", "info", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log(proc: subprocess.Popen[str], text: str, timeout: float = 10.0) -> None:
    """Read the gateway's log until it holds `text`. Straight from the pipe: a buffered
    readline would hold lines that select() no longer reports."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    seen = ""
    while text not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"timed out waiting for {text!r} in the gateway's log: {seen}")
        chunk = os.read(fd, 65536).decode(errors="replace")
        if not chunk:
            pytest.fail(f"the gateway exited before logging {text!r}: {seen}")
        seen += chunk


def listener_pids(netns: Namespaces, ip: str, port: int = 80) -> list[int]:
    """Pids of the processes listening on ip:port in namespace a (one per --workers)."""
    out = run("ip", "netns", "exec", netns.a, "ss", "-Hltnp", f"src {ip}:{port}").stdout
    return sorted(int(pid) for pid in re.findall(r"pid=(\d+)", out))


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    return proc.returncode, err


def test_vips_follow_imports_and_serve_a_client_in_another_namespace(
        netns: Namespaces, backend: None, tmp_path: Path) -> None:
    run("ip", "-n", netns.a, "addr", "add", f"{STALE}/32", "dev", "lo")
    run("ip", "-n", netns.a, "addr", "add", f"{FOREIGN}/32", "dev", "lo")
    source = tmp_path / "imports.yaml"
    manifests(source, {"web": f"{VIP},{VIP6}"})
    proc = gateway(netns, source, "lo")
    try:
        eventually(lambda: {f"{VIP}/32", f"{VIP6}/128"} <= netns.host_addresses(netns.a),
                   f"{VIP} and {VIP6} on lo")
        eventually(lambda: f"{STALE}/32" not in netns.host_addresses(netns.a),
                   "the stale address to go")
        # A client in the other namespace reaches the backend through the ClusterSetIP.
        answer = run(*netns.exec(netns.b, sys.executable, "-c", CLIENT, VIP)).stdout.strip()
        assert answer == "backend-ok"

        manifests(source, {"api": VIP2})  # web withdrawn, api imported
        eventually(lambda: f"{VIP2}/32" in netns.host_addresses(netns.a)
                   and not {f"{VIP}/32", f"{VIP6}/128"} & netns.host_addresses(netns.a),
                   "the swap")
        answer = run(*netns.exec(netns.b, sys.executable, "-c", CLIENT, VIP2)).stdout.strip()
        assert answer == "backend-ok"
        failed = run(*netns.exec(netns.b, sys.executable, "-c", CLIENT, VIP), check=False)
        assert failed.returncode != 0  # the withdrawn address answers no more
    finally:
        code, err = stop(proc)
    assert code == 0, err
    left = netns.host_addresses(netns.a)
    # Clean removal on shutdown.
    assert not any(a.startswith(("198.18.", "fd00:198:")) for a in left), left
    assert {f"{FOREIGN}/32", "127.0.0.1/8"} <= left


def test_only_clusterset_ips_in_the_range_go_on_the_interface(
        netns: Namespaces, tmp_path: Path) -> None:
    """Every import's spec.ips went on the interface, whatever they were: an import
    naming 169.254.169.254 made the node answer the cloud metadata service's address
    itself, through the gateway, to the import's endpoints (so would a node or Service
    IP). Now an address of a family with a --clusterset-cidr range must be inside it;
    one of another family must at least be no host's own (link-local, loopback, ...)."""
    source = tmp_path / "imports.yaml"
    imports = {"web": VIP, "ula6": VIP6, "metadata": "169.254.169.254",
               "outside": "10.77.0.1", "linklocal6": "fe80::77",
               "mapped6": "::ffff:169.254.169.254"}
    manifests(source, imports)
    proc = gateway(netns, source, "lo")
    try:
        eventually(lambda: {f"{VIP}/32", f"{VIP6}/128"} <= netns.host_addresses(netns.a),
                   f"{VIP} and {VIP6} on lo")
        wait_for_log(proc, "169.254.169.254 not put on lo")
        # A barrier rather than a pause: the interface is synced in snapshot order, so
        # once a later import's address is on it, nothing of the first batch is pending.
        manifests(source, {**imports, "marker": VIP2})
        eventually(lambda: f"{VIP2}/32" in netns.host_addresses(netns.a), f"{VIP2} on lo")
        present = netns.host_addresses(netns.a)
        for refused in ("169.254.169.254/32", "10.77.0.1/32", "fe80::77/128"):
            assert refused not in present, present
        assert not any("169.254.169.254" in a for a in present), present
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_missing_interface_is_created_or_refused_clearly(
        netns: Namespaces, tmp_path: Path) -> None:
    probe = run("ip", "-n", netns.a, "link", "add", "mcsprobe", "type", "dummy", check=False)
    source = tmp_path / "imports.yaml"
    manifests(source, {"web": VIP})
    proc = gateway(netns, source, "mcs0")
    if probe.returncode != 0:
        # No dummy driver (this machine): the gateway refuses to start and says why.
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 1
        assert "mcs0" in err and "dummy" in err and "lo" in err
        return
    run("ip", "-n", netns.a, "link", "del", "mcsprobe")
    try:
        eventually(lambda: f"{VIP}/32" in netns.host_addresses(netns.a, "mcs0"), "VIP on mcs0")
    finally:
        code, err = stop(proc)
    assert code == 0, err
    links = run("ip", "-n", netns.a, "-o", "link", "show").stdout
    assert "mcs0" not in links  # the gateway made it, the gateway removed it


def test_restart_after_sigkill_adopts_leftover_vips_and_a_killed_worker_rebinds(
        netns: Namespaces, backend: None, tmp_path: Path) -> None:
    """SIGKILL leaves the VIPs behind; the next gateway removes the withdrawn one once its
    source has synced and never takes the still-wanted one off the link, not even for the
    moment before its first snapshot (it used to: the sources are read after the interface
    is opened). A SIGKILLed worker is restarted and binds beside the supervisor again."""
    source = tmp_path / "imports.yaml"
    manifests(source, {"web": VIP, "api": VIP2})
    proc = gateway(netns, source, "lo", "--workers", "2")
    try:
        eventually(lambda: {f"{VIP}/32", f"{VIP2}/32"} <= netns.host_addresses(netns.a),
                   "both VIPs")
    finally:
        proc.kill()  # no drain, no clean-up
        proc.communicate(timeout=10)
    assert {f"{VIP}/32", f"{VIP2}/32"} <= netns.host_addresses(netns.a)

    manifests(source, {"api": VIP2})  # web withdrawn while no gateway ran
    monitor = subprocess.Popen(["ip", "-n", netns.a, "-o", "monitor", "address"],
                               stdout=subprocess.PIPE, text=True)
    proc = gateway(netns, source, "lo", "--workers", "2")
    try:
        eventually(lambda: f"{VIP}/32" not in netns.host_addresses(netns.a),
                   "the withdrawn VIP to go")
        eventually(lambda: len(listener_pids(netns, VIP2)) == 2, "two processes listening")
        answer = run(*netns.exec(netns.b, sys.executable, "-c", CLIENT, VIP2)).stdout.strip()
        assert answer == "backend-ok"
        monitor.terminate()
        events = monitor.communicate(timeout=5)[0].splitlines()
        assert any("Deleted" in e and f" {VIP}/32" in e for e in events), events
        assert not [e for e in events if f" {VIP2}/32" in e], "the wanted VIP was churned"

        supervisor = proc.pid  # `ip netns exec` execs: this is the gateway itself
        workers = [pid for pid in listener_pids(netns, VIP2) if pid != supervisor]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        eventually(lambda: len(pids := listener_pids(netns, VIP2)) == 2
                   and supervisor in pids and workers[0] not in pids,
                   "the restarted worker listening beside the supervisor")
        assert {f"{VIP2}/32"} <= netns.host_addresses(netns.a)
        answer = run(*netns.exec(netns.b, sys.executable, "-c", CLIENT, VIP2)).stdout.strip()
        assert answer == "backend-ok"
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.communicate(timeout=5)
        code, err = stop(proc)
    assert code == 0, err
    assert "vip interface" not in err  # no netlink call failed (an EEXIST would show here)
    assert not any(a.startswith("198.18.") for a in netns.host_addresses(netns.a))


def test_a_gateway_stopping_beside_another_leaves_the_shared_vips_to_it(
        netns: Namespaces, backend: None, tmp_path: Path) -> None:
    """A replacement started before the old gateway is gone (a DaemonSet with maxSurge, a
    gateway run by hand) overlaps two gateways on one node's network.
    The one that stops first must not take the ClusterSetIPs off the interface the other
    still serves: it did, and the survivor, believing them present, never put them back
    (every connection to the VIP went unanswered until an import changed). The last one
    to stop removes them."""
    source = tmp_path / "imports.yaml"
    manifests(source, {"web": VIP})
    old = gateway(netns, source, "lo")
    new: subprocess.Popen[str] | None = None
    try:
        eventually(lambda: f"{VIP}/32" in netns.host_addresses(netns.a), f"{VIP} on lo")
        new = gateway(netns, source, "lo")
        # Its snapshot is applied (the VIP adopted) once it tries the old one's listener.
        wait_for_log(new, f"listener {VIP}:80/TCP")
        code, err = stop(old)
        assert code == 0, err
        assert f"{VIP}/32" in netns.host_addresses(netns.a), "the survivor lost its VIP"
        # The survivor binds the listener the old one released and serves through it.
        eventually(lambda: run(*netns.exec(netns.b, sys.executable, "-c", CLIENT, VIP),
                               check=False).stdout.strip() == "backend-ok",
                   "a connection through the surviving gateway")
    finally:
        stop(old)
        if new is not None:
            code, err = stop(new)
    assert code == 0, err
    assert f"{VIP}/32" not in netns.host_addresses(netns.a)  # the last one cleans up


def test_an_interface_deleted_and_made_again_is_found_by_name(
        netns: Namespaces, tmp_path: Path) -> None:
    """A gateway stopping beside another may delete the link it created, and an admin may
    too. The gateway kept the old link's index: every add failed (ENODEV) and each retry
    resynchronised against the same dead index, for good. It looks the name up again."""
    def veth(action: str) -> None:
        run("ip", "-n", netns.a, "link", action, "mcsv0", *(
            ("type", "veth", "peer", "name", "mcsv1") if action == "add" else ()))
        if action == "add":
            run("ip", "-n", netns.a, "link", "set", "mcsv1", "up")

    veth("add")
    source = tmp_path / "imports.yaml"
    manifests(source, {"web": VIP})
    proc = gateway(netns, source, "mcsv0")
    try:
        eventually(lambda: f"{VIP}/32" in netns.host_addresses(netns.a, "mcsv0"), "VIP on mcsv0")
        veth("del")
        veth("add")  # the same name, a new index
        manifests(source, {"web": VIP, "api": VIP2})
        eventually(lambda: {f"{VIP}/32", f"{VIP2}/32"} <= netns.host_addresses(netns.a, "mcsv0"),
                   "both VIPs on the new link")
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert not {f"{VIP}/32", f"{VIP2}/32"} & netns.host_addresses(netns.a, "mcsv0")


async def test_without_vip_interface_listeners_bind_freely_ipv4_and_ipv6() -> None:
    """No --vip-interface: IP_FREEBIND lets listeners bind ClusterSetIPs on no interface."""
    from mcsproxy.model import ServicePort
    from tests.proxy_fixtures import Clusterset, endpoint

    clusterset = Clusterset()
    ports = [ServicePort("web", "TCP", 80)]
    clusterset.publish("v4", "198.18.200.1", ports, [endpoint("127.0.0.1", "east", 9)])
    clusterset.publish("v6", "fd00:198:200::1", ports, [endpoint("127.0.0.1", "east", 9)])
    manager = await clusterset.proxy()
    try:
        await clusterset.served(manager)
        assert {str(k) for k in manager.listeners} == {
            "198.18.200.1:80/TCP", "[fd00:198:200::1]:80/TCP"}
    finally:
        await manager.stop()
