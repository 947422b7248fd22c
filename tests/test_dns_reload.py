"""DNS answers follow the files: add, change, remove an endpoint; an invalid file; a
deleted file; names that are not DNS labels; an update of the index that fails. The same
question is asked again each time, so a stale memoised answer would show."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path

import dnslib
import pytest

from mcsproxy.config import DnsConfig
from mcsproxy.dns.responder import next_serial
from mcsproxy.dns.server import DnsServer
from mcsproxy.dns.zone import ZoneIndex
from mcsproxy.model import ServiceKey
from mcsproxy.sources.file import FileSource
from mcsproxy.store import SnapshotStore
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.dns_support import (
    exchange,
    import_yaml,
    load_store,
    make_query,
    running_dns,
    slice_yaml,
    zone_texts,
)

WEB = "[{name: web, protocol: TCP, port: 8080}]"
NAME = "web.test.svc.clusterset.local."
WAIT_S = 5.0
TWO = ["web-0", "web-1"]


def write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def answer(server: DnsServer, name: str = NAME, transport: str = "udp",
                 ) -> tuple[str, list[str]]:
    reply = dnslib.DNSRecord.parse(await exchange(transport, server.bound, make_query(name)))
    return dnslib.RCODE.get(reply.header.rcode), sorted(str(r.rdata) for r in reply.rr)


async def both(server: DnsServer, name: str = NAME) -> list[tuple[str, list[str]]]:
    """The answer over UDP (memoised after the first time) and over TCP (never memoised)."""
    return [await answer(server, name, transport) for transport in ("udp", "tcp")]


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


async def test_a_service_moved_to_another_file_keeps_answering(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same ServiceImport renamed into place under a new name, then the old file
    deleted: every snapshot in between still holds it (NXDOMAIN for ~0.25 s before)."""
    text = import_yaml("web", "ClusterSetIP", WEB, '["127.240.0.50"]')
    old, new = tmp_path / "services.yaml", tmp_path / "imports.yaml"
    write(old, text)
    store = SnapshotStore("cluster-a")
    changed = asyncio.Event()
    server = DnsServer(DnsConfig(listen=("127.0.0.1", 0)), store)
    await server.start()
    store.subscribe(lambda _s: changed.set())
    task = spawn(FileSource(str(tmp_path), poll_interval_s=0.02).run(store), name="file")
    try:
        await until(server, changed, ("NOERROR", ["127.240.0.50"]))
        served: list[bool] = []
        store.subscribe(lambda s: served.append(any(k.name == "web" for k in s.services)))
        with caplog.at_level(logging.INFO, logger="mcsproxy.sources.file"):
            write(new, text)
            old.unlink()
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while f"file removed path={old}" not in caplog.text:
                assert asyncio.get_running_loop().time() < deadline, "deletion not applied"
                assert await answer(server) == ("NOERROR", ["127.240.0.50"])
                await asyncio.sleep(0.01)
        assert f"file loaded path={new}" in caplog.text
        assert all(served), served
        assert await answer(server) == ("NOERROR", ["127.240.0.50"])
    finally:
        await cancel_and_wait([task])
        await server.stop()


async def soa_serials(server: DnsServer) -> list[int]:
    """The serial of the apex SOA over UDP and of an NXDOMAIN's SOA over TCP."""
    serials = []
    for transport, name in (("udp", "clusterset.local."), ("tcp", "nothing." + NAME)):
        reply = dnslib.DNSRecord.parse(
            await exchange(transport, server.bound, make_query(name, "SOA")))
        [soa] = [r for r in reply.rr + reply.auth if r.rtype == dnslib.QTYPE.SOA]
        serials.append(soa.rdata.times[0])
    return serials


async def test_every_snapshot_gets_a_greater_soa_serial_within_one_second_too() -> None:
    # Snapshots a few milliseconds apart: at most one second boundary falls between four,
    # so some share a second, and used to share a serial (a cache comparing serials would
    # miss the change).
    async with running_dns() as server:
        texts = zone_texts()
        seconds = [int(server.store.current.built_at)]
        serials = [await soa_serials(server)]
        for i in range(3):
            texts["more.yaml"] = import_yaml(f"more{i}", "ClusterSetIP", WEB,
                                             f'["127.240.9.{i + 1}"]')
            load_store(server.store, texts)
            seconds.append(int(server.store.current.built_at))
            serials.append(await soa_serials(server))
        assert server.store.current.version == 4
        assert len(set(seconds)) < len(seconds), "no two snapshots in one second"
        assert all(udp == tcp for udp, tcp in serials), serials
        for before, after in itertools.pairwise(serials):
            # RFC 1982: greater by less than 2**31, modulo 2**32
            assert 0 < (after[0] - before[0]) % 2**32 < 2**31, serials


def test_the_serial_follows_the_clock_and_never_goes_back() -> None:
    assert next_serial(None, 1_800_000_000) == 1_800_000_000  # a start: the clock
    assert next_serial(1_800_000_000, 1_800_000_001) == 1_800_000_001
    assert next_serial(1_800_000_000, 1_800_000_000) == 1_800_000_001  # the same second
    assert next_serial(1_800_000_005, 1_800_000_001) == 1_800_000_006  # ahead of the clock
    assert next_serial(2**32 - 1, 2**32 - 1) == 0  # wraps (RFC 1982)
    assert next_serial(2**32 - 1, 2**32 + 3) == 3


def clusterset_ip(ip: str, name: str = "web", namespace: str = "test") -> str:
    return import_yaml(name, "ClusterSetIP", WEB, f'["{ip}"]', namespace=namespace)


def no_dns_name_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has no DNS name" in r.getMessage()]


async def test_a_dotted_service_name_has_no_dns_name_and_leaving_updates_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    # A ServiceImport is a CRD: the API server asks its name to be a DNS subdomain only,
    # so `a.b` passes. It used to be two labels in the zone, and removing it raised half
    # way through the update: web kept its old address, over UDP until an unrelated
    # snapshot came.
    caplog.set_level(logging.WARNING, logger="mcsproxy.dns.zone")
    dotted = "a.b.test.svc.clusterset.local."
    texts = {"all.yaml": clusterset_ip("127.240.20.1", "a.b") + "\n---\n"
             + clusterset_ip("127.240.20.2")}
    async with running_dns(texts=texts) as server:
        assert await both(server) == [("NOERROR", ["127.240.20.2"])] * 2
        assert await both(server, dotted) == [("NXDOMAIN", [])] * 2
        load_store(server.store, {"all.yaml": clusterset_ip("127.240.20.3")})
        assert server.store.current.changed == {ServiceKey("test", "a.b"),
                                                ServiceKey("test", "web")}
        assert await both(server) == [("NOERROR", ["127.240.20.3"])] * 2
        assert await both(server, dotted) == [("NXDOMAIN", [])] * 2
    [warning] = no_dns_name_warnings(caplog)
    assert "test/a.b" in warning


@pytest.mark.parametrize(("namespace", "name"), [("Test", "web"), ("test", "WEB")])
async def test_a_name_that_is_not_a_lowercase_label_leaves_the_lowercase_one_alone(
        namespace: str, name: str, caplog: pytest.LogCaptureFixture) -> None:
    # Test/web (or test/WEB) used to be web.test.svc.<zone> as well: whichever was added
    # last answered, and removing either removed the names of both.
    caplog.set_level(logging.WARNING, logger="mcsproxy.dns.zone")
    texts = {"web.yaml": clusterset_ip("127.240.20.1"),
             "odd.yaml": clusterset_ip("127.240.20.8", name, namespace)}
    async with running_dns(texts=texts) as server:
        assert await both(server) == [("NOERROR", ["127.240.20.1"])] * 2
        texts["odd.yaml"] = clusterset_ip("127.240.20.9", name, namespace)
        load_store(server.store, texts)  # changed: added to the zone again, logged once
        assert await both(server) == [("NOERROR", ["127.240.20.1"])] * 2
        del texts["odd.yaml"]
        load_store(server.store, texts)
        assert server.store.current.changed == {ServiceKey(namespace, name)}
        assert await both(server) == [("NOERROR", ["127.240.20.1"])] * 2
        assert (await answer(server, "test.svc.clusterset.local."))[0] == "NOERROR"
    [warning] = no_dns_name_warnings(caplog)
    assert f"{namespace}/{name}" in warning


class FailsOnce(ZoneIndex):
    """A zone whose next incremental update drops one service's names, then raises: the
    index half-updated, as the dotted-name KeyError above left it."""

    fail_next = False

    def _remove(self, key: ServiceKey) -> None:
        super()._remove(key)
        if self.fail_next:
            self.fail_next = False
            raise KeyError(key)


async def test_an_update_that_fails_half_way_is_replaced_by_a_rebuild(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="mcsproxy.dns")
    texts = {"web.yaml": clusterset_ip("127.240.20.1"),
             "api.yaml": clusterset_ip("127.240.20.5", "api", "prod")}
    store = SnapshotStore("cluster-a")
    load_store(store, texts)
    server = DnsServer(DnsConfig(listen=("127.0.0.1", 0)), store)
    zone = server.responder.zone = FailsOnce("clusterset.local", 5)
    await server.start()
    try:
        assert await both(server) == [("NOERROR", ["127.240.20.1"])] * 2
        before = await soa_serials(server)
        texts["web.yaml"] = clusterset_ip("127.240.20.2")
        texts["db.yaml"] = clusterset_ip("127.240.20.3", "db")
        zone.fail_next = True
        load_store(store, texts)
        assert not zone.fail_next
        assert await both(server) == [("NOERROR", ["127.240.20.2"])] * 2
        assert await both(server, "db." + NAME.removeprefix("web.")) == [
            ("NOERROR", ["127.240.20.3"])] * 2
        assert [r.name for r in caplog.records if r.levelno >= logging.ERROR] == ["mcsproxy.dns"]
        assert all(0 < (a - b) % 2**32 < 2**31 for a, b in zip(await soa_serials(server),
                                                               before, strict=True))
        # the rebuilt index takes the next snapshot incrementally: the namespace prod
        # goes with its last service
        del texts["api.yaml"]
        load_store(store, texts)
        assert zone.version == store.current.version
        assert (await answer(server, "prod.svc.clusterset.local."))[0] == "NXDOMAIN"
        assert await both(server) == [("NOERROR", ["127.240.20.2"])] * 2
    finally:
        await server.stop()
