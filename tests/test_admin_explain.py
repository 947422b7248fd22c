"""`/explain` as a table of cases: spread, local-first, spill and panic, read from live
upstream sets whose health is set through their own interface (probe results)."""

from __future__ import annotations

from mcsproxy.config import HealthConfig, OutlierConfig, ProxyConfig
from mcsproxy.model import ImportedService, ServiceKey, ServicePort
from mcsproxy.observability.explain import explain, explain_port
from mcsproxy.upstream import UpstreamSet, eligible_targets, priority_load
from tests.proxy_fixtures import NO_HEALTH, endpoint
from tests.test_upstream_set import Conn, FakeClock

PORT = ServicePort("web", "TCP", 80)
CONFIG = ProxyConfig(health=NO_HEALTH)
FAIL_ONCE = HealthConfig(unhealthy_threshold=1)


def service(endpoints: list[tuple[str, str, bool]], traffic: str | None = None
            ) -> ImportedService:
    """endpoints: (address, cluster, ready)."""
    return ImportedService(
        key=ServiceKey("test", "web"), type="ClusterSetIP", ips=("127.240.0.1",),
        ports=(PORT,), traffic_distribution=traffic,
        endpoints=tuple(endpoint(a, c, 8080, ready=r) for a, c, r in endpoints))


def live(svc: ImportedService, unhealthy: set[str] = frozenset()) -> UpstreamSet:  # type: ignore[assignment]
    upstream = UpstreamSet("test/web:web/TCP", "east", CONFIG, locality=svc.locality)
    upstream.update(eligible_targets(svc, PORT))
    for host in upstream.hosts.values():
        if host.address in unhealthy:
            upstream.health_result(host, "connection refused", FAIL_ONCE)
    return upstream


def test_spread_over_every_cluster() -> None:
    svc = service([("10.0.0.1", "east", True), ("10.1.0.1", "west", True),
                   ("10.2.0.1", "south", True), ("10.2.0.2", "south", False)])
    out = explain_port(svc, PORT, "east", CONFIG, live(svc))
    assert out["locality"] == "spread" and not out["spill"] and not out["panic"]
    assert [lv["load_percent"] for lv in out["levels"]] == [100]
    assert out["split"] == {"east": 33.3, "south": 33.3, "west": 33.3}
    not_ready = [e for e in out["endpoints"] if not e["eligible"]]
    assert [(e["address"], e["why"]) for e in not_ready] == [
        ("10.2.0.2", "not ready")]
    assert out["words"][0] == ("Locality spread (the KEP-1645 default): one priority level "
                               "with every cluster's endpoints, the local one included.")
    assert any("1 of 4 endpoints are not eligible" in w for w in out["words"])


def test_local_first_keeps_everything_local_while_healthy() -> None:
    svc = service([("10.0.0.1", "east", True), ("10.0.0.2", "east", True),
                   ("10.1.0.1", "west", True)], traffic="PreferClose")
    out = explain_port(svc, PORT, "east", CONFIG, live(svc))
    assert out["locality"] == "local-first"
    assert [(lv["priority"], lv["clusters"], lv["load_percent"]) for lv in out["levels"]] == [
        (0, ["east"], 100), (1, ["west"], 0)]
    assert out["split"] == {"east": 100.0} and not out["spill"]
    assert any("trafficDistribution: PreferClose" in w for w in out["words"])
    assert any("nothing spills" in w for w in out["words"])


def test_spill_to_remote_clusters_as_local_health_drops() -> None:
    svc = service([("10.0.0.1", "east", True), ("10.0.0.2", "east", True),
                   ("10.0.0.3", "east", True), ("10.1.0.1", "west", True),
                   ("10.2.0.1", "south", True)], traffic="PreferClose")
    upstream = live(svc, unhealthy={"10.0.0.2", "10.0.0.3"})
    out = explain_port(svc, PORT, "east", CONFIG, upstream)
    # 1 of 3 healthy: 33 % x 1.4 = 46 % health; the rest spills to priority 1.
    assert [lv["health_percent"] for lv in out["levels"]] == [46, 100]
    assert [lv["load_percent"] for lv in out["levels"]] == [46, 54]
    assert out["spill"] and not out["panic"]
    assert out["split"] == {"east": 46.0, "south": 27.0, "west": 27.0}
    assert upstream.plan == priority_load([1, 2], [3, 2])
    assert any("54% spill to priority 1" in w for w in out["words"])
    assert [e["healthy"] for e in out["endpoints"]] == [True, False, False, True, True]


def test_panic_when_total_health_is_short() -> None:
    svc = service([("10.0.0.1", "east", True), ("10.0.0.2", "east", True),
                   ("10.0.0.3", "east", True), ("10.0.0.4", "east", True),
                   ("10.1.0.1", "west", True), ("10.1.0.2", "west", True)],
                  traffic="PreferClose")
    upstream = live(svc, unhealthy={"10.0.0.2", "10.0.0.3", "10.0.0.4", "10.1.0.1", "10.1.0.2"})
    out = explain_port(svc, PORT, "east", CONFIG, upstream)
    # East 25 % healthy (35 % health), west none: both levels in panic, so the loads
    # follow the endpoint counts (4 and 2 of 6), healthy or not.
    assert [lv["load_percent"] for lv in out["levels"]] == [67, 33]
    assert [lv["panic"] for lv in out["levels"]] == [True, True]
    assert out["panic"]
    assert out["split"] == {"east": 67.0, "west": 33.0}
    assert any("Total health is 35% and every level is in panic" in w for w in out["words"])
    assert any("Priority 0 is in panic: 25% of its endpoints are healthy, below the 50% "
               "panic threshold" in w for w in out["words"])


def test_without_a_proxy_readiness_stands_for_health() -> None:
    svc = service([("10.0.0.1", "east", True), ("10.1.0.1", "west", True)],
                  traffic="PreferClose")
    out = explain(svc, None, "east", CONFIG, None)
    port = out["ports"][0]
    assert not port["live"] and port["split"] == {"east": 100.0}
    assert any("--no-proxy" in w for w in out["words"])
    assert explain(svc, "nope", "east", CONFIG, None)["ports"] == []


def _nested_parentheses(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth > 1:
            return True
    return False


def test_no_sentence_has_brackets_inside_brackets() -> None:
    """The default's reason read "spread (the default (KEP-1645: spread over every
    exporting cluster))": a reason in parentheses must not bring its own."""
    spread = service([("10.0.0.1", "east", True), ("10.1.0.1", "west", True),
                      ("10.1.0.2", "west", False)])
    close = service([("10.0.0.1", "east", True), ("10.1.0.1", "west", True)],
                    traffic="PreferClose")
    annotated = ImportedService(
        key=spread.key, type=spread.type, ips=spread.ips, ports=spread.ports,
        endpoints=spread.endpoints, annotations={"mcsproxy.io/locality": "local-first"})
    words = []
    for svc in (spread, close, annotated):
        words += explain_port(svc, PORT, "east", CONFIG, live(svc, {"10.0.0.1"}))["words"]
        words += explain_port(svc, PORT, "east", CONFIG, None)["words"]
    assert any("annotation mcsproxy.io/locality: local-first" in w for w in words)
    assert [w for w in words if _nested_parentheses(w)] == []


def test_an_ejection_that_ran_out_is_explained_as_over_without_a_connection() -> None:
    """Explain read the ejection and the plan as the last pick left them: an ejection
    that ran out with no connection since still kept its endpoint out of the split."""
    svc = service([("10.0.0.1", "east", True), ("10.0.0.2", "east", True),
                   ("10.1.0.1", "west", True)], traffic="PreferClose")
    clock = FakeClock()
    config = ProxyConfig(health=NO_HEALTH, outlier=OutlierConfig(
        consecutive_failures=1, base_ejection_s=2))
    upstream = UpstreamSet("test/web:web/TCP", "east", config, locality=svc.locality,
                           clock=clock)
    upstream.update(eligible_targets(svc, PORT))
    upstream.connect_failed(upstream.hosts[("10.0.0.1", 8080)], "refused")
    out = explain_port(svc, PORT, "east", config, upstream)
    assert out["split"] == {"east": 70.0, "west": 30.0} and out["endpoints"][0]["ejected"]
    clock.now += 3.5
    out = explain_port(svc, PORT, "east", config, upstream)
    assert out["split"] == {"east": 100.0} and not out["spill"]
    assert [(e["ejected"], e["healthy"]) for e in out["endpoints"]] == [(False, True)] * 3
    assert out["levels"][0]["healthy"] == 2


def test_other_workers_connections_count_in_active_connections() -> None:
    """With --workers N the other processes' connections (admin.workers_active) add to
    this process's own, as /endpoints adds them; explain showed this process's only."""
    svc = service([("10.0.0.1", "east", True), ("10.1.0.1", "west", True)])
    upstream = live(svc)
    upstream.connect_ok(upstream.hosts[("10.0.0.1", 8080)], Conn())
    others = {upstream.name: {"10.0.0.1:8080": 4, "10.1.0.1:8080": 6}}
    out = explain(svc, None, "east", CONFIG, {("web", "TCP"): upstream}, others)
    assert [e["active_connections"] for e in out["ports"][0]["endpoints"]] == [5, 6]
