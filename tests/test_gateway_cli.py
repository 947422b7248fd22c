"""The real `mcsproxy gateway` process: ephemeral ports found in its log, DNS answers,
/readyz, and a clean exit 0 on SIGTERM."""

from __future__ import annotations

import json
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
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


@pytest.mark.parametrize(("flags", "message"), [
    (["--idle-timeout", "nan"], "--idle-timeout must be a finite number, not nan"),
    (["--connect-timeout", "inf"], "--connect-timeout must be a finite number, not inf"),
    (["--health-interval", "nan"], "--health-interval must be a finite number"),
    (["--http-per-try-timeout", "nan"], "--http-per-try-timeout must be a finite number"),
    (["--dns-rrl", "nan"], "--dns-rrl must be a finite number"),
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


@pytest.mark.parametrize("argv", [
    ["gateway", "--cluster-id", "east", "--source", "kube", "--dns-ttl", "abc"],
    ["gateway", "--cluster-id", "east", "--source", "kube", "--log-level", "verbose"],
    ["gateway", "--source", "kube"],
    ["controller", "--clusters-dir", ".", "--output-dir", "o", "--lease-duration", "x"],
])
def test_flags_argparse_refuses_give_one_line_and_exit_2(argv: list[str]) -> None:
    """They used to print the whole usage first (30 lines for the gateway)."""
    proc = subprocess.run([sys.executable, "-m", "mcsproxy", *argv], capture_output=True,
                          text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"mcsproxy {argv[0]}: error: " in proc.stderr and "--help" in proc.stderr


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


def test_a_dns_address_that_cannot_be_bound_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    from mcsproxy.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code = main(["gateway", "--cluster-id", "east", "--source", "file:/nonexistent",
                     "--dns-listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"])
    assert code == 1
    assert f"--dns-listen 127.0.0.1:{port}/udp: Address already in use" in capsys.readouterr().err
