"""`mcsproxy` command line: gateway, controller and demo subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from collections.abc import Sequence
from typing import NoReturn

from mcsproxy.config import (
    CLUSTER_ID_RE,
    AdminConfig,
    ConfigError,
    DnsConfig,
    GatewayConfig,
    parse_host_port,
)
from mcsproxy.logsetup import LEVELS, setup_logging
from mcsproxy.proxy.options import add_proxy_arguments, proxy_config

# Room under DNS's 253 characters for <hostname>.<cluster>.<svc>.<ns>.svc. in front.
MAX_DOMAIN = 128


class _Parser(argparse.ArgumentParser):
    """A flag argparse rejects is reported in one line, like every other bad flag: its
    default prints the whole usage first (30 lines for the gateway), burying the reason."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """A flag no subcommand knows is reported by the subcommand, pointing at its
        --help: argparse leaves it to the top parser, which said "see mcsproxy --help",
        a page that lists none of the subcommand's flags."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._parser_of(getattr(parsed, "command", None)).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _parser_of(self, command: str | None) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                return action.choices[command]  # type: ignore[no-any-return]
        return self


def _add_gateway_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="run the gateway (DNS responder and proxy)")
    p.add_argument("--cluster-id", required=True, help="the local cluster's ID (priority 0)")
    p.add_argument("--source", action="append", default=[], metavar="SOURCE",
                   help="file:PATH, kube or controlplane:http://HOST:PORT (repeatable)")
    p.add_argument("--dns-listen", default="127.0.0.1:5353", metavar="HOST:PORT",
                   help="DNS responder, UDP and TCP (default 127.0.0.1:5353; port 0: any)")
    p.add_argument("--dns-domain", default="clusterset.local", metavar="DOMAIN",
                   help="the zone served (default clusterset.local)")
    p.add_argument("--dns-upstream", default=None, metavar="HOST:PORT",
                   help="forward names outside the zone here (default: REFUSED)")
    p.add_argument("--dns-ttl", type=int, default=5, help="TTL of service records (s, default 5)")
    p.add_argument("--dns-edns-max", type=int, default=1232,
                   help="largest EDNS0 UDP payload answered (bytes, default 1232)")
    p.add_argument("--dns-allow-from", default=",".join(DnsConfig.allow_from), metavar="CIDR,...",
                   help="clients whose names outside the zone are forwarded to --dns-upstream "
                        "(others: REFUSED); default loopback, RFC 1918 and fc00::/7")
    p.add_argument("--dns-rrl", type=float, default=0.0, metavar="QPS",
                   help="UDP answers per second per client /24 (/56); over it every 2nd "
                        "answer is truncated, the rest dropped (default 0: off)")
    p.add_argument("--admin-listen", default="127.0.0.1:9901", metavar="HOST:PORT",
                   help="admin API, /metrics and status page (default 127.0.0.1:9901)")
    p.add_argument("--admin-token-file", default=None, metavar="PATH",
                   help="the admin listener answers only /healthz, /readyz and /metrics "
                        "without the bearer token in PATH (re-read when it changes)")
    p.add_argument("--access-log", default=None, metavar="-|PATH",
                   help="one line per connection and HTTP request to stderr (-) or a file "
                        "(default off)")
    p.add_argument("--access-log-format", default="text", choices=["text", "json"],
                   help="(default text)")
    p.add_argument("--demo-control", default=None, metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=sorted(LEVELS), help="(default info)")
    p.add_argument("--clusterset-cidr", default="127.240.0.0/16", metavar="CIDR[,CIDR6]",
                   help="ClusterSetIPs the gateway allocates itself (Karmada services; "
                        "default 127.240.0.0/16)")
    p.add_argument("--controlplane-token-file", default=None, metavar="PATH",
                   help="--source controlplane: sends the token in PATH as a bearer token "
                        "(the controller's --serve-token-file; re-read on every connect)")
    p.add_argument("--vip-interface", default=None, metavar="NAME",
                   help="keep the ClusterSetIPs on this interface as /32 and /128 "
                        "(created as a dummy link if missing; needs CAP_NET_ADMIN)")
    add_proxy_arguments(p)
    p.set_defaults(func=_run_gateway)


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    domain = args.dns_domain.strip(".").lower()
    if not domain:
        raise ConfigError("--dns-domain must not be empty")
    if not CLUSTER_ID_RE.match(domain) or len(domain) > MAX_DOMAIN:
        raise ConfigError(f"--dns-domain {args.dns_domain!r}: expected a DNS name of "
                          f"RFC 1123 labels (letters, digits, '-'), at most {MAX_DOMAIN} "
                          "characters")
    if not 512 <= args.dns_edns_max <= 65535:
        raise ConfigError("--dns-edns-max must be 512-65535")
    if not 0 <= args.dns_ttl <= 86400:
        raise ConfigError("--dns-ttl must be 0-86400")
    if args.dns_rrl < 0:
        raise ConfigError("--dns-rrl must be >= 0")
    if args.no_proxy and args.http_listen:
        # The front door is one of the proxy's listeners: with --no-proxy it was never
        # opened, and nothing said so (connections to it were refused).
        raise ConfigError(
            f"--http-listen {args.http_listen}: the front door is part of the "
            "proxy, which --no-proxy turns off"
        )
    from mcsproxy.dns.guard import parse_networks

    try:
        allow_from = tuple(str(n) for n in parse_networks(args.dns_allow_from))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return GatewayConfig(
        cluster_id=args.cluster_id,
        sources=tuple(args.source),
        dns=DnsConfig(
            listen=parse_host_port(args.dns_listen, "--dns-listen"),
            domain=domain,
            upstream=parse_host_port(args.dns_upstream, "--dns-upstream", destination=True)
            if args.dns_upstream else None,
            edns_max_payload=args.dns_edns_max,
            ttl_s=args.dns_ttl,
            allow_from=allow_from,
            rrl_qps=args.dns_rrl,
        ),
        admin=AdminConfig(listen=parse_host_port(args.admin_listen, "--admin-listen"),
                          demo_control=args.demo_control, token_file=args.admin_token_file),
        proxy=proxy_config(args),
        log_level=args.log_level,
        clusterset_cidr=args.clusterset_cidr,
        vip_interface=args.vip_interface,
        controlplane_token_file=args.controlplane_token_file,
        access_log=args.access_log,
        access_log_format=args.access_log_format,
    )


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; return (before, after).

    Every proxied connection holds two descriptors, so the soft limit many shells and
    init systems hand out (1024) would cap the gateway at ~500 connections while the
    hard limit, which only an administrator sets, allows far more; the controller's
    stream holds one per gateway (up to 4096). Go's runtime does the same at start;
    nothing here uses select(), so high descriptor numbers are safe.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel caps NOFILE at fs.nr_open anyway
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger("mcsproxy").warning(
                "open files limit stays %d (hard %d): %s", soft, hard, exc)
            return soft, soft
        return soft, target
    return soft, soft


def _run_gateway(args: argparse.Namespace) -> int:
    import uvloop

    from mcsproxy.gateway import Gateway
    from mcsproxy.sources import SourceSpecError

    config = gateway_config(args)
    proxy = config.proxy
    setup_logging(config.log_level, proxy.worker_index if proxy.workers > 1 else None)
    before, after = raise_nofile_limit()
    logging.getLogger("mcsproxy.gateway").info(
        "open files limit %d%s", after, f" (raised from {before})" if after != before else "")

    async def main() -> None:
        await Gateway(config).run()

    try:
        uvloop.run(main())
    except SourceSpecError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="run a local clusterset (no arguments), or kill/restore a cluster of a running one",
    )
    p.add_argument("action", nargs="?", default="run", choices=["run", "kill", "restore", "status"])
    p.add_argument("cluster", nargs="?", help="the cluster to kill or restore")
    p.add_argument("--load", action="store_true", help="send steady traffic and print the split")
    p.add_argument("--workdir", help="keep manifests and logs here (default: a temp dir)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from mcsproxy.demo.runner import control, run_demo

    if args.action == "run":
        import uvloop

        setup_logging("warning")
        return uvloop.run(run_demo(args.workdir, args.load))
    from mcsproxy.demo.clusterset import CLUSTERS

    names = [c.name for c in CLUSTERS]
    if args.action != "status" and args.cluster not in names:
        # Checked here, not by the running demo: its answer was a raw JSON body, exit 1.
        what = f"no cluster {args.cluster!r}" if args.cluster else "needs a cluster name"
        raise ConfigError(f"demo {args.action} {what}; the demo's clusters are "
                          f"{', '.join(names)}")
    return control(args.action, args.cluster or "")


def _add_controller_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("controller", help="run the MCS controller (directory or Kubernetes mode)")
    p.add_argument("--clusters-dir", metavar="DIR", help="DIR/<cluster-id>/*.yaml per member")
    p.add_argument("--output-dir", metavar="OUT", help="OUT/<cluster-id>/ receives the imports")
    p.add_argument("--once", action="store_true", help="reconcile once and exit")
    p.add_argument("--serve", metavar="HOST:PORT", help="stream snapshots to gateways here")
    p.add_argument("--serve-token-file", metavar="PATH",
                   help="the stream and /status answer 401 without 'Authorization: Bearer' "
                        "and the token in PATH (re-read when it changes)")
    p.add_argument("--stream-write-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="stream: a gateway that takes no data for this long is disconnected "
                        "(default 30)")
    p.add_argument("--stream-queue-bytes", type=int, default=16 * 1024 * 1024, metavar="BYTES",
                   help="stream: a gateway with more than this queued for it gets one "
                        "snapshot instead (default 16777216: 16 MiB)")
    p.add_argument("--clusterset-cidr", default="127.240.0.0/16", metavar="CIDR[,CIDR6]",
                   help="ClusterSetIP range; IPv4,IPv6 for dual stack (default 127.240.0.0/16)")
    p.add_argument("--cluster-cidr", action="append", default=[], metavar="CLUSTER=CIDR",
                   help="a ClusterSetIP range of that consumer cluster's own (repeatable)")
    p.add_argument("--kubeconfig", metavar="PATH", help="Kubernetes mode: the kubeconfig")
    p.add_argument("--contexts", metavar="A,B=ID",
                   help="Kubernetes mode: member contexts (cluster ID = context, or after =)")
    p.add_argument("--member-secrets", metavar="NAMESPACE",
                   help="Kubernetes mode in-cluster: member kubeconfigs from Secrets labelled "
                        "mcsproxy.io/member-cluster=<id> in NAMESPACE")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                   help="Kubernetes mode: only the holder of a Lease writes (default on)")
    p.add_argument("--lease-namespace", metavar="NS",
                   help="the Lease's namespace (default: --member-secrets, else kube-system)")
    p.add_argument("--lease-duration", type=float, default=15.0, metavar="SECONDS",
                   help="Kubernetes mode: leader Lease duration (default 15)")
    p.add_argument("--identity", help="leader election identity (default: host-pid)")
    p.add_argument("--log-level", default="info", choices=sorted(LEVELS), help="(default info)")
    p.set_defaults(func=_run_controller)


def _run_controller(args: argparse.Namespace) -> int:
    # The data plane never imports the controller; only this command does, lazily.
    from controlplane.command import run_from_args

    setup_logging(args.log_level)
    return run_from_args(args, ConfigError)


def _add_status_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status", help="a running gateway's services, endpoints and events",
        epilog="exit status: 0 ready, 1 status not readable, 2 bad flag, 3 not ready")
    p.add_argument("--admin", default="http://127.0.0.1:9901", metavar="URL",
                   help="the gateway's admin listener (default http://127.0.0.1:9901)")
    p.add_argument("--events", type=int, default=10, metavar="N",
                   help="recent events shown (default 10)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="send the token in PATH as a bearer token (the gateway's "
                        "--admin-token-file)")
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from mcsproxy.statuscmd import run_status

    if args.events < 0:  # a negative slice bound showed all events but the first N
        raise ConfigError(f"--events must be >= 0, not {args.events}")
    admin = args.admin if "://" in args.admin else f"http://{args.admin}"  # HOST:PORT too
    if not admin.startswith(("http://", "https://")):
        raise ConfigError(f"--admin {args.admin!r}: expected http://HOST:PORT")
    token = None
    if args.token_file is not None:
        from mcsproxy.tokenfile import TokenFile, TokenFileError
        try:
            token = TokenFile(args.token_file)
        except TokenFileError as exc:
            raise ConfigError(f"--token-file: {exc}") from None
    return run_status(admin, args.events, args.json, token)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default X)" to each flag's help that does not say its default yet, so
    --help shows every default the README and the architecture contract state."""
    for action in parser._actions:
        default = action.default
        if (default in (None, False, [], argparse.SUPPRESS) or action.help == argparse.SUPPRESS
                or not action.option_strings or "default" in (action.help or "")):
            continue
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        action.help = f"{action.help} (default {shown})" if action.help else f"(default {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcsproxy", description="Kubernetes Multi-Cluster Services data plane"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_gateway_parser(sub)
    _add_demo_parser(sub)
    _add_controller_parser(sub)
    _add_status_parser(sub)
    for subparser in sub.choices.values():
        _show_defaults(subparser)
    return parser


def open_standard_fds() -> None:
    """/dev/null on whichever of fds 0, 1 and 2 the process was started without (`<&-
    >&- 2>&-`, some init systems). Left closed, the next descriptors opened take their
    numbers: the event loop's own (libuv aborts with SIGABRT when it closes an fd <= 2,
    so at every stop, and in each --workers child between fork and exec), or a socket
    that a stray write to "stderr" would then corrupt."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    # Python leaves sys.stdout and sys.stderr None for an fd closed at its start.
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (for the process's life)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    open_standard_fds()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # --workers re-runs it
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mcsproxy: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mcsproxy: error: {os_error_text(exc)}", file=sys.stderr)
        return 1


def os_error_text(exc: OSError) -> str:
    """One line without the "[Errno 99]" prefix: the listeners and the access log put
    their flag and address in strerror ("--dns-listen 10.9.9.9:53/udp: Cannot assign
    requested address"), a file error gets its file name."""
    if exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
