"""The proxy's command-line flags and their translation into ProxyConfig."""

from __future__ import annotations

import argparse

from mcsproxy.config import (
    LB_POLICIES,
    HealthConfig,
    HttpConfig,
    OutlierConfig,
    ProxyConfig,
    parse_host_port,
)


def add_proxy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("proxy")
    g.add_argument("--no-proxy", action="store_true", help="serve DNS only, no listeners")
    g.add_argument("--lb-policy", default="round-robin", choices=LB_POLICIES)
    g.add_argument("--connect-timeout", type=float, default=1.0, metavar="S",
                   help="per connect attempt (default 1)")
    g.add_argument("--connect-attempts", type=int, default=3, metavar="N",
                   help="endpoints tried per connection before giving up (default 3)")
    g.add_argument("--idle-timeout", type=float, default=3600.0, metavar="S",
                   help="close TCP connections idle this long; 0: never (default 3600)")
    g.add_argument("--drain-grace", type=float, default=None, metavar="S",
                   help="close connections of removed endpoints after S (default: never)")
    g.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                   help="on SIGTERM: /readyz fails, listeners close, in-flight requests and "
                        "connections get S to finish (default 10)")
    g.add_argument("--tcp-keepalive", type=parse_keepalive, default=(30, 10, 3),
                   metavar="IDLE,INTERVAL,PROBES",
                   help="keepalive on client and endpoint connections: first probe after "
                        "IDLE s of silence, then every INTERVAL s, closed after PROBES "
                        "unanswered, or on endpoint connections once --tcp-user-timeout "
                        "has passed (default 30,10,3; off: none)")
    g.add_argument("--tcp-user-timeout", type=float, default=60.0, metavar="S",
                   help="close a connection to an endpoint whose sent data stays "
                        "unacknowledged, or its receive window shut, for S (default 60; "
                        "0: never)")
    g.add_argument("--udp-idle-timeout", type=float, default=30.0, metavar="S")
    g.add_argument("--udp-max-flows", type=int, default=16384, metavar="N",
                   help="UDP flows per listener and process (--workers), a quarter of them "
                        "per client address; datagrams of new flows beyond either drop")
    g.add_argument("--max-connections-per-listener", type=int, default=0, metavar="N",
                   help="open TCP/HTTP connections per ClusterSetIP:port and process "
                        "(--workers); more are closed at accept (default 0: unlimited)")
    g.add_argument("--max-connections-per-client", type=int, default=0, metavar="N",
                   help="the same per client address and listener (default 0: unlimited)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="proxy processes sharing the listeners with SO_REUSEPORT")
    g.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--health-interval", type=float, default=5.0, metavar="S",
                   help="active health check period; 0 disables (default 5)")
    g.add_argument("--health-timeout", type=float, default=1.0, metavar="S")
    g.add_argument("--health-healthy-threshold", type=int, default=2, metavar="N")
    g.add_argument("--health-unhealthy-threshold", type=int, default=2, metavar="N")
    g.add_argument("--health-http-path", default="/", metavar="PATH",
                   help="GET path for appProtocol http ports (default /)")
    g.add_argument("--outlier-consecutive-failures", type=int, default=5, metavar="N",
                   help="eject an endpoint after N connect failures in a row; 0 disables")
    g.add_argument("--outlier-base-ejection", type=float, default=30.0, metavar="S")
    g.add_argument("--outlier-max-ejection", type=float, default=300.0, metavar="S")
    g.add_argument("--outlier-max-ejection-percent", type=int, default=50, metavar="P")
    add_http_arguments(p)


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    d = HttpConfig()
    g = p.add_argument_group("HTTP proxy (appProtocol: http ports and the front door)")
    g.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                   help="front door routing by Host: <svc>.<ns>.svc.<domain>[:port] (default off)")
    g.add_argument("--http-header-timeout", type=float, default=d.header_timeout_s, metavar="S",
                   help=f"to receive a request head (default {d.header_timeout_s:g})")
    g.add_argument("--http-keepalive-timeout", type=float, default=d.keepalive_timeout_s,
                   metavar="S", help=f"idle client connection (default {d.keepalive_timeout_s:g})")
    g.add_argument("--http-per-try-timeout", type=float, default=d.per_try_timeout_s,
                   metavar="S", help=f"one attempt, until the response head "
                   f"(default {d.per_try_timeout_s:g})")
    g.add_argument("--http-request-timeout", type=float, default=d.request_timeout_s,
                   metavar="S", help=f"all attempts together (default {d.request_timeout_s:g})")
    g.add_argument("--http-max-retries", type=int, default=d.max_retries, metavar="N")
    g.add_argument("--http-retry-budget", type=int, default=d.retry_budget_percent,
                   metavar="PCT", help="retries in flight at most PCT %% of requests in flight")
    g.add_argument("--http-retry-buffer", type=int, default=d.retry_buffer_bytes, metavar="B",
                   help="idempotent request bodies up to B bytes are kept for a retry")
    g.add_argument("--http-max-header-bytes", type=int, default=d.max_header_bytes, metavar="B")
    g.add_argument("--http-max-headers", type=int, default=d.max_headers, metavar="N")
    g.add_argument("--http-max-uri-bytes", type=int, default=d.max_uri_bytes, metavar="B")
    g.add_argument("--http-pool-max-idle", type=int, default=d.pool_max_idle, metavar="N",
                   help="idle keep-alive connections kept per endpoint")
    g.add_argument("--http-pool-idle-timeout", type=float, default=d.pool_idle_timeout_s,
                   metavar="S")
    g.add_argument("--http-cluster-header", default=None, metavar="NAME",
                   help="response header naming the cluster that served (default off)")


def parse_keepalive(value: str) -> tuple[int, int, int] | None:
    """--tcp-keepalive: IDLE,INTERVAL,PROBES (whole seconds, a count) or `off`."""
    if value.strip().lower() in ("off", "0"):
        return None
    try:
        idle, interval, probes = (int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected IDLE,INTERVAL,PROBES (as 30,10,3) or off, got {value!r}") from None
    return idle, interval, probes


def http_config(args: argparse.Namespace) -> HttpConfig:
    return HttpConfig(
        listen=parse_host_port(args.http_listen, "--http-listen") if args.http_listen else None,
        header_timeout_s=args.http_header_timeout,
        keepalive_timeout_s=args.http_keepalive_timeout,
        per_try_timeout_s=args.http_per_try_timeout,
        request_timeout_s=args.http_request_timeout,
        max_retries=args.http_max_retries,
        retry_budget_percent=args.http_retry_budget,
        retry_buffer_bytes=args.http_retry_buffer,
        max_header_bytes=args.http_max_header_bytes,
        max_headers=args.http_max_headers,
        max_uri_bytes=args.http_max_uri_bytes,
        pool_max_idle=args.http_pool_max_idle,
        pool_idle_timeout_s=args.http_pool_idle_timeout,
        cluster_header=args.http_cluster_header,
    )


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        enabled=not args.no_proxy,
        lb_policy=args.lb_policy,
        connect_timeout_s=args.connect_timeout,
        connect_attempts=args.connect_attempts,
        idle_timeout_s=args.idle_timeout,
        drain_grace_s=args.drain_grace,
        drain_timeout_s=args.drain_timeout,
        tcp_keepalive=args.tcp_keepalive,
        tcp_user_timeout_s=args.tcp_user_timeout,
        udp_idle_timeout_s=args.udp_idle_timeout,
        udp_max_flows=args.udp_max_flows,
        max_connections_per_listener=args.max_connections_per_listener,
        max_connections_per_client=args.max_connections_per_client,
        workers=args.workers,
        worker_index=args.worker_index,
        worker_argv=tuple(getattr(args, "argv", ())),
        health=HealthConfig(
            interval_s=args.health_interval,
            timeout_s=args.health_timeout,
            healthy_threshold=args.health_healthy_threshold,
            unhealthy_threshold=args.health_unhealthy_threshold,
            http_path=args.health_http_path,
        ),
        outlier=OutlierConfig(
            consecutive_failures=args.outlier_consecutive_failures,
            base_ejection_s=args.outlier_base_ejection,
            max_ejection_s=args.outlier_max_ejection,
            max_ejection_percent=args.outlier_max_ejection_percent,
        ),
        http=http_config(args),
    )
