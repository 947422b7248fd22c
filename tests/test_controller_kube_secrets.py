"""In-cluster mode: member clusters from labelled Secrets in the host cluster.

The host API server (its own emulator, holding the Secrets and the Lease) fails, goes
away and comes back; member Secrets appear, go and turn invalid while the controller
runs. Everything goes through the real kubernetes-asyncio client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.clusters import ClusterError
from controlplane.clusters.kube_app import MEMBER_LABEL, KubeControllerApp, KubeControllerConfig
from mcsproxy.tasks import cancel_and_wait, spawn
from tests.kube_emulator import KubeEmulator
from tests.test_controller_kube_support import (
    FAST,
    Clusterset,
    clusterset,
    export_web,
    member_slice,
    namespace,
    service,
    service_export,
    writes,
)

HOST_IP = "127.163.0.1"  # the host cluster's API server; the members use 127.0.0.1
NS = "mcsproxy"
SECRETS = "/namespaces/mcsproxy/secrets"
WAIT_S = 10.0


def member_secret(name: str, cluster: str, kubeconfig: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS, "labels": {MEMBER_LABEL: cluster}},
            "data": {"kubeconfig": base64.b64encode(kubeconfig).decode()}}


class Setup:
    def __init__(self, cs: Clusterset, host: KubeEmulator, tmp_path: Path) -> None:
        self.cs, self.host, self.tmp_path = cs, host, tmp_path

    def kubeconfig(self, cluster: str) -> bytes:
        return self.cs[cluster].kubeconfig(self.tmp_path / f"member-{cluster}",
                                           "member").read_bytes()

    def add_member(self, cluster: str, kubeconfig: bytes | None = None) -> None:
        self.host.put_object(member_secret(f"member-{cluster}", cluster,
                                           kubeconfig or self.kubeconfig(cluster)))

    def app(self, **kwargs: Any) -> KubeControllerApp:
        return KubeControllerApp(KubeControllerConfig(
            kubeconfig=self.host.kubeconfig(self.tmp_path / "host", "host"),
            member_secrets=NS, lease_duration_s=3.0, identity="in-cluster", timings=FAST,
            **kwargs))

    def secret_requests(self) -> int:
        return sum(1 for r in self.host.requests if r.path.endswith(SECRETS))


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with clusterset() as cs:
        host = KubeEmulator()
        await host.start(HOST_IP)
        try:
            for c in cs.emulators:
                cs[c].put_object(namespace("demo"))
            export_web(cs, "b", ["10.2.0.1"])
            yield Setup(cs, host, tmp_path)
        finally:
            await host.stop()


@contextlib.asynccontextmanager
async def running(app: KubeControllerApp) -> AsyncIterator[asyncio.Task[Any]]:
    task = spawn(app.run(), name="secrets controller")
    try:
        yield task
    finally:
        app.stop()
        await cancel_and_wait([task])


async def until(cond: Callable[[], bool], task: asyncio.Task[Any], what: str) -> None:
    """Until cond() holds; fails at once if the controller ended meanwhile."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not cond():
        assert not task.done(), f"the controller ended: {task.exception()!r}"
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def serving(app: KubeControllerApp) -> set[str]:
    """The members of the controller now serving (it writes before it is published)."""
    return set(app.controller.clients) if app.controller is not None else set()


def secret_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and "member Secrets" in r.getMessage()]


@contextlib.asynccontextmanager
async def serving_a_and_b(
        setup: Setup) -> AsyncIterator[tuple[KubeControllerApp, asyncio.Task[Any]]]:
    """Members a and b from their Secrets, the controller running and serving both."""
    setup.add_member("a")
    setup.add_member("b")
    app = setup.app()
    async with running(app) as task:
        await until(lambda: serving(app) == {"a", "b"}, task, "never served")
        yield app, task


async def b_changes_reach_a(setup: Setup, task: asyncio.Task[Any], what: str) -> None:
    """b's web slice changes; until a imports the new addresses."""
    cs = setup.cs
    cs["b"].put_object(member_slice("web", ["10.2.0.1", "10.2.0.2"]))
    await until(lambda: cs.addresses("a", "web") == {"10.2.0.1", "10.2.0.2"}, task, what)


async def test_a_failing_secret_list_at_startup_is_retried_not_fatal(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    setup.add_member("a")
    setup.add_member("b")
    setup.host.fail_next(4, 503, method="GET", path=SECRETS)
    app = setup.app()
    async with running(app) as task:
        await until(app.led.is_set, task, "never led")
        assert setup.secret_requests() >= 5  # four 503s, then the list that worked
        await until(lambda: setup.cs.addresses("a", "web") == {"10.2.0.1"}, task,
                    "b's export never imported into a")
    assert len(secret_errors(caplog)) == 1, secret_errors(caplog)  # once, not per retry
    assert app.metrics.registry.get_sample_value(
        "mcsproxy_controller_member_secret_errors_total") == 4  # but each one counted


async def test_forbidden_secret_list_at_startup_ends_with_a_clear_error(
        setup: Setup) -> None:
    setup.add_member("a")
    setup.host.fail_next(None, 403, path=SECRETS)  # RBAC: no retry can fix it
    with pytest.raises(ClusterError, match="403"):
        await asyncio.wait_for(setup.app().run(), WAIT_S)


async def test_no_member_secrets_at_startup_ends_with_a_clear_error(setup: Setup) -> None:
    with pytest.raises(ClusterError, match="no member Secrets"):
        await asyncio.wait_for(setup.app().run(), WAIT_S)


async def test_member_secrets_added_and_removed_at_runtime(setup: Setup) -> None:
    cs = setup.cs
    setup.add_member("a")
    setup.add_member("b")
    app = setup.app()
    async with running(app) as task:
        await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task, "no import")
        assert not cs.imported_slices("c")
        setup.add_member("c")
        await until(lambda: cs.addresses("c", "web") == {"10.2.0.1"}, task,
                    "the member added at runtime got no imports")
        await until(lambda: serving(app) == {"a", "b", "c"}, task, "c is not served")
        setup.host.delete_object("secrets", "member-b", NS)
        await until(lambda: not cs.imports("a") and not cs.imports("c"), task,
                    "the removed member's export is still imported")
        await until(lambda: serving(app) == {"a", "c"}, task, "b is still served")
        # b's series go with it: they stayed at their last values (connected 1, its
        # exports) for the life of the process, a member that left read as healthy.
        always = {"mcsproxy_controller_member_connected", "mcsproxy_controller_exports"}
        await until(lambda: always <= member_series(app, "c"), task, "c's series not set")
        assert always <= member_series(app, "a")
        assert member_series(app, "b") == set()


MEMBER_GAUGES = ("mcsproxy_controller_member_connected", "mcsproxy_controller_exports",
                 "mcsproxy_controller_member_input_error", "mcsproxy_controller_stale_endpoints")


def member_series(app: KubeControllerApp, cluster: str) -> set[str]:
    """The per-member gauges with a series for `cluster`."""
    return {n for n in MEMBER_GAUGES
            if app.metrics.registry.get_sample_value(n, {"cluster": cluster}) is not None}


async def test_secret_watch_survives_5xx_and_keeps_the_members(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cs = setup.cs
    async with serving_a_and_b(setup) as (app, task):
        controller = app.controller
        setup.host.fail_next(None, 503, path=SECRETS)
        setup.host.drop_watches()
        failed = setup.secret_requests() + 4
        await until(lambda: setup.secret_requests() >= failed, task, "no retries")
        # Still reconciling with the members it had: b's change reaches a.
        await b_changes_reach_a(setup, task, "the members stopped being served")
        assert app.controller is controller
        setup.add_member("c")  # while the Secrets cannot be read
        setup.host.clear_faults()
        await until(lambda: cs.addresses("c", "web") == {"10.2.0.1", "10.2.0.2"}, task,
                    "the member added during the outage was not picked up")
    assert len(secret_errors(caplog)) == 1, secret_errors(caplog)


async def test_secret_watch_survives_the_host_api_server_going_away(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cs = setup.cs
    for c in ("a", "b", "c"):
        setup.add_member(c)
    app = setup.app(leader_elect=False)  # the Lease would end the term: not under test here
    async with running(app) as task:
        await until(lambda: cs.addresses("c", "web") == {"10.2.0.1"}, task, "no import")
        await setup.host.stop()  # connection refused from now on
        await until(lambda: bool(secret_errors(caplog)), task, "the outage went unnoticed")
        setup.host.delete_object("secrets", "member-b", NS)  # missed while away
        await b_changes_reach_a(setup, task, "the members stopped being served")
        await setup.host.start()
        await until(lambda: not cs.imports("a") and not cs.imports("c"), task,
                    "the Secret deleted during the outage was not noticed")
    assert len(secret_errors(caplog)) == 1, secret_errors(caplog)


@pytest.mark.parametrize("broken", [b"not: [yaml", b"apiVersion: v1\nkind: Config\n"])
async def test_an_invalid_kubeconfig_later_keeps_the_last_good_one(
        setup: Setup, caplog: pytest.LogCaptureFixture, broken: bytes) -> None:
    cs = setup.cs
    async with serving_a_and_b(setup) as (app, task):
        controller = app.controller
        setup.add_member("b", broken)
        await until(lambda: any("member-b" in m for m in secret_errors(caplog)), task,
                    "the broken Secret was not reported")
        await b_changes_reach_a(setup, task, "b stopped being served")
        assert app.controller is controller  # not restarted for a broken Secret
        setup.add_member("c")  # later changes still apply, with b's last good kubeconfig
        await until(lambda: cs.addresses("c", "web") == {"10.2.0.1", "10.2.0.2"}, task,
                    "c was not added")
        await until(lambda: serving(app) == {"a", "b", "c"}, task, "c is not served")


async def test_member_secret_changes_in_quick_succession_make_one_rebuild(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """Five Secret changes within 0.2 s (a rollout touching several Secrets) rebuild the
    controller once, on the set they end with, after it held still; the controller
    already serving keeps serving until then."""
    caplog.set_level(logging.INFO)
    cs = setup.cs
    async with serving_a_and_b(setup) as (app, task):
        first = app.controller
        for change in (lambda: setup.add_member("c"),
                       lambda: setup.host.delete_object("secrets", "member-b", NS),
                       lambda: setup.add_member("b"),
                       lambda: setup.host.delete_object("secrets", "member-c", NS),
                       lambda: setup.add_member("c")):
            change()
            await asyncio.sleep(0.04)
        assert app.controller is first  # not torn down while the Secrets still move
        await until(lambda: serving(app) == {"a", "b", "c"}, task, "the final set is not served")
        await until(lambda: cs.addresses("c", "web") == {"10.2.0.1"}, task,
                    "c got no imports")
        await asyncio.sleep(1.5)  # longer than the settle time: no later rebuild either
        assert serving(app) == {"a", "b", "c"}
    rebuilds = [r.getMessage() for r in caplog.records
                if "restarting the controller" in r.getMessage()]
    assert len(rebuilds) == 1 and app.rebuilds == 1, rebuilds
    assert "+c" in rebuilds[0] and "-b" not in rebuilds[0]


def reads(emu: KubeEmulator) -> int:
    """GETs but watches and the /version probe: lists, discovery."""
    return sum(1 for r in emu.requests
               if r.method == "GET" and "watch" not in r.query and r.path != "/version")


async def test_a_changed_kubeconfig_reconnects_only_that_member(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """b's kubeconfig Secret changes (rotated credentials): only b's connection is made
    anew. Before, the whole controller was rebuilt: every member listed again, every
    key reconciled and the gateway streams given a new epoch (a full snapshot each)."""
    caplog.set_level(logging.INFO)
    cs = setup.cs
    async with serving_a_and_b(setup) as (app, task):
        await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task, "no import")
        controller, old_b = app.controller, app.controller.clients["b"]
        lists_a = reads(cs["a"])
        written = {c: writes(cs[c]) for c in ("a", "b")}
        rotated = setup.kubeconfig("b").replace(b"member", b"rotated")
        setup.add_member("b", rotated)
        await until(lambda: controller.clients["b"] is not old_b, task, "b not reconnected")
        assert app.controller is controller and app.rebuilds == 0
        await b_changes_reach_a(setup, task, "b's changes stopped after reconnecting")
        assert reads(cs["a"]) == lists_a  # a not listed again
        # The slice update (b imports its own export too), nothing rewritten.
        assert {c: writes(cs[c]) for c in ("a", "b")} == {c: n + 1 for c, n in written.items()}
    assert any("reconnecting" in r.getMessage() for r in caplog.records)


async def test_a_kubeconfig_that_does_not_answer_leaves_the_old_connection_serving(
        setup: Setup) -> None:
    cs = setup.cs
    async with serving_a_and_b(setup) as (app, task):
        controller, old_b = app.controller, app.controller.clients["b"]
        url = cs["b"].url.encode()
        nowhere = setup.kubeconfig("b").replace(url, b"http://127.74.0.9:9")
        setup.add_member("b", nowhere)
        await until(lambda: app.reconnects == 1, task, "b not reconnected")
        await b_changes_reach_a(setup, task, "the old connection stopped serving")
        assert controller.clients["b"] is old_b and app.controller is controller
        setup.add_member("b", setup.kubeconfig("b").replace(b"member", b"rotated"))
        await until(lambda: controller.clients["b"] is not old_b, task, "b not reconnected")
        assert app.rebuilds == 0


@pytest.mark.parametrize("leave", ["deleted", "unlabelled"])
async def test_a_member_that_leaves_is_gone_not_stale_and_says_what_it_keeps(
        setup: Setup, caplog: pytest.LogCaptureFixture, leave: str) -> None:
    """Its Secret deleted or unlabelled, b's export leaves a at once (not kept as stale,
    as for a member that stops answering), its ClusterSetIP is held and given back when b
    returns; what we wrote into b stays there, and a warning says how much and where."""
    caplog.set_level(logging.INFO)
    cs = setup.cs
    async with serving_a_and_b(setup) as (app, task):
        await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task, "no import")
        ip = cs.imports("a")["web"]["spec"]["ips"]
        left = [*cs.imports("b").values(), *cs.imported_slices("b")]
        assert len(left) == 2  # b imports its own export too
        if leave == "deleted":
            setup.host.delete_object("secrets", "member-b", NS)
        else:
            secret = member_secret("member-b", "b", setup.kubeconfig("b"))
            secret["metadata"]["labels"] = {}
            setup.host.put_object(secret)
        await until(lambda: not cs.imports("a"), task, "b's export is still imported")
        await until(lambda: serving(app) == {"a"}, task, "b is still served")
        assert not cs.imported_slices("a")  # gone, not annotated stale
        held = setup.host.get_object("configmaps", "mcsproxy-clustersetip-holds", NS)
        assert held is not None and ip[0] in str(held["data"])
        assert [*cs.imports("b").values(), *cs.imported_slices("b")] == left
        setup.add_member("b")
        await until(lambda: cs.addresses("a", "web") == {"10.2.0.1"}, task, "b not back")
        assert cs.imports("a")["web"]["spec"]["ips"] == ip
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "member cluster b left" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{len(left)} objects" in warnings[0]
    assert "managed-by=controller.mcsproxy.io" in warnings[0]


async def test_a_member_added_while_another_is_down_gets_every_import(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """A new member Secret while c's API server is down: the rebuilt controller reads the
    members that answer; d gets b's web, and c's db as the other members hold it (stale),
    updated once c answers. Before: the rebuild waited for c, and d got nothing."""
    caplog.set_level(logging.INFO)
    cs = setup.cs
    cs["c"].put_object(service("db"))
    cs["c"].put_object(member_slice("db", ["10.3.0.1"]))
    cs["c"].put_object(service_export("db"))
    for c in ("a", "b", "c"):
        setup.add_member(c)
    async with KubeEmulator() as d, running(setup.app()) as task:
        cs.emulators["d"] = d
        d.put_object(namespace("demo"))
        await until(lambda: cs.addresses("a", "db") == {"10.3.0.1"}
                    and cs.addresses("a", "web") == {"10.2.0.1"}, task, "no imports")
        await cs["c"].stop()
        # The running controller marks c's endpoints stale; the rebuilt one keeps that.
        await until(lambda: all(s["metadata"].get("annotations", {}).get("mcsproxy.io/stale")
                                for s in cs.imported_slices("a")
                                if s["metadata"]["name"].startswith("db-")), task, "not stale")
        a_before = [*cs.imports("a").values(), *cs.imported_slices("a")]
        setup.add_member("d")
        await until(lambda: cs.addresses("d", "web") == {"10.2.0.1"}
                    and cs.addresses("d", "db") == {"10.3.0.1"}, task,
                    "the new member got no imports while c was down")
        assert cs.imports("d")["db"]["spec"] == cs.imports("a")["db"]["spec"]
        assert [*cs.imports("a").values(), *cs.imported_slices("a")] == a_before
        waiting = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("cluster c not read")]
        assert len(waiting) == 1 and "1 service(s)" in waiting[0] \
            and "demo/db" in waiting[0], waiting
        assert all(s["metadata"].get("annotations", {}).get("mcsproxy.io/stale")
                   for s in cs.imported_slices("d") if s["metadata"]["name"].startswith("db-"))
        await cs["c"].start()
        await until(lambda: cs.addresses("d", "db") == {"10.3.0.1"} and not any(
            s["metadata"].get("annotations", {}).get("mcsproxy.io/stale")
            for s in cs.imported_slices("d")), task,
            "c's export was not reconciled into d once c answered")
        del cs.emulators["d"]
