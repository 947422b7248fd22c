"""DNS answers follow the files: add, change, remove an endpoint; an invalid file; a
deleted file. The same question is asked again each time, so a stale memoised answer
would show."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import dnslib

from mcsproxy.config import DnsConfig
from mcsproxy.dns.server import DnsServer
from mcsproxy.sources.file import FileSource
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.dns_support import import_yaml, make_query, slice_yaml, udp_exchange

WEB = "[{name: web, protocol: TCP, port: 8080}]"
NAME = "web.test.svc.clusterset.local."
WAIT_S = 5.0
TWO = ["web-0", "web-1"]


def write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def answer(server: DnsServer, name: str = NAME) -> tuple[str, list[str]]:
    reply = dnslib.DNSRecord.parse(await udp_exchange(server.bound, make_query(name)))
    return dnslib.RCODE.get(reply.header.rcode), sorted(str(r.rdata) for r in reply.rr)


async def until(server: DnsServer, changed: asyncio.Event, want: tuple[str, list[str]],
                name: str = NAME) -> None:
    """Ask again after each snapshot until the answer is `want`."""
    async def wait() -> None:
        while True:
            changed.clear()
            if await answer(server, name) == want:
                return
            await changed.wait()

    try:
        await asyncio.wait_for(wait(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"{name}: still {await answer(server, name)}, want {want}") from None


async def test_dns_follows_file_reloads(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", import_yaml("web", "Headless", WEB))
    write(tmp_path / "web-a.yaml", slice_yaml("web", "cluster-a", "IPv4", ["10.0.0.1"], WEB,
                                              hostnames=["web-0"]))
    store = SnapshotStore("cluster-a")
    changed = asyncio.Event()
    server = DnsServer(DnsConfig(listen=("127.0.0.1", 0)), store)
    await server.start()
    store.subscribe(lambda _s: changed.set())  # after the server's own subscription
    task = spawn(FileSource(str(tmp_path), poll_interval_s=0.02).run(store), name="file")
    try:
        await until(server, changed, ("NOERROR", ["10.0.0.1"]))
        pod = "web-0.cluster-a." + NAME
        assert await answer(server, pod) == ("NOERROR", ["10.0.0.1"])
        # add
        write(tmp_path / "web-a.yaml", slice_yaml(
            "web", "cluster-a", "IPv4", ["10.0.0.1", "10.0.0.2"], WEB, hostnames=TWO))
        await until(server, changed, ("NOERROR", ["10.0.0.1", "10.0.0.2"]))
        # change
        write(tmp_path / "web-a.yaml", slice_yaml(
            "web", "cluster-a", "IPv4", ["10.0.0.3", "10.0.0.2"], WEB, hostnames=TWO))
        await until(server, changed, ("NOERROR", ["10.0.0.2", "10.0.0.3"]))
        assert await answer(server, pod) == ("NOERROR", ["10.0.0.3"])
        # remove
        write(tmp_path / "web-a.yaml", slice_yaml(
            "web", "cluster-a", "IPv4", ["10.0.0.2"], WEB, hostnames=["web-1"]))
        await until(server, changed, ("NOERROR", ["10.0.0.2"]))
        assert (await answer(server, pod))[0] == "NXDOMAIN"
        # invalid: rejected, the last good answer stays
        version = store.current.version
        write(tmp_path / "web-a.yaml",
              slice_yaml("web", "cluster-a", "IPv4", ["10.0.0.300"], WEB, hostnames=["web-1"]))
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while store.sources[f"file:{tmp_path}"].error is None:
            assert asyncio.get_running_loop().time() < deadline, "invalid file not noticed"
            await asyncio.sleep(0.02)
        assert store.current.version == version
        assert await answer(server) == ("NOERROR", ["10.0.0.2"])
        # deleted slice file: no ready endpoint, so the headless name is gone
        (tmp_path / "web-a.yaml").unlink()
        await until(server, changed, ("NXDOMAIN", []))
        assert (await answer(server, "test.svc.clusterset.local."))[0] == "NOERROR"
        # deleted import: the namespace goes with its last service
        (tmp_path / "web.yaml").unlink()
        await until(server, changed, ("NXDOMAIN", []), "test.svc.clusterset.local.")
    finally:
        await cancel_and_wait([task])
        await server.stop()
