"""Active health checks against real sockets: TCP connect and HTTP GET probes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import socket

from mcsproxy.config import HealthConfig, ProxyConfig
from mcsproxy.upstream import HealthChecker, Host, Target, UpstreamSet, probe_http, probe_tcp
from mcsproxy.upstream.health import ProbeBudget
from tests.proxy_fixtures import free_port, traced_bytes_each


class HttpStatus(asyncio.Protocol):
    def __init__(self, status: bytes) -> None:
        self.status = status

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 " + self.status + b"\r\nContent-Length: 0\r\n\r\n")  # type: ignore[attr-defined]
            self.transport.close()


async def test_tcp_probe_up_and_refused() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.3.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await probe_tcp("127.0.3.1", port, 1.0) is None
    finally:
        server.close()
    assert await probe_tcp("127.0.3.2", free_port("127.0.3.2"), 1.0) is not None


async def test_http_probe_reads_the_status() -> None:
    loop = asyncio.get_running_loop()
    ok = await loop.create_server(lambda: HttpStatus(b"204 No Content"), "127.0.3.3", 0)
    bad = await loop.create_server(lambda: HttpStatus(b"503 Unavailable"), "127.0.3.4", 0)
    junk = await loop.create_server(lambda: HttpStatus(b"x"), "127.0.3.5", 0)
    try:
        assert await probe_http("127.0.3.3", ok.sockets[0].getsockname()[1], "/", 1) is None
        assert await probe_http("127.0.3.4", bad.sockets[0].getsockname()[1], "/", 1) \
            == "status 503"
        assert await probe_http("127.0.3.5", junk.sockets[0].getsockname()[1], "/", 1) \
            == "no HTTP status line"
    finally:
        for s in (ok, bad, junk):
            s.close()


async def test_a_hung_endpoint_passes_the_tcp_check_and_fails_the_http_one() -> None:
    # The limit README's Health section states. A stopped app (SIGSTOP, a deadlock) is a
    # listening socket nobody accepts on: its kernel still completes handshakes, so a
    # TCP connect passes; the HTTP GET gets no answer and times out.
    with socket.create_server(("127.71.5.2", 0)) as hung:
        port = hung.getsockname()[1]
        assert await probe_tcp("127.71.5.2", port, 0.3) is None
        assert await probe_http("127.71.5.2", port, "/", 0.3) == "timeout"


async def test_checker_takes_a_dead_endpoint_out_and_brings_it_back() -> None:
    loop = asyncio.get_running_loop()
    port = free_port("127.0.3.6")
    live = await loop.create_server(asyncio.Protocol, "127.0.3.7", port)
    cfg = HealthConfig(interval_s=0.02, timeout_s=0.5, healthy_threshold=1,
                       unhealthy_threshold=2, jitter=0.2)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(1))
    u.update([Target("127.0.3.6", port, "east", True), Target("127.0.3.7", port, "east", True)])
    u.attach_health_checker(HealthChecker(u, cfg, http=False))
    dead = u.hosts[("127.0.3.6", port)]
    alive = u.hosts[("127.0.3.7", port)]
    revived = None
    try:
        async with asyncio.timeout(5):
            while dead.healthy:
                await asyncio.sleep(0.01)
        assert alive.healthy
        assert {u.pick() for _ in range(10)} == {alive}
        revived = await loop.create_server(asyncio.Protocol, "127.0.3.6", port)
        async with asyncio.timeout(5):
            while not dead.healthy:
                await asyncio.sleep(0.01)
    finally:
        await u.stop()
        live.close()
        if revived is not None:
            revived.close()



async def test_an_endpoint_back_by_the_probes_returns_from_its_ejection() -> None:
    # A cluster killed and restarted: refused connects ejected its endpoint for 30 s,
    # the probes saw it go down and come back, and it still got no traffic for the rest
    # of the 30 s (and up to 300 s once ejected again), local-first staying on remote
    # clusters all the while.
    loop = asyncio.get_running_loop()
    port = free_port("127.79.9.1")
    live = await loop.create_server(asyncio.Protocol, "127.79.9.2", port)
    cfg = HealthConfig(interval_s=0.02, timeout_s=0.5, healthy_threshold=2,
                       unhealthy_threshold=1, jitter=0.2)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(5))
    u.update([Target("127.79.9.1", port, "east", True), Target("127.79.9.2", port, "west", True)])
    u.attach_health_checker(HealthChecker(u, cfg, http=False, rng=random.Random(6)))
    dead = u.hosts[("127.79.9.1", port)]
    revived = None
    try:
        for _ in range(5):
            u.connect_failed(dead, "refused")
        assert dead.ejected and u.ejected_for_s(dead) > 20
        async with asyncio.timeout(2):
            while dead.active_up:
                await asyncio.sleep(0.01)
        revived = await loop.create_server(asyncio.Protocol, "127.79.9.1", port)
        async with asyncio.timeout(2):
            while not dead.healthy:
                await asyncio.sleep(0.01)
        assert not dead.ejected and dead in {u.pick() for _ in range(10)}
    finally:
        await u.stop()
        live.close()
        if revived is not None:
            revived.close()

async def test_a_probe_without_a_descriptor_gives_no_verdict() -> None:
    # The gateway's own descriptors running out (EMFILE) made every probe fail: after
    # two rounds every endpoint was unhealthy, so local-first went into total panic and
    # spread by host counts, though no endpoint was at fault.
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(asyncio.Protocol, f"127.92.7.{i}", 0) for i in (1, 2)]
    cfg = HealthConfig(interval_s=0.02, timeout_s=0.5, healthy_threshold=1,
                       unhealthy_threshold=1)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(1))
    u.update([Target(f"127.92.7.{i}", s.sockets[0].getsockname()[1], "east", True)
              for i, s in zip((1, 2), servers, strict=True)])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
        try:
            u.attach_health_checker(HealthChecker(u, cfg, http=False, rng=random.Random(2)))
            await asyncio.sleep(0.2)  # several probe rounds
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert all(h.active_up for h in u.hosts.values())
    finally:
        await u.stop()
        for s in servers:
            s.close()


class Silent(asyncio.Protocol):
    """Takes a probe's connection and never answers; counts connections open at once."""

    open = 0
    most = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Silent.open += 1
        Silent.most = max(Silent.most, Silent.open)

    def connection_lost(self, exc: Exception | None) -> None:
        Silent.open -= 1


async def test_one_probe_in_flight_per_endpoint_though_probes_outlast_the_interval() -> None:
    # style.md: one probe in flight per endpoint. A probe that waits 0.3 s for a status
    # line, every 0.02 s, would pile up ~15 open probes if probes ran off a timer.
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Silent, "127.161.7.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = HealthConfig(interval_s=0.02, timeout_s=0.3, healthy_threshold=1,
                       unhealthy_threshold=1, jitter=0.1)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(3))
    u.update([Target("127.161.7.1", port, "east", True)])
    u.attach_health_checker(HealthChecker(u, cfg, http=True, rng=random.Random(4)))
    host = u.hosts[("127.161.7.1", port)]
    try:
        async with asyncio.timeout(5):
            while host.active_up:  # the first probe timed out
                await asyncio.sleep(0.01)
            while Silent.open == 0:  # the second one is waiting
                await asyncio.sleep(0.01)
        assert Silent.most == 1
    finally:
        await u.stop()
        server.close()


class Counting(asyncio.Protocol):
    """Counts the probe connections it takes."""

    seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counting.seen += 1
        transport.close()


def health_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("health ")]


async def test_between_probes_an_endpoint_holds_no_task() -> None:
    # A task per endpoint sleeping out the interval cost ~1.4 KiB each: 42 MiB of the
    # gateway's memory at 10,000 services x 3 endpoints. Only a probe in flight is a task.
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Counting, "127.80.7.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = HealthConfig(interval_s=60, timeout_s=1, healthy_threshold=1,
                       unhealthy_threshold=1, jitter=0.1)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(5))
    u.update([Target(f"127.80.7.{i}", port, "east", True) for i in range(1, 51)])
    rng = random.Random(6)
    rng.uniform = lambda a, b: 0.0  # type: ignore[method-assign]  # probe at once
    u.attach_health_checker(HealthChecker(u, cfg, http=False, rng=rng))
    try:
        assert len(health_tasks()) <= 50
        async with asyncio.timeout(5):
            while Counting.seen < 1:
                await asyncio.sleep(0.01)
        # Only 127.80.7.1 listens; the others refuse at once. Every probe is over soon,
        # and the hosts then wait out the 60 s interval without a task.
        async with asyncio.timeout(2):
            while health_tasks():
                await asyncio.sleep(0.01)
        assert all(not h.active_up for a, h in u.hosts.items() if a[0] != "127.80.7.1")
        assert u.hosts[("127.80.7.1", port)].active_up
    finally:
        await u.stop()
        server.close()
    assert not health_tasks()


def test_stop_under_uvloop_cancels_the_timers() -> None:
    # uvloop's timers are not asyncio.TimerHandle: stopping the gateway handed them to
    # gather, and ProxyManager.stop failed with a TypeError.
    import uvloop

    async def main() -> None:
        cfg = HealthConfig(interval_s=60, timeout_s=1)
        u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(7))
        u.update([Target("127.80.8.1", 9, "east", True)])
        u.attach_health_checker(HealthChecker(u, cfg, http=False))
        await u.stop()

    uvloop.run(main())


async def test_probes_in_flight_are_bounded_per_process() -> None:
    # Every endpoint blackholed: each probe holds a socket for its whole timeout, and
    # 3,000 services of 30 endpoints (a 1 s timeout every 5 s) needed ~18,000 at once,
    # past the open-files limit the proxy's own connections need too.
    release = asyncio.Event()
    in_flight: list[int] = []
    probed: set[str] = set()

    class Hanging(HealthChecker):
        async def probe(self, host: Host) -> str | None:
            in_flight.append(budget.in_flight)
            probed.add(host.address)
            await release.wait()
            return None

    budget = ProbeBudget(limit=3)
    cfg = HealthConfig(interval_s=60, timeout_s=0.05)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(8))
    u.update([Target(f"127.80.9.{i}", 9, "east", True) for i in range(1, 11)])
    rng = random.Random(9)
    rng.uniform = lambda a, b: 0.0 if b > 1 else b  # type: ignore[method-assign]
    u.attach_health_checker(Hanging(u, cfg, http=False, rng=rng, budget=budget))
    try:
        async with asyncio.timeout(2):
            while budget.waited < 7:  # the rest put off
                await asyncio.sleep(0.01)
        assert len(probed) == 3 and max(in_flight) == 3 and budget.in_flight == 3
        release.set()
        async with asyncio.timeout(2):
            while len(probed) < 10:
                await asyncio.sleep(0.01)
        assert max(in_flight) <= 3
    finally:
        await u.stop()
    async with asyncio.timeout(1):  # a probe that set its next timer ends just after
        while budget.in_flight:
            await asyncio.sleep(0.01)


async def test_a_probe_put_off_starts_when_a_slot_frees_and_polls_for_none() -> None:
    # Past the limit a due probe polled for a slot again every 0.5-1 probe timeouts: with
    # 3,000 services x 30 endpoints blackholed, ~89,000 of them did, ~100,000 timer
    # callbacks a second; the gateway ran at 95 % CPU, /readyz took 3-5 s and SIGTERM
    # minutes. A probe put off now waits in the budget's queue, polls nothing, and starts
    # as soon as a probe in flight ends (timeout_s 60: a poll would come 30-60 s later).
    gates = {f"127.75.9.{i}": asyncio.Event() for i in range(1, 5)}
    started: list[str] = []
    dues: list[str] = []

    class Gated(HealthChecker):
        async def probe(self, host: Host) -> str | None:
            started.append(host.address)
            await gates[host.address].wait()
            return None

        def _due(self, host: Host) -> None:
            dues.append(host.address)
            super()._due(host)

    budget = ProbeBudget(limit=1)
    cfg = HealthConfig(interval_s=600, timeout_s=60)
    u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(10))
    u.update([Target(address, 9, "east", True) for address in gates])
    rng = random.Random(11)
    rng.uniform = lambda a, b: 0.0 if b > 1 else b  # type: ignore[method-assign]
    u.attach_health_checker(Gated(u, cfg, http=False, rng=rng, budget=budget))
    try:
        async with asyncio.timeout(2):
            while budget.waited < 3:
                await asyncio.sleep(0.01)
        assert len(started) == 1 and budget.in_flight == 1
        for n in range(1, len(gates)):
            gates[started[-1]].set()  # that probe ends: the next one waiting starts
            async with asyncio.timeout(2):
                while len(started) == n:
                    await asyncio.sleep(0.01)
        assert sorted(started) == sorted(gates) and budget.in_flight == 1
        assert len(dues) == len(gates)  # each due once: no poll for a slot
    finally:
        await u.stop()
    assert budget.in_flight == 0 and not health_tasks()


async def test_a_service_port_holds_no_random_generator_of_its_own() -> None:
    # A random.Random is 2.5 KiB: one in each upstream set and one in each health checker
    # cost 5 KiB per TCP service port, 15 MiB at 3,000 services, whatever their size.
    config, health = ProxyConfig(), HealthConfig(interval_s=3600)
    one = [Target("127.75.9.1", 9, "east", True)]
    sets: list[UpstreamSet] = []

    def build(i: int) -> UpstreamSet:
        u = UpstreamSet(f"ns/s{i}:p", "east", config)
        u.update(one)
        u.attach_health_checker(HealthChecker(u, health, http=False))
        sets.append(u)
        return u

    try:
        assert traced_bytes_each(build, 200) < 6000  # was 9,500 interpreted, 10,600 compiled
    finally:
        for u in sets:
            await u.stop()


def test_between_probes_an_endpoint_holds_no_loop_timer_of_its_own() -> None:
    # Under uvloop (the gateway's loop) a timer per endpoint between probes held ~610 B
    # (its TimerHandle and libuv handle): 53 MiB at 3,000 services x 30 endpoints. The
    # due times now wait in a heap of the checker's, under one timer for the earliest.
    import uvloop

    async def main() -> float:
        cfg = HealthConfig(interval_s=3600, timeout_s=1)
        u = UpstreamSet("ns/s:p", "east", ProxyConfig(health=cfg), rng=random.Random(12))
        u.update([Target(f"127.75.{10 + i // 250}.{i % 250 + 1}", 9, "east", True)
                  for i in range(3000)])
        checker = HealthChecker(u, cfg, http=False, rng=random.Random(13))
        try:
            return traced_bytes_each(lambda _: u.attach_health_checker(checker), 1) / 3000
        finally:
            await u.stop()

    assert uvloop.run(main()) < 300


async def test_the_proxy_stops_every_set_s_probes_together() -> None:
    # Each upstream set with a probe in flight waited a turn of the loop for its
    # cancellation, one set after the other: 6,000 blackholed services took 2 s of a
    # SIGTERM that way, and every turn also ran the rest's probes.
    from mcsproxy.model import ServicePort
    from tests.proxy_fixtures import Clusterset, endpoint

    # A listener whose accept queue is full drops every SYN: a connect to it hangs.
    silent = socket.socket()
    silent.bind(("127.75.21.1", 0))
    silent.listen(0)
    port = silent.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.75.21.1", port))
        fillers.append(filler)
    sets = 40
    cs = Clusterset()
    for i in range(sets):
        cs.publish(f"s{i}", f"127.75.20.{i + 1}", [ServicePort("p", "TCP", 80)],
                   [endpoint("127.75.21.1", "east", port, name="p")])
    manager = await cs.proxy(health=HealthConfig(interval_s=0.05, timeout_s=30))
    loop = asyncio.get_running_loop()
    turns = 0

    def tick() -> None:
        nonlocal turns
        turns += 1
        if ticking:
            loop.call_soon(tick)

    try:
        await cs.served(manager)
        async with asyncio.timeout(5):
            while len(health_tasks()) < sets:
                await asyncio.sleep(0.01)
        ticking = True
        loop.call_soon(tick)
        await manager.stop()
        ticking = False
        assert not health_tasks()
        assert turns < 20, turns  # 12 for 40 sets or 80; was 126 for 40
    finally:
        ticking = False
        silent.close()
        for filler in fillers:
            filler.close()
