"""The proxy's command-line flags and their translation into ProxyConfig."""

from __future__ import annotations

import argparse

from mcsproxy.config import LB_POLICIES, HealthConfig, OutlierConfig, ProxyConfig


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
    g.add_argument("--udp-idle-timeout", type=float, default=30.0, metavar="S")
    g.add_argument("--udp-max-flows", type=int, default=16384, metavar="N",
                   help="UDP flows per listener; datagrams of new clients beyond it drop")
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


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        enabled=not args.no_proxy,
        lb_policy=args.lb_policy,
        connect_timeout_s=args.connect_timeout,
        connect_attempts=args.connect_attempts,
        idle_timeout_s=args.idle_timeout,
        drain_grace_s=args.drain_grace,
        udp_idle_timeout_s=args.udp_idle_timeout,
        udp_max_flows=args.udp_max_flows,
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
    )
