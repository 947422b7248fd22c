"""`--workers 2`: a worker does not outlive its supervisor, and its command line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from mcsproxy.proxy.workers import WORKER_MAIN, worker_command
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_proxy_gateway import alive, children, start_two_worker_gateway


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
