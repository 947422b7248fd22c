"""`--workers 2`: a worker does not outlive its supervisor, and its command line."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from pathlib import Path

import pytest

from mcsproxy.proxy.workers import WORKER_MAIN, worker_command
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_proxy_gateway import SERVICE, alive, children, start_two_worker_gateway


def test_worker_command_names_its_supervisor_and_index() -> None:
    argv = ("gateway", "--workers", "2", "--worker-index", "1", "--worker-index=1")
    assert worker_command(argv, 1, parent_pid=4242) == [
        sys.executable, "-c", WORKER_MAIN, "4242", "gateway", "--workers", "2",
        "--worker-index", "1"]
    assert worker_command(("gateway",), 3)[3] == str(os.getpid())


async def test_worker_stops_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed main cannot stop its workers; an orphan would keep its SO_REUSEPORT
    listener (and a frozen configuration) and take a share of a restarted gateway's
    connections."""
    backend = await Backend("east-1", "127.47.1.1", free_port("127.47.1.1"), "east").start()
    ip = "127.240.47.1"
    proc = await start_two_worker_gateway(tmp_path, backend, ip, 47, "--drain-timeout", "1")
    workers: list[int] = []
    try:
        async with asyncio.timeout(20):
            while not workers:
                await asyncio.sleep(0.1)
                workers = children(proc.pid)
            # The worker serves (its own listener is up) before its supervisor dies.
            while not any(f"pid={workers[0]}," in line for line in await listeners(ip)):
                await asyncio.sleep(0.1)
        assert await ask(ip, 80) == "east-1"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        async with asyncio.timeout(15):
            while alive(workers[0]):
                await asyncio.sleep(0.1)
        assert await listeners(ip) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        await backend.stop()


async def listeners(ip: str) -> list[str]:
    """`ss` lines of the TCP listeners on `ip`:80, with their owning processes."""
    ss = await asyncio.create_subprocess_exec(
        "ss", "-ltnpH", "src", f"{ip}:80", stdout=asyncio.subprocess.PIPE)
    out, _ = await ss.communicate()
    return out.decode().splitlines()


async def test_a_worker_that_cannot_be_restarted_at_once_is_retried(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Restarting a worker fails while the supervisor is out of descriptors (EMFILE):
    # the supervising task used to end there, leaving the gateway a worker short for good.
    import errno

    from mcsproxy.config import ProxyConfig
    from mcsproxy.proxy import workers

    monkeypatch.setattr(workers, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(workers, "worker_command", lambda argv, index: [
        sys.executable, "-c", "import time; time.sleep(0.1)"])  # a worker that dies soon
    real_exec = asyncio.create_subprocess_exec
    launches: list[str] = []

    async def exec_failing_twice(*cmd: str, **kw: object) -> asyncio.subprocess.Process:
        launches.append("fail" if len(launches) in (1, 2) else "ok")
        if launches[-1] == "fail":
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await real_exec(*cmd, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(workers.asyncio, "create_subprocess_exec", exec_failing_twice)
    pool = workers.WorkerPool(ProxyConfig(workers=2, worker_argv=("gateway",)))
    await pool.start()
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while launches.count("ok") < 3:
            assert asyncio.get_running_loop().time() < deadline, launches
            await asyncio.sleep(0.05)
        assert launches[:4] == ["ok", "fail", "fail", "ok"]
    finally:
        await pool.stop()


async def test_each_process_tags_its_log_lines_with_its_worker_index(tmp_path: Path) -> None:
    """The workers write to the supervisor's stderr: every line says which one wrote it."""
    backend = await Backend("east-1", "127.203.1.1", free_port("127.203.1.1"), "east").start()
    proc = await start_two_worker_gateway(tmp_path, backend, "127.240.203.1", 203,
                                          "--log-level", "info",
                                          stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not ({"worker=0", "worker=1"} <= {w for line in lines
                                                    for w in line.split()[2:3]}):
                line = await proc.stderr.readline()
                assert line, f"stderr closed early: {lines}"
                lines.append(line.decode())
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, rest = await proc.communicate()
        lines += rest.decode().splitlines()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await backend.stop()
    # `<time> <LEVEL> worker=<i> <logger> <message>`, on every line.
    assert all(line.split()[2] in ("worker=0", "worker=1") for line in lines), lines


async def launches_of_a_pool_running_for(seconds: float, monkeypatch) -> list[float]:  # type: ignore[no-untyped-def]
    """Runs a two-worker pool for `seconds`: the loop time of each worker launch."""
    from mcsproxy.config import ProxyConfig
    from mcsproxy.proxy import workers

    real_exec = asyncio.create_subprocess_exec
    launched: list[float] = []

    async def counting_exec(*cmd: str, **kw: object) -> asyncio.subprocess.Process:
        launched.append(asyncio.get_running_loop().time())
        return await real_exec(*cmd, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(workers.asyncio, "create_subprocess_exec", counting_exec)
    pool = workers.WorkerPool(ProxyConfig(workers=2, worker_argv=("gateway",)))
    await pool.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await pool.stop()
    return launched


async def test_a_worker_that_keeps_crashing_is_restarted_with_growing_delays(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A worker that dies at once, every time (a bad node, an OOM kill at start), was
    # restarted every RESTART_DELAY_S forever: an interpreter start a second, a core
    # kept busy by a crash loop. Delays now double, and reset once a worker has lived.
    from mcsproxy.proxy import workers

    monkeypatch.setattr(workers, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(workers, "worker_command", lambda argv, index: [
        sys.executable, "-c", "import sys; sys.exit(3)"])
    launched = await launches_of_a_pool_running_for(2.0, monkeypatch)
    gaps = [b - a for a, b in itertools.pairwise(launched)]
    # 0.05, 0.1, 0.2, 0.4, 0.8 s (plus each start) fit in 2 s; a fixed delay fit ~20.
    assert 3 <= len(launched) <= 7, gaps
    assert gaps[-1] > 2.5 * gaps[0], gaps


async def test_a_worker_that_lived_a_while_is_restarted_after_the_first_delay_again(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from mcsproxy.proxy import workers

    monkeypatch.setattr(workers, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(workers, "STABLE_S", 0.2)
    monkeypatch.setattr(workers, "worker_command", lambda argv, index: [
        sys.executable, "-c", "import time; time.sleep(0.3)"])  # lives past STABLE_S
    launched = await launches_of_a_pool_running_for(2.0, monkeypatch)
    # Each run lasts ~0.3 s (+ the interpreter's start), each pause stays 0.05 s.
    assert len(launched) >= 4, launched


# A worker that beats as a live worker's loop does (or once, then hangs as a stuck loop).
BEATING_WORKER = """
import os, sys, time
fd = os.environ.get("MCSPROXY_WORKER_HEARTBEAT_FD")
for _ in range(1 if sys.argv[1] == "stuck" or fd is None else 1000):
    if fd is not None:
        os.write(int(fd), b".")
    time.sleep(0.05)
time.sleep(60)
"""


@pytest.mark.parametrize("worker", ["stuck", "beating"])
async def test_a_worker_whose_loop_is_stuck_is_killed_and_restarted(
        worker: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A worker whose event loop no longer runs keeps its listeners in the SO_REUSEPORT
    group: the kernel gave it its share of new connections, which waited unaccepted
    (a SIGSTOPped one of --workers 2: 19 of 40 connections), and nothing noticed. One
    that beats is left alone."""
    from mcsproxy.proxy import workers

    monkeypatch.setattr(workers, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(workers, "HEARTBEAT_S", 0.05, raising=False)
    monkeypatch.setattr(workers, "WATCHDOG_S", 0.5, raising=False)
    monkeypatch.setattr(workers, "worker_command", lambda argv, index: [
        sys.executable, "-c", BEATING_WORKER, worker])
    launched = await launches_of_a_pool_running_for(2.0, monkeypatch)
    assert len(launched) >= 2 if worker == "stuck" else len(launched) == 1, launched


async def test_a_worker_restart_is_counted_in_the_metrics(tmp_path: Path) -> None:
    """A worker that died and was restarted showed only in the log: a crash loop was
    invisible to alerting on /metrics."""
    backend = await Backend("east-1", "127.212.1.1", free_port("127.212.1.1"), "east").start()
    admin = ("127.212.9.1", free_port("127.212.9.1"))
    proc = await start_two_worker_gateway(tmp_path, backend, "127.240.212.1", 212,
                                          "--admin-listen", f"{admin[0]}:{admin[1]}")

    async def restarts() -> list[str]:
        reader, writer = await asyncio.open_connection(*admin)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
        return [line for line in text.splitlines()
                if line.startswith("mcsproxy_gateway_worker_restarts_total")]

    try:
        async with asyncio.timeout(20):
            while not children(proc.pid):
                await asyncio.sleep(0.05)
            worker = children(proc.pid)[0]
            os.kill(worker, signal.SIGKILL)
            while children(proc.pid) in ([], [worker]):  # restarted after 1 s
                await asyncio.sleep(0.05)
            while True:
                try:
                    found = await restarts()
                    break
                except OSError:
                    await asyncio.sleep(0.05)  # the admin not listening yet
        assert sorted(found) == ['mcsproxy_gateway_worker_restarts_total{reason="exited"} 1.0',
                                 'mcsproxy_gateway_worker_restarts_total{reason="stuck"} 0.0']
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        await backend.stop()


async def test_workers_share_the_front_doors_port_when_it_is_port_0(tmp_path: Path) -> None:
    """`--http-listen HOST:0` gave each process a port of its own: the workers' front
    doors listened where no client knew to go, and the log said ":0" for all of them."""
    backend = await Backend("east-1", "127.213.1.1", free_port("127.213.1.1"), "east").start()
    proc = await start_two_worker_gateway(
        tmp_path, backend, "127.240.213.1", 213, "--log-level", "info",
        "--http-listen", "127.213.9.2:0", stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    ports: dict[str, str] = {}
    try:
        async with asyncio.timeout(20):
            while len(ports) < 2:
                line = (await proc.stderr.readline()).decode()
                assert line, "stderr closed early"
                if "HTTP front door on " in line:
                    ports[line.split()[2]] = line.rsplit(":", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.communicate()
        await backend.stop()
    assert ports["worker=0"] == ports["worker=1"] != "0", ports


async def test_workers_that_ignore_sigterm_are_killed_after_one_deadline(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Stopping waited STOP_TIMEOUT_S for each worker in turn: with stuck workers the
    stop took N times as long, past a pod's grace period."""
    from mcsproxy.config import ProxyConfig
    from mcsproxy.proxy import workers

    monkeypatch.setattr(workers, "STOP_TIMEOUT_S", 0.5)
    monkeypatch.setattr(workers, "worker_command", lambda argv, index: [
        sys.executable, "-c", "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"])
    real_exec = asyncio.create_subprocess_exec

    async def piped_exec(*cmd: str, **kw: object) -> asyncio.subprocess.Process:
        return await real_exec(*cmd, stdout=asyncio.subprocess.PIPE, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(workers.asyncio, "create_subprocess_exec", piped_exec)
    pool = workers.WorkerPool(ProxyConfig(workers=5, worker_argv=("gateway",)))
    await pool.start()
    procs = list(pool.procs.values())
    for proc in procs:  # each has set SIGTERM aside
        assert proc.stdout is not None
        await proc.stdout.readline()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pool.stop()
    assert loop.time() - started < 1.5  # 4 workers in turn: 2 s
    assert all(proc.returncode == -signal.SIGKILL for proc in procs)


async def test_a_worker_beats_from_its_event_loop() -> None:
    from mcsproxy.proxy.workers import HEARTBEAT_FD_ENV, Heartbeat

    read_fd, write_fd = os.pipe()
    os.environ[HEARTBEAT_FD_ENV] = str(write_fd)
    heartbeat = Heartbeat.from_environment()
    assert heartbeat is not None and HEARTBEAT_FD_ENV not in os.environ
    await heartbeat.start()
    try:
        assert await asyncio.get_running_loop().run_in_executor(
            None, os.read, read_fd, 1) == b"."
    finally:
        await heartbeat.stop()
        os.close(read_fd)
    assert Heartbeat.from_environment() is None


async def test_a_gateway_started_with_stdio_closed_runs_workers_and_stops_cleanly(
        tmp_path: Path) -> None:
    """Started with fds 0-2 closed (`<&- >&- 2>&-`, some init systems), the event loop's
    own descriptors took those numbers: libuv aborts closing an fd <= 2, so every worker
    died in the fork before its exec (a crash loop) and SIGTERM ended in SIGABRT."""
    backend = await Backend("east-1", "127.95.6.1", free_port("127.95.6.1"), "east").start()
    ip = "127.240.95.6"
    (tmp_path / "web.yaml").write_text(SERVICE.format(ip=ip, host=backend.host,
                                                      port=backend.port))
    own = "127.95.9.1"

    def close_stdio() -> None:
        for fd in (0, 1, 2):
            os.close(fd)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
        "--source", f"file:{tmp_path}", "--workers", "2", "--drain-timeout", "1",
        "--dns-listen", f"{own}:{free_port(own)}", "--admin-listen", f"{own}:{free_port(own)}",
        preexec_fn=close_stdio)
    try:
        async with asyncio.timeout(10):
            while not ((workers := children(proc.pid))
                       and any(f"pid={workers[0]}," in line for line in await listeners(ip))):
                assert proc.returncode is None
                await asyncio.sleep(0.1)
        assert await ask(ip, 80) == "east-1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await backend.stop()
