"""A whole gateway on `--source kube`: DNS, proxy and /readyz over a Karmada service."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import dnslib
import pytest
from kubernetes_asyncio.client import CoreV1Api

from mcsproxy.config import AdminConfig, DnsConfig, GatewayConfig, HealthConfig, ProxyConfig
from mcsproxy.gateway import Gateway
from mcsproxy.model import ImportedService, ServiceKey
from tests.http_support import HttpBackend, RawClient
from tests.kube_emulator import KubeEmulator
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_controller import dns_a, dns_query
from tests.test_kube_source import (
    claimed_service,
    karmada_slice,
    local_service,
    multicluster_service,
    native_slice,
)

HOST = "127.50.0.1"
NAME = "web.test.svc.clusterset.local"
WEB = ServiceKey("test", "web")


async def readyz(config: GatewayConfig) -> tuple[int, dict]:
    host, port = config.admin.listen
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.get(f"http://{host}:{port}/readyz") as response:
        return response.status, await response.json()


async def test_karmada_service_served_with_failover_and_static_stability(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    west = await Backend("west-1", "127.50.1.1", free_port("127.50.1.1"), "member1").start()
    north = await Backend("north-1", "127.50.2.1", free_port("127.50.2.1"), "member2").start()
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.put_object(multicluster_service("web"))
        emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
        emu.put_object(karmada_slice("member1", "web-a", "web", [west.host], port=west.port))
        emu.put_object(karmada_slice("member2", "web-b", "web", [north.host], port=north.port))
        monkeypatch.setenv("KUBECONFIG", str(emu.kubeconfig(tmp_path / "kubeconfig")))
        config = GatewayConfig(
            cluster_id="member3", sources=("kube",), clusterset_cidr="127.240.50.0/24",
            dns=DnsConfig(listen=(HOST, free_port(HOST, socket.SOCK_DGRAM))),
            admin=AdminConfig(listen=(HOST, free_port(HOST))),
            proxy=ProxyConfig(health=HealthConfig(interval_s=0.2, timeout_s=0.2,
                                                  healthy_threshold=1,
                                                  unhealthy_threshold=1)))
        gateway = Gateway(config)
        await gateway.start()
        try:
            async with asyncio.timeout(5):
                await gateway.store.loaded.wait()
            [ip] = await dns_a(config.dns.listen, NAME)
            assert ip.startswith("127.240.50.")
            assert gateway.proxy is not None
            await asyncio.wait_for(
                gateway.proxy.wait_applied(gateway.store.current.version), 5)
            seen = {await ask(ip, 80) for _ in range(6)}
            assert seen == {"west-1", "north-1"}  # every provider cluster serves

            await west.stop()  # a provider cluster fails: the other one takes it all
            assert {await ask(ip, 80) for _ in range(6)} == {"north-1"}

            await emu.stop()  # the API server goes away
            status = gateway.store.sources["kube"]
            async with asyncio.timeout(5):
                while status.connected:
                    await asyncio.sleep(0.02)
            code, detail = await readyz(config)
            assert code == 200 and detail["sources"]["kube"]["connected"] is False
            assert detail["sources"]["kube"]["error"]
            assert await dns_a(config.dns.listen, NAME) == [ip]  # still serving
            assert await ask(ip, 80) == "north-1"

            emu.put_object(karmada_slice("member1", "web-a", "web", [north.host],
                                         port=north.port))
            await emu.start()
            async with asyncio.timeout(5):
                while not status.connected:
                    await asyncio.sleep(0.02)
            code, detail = await readyz(config)
            assert code == 200 and detail["sources"]["kube"]["error"] is None
            assert await dns_a(config.dns.listen, NAME) == [ip]  # the same address
        finally:
            await gateway.stop()
            await west.stop()
            await north.stop()


def gateway_config(cluster_id: str, host: str = HOST) -> GatewayConfig:
    return GatewayConfig(
        cluster_id=cluster_id, sources=("kube",), clusterset_cidr="127.240.50.0/24",
        dns=DnsConfig(listen=(host, free_port(host, socket.SOCK_DGRAM))),
        admin=AdminConfig(listen=(host, free_port(host))),
        proxy=ProxyConfig(health=HealthConfig(interval_s=0.2, timeout_s=0.2,
                                              healthy_threshold=1, unhealthy_threshold=1)))


async def serving_ip(gateway: Gateway, config: GatewayConfig) -> str:
    async with asyncio.timeout(5):
        await gateway.store.loaded.wait()
        while ServiceKey("test", "web") not in gateway.store.current.services:
            await asyncio.sleep(0.02)
    [ip] = await dns_a(config.dns.listen, NAME)
    assert gateway.proxy is not None
    await asyncio.wait_for(gateway.proxy.wait_applied(gateway.store.current.version), 5)
    return ip


async def applied(gateway: Gateway,
                  predicate: Callable[[ImportedService | None], bool]) -> None:
    """Until test/web in the store satisfies `predicate` and the proxy serves that snapshot."""
    async with asyncio.timeout(5):
        while not predicate(gateway.store.current.services.get(WEB)):
            await asyncio.sleep(0.02)
    assert gateway.proxy is not None
    await asyncio.wait_for(gateway.proxy.wait_applied(gateway.store.current.version), 5)


@contextlib.asynccontextmanager
async def served_gateway(emu: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         cluster_id: str, host: str = HOST,
                         ) -> AsyncIterator[tuple[Gateway, GatewayConfig, str]]:
    """A gateway of `cluster_id` on `--source kube` against `emu`, serving test/web:
    yields it, its config and the service's ClusterSetIP; stopped on the way out."""
    monkeypatch.setenv("KUBECONFIG", str(emu.kubeconfig(tmp_path / "kubeconfig")))
    config = gateway_config(cluster_id, host)
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield gateway, config, await serving_ip(gateway, config)
    finally:
        await gateway.stop()


async def test_karmada_consumer_served_without_a_multicluster_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer member as Karmada leaves it: the propagated Service and the providers'
    dispatched slices, no MultiClusterService. DNS answers and connections reach both."""
    west = await Backend("west-1", "127.50.1.1", free_port("127.50.1.1"), "member1").start()
    north = await Backend("north-1", "127.50.2.1", free_port("127.50.2.1"), "member2").start()
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}]))
        emu.put_object(karmada_slice("member1", "web-a", "web", [west.host], port=west.port))
        emu.put_object(karmada_slice("member2", "web-b", "web", [north.host], port=north.port))
        try:
            async with served_gateway(emu, tmp_path, monkeypatch, "member3") as (_, _, ip):
                assert ip.startswith("127.240.50.")
                assert {await ask(ip, 80) for _ in range(6)} == {"west-1", "north-1"}
        finally:
            await west.stop()
            await north.stop()


async def test_karmada_provider_and_consumer_prefers_its_own_endpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member that is provider and consumer: its own endpoints (the Service's native
    slices; Karmada never dispatches them back) are local, so PreferClose stays local and
    fails over to the dispatched provider when they fail."""
    local = await Backend("local-1", "127.50.1.1", free_port("127.50.1.1"), "member1").start()
    north = await Backend("north-1", "127.50.2.1", free_port("127.50.2.1"), "member2").start()
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.put_object(local_service("web", [{"name": "http", "protocol": "TCP", "port": 80}],
                                     trafficDistribution="PreferClose"))
        emu.put_object(native_slice("web-x1", "web", [local.host], port=local.port))
        emu.put_object(karmada_slice("member2", "web-b", "web", [north.host], port=north.port))
        try:
            async with served_gateway(emu, tmp_path, monkeypatch, "member1") as (_, _, ip):
                assert {await ask(ip, 80) for _ in range(6)} == {"local-1"}
                await local.stop()  # the local cluster fails: the remote provider takes over
                assert {await ask(ip, 80) for _ in range(6)} == {"north-1"}
        finally:
            await local.stop()
            await north.stop()


async def test_karmada_sole_provider_resolves_its_clusterset_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only provider of a CrossCluster MultiClusterService gets no dispatched slice.
    Its clients still resolve the clusterset name (the portable name of MCS) and reach
    the local backends; a second provider joining keeps the address and adds its own."""
    host = "127.50.3.1"
    local = await Backend("local-1", "127.50.3.2", free_port("127.50.3.2"), "member1").start()
    north = await Backend("north-1", "127.50.3.3", free_port("127.50.3.3"), "member2").start()
    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.put_object(claimed_service("web", [{"name": "http", "protocol": "TCP",
                                                "port": 80}]))
        emu.put_object(native_slice("web-x1", "web", [local.host], port=local.port))
        try:
            async with served_gateway(emu, tmp_path, monkeypatch, "member1",
                                      host) as (gateway, config, ip):
                assert ip.startswith("127.240.50.")
                assert {await ask(ip, 80) for _ in range(6)} == {"local-1"}

                emu.put_object(karmada_slice("member2", "web-b", "web", [north.host],
                                             port=north.port))
                await applied(gateway, lambda web: web is not None and len(web.endpoints) == 2)
                assert await dns_a(config.dns.listen, NAME) == [ip]
                assert {await ask(ip, 80) for _ in range(8)} == {"local-1", "north-1"}
        finally:
            await local.stop()
            await north.stop()


async def test_karmada_sole_provider_at_zero_endpoints_keeps_name_and_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KEP-1645: an import with no endpoints still resolves. The only provider scaled to zero
    keeps its name and ClusterSetIP; a connection is closed at once (not hung), an http
    port answers 503; its endpoints back, traffic flows at the same address; its Service
    deleted, the name is gone."""
    host, address = "127.50.4.1", "127.50.4.2"
    tcp = await Backend("local-1", address, free_port(address), "member1").start()
    web = await HttpBackend("local-1", address, "member1").start()

    def provider_slice(addresses: list[str]) -> dict:
        eslice = native_slice("web-x1", "web", addresses)
        eslice["ports"] = [{"name": "http", "protocol": "TCP", "port": web.port},
                           {"name": "tcp", "protocol": "TCP", "port": tcp.port}]
        return eslice

    async def http_get(ip: str) -> tuple[int, bytes]:
        client = await RawClient.open(ip, 80)
        try:
            response = await client.get()
        finally:
            await client.close()
        return response.status, response.body

    async with KubeEmulator(bookmark_interval=0.1) as emu:
        emu.put_object(claimed_service("web", [
            {"name": "http", "protocol": "TCP", "port": 80, "appProtocol": "http"},
            {"name": "tcp", "protocol": "TCP", "port": 81}]))
        emu.put_object(provider_slice([address]))
        try:
            async with served_gateway(emu, tmp_path, monkeypatch, "member1",
                                      host) as (gateway, config, ip):
                assert await ask(ip, 81) == "local-1"
                assert (await http_get(ip))[0] == 200

                emu.put_object(provider_slice([]))  # scaled to zero
                await applied(gateway, lambda svc: svc is not None and not svc.endpoints)
                assert await dns_a(config.dns.listen, NAME) == [ip]
                client = await RawClient.open(ip, 81)
                started = time.monotonic()
                assert await client.closed(timeout=1.0)
                assert time.monotonic() - started < 1.0
                await client.close()
                assert await http_get(ip) == (503, b"no healthy endpoint\n")

                emu.put_object(provider_slice([address]))  # back
                await applied(gateway, lambda svc: svc is not None and bool(svc.endpoints))
                assert await dns_a(config.dns.listen, NAME) == [ip]
                assert await ask(ip, 81) == "local-1"
                assert await http_get(ip) == (200, b"local-1")

                async with emu.api_client() as api:
                    await CoreV1Api(api).delete_namespaced_service("web", "test")
                await applied(gateway, lambda svc: svc is None)
                reply = await asyncio.to_thread(dns_query, config.dns.listen, NAME)
                assert reply.header.rcode == dnslib.RCODE.NXDOMAIN
                with pytest.raises(OSError):
                    await ask(ip, 81)
        finally:
            await tcp.stop()
            await web.stop()
