"""The real `mcsproxy gateway` process: ephemeral ports found in its log, DNS answers,
/readyz, and a clean exit 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dnslib
import pytest

from tests.dns_support import EXAMPLES, make_query

DEADLINE_S = 15.0
LISTEN_RE = re.compile(rb"(dns|admin) listening on ([\d.]+):(\d+)")


def read_ports(proc: subprocess.Popen[bytes], log: list[bytes]) -> dict[str, tuple[str, int]]:
    """Read the log until both listeners said where they are."""
    assert proc.stderr is not None
    found: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(found) < 2:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, b"".join(log).decode()
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            line = proc.stderr.readline()
            log.append(line)
            if m := LISTEN_RE.search(line):
                found[m.group(1).decode()] = (m.group(2).decode(), int(m.group(3)))
    return found


def dns_query(addr: tuple[str, int], name: str, qtype: str = "A") -> dnslib.DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(make_query(name, qtype), addr)
        return dnslib.DNSRecord.parse(sock.recv(4096))


def http_get(addr: tuple[str, int], path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_gateway_process_serves_dns_and_stops_on_sigterm(tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    shutil.copytree(EXAMPLES, imports)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "cluster-a",
         "--source", f"file:{imports}", "--dns-listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--log-level", "info"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    log: list[bytes] = []
    try:
        ports = read_ports(proc, log)
        # Ready once the first snapshot is in: poll /readyz with a deadline.
        deadline = time.monotonic() + DEADLINE_S
        while (status := http_get(ports["admin"], "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert json.loads(status[1])["services"] == 2
        assert http_get(ports["admin"], "/healthz")[0] == 200

        from mcsproxy.cli import main  # `mcsproxy status` against it: ready, exit 0
        assert main(["status", "--admin", "{}:{}".format(*ports["admin"])]) == 0

        reply = dns_query(ports["dns"], "myservice.test.svc.clusterset.local.")
        assert [str(r.rdata) for r in reply.rr] == ["127.240.0.10"]
        reply = dns_query(ports["dns"], "_https._tcp.headless.test.svc.clusterset.local.", "SRV")
        assert len(reply.rr) == 3
        reply = dns_query(ports["dns"], "nothing.test.svc.clusterset.local.")
        assert dnslib.RCODE.get(reply.header.rcode) == "NXDOMAIN"

        # TCP on the same port as UDP.
        with socket.create_connection(ports["dns"], timeout=2) as sock:
            q = make_query("headless.test.svc.clusterset.local.")
            sock.sendall(len(q).to_bytes(2, "big") + q)
            size = int.from_bytes(sock.recv(2, socket.MSG_WAITALL), "big")
            answer = dnslib.DNSRecord.parse(sock.recv(size, socket.MSG_WAITALL))
            assert sorted(str(r.rdata) for r in answer.rr) == ["10.4.0.5", "10.4.0.6", "10.4.0.7"]

        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=DEADLINE_S)
        log.append(rest)
        assert proc.returncode == 0, b"".join(log).decode()
        assert b"gateway stopped" in b"".join(log)
        assert b"Traceback" not in b"".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_gateway_started_with_stdio_closed_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """With fds 0-2 closed at start (`<&- >&- 2>&-`) the event loop's own descriptors got
    those numbers, and libuv aborts (SIGABRT) when it closes an fd <= 2: at every stop."""
    imports = tmp_path / "imports"
    shutil.copytree(EXAMPLES, imports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin = s.getsockname()

    def close_stdio() -> None:
        for fd in (0, 1, 2):
            os.close(fd)

    proc = subprocess.Popen(
        [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "cluster-a",
         "--source", f"file:{imports}", "--dns-listen", "127.0.0.1:0",
         "--admin-listen", f"{admin[0]}:{admin[1]}"], preexec_fn=close_stdio)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                if http_get(admin, "/readyz")[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The gateway command with the file source's listing hanging from its third call on, as
# a stat on an NFS volume whose server went away does; it says so on stderr first.
HUNG_VOLUME_GATEWAY = """
import sys, threading
from mcsproxy.cli import main
from mcsproxy.sources import file
listing = file.FileSource._list_files
calls = 0
def hanging(self):
    global calls
    calls += 1
    if calls > 2:
        print("the volume hangs", file=sys.stderr, flush=True)
        threading.Event().wait()
    return listing(self)
file.FileSource._list_files = hanging
sys.exit(main(sys.argv[1:]))
"""


def test_a_gateway_whose_file_source_hangs_still_exits_on_sigterm(tmp_path: Path) -> None:
    """A scan ran on asyncio's default executor, whose threads are joined at the loop's
    shutdown: after "gateway stopped" the process waited for the hung stat for ever, and
    a second SIGTERM did nothing. Now the gateway exits; the thread is left behind."""
    imports = tmp_path / "imports"
    imports.mkdir()
    (imports / "services.yaml").write_text((EXAMPLES / "services.yaml").read_text())
    proc = subprocess.Popen(
        [sys.executable, "-c", HUNG_VOLUME_GATEWAY, "gateway", "--cluster-id", "cluster-a",
         "--source", f"file:{imports}", "--dns-listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--no-proxy"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    log: list[bytes] = []
    try:
        read_ports(proc, log)
        assert proc.stderr is not None
        while b"the volume hangs" not in log[-1]:
            assert proc.poll() is None, b"".join(log).decode()
            log.append(proc.stderr.readline())
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=DEADLINE_S)
        log.append(rest)
        assert proc.returncode == 0, b"".join(log).decode()
        assert b"gateway stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(("flags", "message"), [
    (["--idle-timeout", "nan"], "--idle-timeout must be a finite number, not nan"),
    (["--connect-timeout", "inf"], "--connect-timeout must be a finite number, not inf"),
    (["--health-interval", "nan"], "--health-interval must be a finite number"),
    (["--http-per-try-timeout", "nan"], "--http-per-try-timeout must be a finite number"),
    (["--dns-rrl", "nan"], "--dns-rrl must be a finite number"),
    (["--tcp-user-timeout", "nan"], "--tcp-user-timeout must be a finite number"),
    (["--tcp-keepalive", "0,10,3"], "--tcp-keepalive must be IDLE,INTERVAL,PROBES"),
    (["--dns-domain", "a b..c"], "--dns-domain 'a b..c': expected a DNS name"),
    (["--dns-domain", "x" * 64 + ".local"], "expected a DNS name of RFC 1123 labels"),
])
def test_bad_values_are_refused_with_the_flag_named(
        flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # NaN passes every < check (a NaN idle timeout crashed the idle sweep), and a bad
    # domain ended in a traceback: both are refused before anything starts.
    from mcsproxy.cli import main

    code = main(["gateway", "--cluster-id", "east", "--source", "file:/nonexistent",
                 "--dns-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *flags])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--cluster-id", "east\n"], "is not an RFC-1123 name"),
    (["--dns-domain", "clusterset.local\n"], "expected a DNS name of RFC 1123 labels"),
    (["--http-cluster-header", "X-Cluster\n"], "is not a header name"),
    (["--admin-listen", "gw\n:9901"], "is not an IP address or a host name"),
])
def test_a_name_with_a_final_newline_is_refused(flags: list[str], message: str) -> None:
    """`$` matches before a final newline: "east\\n" was a cluster ID, the newline in every
    label naming the cluster, and "clusterset.local\\n" a zone."""
    from mcsproxy.cli import build_parser, gateway_config
    from mcsproxy.config import ConfigError

    args = build_parser().parse_args(["gateway", "--cluster-id", "east", "--source", "kube",
                                      *flags])
    with pytest.raises(ConfigError, match=message):
        gateway_config(args)


@pytest.mark.parametrize(("flags", "keepalive", "user_timeout_ms"), [
    ([], (30, 10, 3), 60_000),
    (["--tcp-keepalive", "20,5,4", "--tcp-user-timeout", "2.5"], (20, 5, 4), 2_500),
    (["--tcp-keepalive", "off", "--tcp-user-timeout", "0"], None, None),
])
def test_tcp_keepalive_flags_become_endpoint_socket_options(
        flags: list[str], keepalive: tuple[int, int, int] | None,
        user_timeout_ms: int | None) -> None:
    import socket

    from mcsproxy.cli import build_parser, gateway_config

    args = build_parser().parse_args(["gateway", "--cluster-id", "east", "--source", "kube",
                                      *flags])
    proxy = gateway_config(args).proxy
    assert proxy.tcp_keepalive == keepalive
    listening = {(level, option): value for level, option, value in proxy.keepalive_options()}
    tcp = socket.IPPROTO_TCP
    if keepalive is None:
        assert not listening
    else:
        assert listening == {(socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
                             (tcp, socket.TCP_KEEPIDLE): keepalive[0],
                             (tcp, socket.TCP_KEEPINTVL): keepalive[1],
                             (tcp, socket.TCP_KEEPCNT): keepalive[2]}
    endpoint = {(level, option): value
                for level, option, value in proxy.endpoint_socket_options()}
    assert endpoint.pop((tcp, socket.TCP_USER_TIMEOUT), None) == user_timeout_ms
    # With a user timeout Linux ignores the probe count: not set, one call fewer.
    assert endpoint == {k: v for k, v in listening.items()
                        if user_timeout_ms is None or k != (tcp, socket.TCP_KEEPCNT)}


def test_the_front_door_without_the_proxy_is_refused() -> None:
    """--no-proxy --http-listen started DNS and admin only: the front door, one of the
    proxy's listeners, was never opened, with no word in the log."""
    from mcsproxy.cli import build_parser, gateway_config
    from mcsproxy.config import ConfigError

    argv = ["gateway", "--cluster-id", "east", "--source", "kube", "--no-proxy"]
    args = build_parser().parse_args([*argv, "--http-listen", "127.0.0.1:0"])
    with pytest.raises(
        ConfigError, match="the front door is part of the proxy, which --no-proxy turns off"
    ):
        gateway_config(args)


@pytest.mark.parametrize("argv", [
    ["gateway", "--cluster-id", "east", "--source", "kube", "--dns-ttl", "abc"],
    ["gateway", "--cluster-id", "east", "--source", "kube", "--log-level", "verbose"],
    ["gateway", "--source", "kube"],
    ["controller", "--clusters-dir", ".", "--output-dir", "o", "--lease-duration", "x"],
    # unknown to the subcommand: its own --help, not "see mcsproxy --help" (no such flags)
    ["controller", "--clusters-dir", ".", "--bogus"],
    ["status", "extra"],
])
def test_flags_argparse_refuses_give_one_line_and_exit_2(argv: list[str]) -> None:
    """They used to print the whole usage first (30 lines for the gateway)."""
    proc = subprocess.run([sys.executable, "-m", "mcsproxy", *argv], capture_output=True,
                          text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"mcsproxy {argv[0]}: error: " in proc.stderr
    assert f"(see mcsproxy {argv[0]} --help)" in proc.stderr


@pytest.mark.parametrize(("url", "why"), [
    ("http://", "'' is not an IP address or a host name"),
    ("http://127.0.0.1:abc", "Port could not be cast"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:0", "port 0 cannot be connected to"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://127.0.0.1:9000/?x=1", "without a query"),
])
def test_a_controlplane_url_that_can_never_work_is_a_flag_error(url: str, why: str) -> None:
    """Such a URL was taken: the gateway ran on, never ready, retrying aiohttp's
    InvalidUrlClientError with backoff for ever."""
    from mcsproxy.sources import SourceSpecError, make_source

    with pytest.raises(SourceSpecError) as caught:
        make_source(f"controlplane:{url}", "east")
    assert f"controlplane source {url!r}" in str(caught.value) and why in str(caught.value)
    make_source("controlplane:http://[::1]:9000/prefix/", "east")  # these still do
    make_source("controlplane:https://controller.mcs-system.svc:8443", "east")


def test_the_gateway_exits_2_on_a_controlplane_url_without_host() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
         "--source", "controlplane:http://:9000", "--dns-listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert errors == ["mcsproxy: error: controlplane source 'http://:9000': expected "
                      "http://HOST:PORT, '' is not an IP address or a host name"], errors


def test_a_controlplane_url_with_credentials_is_refused_without_echoing_them() -> None:
    """`controlplane:http://gw:s3cr3t@host:9902` was taken: the controller checks bearer
    tokens only, and the password went into the start line, /config_dump and every
    connection error. Refused at start (exit 2), the password nowhere in the output."""
    secret = "s3cr3t-pw-4711"
    proc = subprocess.run(
        [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "east",
         "--source", f"controlplane:http://gw:{secret}@127.81.11.1:9902",
         "--dns-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2, proc.stderr
    assert "carries credentials" in proc.stderr and "--controlplane-token-file" in proc.stderr
    assert secret not in proc.stderr + proc.stdout


def test_status_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from mcsproxy.cli import main

    # --events -1 showed every event but the first (a negative slice bound).
    assert main(["status", "--events", "-1"]) == 2
    assert "--events must be >= 0" in capsys.readouterr().err
    assert main(["status", "--admin", "ftp://x"]) == 2
    assert "expected http://HOST:PORT" in capsys.readouterr().err
    # HOST:PORT, as the demo banner prints DNS addresses, was 'unknown url type'.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        assert main(["status", "--admin", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read http://127.0.0.1:{port}/api/status" in err and "refused" in err


def test_status_exits_3_while_the_gateway_is_not_ready(
        capsys: pytest.CaptureFixture[str]) -> None:
    """It exited 0 with "NOT READY" printed: a script or probe could not tell."""
    from mcsproxy.cli import main

    with socket.socket() as closed:  # a controller that is not there: no snapshot ever
        closed.bind(("127.0.0.1", 0))
        controller = "{}:{}".format(*closed.getsockname())
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcsproxy", "gateway", "--cluster-id", "cluster-a",
             "--source", f"controlplane:http://{controller}", "--dns-listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0", "--log-level", "info"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )
        try:
            admin = "{}:{}".format(*read_ports(proc, [])["admin"])
            capsys.readouterr()
            assert main(["status", "--admin", admin]) == 3
            assert "NOT READY" in capsys.readouterr().out
            assert main(["status", "--admin", admin, "--json"]) == 3
            assert json.loads(capsys.readouterr().out)["gateway"]["ready"] is False
        finally:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",
    b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{"a": 1}',
    b"SSH-2.0-OpenSSH_9.2\r\n",
])
def test_status_of_something_else_than_a_gateway_names_the_address(
        answer: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    """Another service's JSON, or no HTTP at all, on that port ended in a traceback
    (KeyError 'gateway', TypeError, http.client.BadStatusLine) that named no address."""
    from mcsproxy.cli import main

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(DEADLINE_S)
        address = "{}:{}".format(*server.getsockname())

        def answer_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(answer)

        thread = threading.Thread(target=answer_once)
        thread.start()
        try:
            assert main(["status", "--admin", address]) == 1
        finally:
            thread.join(DEADLINE_S)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"http://{address}/api/status" in err, err


def test_help_shows_the_defaults_the_contract_states() -> None:
    """--dns-listen, --admin-listen, --dns-domain and --log-level had no help at all, so
    --help never said the defaults docs/architecture.md fixes."""
    def help_of(command: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mcsproxy", command, "--help"],
                              capture_output=True, text=True, timeout=DEADLINE_S)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())  # argparse wraps lines anywhere

    gateway = help_of("gateway")
    for flag, default in [("--dns-listen", "127.0.0.1:5353"), ("--admin-listen",
                          "127.0.0.1:9901"), ("--dns-domain", "clusterset.local"),
                          ("--log-level", "info"), ("--clusterset-cidr", "127.240.0.0/16")]:
        assert re.search(rf"{flag} \S+ [^-]*default {re.escape(default)}\b", gateway), flag
    controller = help_of("controller")
    assert re.search(r"--clusterset-cidr \S+ [^-]*default 127\.240\.0\.0/16", controller)
    assert re.search(r"--log-level \S+ \(default info\)", controller)
    assert re.search(r"--stream-write-timeout \S+ [^-]*default 30\)", controller)
    assert re.search(r"--stream-queue-bytes \S+ [^-]*default 16777216: 16 MiB\)", controller)


def test_a_dns_address_that_cannot_be_bound_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    from mcsproxy.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code = main(["gateway", "--cluster-id", "east", "--source", "file:/nonexistent",
                     "--dns-listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"])
    assert code == 1
    assert f"--dns-listen 127.0.0.1:{port}/udp: Address already in use" in capsys.readouterr().err


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mcsproxy", *argv], capture_output=True,
                          text=True, timeout=DEADLINE_S * 2)


def _gateway(*flags: str) -> subprocess.CompletedProcess[str]:
    defaults = {"--dns-listen": "127.0.0.1:0", "--admin-listen": "127.0.0.1:0"}
    for flag in flags:
        defaults.pop(flag, None)
    return _run("gateway", "--cluster-id", "east", "--source", f"file:{EXAMPLES}",
                "--log-level", "error", *flags, *(x for kv in defaults.items() for x in kv))


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error is the process's only output line, without a traceback or "[Errno N]"."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcsproxy: error: "), proc.stderr
    assert "Errno" not in lines[0] and "Traceback" not in proc.stderr
    return lines[0].removeprefix("mcsproxy: error: ")


@pytest.mark.parametrize(("argv", "message"), [
    (["--dns-listen", "999.1.1.1:53"], "--dns-listen 999.1.1.1:53: '999.1.1.1' is not an IP "
     "address or a host name"),
    (["--admin-listen", "999.1.1.1:9901"], "--admin-listen 999.1.1.1:9901: '999.1.1.1' is not"),
    (["--http-listen", "10.0.0:8080"], "--http-listen 10.0.0:8080: '10.0.0' is not an IP"),
    (["--dns-upstream", "bad_host!:53"], "--dns-upstream bad_host!:53: 'bad_host!' is not"),
])
def test_an_address_no_listener_could_use_is_a_flag_error(argv: list[str], message: str) -> None:
    """999.1.1.1 went on to a DNS lookup and ended as "[Errno -2] ... Name or service not
    known", exit 1, after the other listeners had started."""
    proc = _gateway(*argv)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith(message) and line.endswith("is not an IP address or a host name")


def test_an_upstream_on_port_0_is_a_flag_error() -> None:
    """--dns-upstream 10.0.0.1:0 was taken (port 0 is valid in a listen address): every
    name outside the zone waited out the 2 s timeout for SERVFAIL, a warning said the
    upstream "did not answer"."""
    from mcsproxy.cli import build_parser, gateway_config
    from mcsproxy.config import ConfigError

    argv = ["gateway", "--cluster-id", "east", "--source", "kube", "--dns-upstream"]
    with pytest.raises(ConfigError, match=r"--dns-upstream 10\.0\.0\.1:0: port 0 is not a "
                                          "port to send to"):
        gateway_config(build_parser().parse_args([*argv, "10.0.0.1:0"]))
    assert gateway_config(build_parser().parse_args([*argv, "10.0.0.1:53"])).dns.upstream == (
        "10.0.0.1", 53)
    assert gateway_config(build_parser().parse_args(
        ["gateway", "--cluster-id", "east", "--source", "kube", "--dns-listen", "[::1]:0"]
    )).dns.listen == ("::1", 0)  # listeners keep port 0: any free port


def test_an_address_that_cannot_be_bound_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    """The admin listener's failure read "[Errno 98] error while attempting to bind on
    address ('127.0.0.1', N): address already in use", naming no flag; an unwritable
    access log "[Errno 2] No such file or directory: '...'"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _gateway("--admin-listen", f"127.0.0.1:{port}")
        assert proc.returncode == 1
        assert _one_error_line(proc) == f"--admin-listen 127.0.0.1:{port}: Address already in use"
        proc = _run("controller", "--clusters-dir", str(EXAMPLES.parent / "clusters"),
                    "--output-dir", str(tmp_path / "out"), "--log-level", "error",
                    "--serve", f"127.0.0.1:{port}")
        assert proc.returncode == 1
        assert _one_error_line(proc) == f"--serve 127.0.0.1:{port}: Address already in use"
    missing = tmp_path / "no-such-dir" / "access.log"
    proc = _gateway("--access-log", str(missing))
    assert proc.returncode == 1
    assert _one_error_line(proc) == (f"--access-log {missing}: cannot open: "
                                     "No such file or directory")


def test_the_controller_refuses_an_unusable_serve_address_as_a_flag_error(
        tmp_path: Path) -> None:
    proc = _run("controller", "--clusters-dir", str(tmp_path), "--output-dir",
                str(tmp_path / "out"), "--serve", "999.1.1.1:9902")
    assert proc.returncode == 2
    assert _one_error_line(proc) == ("--serve 999.1.1.1:9902: '999.1.1.1' is not an IP "
                                     "address or a host name")


@pytest.mark.parametrize("value", ["127.0.0.1:0", "0.0.0.0:53", "[::]:53", "[::1]:9901",
                                   "[fe80::1%lo]:53", "localhost:9901", "gw-0.mcs.svc:53",
                                   "node1.example.com.:53"])
def test_addresses_and_host_names_are_still_taken(value: str) -> None:
    from mcsproxy.config import parse_host_port

    assert parse_host_port(value, "--dns-listen")[1] == int(value.rsplit(":", 1)[1])
