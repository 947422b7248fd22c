"""Clusters as network namespaces for the fault tests: one bridge on the host, one
namespace per cluster joined to it by a veth pair, a pod process inside each.

    host (gateway) 10.251.S.1 ── bridge ──┬── veth ── ns <prefix>-a  10.251.S.11
                                          ├── veth ── ns <prefix>-b  10.251.S.12
                                          └── veth ── ns <prefix>-c  10.251.S.13

Names and the subnet S carry this process's pid, so parallel runs do not collide;
MCSPROXY_TEST_NETNS_PREFIX replaces the namespaces' prefix (`mcschaos`) where a host
reserves a prefix per user. Needs
root and `ip netns`; `netns_skip_reason()` says why not otherwise. Faults: the host-side
link down, a blackhole route for the host inside a namespace (every reply is eaten), and
packet loss with nftables (`numgen random mod 100 < P drop`: this kernel has no netem).
Everything is removed by `teardown()` (the fixtures call it even when a test fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ID = os.getpid() % 10000
SUBNET = 10 + os.getpid() % 200  # 10.251.SUBNET.0/24
PREFIX = os.environ.get("MCSPROXY_TEST_NETNS_PREFIX", "mcschaos")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def netns_skip_reason(need_nft: bool = False) -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if need_nft and shutil.which("nft") is None:
        return "nftables (nft) is not installed"
    probe = f"{PREFIX}probe{ID}"
    made = run("ip", "netns", "add", probe, check=False)
    run("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    return None


class NetnsClusters:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.bridge = f"mcb{ID}"
        self.host_ip = f"10.251.{SUBNET}.1"
        self.pods: dict[str, subprocess.Popen[bytes]] = {}

    def ns(self, name: str) -> str:
        return f"{PREFIX}{ID}-{name}"

    def veth(self, name: str) -> str:
        return f"mch{ID}{name}"[:15]

    def address(self, name: str) -> str:
        return f"10.251.{SUBNET}.{11 + self.names.index(name)}"

    def setup(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for name in self.names:
            ns, host, inner = self.ns(name), self.veth(name), f"mci{ID}{name}"[:15]
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
            run("ip", "link", "set", inner, "netns", ns)
            run("ip", "-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", inner)
            run("ip", "-n", ns, "link", "set", inner, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "link", "set", host, "master", self.bridge)
            run("ip", "link", "set", host, "up")

    def teardown(self) -> None:
        for name in list(self.pods):
            self.kill_pod(name, signal.SIGKILL)
        for name in self.names:
            run("ip", "netns", "del", self.ns(name), check=False)
            run("ip", "link", "del", self.veth(name), check=False)
        run("ip", "link", "del", self.bridge, check=False)

    # -- pods -----------------------------------------------------------------------------
    def start_pod(self, name: str) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), sys.executable, "-m",
             "tests.chaos.backend", name],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":  # bounded: the pod exits if it cannot bind
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pod of cluster {name} did not start")
        self.pods[name] = proc

    def kill_pod(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.pods.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)  # `ip netns exec` execs: this pid is the pod itself
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    # -- faults ---------------------------------------------------------------------------
    def link(self, name: str, up: bool) -> None:
        run("ip", "link", "set", self.veth(name), "up" if up else "down")

    def blackhole(self, name: str, on: bool) -> None:
        run("ip", "-n", self.ns(name), "route", "add" if on else "del", "blackhole",
            f"{self.host_ip}/32")

    def loss(self, name: str, percent: int | None) -> None:
        """Drop `percent` % of the packets entering the cluster's namespace; None heals."""
        ns = self.ns(name)
        if percent is None:
            run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "chaos")
            return
        rules = ("table inet chaos {\n chain input {\n"
                 "  type filter hook input priority 0; policy accept;\n"
                 f"  numgen random mod 100 < {percent} drop\n }}\n}}\n")
        proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                              capture_output=True, text=True, timeout=10, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nft: {proc.stderr.strip()}")
