"""Reconcile tables: every rule of mcs-spec.md "Export and import" and "Karmada
MultiClusterService", through the pure reconcile_clusterset()."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from typing import Any

import pytest

from controlplane.allocator import AllocationError, ClusterSetIPAllocator, parse_cidrs
from controlplane.clusters.state import ClusterObjects
from controlplane.conditions import EXPORT_CONDITION_TYPES, with_own_conditions
from controlplane.reconcile import MAX_ENDPOINTS_PER_SLICE, STALE_ANNOTATION, owner_uid
from controlplane.resources import KIND_EXPORT, KIND_IMPORT, ObjectRef, parse_member_object
from mcsproxy.manifests import ManifestError, parse_endpoint_slice, parse_service_import
from mcsproxy.model import ServiceKey
from tests.test_reconcile_support import (
    LATER,
    NOW,
    cluster,
    eslice,
    export,
    export_status,
    exporter,
    mcs,
    namespace,
    reconcile,
    service,
    service_import,
    slices,
    with_fields,
)


# -- rules 1-3: who exports, who imports --------------------------------------------------
def test_no_export_no_import_even_if_another_cluster_has_the_service() -> None:
    desired = reconcile({
        "a": cluster("a", namespace(), service(), eslice("web-1", ["127.0.1.1"])),
        "b": cluster("b", namespace(), service()),
    })
    assert desired == {"a": {}, "b": {}}


def test_every_cluster_with_the_namespace_imports_exporters_included() -> None:
    desired = reconcile({
        "a": exporter("a"),
        "b": cluster("b", namespace()),
        "c": cluster("c", namespace("other")),
    })
    assert service_import(desired, "a") is not None
    assert service_import(desired, "b") is not None
    assert service_import(desired, "c") is None
    assert desired["c"] == {}


def test_an_exporting_cluster_has_the_namespace_without_a_namespace_object() -> None:
    # Kubernetes admits no Service or ServiceExport in a namespace that does not exist;
    # a directory member may leave the Namespace document out. A Karmada
    # MultiClusterService in a folder says nothing about that cluster's namespaces.
    desired = reconcile({
        "a": cluster("a", service(), eslice("web-a", ["127.0.1.1"]), export()),
        "b": cluster("b", service("api"), mcs("other")),
        "c": cluster("c", mcs("other")),
    })
    assert service_import(desired, "a")["status"]["clusters"] == [{"cluster": "a"}]
    assert service_import(desired, "b") is not None
    assert service_import(desired, "c") is None
    ready = export_status(desired, "a")["Ready"]
    assert (ready["status"], ready["reason"]) == ("True", "Exported")


def test_import_disappears_everywhere_after_the_last_export_goes() -> None:
    a_with, b_with = exporter("a"), exporter("b", created="2024-02-01T00:00:00Z")
    a_without = cluster("a", namespace(), service(), eslice("web-a", ["127.0.1.1"]))
    b_without = cluster("b", namespace(), service(), eslice("web-b", ["127.0.2.1"]))
    one_left = reconcile({"a": a_without, "b": b_with})
    assert service_import(one_left, "a")["status"]["clusters"] == [{"cluster": "b"}]
    none_left = reconcile({"a": a_without, "b": b_without})
    assert none_left == {"a": {}, "b": {}}
    both = reconcile({"a": a_with, "b": b_with})
    assert service_import(both, "b")["status"]["clusters"] == [{"cluster": "a"},
                                                               {"cluster": "b"}]


def test_a_cluster_that_unexports_takes_its_endpoints_out_of_every_consumer() -> None:
    # mcs-spec.md 1 and 12: b keeps its Service but drops its ServiceExport.
    b_without = cluster("b", namespace(), service(), eslice("web-b", ["127.0.2.1"]))
    desired = reconcile({"a": exporter("a"), "b": b_without, "c": cluster("c", namespace())})
    for c in ("a", "b", "c"):
        assert service_import(desired, c)["status"]["clusters"] == [{"cluster": "a"}]
        assert [s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
                for s in slices(desired, c)] == ["a"]
    assert not any(r.kind == "ServiceExport" for r in desired["b"])


# -- rule 4: types and validity -----------------------------------------------------------
@pytest.mark.parametrize(("svc", "expected"), [
    (service(svc_type="ClusterIP"), "ClusterSetIP"),
    (service(svc_type="NodePort"), "ClusterSetIP"),
    (service(svc_type="LoadBalancer"), "ClusterSetIP"),
    (service(headless=True), "Headless"),
])
def test_service_type_maps_to_import_type(svc: dict, expected: str) -> None:
    desired = reconcile({"a": exporter("a", svc=svc)})
    imp = service_import(desired, "a")
    assert imp["spec"]["type"] == expected
    assert ("ips" in imp["spec"]) is (expected == "ClusterSetIP")
    parse_service_import(imp)  # the gateway accepts what the controller writes


@pytest.mark.parametrize(("docs", "reason"), [
    ((namespace(), service(svc_type="ExternalName", ports=()), export()), "InvalidServiceType"),
    ((namespace(), export()), "NoService"),
])
def test_invalid_exports_get_valid_false_and_no_import(docs: tuple, reason: str) -> None:
    desired = reconcile({"a": cluster("a", *docs), "b": cluster("b", namespace())})
    assert service_import(desired, "a") is None and service_import(desired, "b") is None
    conds = export_status(desired, "a")
    assert conds["Valid"]["status"] == "False" and conds["Valid"]["reason"] == reason
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "Failed"
    assert "Conflict" not in conds


@pytest.mark.parametrize(("docs", "reason"), [
    ((namespace(), service(svc_type="ExternalName", ports=()),
      export(created="2023-01-01T00:00:00Z")), "InvalidServiceType"),
    ((namespace(), export(created="2023-01-01T00:00:00Z")), "NoService"),
])
def test_an_invalid_export_takes_no_part_beside_valid_ones(docs: tuple, reason: str) -> None:
    """mcs-spec.md 4, 6, 11: c's export is the oldest but invalid: it neither wins nor
    disagrees nor appears in status.clusters; c still imports (it has the namespace)."""
    desired = reconcile({"a": exporter("a"), "b": exporter("b", addresses=["127.0.2.1"]),
                         "c": cluster("c", *docs)})
    for c in ("a", "b", "c"):
        imp = service_import(desired, c)
        assert imp["spec"]["type"] == "ClusterSetIP"
        assert imp["status"]["clusters"] == [{"cluster": "a"}, {"cluster": "b"}]
    conds = export_status(desired, "c")
    assert (conds["Valid"]["status"], conds["Valid"]["reason"]) == ("False", reason)
    assert "Conflict" not in conds
    for c in ("a", "b"):
        conflict = export_status(desired, c)["Conflict"]
        assert (conflict["status"], conflict["reason"]) == ("False", "NoConflicts")


def test_valid_export_conditions_carry_every_field() -> None:
    desired = reconcile({"a": exporter("a"), "b": cluster("b", namespace())})
    conds = export_status(desired, "a")
    assert [c for c in conds] == ["Valid", "Ready", "Conflict"]
    assert set(conds) == EXPORT_CONDITION_TYPES  # all ours: any other type is left alone
    assert (conds["Valid"]["status"], conds["Valid"]["reason"]) == ("True", "Valid")
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("True", "Exported")
    assert (conds["Conflict"]["status"], conds["Conflict"]["reason"]) == ("False", "NoConflicts")
    for c in conds.values():
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime"}
        assert c["message"] and c["lastTransitionTime"] == NOW


def test_last_transition_time_kept_until_the_status_changes() -> None:
    first = reconcile({"a": exporter("a")})
    previous = {"a": list(first["a"].values())}
    same = reconcile({"a": exporter("a")}, previous=previous, now=LATER)
    assert all(c["lastTransitionTime"] == NOW for c in export_status(same, "a").values())
    other = exporter("b", created="2024-02-01T00:00:00Z", svc=service(headless=True))
    flipped = reconcile({"a": exporter("a"), "b": other}, previous=previous, now=LATER)
    conds = export_status(flipped, "a")
    assert conds["Conflict"]["lastTransitionTime"] == LATER
    assert conds["Valid"]["lastTransitionTime"] == NOW


@pytest.mark.parametrize(("live", "ours", "written"), [
    # Theirs stay where they are, ours take the place of their type.
    ("P Valid- Ready- Q", "Valid Ready Conflict", "P Valid Ready Q Conflict"),
    # One of ours no longer written (an export turned invalid) goes; theirs do not.
    ("Valid- Ready- Conflict- Q", "Valid Ready", "Valid Ready Q"),
    ("", "Valid Ready", "Valid Ready"),
    ("Q P", "Valid", "Q P Valid"),
])
def test_export_conditions_written_keep_everyone_elses(live: str, ours: str,
                                                       written: str) -> None:
    """Names: a condition type; "-" marks the stale one of ours the object holds."""
    def cond(name: str) -> dict[str, str]:
        return {"type": name.rstrip("-"), "status": "True",
                "reason": "Old" if name.endswith("-") else "New"}

    merged = with_own_conditions([cond(n) for n in live.split()],
                                 [cond(n) for n in ours.split()])
    assert merged == [cond(n) for n in written.split()]


# -- rules 5-6: conflicts, oldest wins, reported on every export --------------------------
def test_type_conflict_oldest_wins_and_every_export_says_so() -> None:
    desired = reconcile({
        "cluster-1": exporter("cluster-1", created="2024-01-01T00:00:00Z"),
        "cluster-2": exporter("cluster-2", created="2024-03-01T00:00:00Z",
                              svc=service(headless=True)),
    })
    assert service_import(desired, "cluster-2")["spec"]["type"] == "ClusterSetIP"
    for c in ("cluster-1", "cluster-2"):
        conflict = export_status(desired, c)["Conflict"]
        assert conflict["status"] == "True"
        assert conflict["reason"] == "TypeConflict"
        assert conflict["message"] == (
            'Conflicting type. Using "ClusterSetIP" from oldest service export in '
            '"cluster-1". 1/2 clusters disagree.')


def test_oldest_is_by_creation_timestamp_not_by_name() -> None:
    desired = reconcile({
        "a": exporter("a", created="2024-05-01T00:00:00Z", svc=service(headless=True)),
        "b": exporter("b", created="2024-01-01T00:00:00Z"),
    })
    assert service_import(desired, "a")["spec"]["type"] == "ClusterSetIP"
    assert '"b"' in export_status(desired, "a")["Conflict"]["message"]


def test_equal_timestamps_are_settled_by_cluster_name() -> None:
    desired = reconcile({
        "b": exporter("b", svc=service(headless=True)),
        "a": exporter("a"),
    })
    assert service_import(desired, "b")["spec"]["type"] == "ClusterSetIP"


@pytest.mark.parametrize(("a_created", "b_created", "oldest"), [
    # Compared as instants: 01:00+02:00 is 23:00Z the day before.
    ("2024-01-01T01:00:00+02:00", "2024-01-01T00:00:00Z", "a"),
    ("2024-01-01T00:00:00.5Z", "2024-01-01T00:00:00Z", "b"),
    # An export without creationTimestamp cannot be shown to be the oldest.
    (None, "2024-06-01T00:00:00Z", "b"),
    ("2024-06-01T00:00:00Z", None, "a"),
])
def test_oldest_export_is_the_earliest_creation_instant(a_created, b_created, oldest) -> None:
    members = {"a": cluster("a", namespace(), service(headless=True), export(created=a_created)),
               "b": cluster("b", namespace(), service(), export(created=b_created))}
    desired = reconcile(members)
    expected = "Headless" if oldest == "a" else "ClusterSetIP"
    assert service_import(desired, "a")["spec"]["type"] == expected
    for c in ("a", "b"):
        assert export_status(desired, c)["Conflict"]["message"] == (
            f'Conflicting type. Using "{expected}" from oldest service export in '
            f'"{oldest}". 1/2 clusters disagree.')


def test_a_cleared_conflict_says_no_conflicts_and_the_address_stays() -> None:
    headless_b = exporter("b", created="2024-02-01T00:00:00Z", svc=service(headless=True))
    first = reconcile({"a": exporter("a"), "b": headless_b})
    assert export_status(first, "b")["Conflict"]["status"] == "True"
    previous = {c: list(objects.values()) for c, objects in first.items()}
    cleared = reconcile({"a": exporter("a"), "b": exporter("b", created="2024-02-01T00:00:00Z")},
                        previous=previous, now=LATER)
    for c in ("a", "b"):
        conds = export_status(cleared, c)
        assert (conds["Conflict"]["status"], conds["Conflict"]["reason"],
                conds["Conflict"]["lastTransitionTime"]) == ("False", "NoConflicts", LATER)
        assert conds["Valid"]["lastTransitionTime"] == NOW
        assert service_import(cleared, c)["spec"]["ips"] == \
            service_import(first, c)["spec"]["ips"]


def test_several_conflicts_are_joined_by_commas() -> None:
    desired = reconcile({
        "a": exporter("a"),
        "b": exporter("b", created="2024-02-01T00:00:00Z",
                      svc=service(headless=True, sessionAffinity="ClientIP",
                                  ports=[("http", "TCP", 8080)]),
                      labels={"tier": "web"}),
    })
    conflict = export_status(desired, "a")["Conflict"]
    assert conflict["reason"] == (
        "PortConflict,TypeConflict,SessionAffinityConflict,LabelsConflict")
    assert conflict["message"].count("clusters disagree.") == 4


def test_conflict_counts_disagreeing_clusters() -> None:
    members = {c: exporter(c, created=f"2024-0{i + 1}-01T00:00:00Z")
               for i, c in enumerate(["a", "b", "c"])}
    members["d"] = exporter("d", created="2024-06-01T00:00:00Z", svc=service(headless=True))
    message = export_status(reconcile(members), "b")["Conflict"]["message"]
    assert message.endswith('"a". 1/4 clusters disagree.')


def test_affinity_timeout_conflict_counts_every_exporting_cluster() -> None:
    def client_ip(timeout: int | None = None) -> dict:
        config = {"clientIP": {"timeoutSeconds": timeout}} if timeout else {}
        return service(sessionAffinity="ClientIP", sessionAffinityConfig=config)

    desired = reconcile({
        "a": exporter("a", svc=client_ip(60)),
        "b": exporter("b", created="2024-02-01T00:00:00Z", svc=client_ip()),
        "c": exporter("c", created="2024-03-01T00:00:00Z", svc=service()),
    })
    conflict = export_status(desired, "c")["Conflict"]
    assert conflict["reason"] == "SessionAffinityConflict,SessionAffinityConfigConflict"
    assert conflict["message"] == (
        'Conflicting session affinity. Using "ClientIP" from oldest service export in "a". '
        "1/3 clusters disagree. Conflicting session affinity timeout. Using 60 from oldest "
        'service export in "a". 1/3 clusters disagree.')


# -- rule 7: ports ------------------------------------------------------------------------
def _ports(desired: dict, c: str = "a") -> list[tuple]:
    return [(p.get("name", ""), p["protocol"], p["port"])
            for p in service_import(desired, c)["spec"]["ports"]]


@pytest.mark.parametrize(("a_ports", "b_ports", "union", "conflict"), [
    ([("http", "TCP", 80)], [("http", "TCP", 80)], [("http", "TCP", 80)], False),
    ([("http", "TCP", 80)], [("dns", "UDP", 53)], [("http", "TCP", 80), ("dns", "UDP", 53)],
     False),
    ([("http", "TCP", 80)], [("http", "TCP", 8080)], [("http", "TCP", 80)], True),
    ([("http", "TCP", 80)], [("web", "TCP", 80)], [("http", "TCP", 80)], True),
    ([("", "TCP", 80)], [("", "TCP", 81)], [("", "TCP", 80)], True),
    ([("", "TCP", 80)], [("", "UDP", 80)], [("", "TCP", 80)], True),
    ([("a", "TCP", 80)], [("b", "UDP", 80)], [("a", "TCP", 80), ("b", "UDP", 80)], False),
])
def test_port_union_by_name_then_protocol_and_port(a_ports, b_ports, union, conflict) -> None:
    desired = reconcile({
        "a": exporter("a", svc=service(ports=a_ports)),
        "b": exporter("b", created="2024-02-01T00:00:00Z", svc=service(ports=b_ports)),
    })
    assert _ports(desired) == union
    cond = export_status(desired, "b")["Conflict"]
    assert (cond["status"] == "True") is conflict
    if conflict:
        assert cond["reason"] == "PortConflict"
        assert cond["message"].startswith("Conflicting ports. Using port")
        assert cond["message"].endswith('from oldest service export in "a". '
                                        "1/2 clusters disagree.")


@pytest.mark.parametrize(("a_app", "b_app", "kept", "shown"), [
    ("http", None, "http", 'port "http" 80/TCP with appProtocol "http"'),
    (None, "http", None, 'port "http" 80/TCP without appProtocol'),
    ("http", "kubernetes.io/h2c", "http", 'port "http" 80/TCP with appProtocol "http"'),
])
def test_same_port_with_another_app_protocol_is_a_port_conflict(a_app, b_app, kept,
                                                                shown) -> None:
    # KEP-1645: a name used for non-identical (port, protocol, appProtocol) is settled
    # oldest-wins; appProtocol decides whether the gateway proxies the port as HTTP.
    def svc(app: str | None) -> dict:
        body = service(ports=[("http", "TCP", 80)])
        if app is not None:
            body["spec"]["ports"][0]["appProtocol"] = app
        return body

    desired = reconcile({
        "a": exporter("a", svc=svc(a_app)),
        "b": exporter("b", created="2024-02-01T00:00:00Z", svc=svc(b_app)),
    })
    port = service_import(desired, "b")["spec"]["ports"][0]
    assert port.get("appProtocol") == kept
    for c in ("a", "b"):
        cond = export_status(desired, c)["Conflict"]
        assert (cond["status"], cond["reason"]) == ("True", "PortConflict")
        assert cond["message"] == (f'Conflicting ports. Using {shown} from oldest service '
                                   'export in "a". 1/2 clusters disagree.')


def test_traffic_to_a_port_goes_only_to_clusters_exposing_it() -> None:
    a = cluster("a", namespace(), service(ports=[("http", "TCP", 80)]),
                eslice("web-a", ["127.0.1.1"], ports=[("http", "TCP", 8080)]), export())
    b = cluster("b", namespace(),
                service(ports=[("http", "TCP", 80), ("metrics", "TCP", 9090)]),
                eslice("web-b", ["127.0.2.1"],
                       ports=[("http", "TCP", 8080), ("metrics", "TCP", 9100)]),
                export(created="2024-02-01T00:00:00Z"))
    desired = reconcile({"a": a, "b": b})
    assert _ports(desired) == [("http", "TCP", 80), ("metrics", "TCP", 9090)]
    by_source = {s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]: s
                 for s in slices(desired, "a")}
    assert by_source["a"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    assert {p["name"] for p in by_source["b"]["ports"]} == {"http", "metrics"}


# -- rule 8: whole-service properties ------------------------------------------------------
@pytest.mark.parametrize(("spec", "field", "value", "reason"), [
    ({"sessionAffinity": "ClientIP"}, "sessionAffinity", "ClientIP", "SessionAffinityConflict"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
     "sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 60}},
     "SessionAffinityConfigConflict"),
    ({"internalTrafficPolicy": "Local"}, "internalTrafficPolicy", "Local",
     "InternalTrafficPolicyConflict"),
    ({"trafficDistribution": "PreferClose"}, "trafficDistribution", "PreferClose",
     "TrafficDistributionConflict"),
    ({"ipFamilies": ["IPv6"]}, "ipFamilies", ["IPv6"], "IPFamilyConflict"),
])
def test_whole_service_properties_copied_and_settled_oldest_wins(spec, field, value,
                                                                 reason) -> None:
    # Without a conflict the import copies the value.
    alone = reconcile({"a": exporter("a", svc=service(**spec))},
                      cidrs="127.240.0.0/16,fd00:240::/112")
    assert service_import(alone, "a")["spec"][field] == value
    # With a disagreeing newer export, the oldest value stays and the conflict is named.
    base = {"sessionAffinity": "ClientIP"} if field == "sessionAffinityConfig" else {}
    desired = reconcile({
        "a": exporter("a", svc=service(**spec)),
        "b": exporter("b", created="2024-02-01T00:00:00Z", svc=service(**base)),
    }, cidrs="127.240.0.0/16,fd00:240::/112")
    assert service_import(desired, "b")["spec"][field] == value
    assert export_status(desired, "b")["Conflict"]["reason"] == reason


# -- rule 9: ClusterSetIPs -----------------------------------------------------------------
def test_cluster_set_ip_from_the_cidr_same_in_every_cluster() -> None:
    desired = reconcile({"a": exporter("a"), "b": cluster("b", namespace())},
                        cidrs="127.241.0.0/24")
    ips = service_import(desired, "a")["spec"]["ips"]
    assert len(ips) == 1 and ipaddress.ip_address(ips[0]) in ipaddress.ip_network("127.241.0.0/24")
    assert service_import(desired, "b")["spec"]["ips"] == ips
    assert service_import(desired, "a")["spec"]["ipFamilies"] == ["IPv4"]


def test_cluster_set_ips_are_stable_across_runs_and_unique() -> None:
    def members(names: list[str]) -> dict:
        docs = [namespace()]
        for n in names:
            docs += [service(n), export(n)]
        return {"a": cluster("a", *docs)}

    first = reconcile(members(["s1", "s2"]), cidrs="127.241.0.0/28")
    ip1 = service_import(first, "a", "s1")["spec"]["ips"]
    # A later run that reads back the earlier output keeps s1's address even though
    # new services compete for a tiny range.
    later = reconcile(members(["s0", "s1", "s2", "s3", "s4"]), cidrs="127.241.0.0/28",
                      previous={"a": list(first["a"].values())})
    assert service_import(later, "a", "s1")["spec"]["ips"] == ip1
    all_ips = [service_import(later, "a", n)["spec"]["ips"][0] for n in
               ["s0", "s1", "s2", "s3", "s4"]]
    assert len(set(all_ips)) == 5


def test_cluster_set_ips_stay_when_the_oldest_exporter_leaves() -> None:
    # mcs-spec.md 9: stable for the import's life, whichever export now wins.
    cidrs = "127.240.0.0/16,fd00:240::/112"
    b = exporter("b", created="2024-02-01T00:00:00Z",
                 svc=service(ipFamilies=["IPv6", "IPv4"]))
    first = reconcile({"a": exporter("a", svc=service(ipFamilies=["IPv4", "IPv6"])), "b": b},
                      cidrs=cidrs)
    v4, v6 = service_import(first, "a")["spec"]["ips"]
    later = reconcile({"a": cluster("a", namespace()), "b": b}, cidrs=cidrs,
                      previous={c: list(objects.values()) for c, objects in first.items()})
    for c in ("a", "b"):
        spec = service_import(later, c)["spec"]
        assert spec["ips"] == [v6, v4]  # b's primary family first now
        assert spec["ipFamilies"] == ["IPv6", "IPv4"]


def test_a_released_address_goes_to_another_service_only_when_nothing_else_is_free() -> None:
    # Clients may still hold a released ClusterSetIP from DNS and a member may still hold
    # the old ServiceImport: another service gets it last, the service itself gets it back.
    allocator = ClusterSetIPAllocator(parse_cidrs("127.241.0.0/28"))  # 14 addresses
    gone = ServiceKey("test", "gone")
    (released,) = allocator.ensure(gone, ["IPv4"])
    allocator.release(gone)
    others = [allocator.ensure(ServiceKey("test", f"s{i}"), ["IPv4"])[0] for i in range(13)]
    assert released not in others and len(set(others)) == 13
    allocator.release(ServiceKey("test", "s0"))
    assert allocator.ensure(gone, ["IPv4"]) == (released,)
    allocator.release(gone)
    # The range is full but for two released addresses: the longest released goes first.
    assert allocator.ensure(ServiceKey("test", "new"), ["IPv4"]) == (others[0],)
    assert allocator.ensure(ServiceKey("test", "newer"), ["IPv4"]) == (released,)
    with pytest.raises(AllocationError):
        allocator.ensure(ServiceKey("test", "newest"), ["IPv4"])


def test_a_dual_stack_service_whose_second_range_is_full_takes_no_address() -> None:
    allocator = ClusterSetIPAllocator(parse_cidrs("127.241.0.0/28,fd00:241::/126"))
    allocator.ensure(ServiceKey("test", "v6"), ["IPv6"])
    allocator.ensure(ServiceKey("test", "v6b"), ["IPv6"])  # the /126's two addresses
    before = len(allocator)
    with pytest.raises(AllocationError):
        allocator.ensure(ServiceKey("test", "web"), ["IPv4", "IPv6"])
    assert len(allocator) == before and allocator.get(ServiceKey("test", "web")) == ()


def test_a_service_no_address_is_free_for_is_imported_nowhere_and_says_why() -> None:
    """Before, the AllocationError left reconcile (the controller's loop with it)."""
    docs = [namespace()]
    for name in ("s1", "s2", "s3"):  # in age order; a /30 has two addresses
        docs += [service(name), eslice(f"{name}-x", ["127.0.1.1"], svc=name),
                 export(name, created=f"2024-01-0{name[1]}T00:00:00Z")]
    desired = reconcile({"a": cluster("a", *docs), "b": cluster("b", namespace())},
                        cidrs="127.241.0.0/30")
    for c in ("a", "b"):
        assert [service_import(desired, c, n) is not None for n in ("s1", "s2", "s3")] == [
            True, True, False]
        assert not [s for s in slices(desired, c)
                    if s["metadata"]["labels"]["multicluster.kubernetes.io/service-name"]
                    == "s3"]
    ready = export_status(desired, "a", "s3")["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Pending")
    assert ready["message"] == ("No ClusterSetIP free: --clusterset-cidr 127.241.0.0/30 is "
                                "full (2 addresses); imported once one is released")
    assert export_status(desired, "a", "s2")["Ready"]["status"] == "True"


def test_restored_holds_keep_their_order_and_only_usable_addresses() -> None:
    """What a restart reads back is held as before, by release time; addresses outside
    the range, at its edges or in use are dropped."""
    before = ClusterSetIPAllocator(parse_cidrs("127.241.0.0/29"), clock=iter([10.0]).__next__)
    a, b = ServiceKey("test", "a"), ServiceKey("test", "b")
    (ip,) = before.ensure(a, ["IPv4"])
    before.release(a)
    assert before.held() == [(ip, a, 10.0)]

    after = ClusterSetIPAllocator(parse_cidrs("127.241.0.0/29"))  # .1 to .6
    after.reserve(ServiceKey("test", "owner"), ["127.241.0.6"])
    changes = after.held_changes
    assert after.restore_held([
        ("127.241.0.5", b, 20.0), ("127.241.0.3", a, 10.0),  # sorted by release time
        ("127.241.0.5", a, 5.0),  # an older release of the same address loses
        ("127.241.0.0", a, 1.0), ("127.241.0.7", a, 1.0), ("10.0.0.1", a, 1.0),
        ("not an address", a, 1.0), ("127.241.0.6", a, 1.0),  # in use
    ]) == 2
    assert after.held_changes > changes
    assert after.held() == [("127.241.0.3", a, 10.0), ("127.241.0.5", b, 20.0)]
    assert after.ensure(b, ["IPv4"]) == ("127.241.0.5",)  # its own back
    new = [after.ensure(ServiceKey("test", f"n{i}"), ["IPv4"])[0] for i in range(4)]
    assert sorted(new[:3]) == ["127.241.0.1", "127.241.0.2", "127.241.0.4"]
    assert new[3] == "127.241.0.3"  # the held one only when nothing else is free


def test_a_released_family_is_held_too() -> None:
    allocator = ClusterSetIPAllocator(parse_cidrs("127.241.0.0/28,fd00:241::/124"))
    key = ServiceKey("test", "web")
    v4, v6 = allocator.ensure(key, ["IPv4", "IPv6"])
    assert allocator.ensure(key, ["IPv4"]) == (v4,)  # the service went single-stack
    others = [allocator.ensure(ServiceKey("test", f"s{i}"), ["IPv6"])[0] for i in range(13)]
    assert v6 not in others
    assert allocator.ensure(key, ["IPv4", "IPv6"]) == (v4, v6)


def test_dual_stack_gets_one_address_per_family() -> None:
    svc = service(ipFamilies=["IPv4", "IPv6"])
    desired = reconcile({"a": exporter("a", svc=svc)}, cidrs="127.240.0.0/16,fd00:240::/112")
    spec = service_import(desired, "a")["spec"]
    assert [ipaddress.ip_address(ip).version for ip in spec["ips"]] == [4, 6]
    assert spec["ipFamilies"] == ["IPv4", "IPv6"]


def test_an_ipv6_primary_service_gets_its_ipv6_address_first() -> None:
    svc = service(ipFamilies=["IPv6", "IPv4"])
    desired = reconcile({"a": exporter("a", svc=svc)}, cidrs="127.240.0.0/16,fd00:240::/112")
    spec = service_import(desired, "a")["spec"]
    assert [ipaddress.ip_address(ip).version for ip in spec["ips"]] == [6, 4]
    assert spec["ipFamilies"] == ["IPv6", "IPv4"]
    parse_service_import(service_import(desired, "a"))
    # The gateway passes a Karmada Service's ipFamilies unchecked: junk is skipped.
    allocator = ClusterSetIPAllocator(parse_cidrs("127.240.0.0/16,fd00:240::/112"))
    got = allocator.ensure(ServiceKey("test", "web"), [{"x": 1}, "IPv6", "IPv6", "IPv4"])
    assert [ipaddress.ip_address(ip).version for ip in got] == [6, 4]


# -- rule 10-11: labels, annotations, status.clusters -------------------------------------
def test_import_labels_come_only_from_exported_labels() -> None:
    svc = service()
    svc["metadata"]["labels"] = {"app": "web"}
    exp = export(labels={"tier": "front"}, annotations={"note": "x"})
    exp["metadata"]["labels"] = {"owner": "me"}
    desired = reconcile({"a": cluster("a", namespace(), svc, exp)})
    meta = service_import(desired, "a")["metadata"]
    assert meta["labels"] == {"tier": "front"}
    assert meta["annotations"] == {"note": "x"}


@pytest.mark.parametrize(("field", "reason"), [
    ("labels", "LabelsConflict"),
    ("annotations", "AnnotationsConflict"),
])
def test_exported_labels_and_annotations_conflict_oldest_wins(field: str, reason: str) -> None:
    desired = reconcile({
        "a": exporter("a", **{field: {"k": "1"}}),
        "b": exporter("b", created="2024-02-01T00:00:00Z", **{field: {"k": "2"}}),
    })
    assert service_import(desired, "b")["metadata"][field] == {"k": "1"}
    for c in ("a", "b"):
        conflict = export_status(desired, c)["Conflict"]
        assert (conflict["status"], conflict["reason"]) == ("True", reason)
        assert conflict["message"] == (
            f'Conflicting exported {field}. Using {{"k": "1"}} from oldest service export '
            'in "a". 1/2 clusters disagree.')


def test_status_clusters_lists_exporters() -> None:
    desired = reconcile({"b": exporter("b"), "a": exporter("a"), "c": cluster("c", namespace())})
    assert service_import(desired, "c")["status"]["clusters"] == [{"cluster": "a"},
                                                                  {"cluster": "b"}]


# -- rule 12: imported EndpointSlices -----------------------------------------------------
def test_imported_slices_labels_owner_and_one_source_each() -> None:
    desired = reconcile({"a": exporter("a"), "b": exporter("b", addresses=["127.0.2.1"]),
                         "c": cluster("c", namespace())})
    got = slices(desired, "c")
    assert len(got) == 2
    for s in got:
        labels = s["metadata"]["labels"]
        assert set(labels) == {"multicluster.kubernetes.io/service-name",
                               "multicluster.kubernetes.io/source-cluster",
                               "endpointslice.kubernetes.io/managed-by"}
        assert "kubernetes.io/service-name" not in labels
        assert labels["endpointslice.kubernetes.io/managed-by"] != \
            "endpointslice-controller.k8s.io"
        assert s["metadata"]["ownerReferences"] == [{
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "name": "web", "uid": owner_uid(ServiceKey("test", "web"))}]
        spec = parse_endpoint_slice(s)
        assert {e.cluster for e in spec.endpoints} == {labels[
            "multicluster.kubernetes.io/source-cluster"]}
    # The exporting cluster imports its own endpoints too.
    assert len(slices(desired, "a")) == 2


def test_at_most_100_endpoints_per_slice() -> None:
    addresses = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(250)]
    desired = reconcile({"a": exporter("a", addresses=addresses)})
    got = slices(desired, "a")
    assert [len(s["endpoints"]) for s in got] == [MAX_ENDPOINTS_PER_SLICE,
                                                  MAX_ENDPOINTS_PER_SLICE, 50]
    assert len({s["metadata"]["name"] for s in got}) == 3


HTTP, METRICS = ("http", "TCP", 8080), ("metrics", "TCP", 9091)


@pytest.mark.parametrize(("second_slice_ports", "imported"), [
    # The source moving an endpoint between its slices: one endpoint, not two.
    ([HTTP], [([HTTP], ["10.4.0.5"])]),
    # A selectorless Service's slices written one per port: kube-proxy serves each port
    # from the slice naming it, so each port keeps the endpoint (metrics was dropped).
    ([METRICS], [([HTTP], ["10.4.0.5"]), ([METRICS], ["10.4.0.5"])]),
])
def test_an_endpoint_in_two_slices_of_its_source(second_slice_ports: list,
                                                  imported: list) -> None:
    a = cluster("a", namespace(), service(ports=[("http", "TCP", 80), ("metrics", "TCP", 9090)]),
                eslice("web-1", ["10.4.0.5"], ports=[HTTP]),
                eslice("web-2", ["10.4.0.5"], ports=second_slice_ports), export())
    got = [([(p["name"], p["protocol"], p["port"]) for p in s["ports"]],
            [e["addresses"][0] for e in s["endpoints"]]) for s in slices(reconcile({"a": a}), "a")]
    assert sorted(got) == imported


def test_a_headless_exporter_without_the_imports_ports_is_still_in_its_dns() -> None:
    """mcs-spec.md DNS: a headless name lists the ready endpoints of every cluster. b's
    Service has no ports (DNS only) beside a's port: b's endpoints used to be left out."""
    def member(cluster_id: str, address: str, created: str, **svc: Any) -> ClusterObjects:
        ports = () if "ports" in svc else (("http", "TCP", 8080),)
        return cluster(cluster_id, namespace(), service(**svc),
                       eslice(f"web-{cluster_id}", [address], ports=ports),
                       export(created=created))

    def imported(desired: dict) -> list[tuple[str, list[str], list[list[str]]]]:
        return sorted((s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
                       [p["name"] for p in s["ports"]], [e["addresses"] for e in s["endpoints"]])
                      for s in slices(desired, "a"))

    first, second = "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"
    desired = reconcile({"a": member("a", "10.1.0.1", first, headless=True),
                         "b": member("b", "10.2.0.1", second, headless=True, ports=())})
    assert imported(desired) == [("a", ["http"], [["10.1.0.1"]]), ("b", [], [["10.2.0.1"]])]
    # A ClusterSetIP service's traffic still goes only where the port is (rule 7).
    desired = reconcile({"a": member("a", "10.1.0.1", first),
                         "b": member("b", "10.2.0.1", second, ports=())})
    assert imported(desired) == [("a", ["http"], [["10.1.0.1"]])]


ONE = eslice("web-a", ["10.4.0.5"])
UNNAMED = service(ports=[("", "TCP", 80)])
PORTLESS = service(headless=True, ports=())


# Odd but valid member objects, as API servers and controllers write them: exported,
# and imported as kube-proxy and CoreDNS read them. (svc, member slices, export) →
# (import spec fields it must hold, imported slices as (ports, [addresses per endpoint])).
@pytest.mark.parametrize(("svc", "member_slices", "exp", "spec", "imported"), [
    # FQDN slices are not endpoints of the Service: ignored beside the IPv4 one.
    (service(), [ONE, with_fields(eslice("web-fqdn", ["x"]), ("addressType", "FQDN"),
                                  ("endpoints.0.addresses", ["web.example.com"]))],
     export(), {}, [([HTTP], [["10.4.0.5"]])]),
    # A headless Service without ports: slices with ports null or [] both import.
    (PORTLESS, [with_fields(ONE, ("ports", None)),
                with_fields(eslice("web-b", ["10.4.0.6"]), ("ports", []))],
     export(), {"type": "Headless", "ports": []}, [([], [["10.4.0.5"], ["10.4.0.6"]])]),
    # The unnamed port: name "" or absent, protocol absent (TCP).
    (with_fields(UNNAMED, ("spec.ports.0", {"port": 80})),
     [with_fields(ONE, ("ports", [{"name": "", "port": 8080}]))], export(),
     {"ports": [{"protocol": "TCP", "port": 80}]}, [([("", "TCP", 8080)], [["10.4.0.5"]])]),
    (UNNAMED, [with_fields(ONE, ("ports", [{"port": 8080}]))], export(),
     {"ports": [{"protocol": "TCP", "port": 80}]}, [([("", "TCP", 8080)], [["10.4.0.5"]])]),
    # conditions {} or absent: ready; written back explicit for every consumer.
    (service(), [with_fields(ONE, ("endpoints.0.conditions", {}))], export(), {},
     [([HTTP], [["10.4.0.5"]])]),
    (service(), [with_fields(ONE, ("endpoints.0", {"addresses": ["10.4.0.5"]}))], export(), {},
     [([HTTP], [["10.4.0.5"]])]),
    # Several addresses, topology and unknown fields: addresses kept, the rest ignored.
    (service(), [with_fields(ONE, ("endpoints.0.addresses", ["10.4.0.5", "10.4.0.9"]),
                             ("endpoints.0.nodeName", "n1"), ("endpoints.0.futureField", 1),
                             ("endpoints.0.hints", {"forZones": [{"name": "z1"}]}))],
     export(), {},
     [([HTTP], [["10.4.0.5", "10.4.0.9"]])]),
    # appProtocol as written (the gateway folds case); PreferDualStack with one family
    # gets one address; sessionAffinityConfig beside None is no affinity;
    # publishNotReadyAddresses is already in the slice's conditions.
    (with_fields(service(), ("spec.ports.0.appProtocol", "HTTP"),
                 ("spec.ipFamilyPolicy", "PreferDualStack"), ("spec.ipFamilies", ["IPv4"]),
                 ("spec.sessionAffinity", "None"),
                 ("spec.sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 60}}),
                 ("spec.publishNotReadyAddresses", True)), [ONE], export(),
     {"ipFamilies": ["IPv4"], "sessionAffinity": "None",
      "ports": [{"name": "http", "protocol": "TCP", "port": 80, "appProtocol": "HTTP"}]},
     [([HTTP], [["10.4.0.5"]])]),
    # A ServiceExport with fields and status a newer MCS API has: valid, echoed as written.
    (service(), [ONE], with_fields(export(), ("spec", {"futureField": True}),
                                   ("status", {"conditions": [], "newThing": 1})), {},
     [([HTTP], [["10.4.0.5"]])]),
])
def test_odd_but_valid_member_objects(svc: dict, member_slices: list, exp: dict, spec: dict,
                                      imported: list) -> None:
    desired = reconcile({"a": cluster("a", namespace(), svc, *member_slices, exp)},
                        cidrs="127.240.0.0/16,fd00:240::/112")
    assert export_status(desired, "a")["Valid"]["status"] == "True"
    imp = service_import(desired, "a")
    assert {k: imp["spec"][k] for k in spec} == spec
    assert "sessionAffinityConfig" not in imp["spec"]
    assert len(imp["spec"].get("ips", [])) == (imp["spec"]["type"] == "ClusterSetIP")
    got = slices(desired, "a")
    assert [([(p.get("name", ""), p["protocol"], p["port"]) for p in s["ports"]],
             [e["addresses"] for e in s["endpoints"]]) for s in got] == imported
    assert all(e["conditions"]["ready"] for s in got for e in s["endpoints"])
    exported = desired["a"][ObjectRef(KIND_EXPORT, "test", "web")]
    assert exported.get("spec") == exp.get("spec")
    parse_service_import(imp)  # the gateway takes what was written
    for s in got:
        parse_endpoint_slice(s)


def test_a_member_slice_of_more_than_1000_endpoints_is_imported_whole() -> None:
    addresses = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(1500)]
    got = slices(reconcile({"a": exporter("a", addresses=addresses)}), "a")
    assert sorted(e["addresses"][0] for s in got for e in s["endpoints"]) == sorted(addresses)
    assert max(len(s["endpoints"]) for s in got) == MAX_ENDPOINTS_PER_SLICE


def test_headless_endpoints_keep_hostname_and_conditions() -> None:
    a = cluster("a", namespace(), service(headless=True),
                eslice("web-a", ["10.4.0.5", "10.4.0.6"], hostnames=["web-0", None]),
                eslice("web-a2", ["10.4.0.7"], ready=False), export())
    got = slices(reconcile({"a": a}), "a")[0]["endpoints"]
    assert got[0]["hostname"] == "web-0" and "hostname" not in got[1]
    assert got[2]["conditions"] == {"ready": False, "serving": False, "terminating": True}


@pytest.mark.parametrize("conditions", [
    {"ready": True, "serving": True, "terminating": False},
    {"ready": False, "serving": True, "terminating": True},  # draining, still serving
    {"ready": False, "serving": False, "terminating": True},
    {"ready": False, "serving": False, "terminating": False},
])
@pytest.mark.parametrize("headless", [False, True])
def test_endpoint_conditions_are_copied_as_they_are(conditions: dict, headless: bool) -> None:
    a = cluster("a", namespace(), service(headless=headless),
                eslice("web-a", ["10.4.0.5"], conditions=conditions), export())
    desired = reconcile({"a": a, "b": cluster("b", namespace())})
    for c in ("a", "b"):
        [got] = slices(desired, c)
        assert got["endpoints"][0]["conditions"] == conditions


def test_imported_and_dispatched_slices_are_not_exported_again() -> None:
    a = cluster("a", namespace(), service(), export(),
                eslice("web-a", ["127.0.1.1"]),
                eslice("web-imported", ["127.0.9.9"], labels={
                    "multicluster.kubernetes.io/source-cluster": "x"}),
                eslice("x-web", ["127.0.8.8"], labels={
                    "endpointslice.kubernetes.io/managed-by":
                        "endpointslice-dispatch-controller.karmada.io"}))
    addresses = [e["addresses"][0] for s in slices(reconcile({"a": a}), "a")
                 for e in s["endpoints"]]
    assert addresses == ["127.0.1.1"]


def test_stale_member_keeps_its_endpoints_marked_stale() -> None:
    desired = reconcile({"a": exporter("a"), "b": exporter("b", addresses=["127.0.2.1"])},
                        stale=["b"])
    by_source = {s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]: s
                 for s in slices(desired, "a")}
    assert by_source["b"]["metadata"]["annotations"] == {STALE_ANNOTATION: "true"}
    assert "annotations" not in by_source["a"]["metadata"]


# -- Karmada MultiClusterService -----------------------------------------------------------
def test_mcs_providers_to_consumers_never_back_to_source() -> None:
    def member(c: str, octet: int) -> object:
        return cluster(c, namespace(), service(), eslice(f"web-{c}", [f"127.0.{octet}.1"]))

    a, b, c = member("a", 1), member("b", 2), cluster("c", namespace(), mcs(
        providers=["a", "b"], consumers=["b", "c"]))
    desired = reconcile({"a": a, "b": b, "c": c})
    assert service_import(desired, "a") is None  # not a consumer
    assert service_import(desired, "b")["status"]["clusters"] == [{"cluster": "a"},
                                                                  {"cluster": "b"}]

    def sources(cluster_id: str) -> set[str]:
        return {s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
                for s in slices(desired, cluster_id)}

    assert sources("b") == {"a"}  # b's own endpoints are not dispatched back to b
    assert sources("c") == {"a", "b"}
    assert not any(r.kind == "ServiceExport" for r in desired["c"])


def test_mcs_consumer_without_the_namespace_gets_nothing() -> None:
    members = {"a": cluster("a", namespace(), service(), eslice("web-a", ["127.0.1.1"])),
               "b": cluster("b", namespace("other"), mcs(providers=["a"], consumers=["b", "c"])),
               "c": cluster("c", namespace())}
    desired = reconcile(members)
    assert desired["b"] == {}
    assert service_import(desired, "c")["status"]["clusters"] == [{"cluster": "a"}]


def test_mcs_empty_lists_mean_every_cluster_and_other_types_are_ignored() -> None:
    members = {"a": cluster("a", namespace(), service(), mcs()),
               "b": cluster("b", namespace())}
    assert service_import(reconcile(members), "b") is not None
    members["a"] = cluster("a", namespace(), service(), mcs(types=["LoadBalancer"]))
    assert service_import(reconcile(members), "b") is None


def test_mcs_sole_provider_at_zero_endpoints_keeps_the_import() -> None:
    # KEP-1645: the import lives while its export does, whatever its endpoint count (the
    # gateway's kube source does the same for a claimed Service without a member MCS).
    def members(*docs: object) -> dict[str, object]:
        return {"a": cluster("a", namespace(), mcs(providers=["a"]), *docs),
                "b": cluster("b", namespace())}

    def written() -> dict[str, list[object]]:
        return {c: list(objects.values()) for c, objects in desired.items()}

    desired = reconcile(members(service(), eslice("web-a", ["127.0.1.1"])))
    ips = service_import(desired, "b")["spec"]["ips"]
    for docs in [(service(), eslice("web-a", [])), (service(),)]:  # emptied, deleted
        desired = reconcile(members(*docs), previous=written())
        assert [service_import(desired, c)["spec"]["ips"] for c in "ab"] == [ips, ips]
        assert slices(desired, "b") == []
    assert reconcile(members(eslice("web-a", ["127.0.1.1"])), previous=written()) == {
        "a": {}, "b": {}}  # the provider's Service deleted


def test_mcs_provider_without_the_service_provides_nothing() -> None:
    members = {"a": cluster("a", namespace(), mcs(providers=["a"])),
               "b": cluster("b", namespace())}
    assert reconcile(members) == {"a": {}, "b": {}}


# -- member object validation ----------------------------------------------------------------
@pytest.mark.parametrize(("obj", "message"), [
    (service(ports=[("http", "TCP", 70000)]), "1-65535"),
    (service(sessionAffinity="Sticky"), "sessionAffinity"),
    (service(ipFamilies=["IPv5"]), "ipFamilies"),
    (export(created="yesterday"), "RFC 3339"),
    (eslice("web-1", ["not-an-ip"]), "invalid address"),
])
def test_bad_member_objects_are_rejected_with_a_reason(obj: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_member_object(obj, "a")


def test_import_written_is_accepted_by_the_gateway_validation() -> None:
    desired = reconcile({"a": exporter("a"), "b": exporter("b", addresses=["127.0.2.1"])})
    for ref, obj in desired["a"].items():
        if ref.kind == KIND_IMPORT:
            assert parse_service_import(obj).clusters == ("a", "b")


Ranked = dict[ServiceKey, tuple[str, tuple[str, ...]]]  # key → (created, ipFamilies)
FAMILY_CHOICES = [(), ("IPv4",), ("IPv6",), ("IPv6", "IPv4"), ("IPv4", "IPv6")]


def _ranked_from_scratch(cidrs: str, ranked: Ranked, foreign: Iterable[tuple[str, ...]] = (),
                         ) -> dict[ServiceKey, tuple[str, ...]]:
    fresh = ClusterSetIPAllocator(parse_cidrs(cidrs), hold_released=False)
    for ips in foreign:
        fresh.foreign_changed((), ips)
    out = {}
    for _, key in sorted((created, k) for k, (created, _) in ranked.items()):
        try:
            out[key] = fresh.ensure(key, ranked[key][1])
        except AllocationError:
            out[key] = ()
    return out


@pytest.mark.parametrize("cidrs", ["127.241.0.0/29", "127.241.0.0/29,fd00:241::/126"])
def test_ranked_placement_is_a_function_of_the_services_not_their_order(cidrs: str) -> None:
    """What the gateway's Karmada services get (ClusterSetIPAllocator.place): after any
    sequence of arrivals, re-datings and departures, each key has exactly what a fresh
    allocator would give the services that remain, oldest first; a /29 (5 usable) for 7
    keys makes collisions and a full range certain; `moved` names every other key whose
    addresses changed (one a full range had left without an address, given one, too: a
    failed place raised and told nothing of the keys it moved). Dual-stack: a key left
    without an address by a full IPv6 range (ensure gives all families or none) used to
    find its IPv4 address taken for good by a newer key once IPv6 had room again."""
    keys = [ServiceKey("ns", f"svc{i}") for i in range(7)]
    choices = FAMILY_CHOICES if "," in cidrs else [()]
    for seed in range(200):
        rnd = random.Random(seed)
        allocator = ClusterSetIPAllocator(parse_cidrs(cidrs), hold_released=False)
        ranked: Ranked = {}
        for _ in range(30):
            before = {k: allocator.get(k) for k in ranked}
            key = rnd.choice(keys)
            if key in ranked and rnd.random() < 0.4:
                moved = allocator.unplace(key)
                del ranked[key]
            else:
                ranked[key] = (f"2024-01-{rnd.randint(1, 9):02d}", rnd.choice(choices))
                ips, moved = allocator.place(key, ranked[key][1], ranked[key][0])
                assert ips == allocator.get(key)
                moved.add(key)
            expected = _ranked_from_scratch(cidrs, ranked)
            got = {k: allocator.get(k) for k in ranked}
            assert got == expected, (seed, key)
            assert not allocator.held()
            assert {k for k in ranked if before.get(k, ()) != got[k]} <= moved <= set(ranked)


def test_a_freed_address_costs_the_keys_that_move_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ranked key going, or an import elsewhere freeing an address, placed again every
    displaced key ranked after the first that moved: 10,000 services in a /16, 1000
    ServiceImports going one by one, 96,133 placements (9.8 s CPU) for 200 keys that
    moved. Only those that move are touched now (counted: no speed is asserted)."""
    cidrs = parse_cidrs("127.240.0.0/16")
    allocator = ClusterSetIPAllocator(cidrs, hold_released=False)
    keys = [ServiceKey("k", f"svc{i}") for i in range(2000)]
    for i, key in enumerate(keys):
        allocator.place(key, (), f"2024-01-01T00:00:{i:05d}")
    controller = ClusterSetIPAllocator(cidrs)  # a controller's ServiceImports, same range
    imports = [controller.ensure(ServiceKey("real", f"imp{i}"), ())[0] for i in range(2000)]
    for ip in imports:
        allocator.foreign_changed((), [ip])
    placements: list[ServiceKey] = []
    ensure = allocator.ensure
    monkeypatch.setattr(allocator, "ensure",
                        lambda key, families: placements.append(key) or ensure(key, families))
    moved = set()
    for ip in imports:
        moved |= allocator.foreign_changed([ip], ())
    for key in keys[:200]:
        moved |= allocator.unplace(key)
    assert moved and not placements
    remaining = {k: (f"2024-01-01T00:00:{i:05d}", ()) for i, k in enumerate(keys) if i >= 200}
    assert {k: allocator.get(k) for k in remaining} == _ranked_from_scratch(
        "127.240.0.0/16", remaining)


def test_ranked_placement_leaves_foreign_addresses_whatever_the_order() -> None:
    """Addresses imports the allocator did not make hold (real ServiceImports, another
    source's) are no ranked key's: after any sequence of keys and such imports coming,
    moving and going, each key has what a fresh allocator that saw the imports first gives
    it, no two hold one address, and `moved` names every key whose addresses changed.
    Dual-stack, two imports on one address; a /29 makes collisions and a full range
    certain."""
    cidrs = "127.241.0.0/29,fd00:241::/125"
    keys = [ServiceKey("ns", f"svc{i}") for i in range(7)]
    pool = [f"127.241.0.{i}" for i in range(1, 7)] + [f"fd00:241::{i}" for i in range(1, 7)]
    for seed in range(150):
        rnd = random.Random(seed)
        allocator = ClusterSetIPAllocator(parse_cidrs(cidrs), hold_released=False)
        ranked: Ranked = {}
        imports: dict[int, tuple[str, ...]] = {}  # import → the addresses it holds
        for step in range(40):
            before = {k: allocator.get(k) for k in ranked}
            if rnd.random() < 0.4:
                which = rnd.randrange(4)
                old = imports.pop(which, ())
                new = tuple(rnd.sample(pool, rnd.randint(0, 2))) if rnd.random() < 0.7 else ()
                if new:
                    imports[which] = new
                moved = allocator.foreign_changed(old, new)
            else:
                key = rnd.choice(keys)
                if key in ranked and rnd.random() < 0.4:
                    moved = allocator.unplace(key)
                    del ranked[key]
                else:
                    ranked[key] = (f"2024-01-{rnd.randint(1, 9):02d}", rnd.choice(FAMILY_CHOICES))
                    _, moved = allocator.place(key, ranked[key][1], ranked[key][0])
                    moved.add(key)
            got = {k: allocator.get(k) for k in ranked}
            assert got == _ranked_from_scratch(cidrs, ranked, imports.values()), (seed, step)
            changed = {k for k in ranked if before.get(k, ()) != got[k]}
            assert changed <= moved, (seed, step)
            taken = [ip for ips in got.values() for ip in ips]
            held = {ip for ips in imports.values() for ip in ips}
            assert len(taken) == len(set(taken)) and not held & set(taken)
