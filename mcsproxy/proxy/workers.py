"""`--workers N`: N-1 extra proxy processes beside this one, sharing listeners by SO_REUSEPORT.

Each worker is the same gateway command with a hidden `--worker-index i`; a worker runs
its own sources, store and proxy on its own event loop (no DNS, no admin), so the kernel
spreads new connections over N processes and throughput scales with cores. The
supervisor (index 0) restarts a worker that dies and stops every worker by its pid. A
worker that keeps dying soon after its start is restarted after doubling delays (1 s up to
30 s), so a crash loop does not keep a core busy starting interpreters; one that lived
STABLE_S before dying is restarted after 1 s again.

A worker whose event loop is stuck (a bug: an endless loop, a deadlock; or stopped with
SIGSTOP) is killed and restarted: it writes a byte to a pipe from the supervisor every
HEARTBEAT_S, and one silent for WATCHDOG_S gets SIGKILL. Its listeners stay in the
SO_REUSEPORT group while it lives, so the kernel kept handing it its share of new
connections, which waited in its backlog for ever (19 of 40 with --workers 2), while
/readyz said 200.

A worker also stops when the supervisor dies without stopping it (SIGKILL, OOM, crash):
the kernel sends it SIGTERM (PR_SET_PDEATHSIG), so it drains and exits. An orphaned worker
would otherwise keep its SO_REUSEPORT listeners forever with a frozen configuration, and a
restarted gateway (or anything else binding the same address) would silently share its
connections with it.

The kernel spreads a listener's packets over the workers by a hash of each flow's
addresses and ports, so one client's connections (and UDP flows) from different source
ports land on different workers, each with its own sessionAffinity table: ClientIP
affinity would hold per worker only. Listeners of ClientIP services therefore get a
classic BPF program (`steer_by_client_ip`) that picks the worker by the client address
alone, as kube-proxy's affinity is by client address across every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any

from mcsproxy.backoff import Backoff
from mcsproxy.config import ProxyConfig
from mcsproxy.tasks import cancel_and_wait, spawn

log = logging.getLogger("mcsproxy.proxy.workers")

RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STABLE_S = 60.0  # a worker that ran this long before dying starts its backoff over
STOP_TIMEOUT_S = 5.0
HEARTBEAT_S = 1.0
# Far above any pause of a working loop (a GC pass, a report of 10,000 services made a
# part at a time), and time for the interpreter to start and import.
WATCHDOG_S = 30.0
# The write end of the heartbeat pipe, in a worker's environment.
HEARTBEAT_FD_ENV = "MCSPROXY_WORKER_HEARTBEAT_FD"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# From the supervisor, told to stop again while draining: close what is still open now.
# A signal of its own, as a worker counts no stop signals (see Gateway.request_stop).
HURRY_SIGNAL = signal.SIGUSR1
# The worker's entry: `python -c WORKER_MAIN <supervisor pid> gateway ...` (the same
# interpreter and sys.path as `python -m mcsproxy`, so a cwd-local package still wins).
WORKER_MAIN = "import sys; from mcsproxy.proxy.workers import worker_main; sys.exit(worker_main())"
# <asm-generic/socket.h>, <linux/filter.h>: not in Python's socket module.
SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
SKF_NET_OFF = -0x100000  # loads relative to the IP header (the program starts past UDP/TCP)
BPF_LD_W_ABS, BPF_TAX, BPF_XOR_X, BPF_MOD_K, BPF_RET_A = 0x20, 0x07, 0xAC, 0x94, 0x16


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def client_ip_program(family: int, workers: int) -> list[tuple[int, int]]:
    """(code, k) of a reuseport program: the source address (IPv6: its four words XORed)
    modulo the number of workers, the index of the socket that gets the packet. An index
    past the group's sockets (a worker restarting) falls back to the kernel's hash."""
    words = (12,) if family == socket.AF_INET else (8, 12, 16, 20)
    prog = [(BPF_LD_W_ABS, (SKF_NET_OFF + words[0]) & 0xFFFFFFFF)]
    for offset in words[1:]:
        prog += [(BPF_TAX, 0), (BPF_LD_W_ABS, (SKF_NET_OFF + offset) & 0xFFFFFFFF),
                 (BPF_XOR_X, 0)]
    return [*prog, (BPF_MOD_K, workers), (BPF_RET_A, 0)]


def steer_by_client_ip(sock: Any, workers: int, on: bool) -> None:
    """Make the reuseport group of `sock` (a bound SO_REUSEPORT socket, or the stand-in a
    transport gives for one: anything with `family` and `setsockopt`) pick its socket by
    client address (`on`), or by the kernel's hash of addresses and ports again. The
    program belongs to the group: every worker sets the same one."""
    if not on:
        # ENOENT: none attached, another worker detached it first.
        with contextlib.suppress(FileNotFoundError):
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        return
    code = client_ip_program(sock.family, workers)
    filters = (SockFilter * len(code))(*(SockFilter(c, 0, 0, k) for c, k in code))
    fprog = SockFprog(len(code), filters)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def die_with_parent(parent_pid: int) -> bool:
    """Ask for SIGTERM when the parent exits; False if it is already gone (or is not
    `parent_pid`: a worker orphaned before this call was reparented at once)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == parent_pid


def worker_main(argv: list[str] | None = None) -> int:
    """A worker process (or a child of `mcsproxy demo`): tied to its supervisor's life,
    then the ordinary mcsproxy CLI."""
    from mcsproxy.cli import main

    args = sys.argv[1:] if argv is None else argv
    if not die_with_parent(int(args[0])):
        return 0  # the supervisor died while this process started: nobody to serve for
    return main(args[1:])


def worker_command(argv: tuple[str, ...], index: int, parent_pid: int | None = None) -> list[str]:
    """The gateway command line for worker `index` (any earlier --worker-index dropped),
    run by worker_main on behalf of `parent_pid` (default: this process)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--worker-index":
            skip = True
            continue
        if arg.startswith("--worker-index="):
            continue
        args.append(arg)
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-c", WORKER_MAIN, str(parent), *args, "--worker-index", str(index)]


class Heartbeat:
    """Component of a worker: a byte to the supervisor's pipe every HEARTBEAT_S, from the
    event loop, so that a loop that no longer runs goes silent (see WorkerPool)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._tasks: list[asyncio.Task[Any]] = []

    @classmethod
    def from_environment(cls) -> Heartbeat | None:
        fd = os.environ.pop(HEARTBEAT_FD_ENV, "")
        return cls(int(fd)) if fd.isdigit() else None

    async def start(self) -> None:
        os.set_blocking(self.fd, False)
        self._tasks.append(spawn(self._beat(), name="heartbeat"))

    async def _beat(self) -> None:
        while True:
            try:
                os.write(self.fd, b".")
            except BlockingIOError:
                pass  # the supervisor is behind on reading: it has heard from us
            except OSError:
                return  # the supervisor is gone (PR_SET_PDEATHSIG stops us)
            await asyncio.sleep(HEARTBEAT_S)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class WorkerPool:
    """Component: starts workers 1..N-1 and keeps them running until stopped."""

    def __init__(self, config: ProxyConfig, front_door: Any = None) -> None:
        self.config = config
        # The supervisor's FrontDoor (started first), whose bound port the workers share.
        self.front_door = front_door
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._heard: dict[int, float] = {}  # loop time of each worker's last heartbeat
        # Workers that ended unasked, by why: "exited" (a crash, a kill from outside, an
        # OOM kill) or "stuck" (killed by the watchdog); each is restarted. Only the log
        # said so: a crash-looping worker was invisible to alerting on /metrics.
        self.deaths: dict[str, int] = {"exited": 0, "stuck": 0}
        self._pipes: dict[int, int] = {}  # read end of each worker's heartbeat pipe

    async def start(self) -> None:
        if not self.config.worker_argv:
            raise RuntimeError("--workers needs the gateway command line to re-run")
        for index in range(1, self.config.workers):
            await self._launch(index)
            self._tasks.append(spawn(self._supervise(index), name=f"proxy worker {index}"))

    async def _launch(self, index: int) -> None:
        argv = self.config.worker_argv
        bound = getattr(self.front_door, "bound", None)
        if bound is not None and self.config.http.listen is not None \
                and self.config.http.listen[1] == 0:
            # `--http-listen HOST:0`: each worker bound a port of its own, outside the
            # supervisor's SO_REUSEPORT group, where no client knew to go. Workers get
            # the supervisor's port (the last --http-listen wins).
            host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            argv = (*argv, "--http-listen", f"{host}:{bound[1]}")
        cmd = worker_command(argv, index)
        self._close_pipe(index)
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(read_fd, False)
            self.procs[index] = await asyncio.create_subprocess_exec(
                *cmd, pass_fds=(write_fd,), env={**os.environ, HEARTBEAT_FD_ENV: str(write_fd)})
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        self._pipes[index] = read_fd
        self._heard[index] = loop.time()
        loop.add_reader(read_fd, self._hear, index, read_fd)
        log.info("proxy worker %d started pid=%d", index, self.procs[index].pid)

    def _hear(self, index: int, fd: int) -> None:
        try:
            beats = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            beats = b""
        if beats:
            self._heard[index] = asyncio.get_running_loop().time()
        else:  # the worker ended: its pipe is done
            self._close_pipe(index)

    def _close_pipe(self, index: int) -> None:
        fd = self._pipes.pop(index, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def _wait_alive(self, index: int) -> int | None:
        """Until worker `index` exits (its exit code), or its loop has been silent for
        WATCHDOG_S: then it is killed, and None is returned once it has exited."""
        loop = asyncio.get_running_loop()
        proc = self.procs[index]
        # One wait for the whole life: each cancelled proc.wait() left its future in the
        # transport's list of exit waiters until the exit.
        exited = spawn(proc.wait(), name=f"proxy worker {index} exit")
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=HEARTBEAT_S)
                if done:
                    return exited.result()
                silent = loop.time() - self._heard.get(index, loop.time())
                if silent >= WATCHDOG_S:
                    self.deaths["stuck"] += 1
                    log.error("proxy worker %d (pid %d) sent no heartbeat for %.0fs (its "
                              "event loop is stuck); killing it", index, proc.pid, silent)
                    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                        proc.kill()
                    await exited
                    return None
        finally:
            exited.cancel()

    async def _supervise(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(RESTART_DELAY_S, MAX_RESTART_DELAY_S)
        while True:
            started = loop.time()
            code = await self._wait_alive(index)
            if self._stopping:
                return
            if code is not None:
                self.deaths["exited"] += 1
            lived = loop.time() - started
            if lived >= STABLE_S:
                backoff.reset()  # it served a while: a one-off death, not a crash loop
            delay = backoff.step()
            log.error("proxy worker %d (pid %d) exited with %s after %.1fs; restarting in "
                      "%.1fs", index, self.procs[index].pid,
                      "SIGKILL (stuck)" if code is None else code, lived, delay)
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._launch(index)
                    break
                except OSError as exc:
                    # Out of file descriptors or processes for a moment: keep trying
                    # (slower) rather than end this task and serve with a worker short.
                    delay = backoff.step()
                    log.error("proxy worker %d: cannot start: %s; retrying in %.1fs",
                              index, exc.strerror or exc, delay)

    async def drain(self, timeout_s: float) -> int:
        """SIGTERM every worker (each drains its own connections) and wait for them, one
        second beyond their own drain timeout at most; stop() kills what is left."""
        self._stopping = True
        try:
            await cancel_and_wait(self._tasks)
            for proc in self.procs.values():
                if proc.returncode is None:
                    proc.terminate()
            async with asyncio.timeout(timeout_s + 1.0):
                await asyncio.gather(*(proc.wait() for proc in self.procs.values()))
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # The gateway was told to stop again, whenever in this drain: no more waiting
            # for the workers' (their connections would be aborted at its end all the
            # same). Told while the restart tasks were still being cancelled, the workers
            # used to be left to stop()'s SIGTERM and its 5 s wait. Each cuts its
            # connections itself, with RSTs, and exits; stop() kills one that does not
            # within STOP_TIMEOUT_S. SIGKILLed at once, they left their connections to the
            # kernel, which closed them with FINs: cut streams passed off as complete.
            for proc in self.procs.values():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(HURRY_SIGNAL)
            raise
        return sum(1 for proc in self.procs.values() if proc.returncode is None)

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._tasks)
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        # One deadline for them all: waited one after the other, N workers that ignore
        # SIGTERM (stuck loops) took N x STOP_TIMEOUT_S, past a pod's grace period, and
        # the supervisor's SIGKILL then left them running with their listeners.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await asyncio.gather(*(proc.wait() for proc in self.procs.values()))
        for index, proc in self.procs.items():
            if proc.returncode is None:
                log.warning("proxy worker %d (pid %d) ignored SIGTERM; killing", index, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.gather(*(proc.wait() for proc in self.procs.values()))
        self.procs.clear()
        for index in list(self._pipes):
            self._close_pipe(index)
