"""Shared by the DNS tests: the test zone, a running DnsServer, UDP/TCP query clients.

The zone is the mcs-spec.md DNS example (namespace `test`, ClusterSetIP `myservice`,
headless `headless`, clusters cluster-a / cluster-b) plus a dual-stack service, a
dual-stack headless one, a headless one with nothing ready and one of 200 endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import dnslib

from mcsproxy.config import DnsConfig
from mcsproxy.dns.server import DnsServer
from mcsproxy.sources.file import parse_file_text
from mcsproxy.store import SnapshotStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "gateway"
TIMEOUT_S = 5.0


def slice_yaml(service: str, cluster: str, family: str, addresses: list[str],
               ports: str, namespace: str = "test", ready: bool = True,
               hostnames: list[str] | None = None) -> str:
    endpoints = []
    for i, address in enumerate(addresses):
        host = f"\n    hostname: {hostnames[i]}" if hostnames else ""
        endpoints.append(
            f"  - addresses: [\"{address}\"]{host}\n    conditions: {{ready: {str(ready).lower()}}}"
        )
    return f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{cluster}-{family.lower()}
  namespace: {namespace}
  labels:
    multicluster.kubernetes.io/service-name: {service}
    multicluster.kubernetes.io/source-cluster: {cluster}
addressType: {family}
ports: {ports}
endpoints:
{chr(10).join(endpoints)}
"""


def import_yaml(name: str, svc_type: str, ports: str, ips: str = "[]",
                namespace: str = "test") -> str:
    return f"""
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceImport
metadata:
  name: {name}
  namespace: {namespace}
spec:
  type: {svc_type}
  ips: {ips}
  ports: {ports}
"""


HTTP_PORTS = "[{name: http, protocol: TCP, port: 80}, {name: http-udp, protocol: UDP, port: 80}]"
WEB_PORTS = "[{name: web, protocol: TCP, port: 8080}]"
WEB_METRICS_PORTS = ("[{name: web, protocol: TCP, port: 8080}, "
                     "{name: metrics, protocol: TCP, port: 9090}]")
BIG_ADDRESSES = [f"10.5.{i // 250}.{i % 250 + 1}" for i in range(200)]

EXTRA_ZONE = "\n---\n".join([
    import_yaml("dual", "ClusterSetIP", HTTP_PORTS, '["127.240.0.11", "fd00::11"]'),
    import_yaml("headless6", "Headless", WEB_PORTS),
    slice_yaml("headless6", "cluster-a", "IPv4", ["10.6.0.1"], WEB_PORTS),
    slice_yaml("headless6", "cluster-a", "IPv6", ["fd00::6:1"], WEB_PORTS),
    slice_yaml("headless6", "cluster-b", "IPv6", ["fd00::6:2"], WEB_PORTS, ready=False),
    import_yaml("sleepy", "Headless", WEB_PORTS),
    slice_yaml("sleepy", "cluster-a", "IPv4", ["10.7.0.1"], WEB_PORTS, ready=False),
    import_yaml("big", "Headless", WEB_PORTS),
    slice_yaml("big", "cluster-a", "IPv4", BIG_ADDRESSES, WEB_PORTS),
    import_yaml("api", "ClusterSetIP", WEB_PORTS, '["127.240.1.1"]', namespace="prod"),
    # cluster-b's Service does not expose `metrics`; portless's slice names no port at all
    import_yaml("partial", "Headless", WEB_METRICS_PORTS),
    slice_yaml("partial", "cluster-a", "IPv4", ["10.8.0.1"], WEB_METRICS_PORTS),
    slice_yaml("partial", "cluster-b", "IPv4", ["10.8.0.2"], WEB_PORTS),
    import_yaml("portless", "Headless", WEB_PORTS),
    slice_yaml("portless", "cluster-a", "IPv4", ["10.9.0.1"], "[]"),
])


def zone_texts() -> dict[str, str]:
    """File name → YAML text of the whole test zone."""
    texts = {p.name: p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))}
    texts["extra.yaml"] = EXTRA_ZONE
    return texts


def load_store(store: SnapshotStore, texts: dict[str, str] | None = None) -> None:
    objects = {}
    for name, text in (texts or zone_texts()).items():
        objects.update(parse_file_text(text, name, "test"))
    store.register_source("test")
    store.replace_source("test", objects)
    store.mark_synced("test")
    store.commit()


@contextlib.asynccontextmanager
async def running_dns(load: bool = True, texts: dict[str, str] | None = None,
                      **config: object) -> AsyncIterator[DnsServer]:
    """A DNS server for the test zone, for a zone of its own (texts), or for none."""
    store = SnapshotStore("cluster-a")
    if load:
        load_store(store, texts)
    config.setdefault("listen", ("127.0.0.1", 0))
    server = DnsServer(DnsConfig(**config), store)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


P = TypeVar("P", bound=asyncio.DatagramProtocol)
TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_upstream(protocol: Callable[[], P], host: str = "127.0.0.1",
                        tcp: Callable[[P], TcpHandler] | None = None,
                        ) -> AsyncIterator[tuple[tuple[str, int], P]]:
    """A fake --dns-upstream: protocol on a UDP port of host and, with tcp (given the
    protocol, it returns the connection handler), a TCP server on the same port."""
    loop = asyncio.get_running_loop()
    for _ in range(10):  # the UDP port may be taken for TCP
        transport, proto = await loop.create_datagram_endpoint(protocol, local_addr=(host, 0))
        addr = transport.get_extra_info("sockname")[:2]
        if tcp is None:
            server = None
            break
        try:
            server = await asyncio.start_server(tcp(proto), *addr)
            break
        except OSError:
            transport.close()
    else:
        raise AssertionError("no port free for both UDP and TCP")
    try:
        yield addr, proto
    finally:
        transport.close()
        if server is not None:
            server.close()
            await server.wait_closed()


# -- clients -------------------------------------------------------------------------
def make_query(name: str, qtype: str = "A", edns: int | None = None, **kw: object) -> bytes:
    q = dnslib.DNSRecord.question(name, qtype)
    q.header.id = random.getrandbits(16)
    if edns is not None:
        q.add_ar(dnslib.EDNS0(udp_len=edns, **kw))  # type: ignore[arg-type]
    return bytes(q.pack())


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.answers.put_nowait(data)


@contextlib.asynccontextmanager
async def udp_client(addr: tuple[str, int]) -> AsyncIterator[tuple[asyncio.DatagramTransport,
                                                                   _UdpClient]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_UdpClient, remote_addr=addr)
    try:
        yield transport, proto
    finally:
        transport.close()


async def udp_exchange(addr: tuple[str, int], packet: bytes) -> bytes:
    async with udp_client(addr) as (transport, proto):
        transport.sendto(packet)
        return await asyncio.wait_for(proto.answers.get(), TIMEOUT_S)


async def tcp_exchange(addr: tuple[str, int], *packets: bytes) -> list[bytes]:
    """Send every packet on one connection (pipelined), read one answer per packet."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), TIMEOUT_S)
    try:
        writer.write(b"".join(len(p).to_bytes(2, "big") + p for p in packets))
        answers = []
        for _ in packets:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TIMEOUT_S))
            answers.append(await asyncio.wait_for(reader.readexactly(size), TIMEOUT_S))
        return answers
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(transport: str, addr: tuple[str, int], packet: bytes) -> bytes:
    if transport == "udp":
        return await udp_exchange(addr, packet)
    return (await tcp_exchange(addr, packet))[0]


# -- zone-file lines ------------------------------------------------------------------
def zone_line(record: dnslib.RR) -> str:
    """A record as a normalised zone-file line; the SOA serial becomes SERIAL."""
    fields = str(record).split()
    if record.rtype == dnslib.QTYPE.SOA:
        fields[6] = "SERIAL"
    return " ".join(fields)


def zone_lines(records: list[dnslib.RR]) -> list[str]:
    return sorted(zone_line(r) for r in records)


SOA_LINE = ("clusterset.local. 5 IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. "
            "SERIAL 3600 600 86400 5")
NS_LINE = "clusterset.local. 5 IN NS ns.dns.clusterset.local."
