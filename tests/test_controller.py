"""Directory mode: `mcsproxy controller --clusters-dir DIR --output-dir OUT [--once]`, the
running controller reacting to file changes, and a gateway serving what it wrote."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import dnslib
import pytest
import yaml

from controlplane import command
from controlplane import holds as holds_module
from controlplane.clusters import ChangeSet, ClusterError, kube_app
from controlplane.clusters.directory import DirectoryCluster
from controlplane.command import ControllerConfig, DirectoryControllerApp
from controlplane.reconcile import STALE_ANNOTATION
from controlplane.resources import KIND_IMPORT, ObjectRef
from controlplane.stream import StreamLimits
from mcsproxy.cli import build_parser, main
from mcsproxy.config import AdminConfig, DnsConfig, GatewayConfig
from mcsproxy.gateway import Gateway
from mcsproxy.model import ServiceKey
from mcsproxy.sources import file as file_source
from mcsproxy.sources.file import FileStamp
from mcsproxy.tasks import cancel_and_wait
from tests.fs_support import (
    TRIES,
    at_the_start_of_a_second,
    coarse_fs_skip_reason,
    coarse_timestamps_dir,
    same_stamps,
)
from tests.proxy_fixtures import Backend, ask, free_port
from tests.test_reconcile_support import colliding_names, eslice, export, namespace, service

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "clusters"


def write_docs(path: Path, *docs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def read_out(out: Path, cluster: str) -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((out / cluster).glob("*.yaml"))}


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(out.rglob("*"))
            if p.is_file()}


def member(root: Path, cluster: str, octet: int, created: str = "2024-01-01T00:00:00Z",
           name: str = "web") -> None:
    write_docs(root / cluster / f"{name}.yaml", namespace(), service(name),
               eslice(f"{name}-x", [f"127.0.{octet}.1"], svc=name), export(name, created=created))


def once(clusters: Path, out: Path, *extra: str) -> int:
    return main(["controller", "--clusters-dir", str(clusters), "--output-dir", str(out),
                 "--once", "--log-level", "warning", *extra])


# -- --once -------------------------------------------------------------------------------
def test_once_writes_each_clusters_desired_state(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert once(EXAMPLES, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cluster-a", "cluster-b", "cluster-c"]
    c = read_out(out, "cluster-c")
    kinds = sorted(doc["kind"] for doc in c.values())
    assert kinds == ["EndpointSlice"] * 4 + ["ServiceImport"] * 2  # no export in cluster-c
    a = read_out(out, "cluster-a")
    status = a["serviceexport_test_myservice.yaml"]["status"]["conditions"]
    assert [(x["type"], x["status"]) for x in status] == [
        ("Valid", "True"), ("Ready", "True"), ("Conflict", "False")]
    assert c["serviceimport_test_myservice.yaml"]["spec"]["ips"] == \
        a["serviceimport_test_myservice.yaml"]["spec"]["ips"]


def test_once_again_writes_nothing_and_keeps_addresses(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert once(EXAMPLES, out) == 0
    before = stamps(out)
    assert once(EXAMPLES, out) == 0
    assert stamps(out) == before


def test_unwanted_objects_are_removed_and_foreign_files_left(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    member(clusters, "b", 2, name="api")
    assert once(clusters, out) == 0
    (out / "a" / "notes.txt").write_text("mine")
    ip_api = read_out(out, "a")["serviceimport_test_api.yaml"]["spec"]["ips"]
    (clusters / "a" / "web.yaml").write_text(yaml.safe_dump_all(
        [namespace(), service("web")]))  # the export is gone
    assert once(clusters, out) == 0
    names = {p.name for p in (out / "a").iterdir()}
    assert not any("web" in n for n in names)
    assert "notes.txt" in names
    assert read_out(out, "a")["serviceimport_test_api.yaml"]["spec"]["ips"] == ip_api


def test_addresses_survive_a_restart_with_new_services(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    assert once(clusters, out, "--clusterset-cidr", "127.241.0.0/29") == 0
    ip = read_out(out, "a")["serviceimport_test_web.yaml"]["spec"]["ips"]
    for i in range(3):
        member(clusters, "a", 1, name=f"s{i}")
        member(clusters, "a", 1)  # rewritten: same content
    assert once(clusters, out, "--clusterset-cidr", "127.241.0.0/29") == 0
    docs = read_out(out, "a")
    assert docs["serviceimport_test_web.yaml"]["spec"]["ips"] == ip
    all_ips = [d["spec"]["ips"][0] for n, d in docs.items() if n.startswith("serviceimport")]
    assert len(all_ips) == len(set(all_ips)) == 4


def test_a_released_address_stays_held_across_a_restart(tmp_path: Path) -> None:
    """Three real runs: `gone` is exported, then unexported, then after that restart a new
    service whose hash lands on the same address gets another one (before: it got it)."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    cidr = ("--clusterset-cidr", "127.241.0.0/29")
    gone, new, ip = colliding_names("127.241.0.0/29")
    member(clusters, "a", 1, name=gone)
    assert once(clusters, out, *cidr) == 0
    assert read_out(out, "a")[f"serviceimport_test_{gone}.yaml"]["spec"]["ips"] == [ip]
    write_docs(clusters / "a" / f"{gone}.yaml", namespace(), service(gone))  # unexported
    assert once(clusters, out, *cidr) == 0
    assert not (out / "a" / f"serviceimport_test_{gone}.yaml").exists()
    member(clusters, "a", 1, name=new)
    assert once(clusters, out, *cidr) == 0
    assert read_out(out, "a")[f"serviceimport_test_{new}.yaml"]["spec"]["ips"] != [ip]
    # The hold is a dotfile beside the cluster folders, which neither DIR's discovery nor
    # a gateway's `file:` source reads.
    assert sorted(p.name for p in out.iterdir()) == [".clustersetip-holds.json", "a"]


@pytest.mark.parametrize("content", [b"{not json", b'{"kind": "Something", "holds": []}',
                                     b'{"kind":"ClusterSetIPHolds","version":1,"holds":[7]}',
                                     b"\xff\xfe"])
def test_a_damaged_or_foreign_holds_file_is_logged_and_replaced(
        tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    member(clusters, "a", 1, name="api")
    assert once(clusters, out) == 0
    holds = out / ".clustersetip-holds.json"
    holds.write_bytes(content)
    write_docs(clusters / "a" / "web.yaml", namespace(), service("web"))  # unexported
    assert once(clusters, out) == 0
    assert f"WARNING controlplane.holds {holds}: " in capsys.readouterr().err
    assert "serviceimport_test_api.yaml" in {p.name for p in (out / "a").iterdir()}
    assert [h["service"] for h in yaml.safe_load(holds.read_text())["holds"]] == ["test/web"]


async def test_a_holds_write_that_hangs_does_not_hold_up_stopping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A save still under way when the controller stops is waited for (its thread would
    race the last try), but not for ever: a filesystem that stopped answering."""
    hung = asyncio.Event()

    class HungStore(holds_module.HoldStore):
        async def _write(self, data: bytes) -> None:
            hung.set()
            await asyncio.Event().wait()

    monkeypatch.setattr(holds_module, "CLOSE_WAIT_S", 0.2)
    store = HungStore()
    store.save([holds_module.Hold(None, "127.241.0.4", ServiceKey("test", "web"), 1.0)])
    await asyncio.wait_for(hung.wait(), 2)
    async with asyncio.timeout(2):
        await store.close()
    assert store.writes == 0


def test_a_cluster_with_its_own_range_gets_its_own_stable_addresses(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    member(clusters, "b", 2)
    own = ("--cluster-cidr", "b=127.242.0.0/24")
    assert once(clusters, out, *own) == 0
    ip_a = read_out(out, "a")["serviceimport_test_web.yaml"]["spec"]["ips"]
    ip_b = read_out(out, "b")["serviceimport_test_web.yaml"]["spec"]["ips"]
    assert ip_a[0].startswith("127.240.") and ip_b[0].startswith("127.242.0.")
    before = stamps(out)
    assert once(clusters, out, *own) == 0
    assert stamps(out) == before  # read back, not reallocated


def test_a_range_for_a_cluster_that_is_no_member_is_warned_of(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--cluster-cidr bb=... for member b (a typo) gave b the clusterset range, silently."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    member(clusters, "b", 2)
    assert once(clusters, out, "--cluster-cidr", "bb=127.242.0.0/24",
                "--cluster-cidr", "a=127.243.0.0/24") == 0
    warnings = [line.split(" controlplane.controller ", 1)[1]
                for line in capsys.readouterr().err.splitlines()
                if " WARNING controlplane.controller " in line]
    assert warnings == ["--cluster-cidr bb=127.242.0.0/24: no member cluster bb (members: a, "
                        "b); the range is used once a member of that ID joins"]


def test_once_exits_1_when_a_cluster_could_not_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It exited 0. The files it could write are written, and no temporary file is left."""
    clusters, out = a_exports_to_b(tmp_path)
    (out / "b" / "serviceimport_test_web.yaml").mkdir(parents=True)  # in the way
    assert once(clusters, out) == 1
    assert "--once: writing to cluster(s) b failed" in capsys.readouterr().err
    assert [p.name for p in (out / "b").glob("endpointslice_*.yaml")]
    assert not list((out / "b").glob(".*.tmp"))


def test_objects_whose_file_names_would_be_too_long_are_written(tmp_path: Path) -> None:
    """63-character names and a 122-character cluster ID made a slice's file name longer
    than a file name can be (and every other file of its batch went unwritten)."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    ns, name, source = "n" * 63, "s" * 63, "c" * 63 + "." + "d" * 58
    write_docs(clusters / source / "web.yaml", namespace(ns), service(name, ns=ns),
               eslice("web-x", ["127.0.1.1"], svc=name, ns=ns), export(name, ns=ns))
    write_docs(clusters / "b" / "ns.yaml", namespace(ns))
    assert once(clusters, out) == 0
    kinds = sorted(d["kind"] for d in read_out(out, "b").values())
    assert kinds == ["EndpointSlice", "ServiceImport"]
    assert max(len(p.name) for p in (out / "b").iterdir()) <= 250
    before = stamps(out)
    assert once(clusters, out) == 0  # read back as ours: nothing rewritten
    assert stamps(out) == before


def test_bad_file_fails_once_with_file_and_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    bad = clusters / "a" / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n"
                   "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\n"
                   "spec: {ports: [{port: 99999}]}\n")
    assert once(clusters, out) == 1
    err = capsys.readouterr().err
    assert f"{bad}:8: " in err and "1-65535" in err  # the port's line, not the document's
    assert not (out / "a").exists()


def test_a_mistyped_export_kind_fails_once_instead_of_unexporting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kind: ServiceExprt` used to be skipped as some other kind: the service was quietly
    not exported and --once exited 0."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    web = clusters / "a" / "web.yaml"
    text = web.read_text()
    assert text.count("kind: ServiceExport") == 1
    web.write_text(text.replace("kind: ServiceExport", "kind: ServiceExprt"))
    line = text[:text.index("kind: ServiceExport")].count("\n") + 1  # the kind's line
    assert once(clusters, out) == 1
    err = capsys.readouterr().err
    assert f"{web}:{line}: kind 'ServiceExprt' does not exist in multicluster.x-k8s.io" in err
    assert not (out / "a").exists()


@pytest.mark.parametrize(("old", "new", "message"), [
    ("kind: Service\n", "kind: Servce\n", "kind 'Servce' does not exist in the core API group"),
    ("kind: Namespace\n", "kind: Namespce\n", "kind 'Namespce' does not exist"),
    ("apiVersion: v1\nkind: Service\n", "apiVersion: v2\nkind: Service\n",
     "apiVersion 'v2' does not exist for Service: expected v1"),
])
def test_a_mistyped_core_kind_or_version_fails_once_instead_of_vanishing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    """`kind: Servce` (core group) was skipped as a foreign kind: the service was quietly
    not exported, its export judged against no Service, and --once exited 0."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    web = clusters / "a" / "web.yaml"
    text = web.read_text()
    assert text.count(old) == 1
    web.write_text(text.replace(old, new))
    field = new.split("\n")[0 if "apiVersion: v2" in new else -2]
    line = text.replace(old, new)[:text.replace(old, new).index(field)].count("\n") + 1
    assert once(clusters, out) == 1
    err = capsys.readouterr().err
    assert f"{web}:{line}: {message}" in err
    assert not (out / "a").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--kubeconfig", "k"], "--kubeconfig needs --contexts"),
    (["--clusters-dir", ".", "--output-dir", "o", "--cluster-cidr", "east"], "CLUSTER=CIDR"),
    # The message names the flag that was wrong (it used to say --clusterset-cidr).
    (["--clusters-dir", ".", "--output-dir", "o", "--cluster-cidr", "a=10.0.0.0/40"],
     "--cluster-cidr a=10.0.0.0/40: "),
    (["--clusters-dir", ".", "--output-dir", "o", "--cluster-cidr", "East_1=10.0.0.0/24"],
     "'East_1' is not an RFC-1123 cluster ID"),
    # Kubernetes mode: checked before connecting. A missing kubeconfig was called
    # "Invalid kube-config file. Expected key contexts" (exit 1, after a library warning);
    # nan passed the lease-duration check; bad ranges passed until connected.
    (["--kubeconfig", "/nonexistent/kubeconfig", "--contexts", "a"],
     "--kubeconfig /nonexistent/kubeconfig: no such file"),
    (["--contexts", "a", "--lease-duration", "nan"], "--lease-duration must be at least 3"),
    (["--contexts", "a", "--clusterset-cidr", "10.0.0.0/33"], "--clusterset-cidr: "),
    (["--contexts", "a", "--cluster-cidr", "a=bad"], "--cluster-cidr a=bad: "),
    (["--clusters-dir", "/nonexistent-dir", "--output-dir", "/tmp/x"], "not a directory"),
    (["--clusters-dir", ".", "--output-dir", "o", "--clusterset-cidr", "10.0.0.0/33"],
     "clusterset-cidr"),
    (["--clusters-dir", ".", "--output-dir", "o", "--stream-write-timeout", "0"],
     "--stream-write-timeout must be a finite number of seconds > 0, not 0"),
    (["--contexts", "a", "--stream-write-timeout", "inf"],
     "--stream-write-timeout must be a finite number of seconds > 0, not inf"),
    (["--clusters-dir", ".", "--output-dir", "o", "--stream-queue-bytes", "0"],
     "--stream-queue-bytes must be at least 1, not 0"),
    (["--contexts", "a", "--stream-queue-bytes", "-5"],
     "--stream-queue-bytes must be at least 1, not -5"),
])
def test_bad_flags_exit_2_with_the_reason(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["controller", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_kubeconfig_that_is_not_yaml_is_one_line_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It ended in yaml's ParserError traceback."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nclusters: [\n")
    assert main(["controller", "--kubeconfig", str(kubeconfig), "--contexts", "a",
                 "--log-level", "error"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"kubeconfig {kubeconfig}: ParserError: " in err and ", line 3," in err


def test_an_output_dir_that_cannot_be_one_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file there failed as "mcsproxy: error: OUT: File exists" (exit 1), an output
    dir that cannot be made as "/proc/x: No such file or directory": no flag named."""
    clusters = tmp_path / "clusters"
    member(clusters, "a", 1)
    (tmp_path / "file").write_text("")
    assert once(clusters, tmp_path / "file") == 2
    assert f"error: --output-dir {tmp_path / 'file'}: not a directory" in (
        capsys.readouterr().err)
    assert once(clusters, tmp_path / "file" / "out") == 1
    assert (f"error: --output-dir {tmp_path / 'file' / 'out'}: cannot create: Not a "
            "directory") in capsys.readouterr().err


def test_stream_flags_reach_the_config_in_both_modes(tmp_path: Path) -> None:
    """--stream-write-timeout and --stream-queue-bytes; without them, the defaults."""
    directory = ["--clusters-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    flags = ["--stream-write-timeout", "2.5", "--stream-queue-bytes", "65536"]
    for argv, limits in [([], StreamLimits()), (flags, StreamLimits(2.5, 65536))]:
        args = build_parser().parse_args(["controller", *directory, *argv])
        assert command.config_from_args(args).stream_limits == limits
        args = build_parser().parse_args(["controller", "--contexts", "a", *argv])
        assert kube_app.config_from_args(args).stream_limits == limits
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    for argv in (directory, ["--contexts", "a"]):
        args = build_parser().parse_args(["controller", *argv, "--serve-token-file", str(token)])
        mode = command if argv is directory else kube_app
        assert mode.config_from_args(args).serve_token_file == token  # type: ignore[attr-defined]


# "b\n" passed as cluster b: `$` matches before a final newline, and the newline went
# into every label naming the cluster (mcs-spec.md 14: cluster IDs are RFC-1123 labels).
@pytest.mark.parametrize("name", ["Not_A_Cluster", "b\n"])
def test_bad_cluster_folder_name_is_rejected(tmp_path: Path, name: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / name).mkdir()
    assert once(tmp_path, tmp_path.parent / f"{tmp_path.name}-out") == 1
    assert "RFC-1123" in capsys.readouterr().err


# -- running --------------------------------------------------------------------------------
async def until(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll a condition on files with a deadline (the controller writes in the background)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def a_exports_to_b(tmp_path: Path) -> tuple[Path, Path]:
    """CLUSTERS with a exporting web at 127.0.1.1 and b holding only the namespace; OUT."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    write_docs(clusters / "b" / "ns.yaml", namespace())
    return clusters, out


async def a_changes_reach_b(clusters: Path, out: Path) -> None:
    """a's endpoint moves to 127.0.7.1; until the running controller writes it into b."""
    member(clusters, "a", 7)
    await until(lambda: "127.0.7.1" in str(read_out(out, "b")))


class Running:
    def __init__(self, clusters: Path, out: Path, **config: object) -> None:
        config.setdefault("stale_after_s", 0.3)  # a folder away goes stale within `until`
        self.app = DirectoryControllerApp(ControllerConfig(clusters, out, poll_interval_s=0.05,
                                                           **config))  # type: ignore[arg-type]
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> DirectoryControllerApp:
        await self.app.start()
        self.task = asyncio.create_task(self.app.serve())
        return self.app

    async def __aexit__(self, *exc: object) -> None:
        self.app.stop()
        assert self.task is not None
        await self.task


async def test_running_controller_follows_changes(tmp_path: Path) -> None:
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out) as app:
        web_b = out / "b" / "serviceimport_test_web.yaml"
        assert web_b.exists()
        # A new endpoint in a: only a's slice file changes, in every cluster.
        before = stamps(out)
        write_docs(clusters / "a" / "web.yaml", namespace(), service(),
                   eslice("web-x", ["127.0.1.1", "127.0.1.2"]), export())

        def two_endpoints() -> bool:
            docs = [d for n, d in read_out(out, "b").items() if n.startswith("endpointslice")]
            return len(docs) == 1 and len(docs[0]["endpoints"]) == 2

        await until(two_endpoints)
        after = stamps(out)
        changed = sorted(Path(p).name for p in after if after[p] != before.get(p))
        assert len(changed) == 2 and all(n.startswith("endpointslice") for n in changed)
        # Unexport: the import goes everywhere.
        write_docs(clusters / "a" / "web.yaml", namespace(), service())
        await until(lambda: not web_b.exists())
        assert app.metrics.propagation.labels("written")._sum.get() > 0


async def test_one_source_unexporting_leaves_every_consumer(tmp_path: Path) -> None:
    """mcs-spec.md 3 and 12: b's slices and export status go from every OUT, a's stay."""
    clusters, out = a_exports_to_b(tmp_path)
    member(clusters, "b", 2, created="2024-02-01T00:00:00Z")

    def sources(cluster: str) -> list[str]:
        return sorted(d["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
                      for n, d in read_out(out, cluster).items()
                      if n.startswith("endpointslice"))

    async with Running(clusters, out):
        assert sources("a") == sources("b") == ["a", "b"]
        write_docs(clusters / "b" / "web.yaml", namespace(), service(),
                   eslice("web-x", ["127.0.2.1"]))  # the export is gone, the Service stays
        await until(lambda: sources("a") == sources("b") == ["a"])
        assert not (out / "b" / "serviceexport_test_web.yaml").exists()
        imported = read_out(out, "b")["serviceimport_test_web.yaml"]
        assert imported["status"]["clusters"] == [{"cluster": "a"}]


async def test_bad_file_keeps_the_last_good_state(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    async with Running(clusters, out) as app:
        controller = app.controller
        assert controller is not None
        before = stamps(out)
        (clusters / "a" / "web.yaml").write_text("apiVersion: v1\nkind: Service\n  bad: [\n")
        await until(lambda: controller.clients["a"].connection.error is not None)
        assert "web.yaml:3" in controller.clients["a"].connection.error
        assert stamps(out) == before
        member(clusters, "a", 1)
        await until(lambda: controller.clients["a"].connection.error is None)
        assert stamps(out) == before


async def test_a_member_file_caught_half_written_withdraws_nothing(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    cluster = DirectoryCluster("a", clusters, out)
    await cluster.sync()
    held = cluster.objects.refs()
    assert len(held) == 4
    (clusters / "a" / "web.yaml").write_text("")  # a writer's truncate, before its write
    assert not await cluster.sync() and cluster.objects.refs() == held
    member(clusters, "a", 2)
    assert not await cluster.sync() and cluster.objects.refs() == held
    assert await cluster.sync()  # it held still for a scan: read now
    assert cluster.objects.refs() == held
    assert endpoint_addresses(cluster) == [("127.0.2.1",)]


async def test_a_member_file_moved_to_a_new_name_withdraws_nothing(tmp_path: Path) -> None:
    """The new file renamed into place, then the old one deleted: the deletion used to be
    applied a scan before the new file was read, withdrawing the export (and with it the
    ServiceImport in every cluster) for that scan."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    cluster = DirectoryCluster("a", clusters, out)
    await cluster.sync()
    held = cluster.objects.refs()
    old, new = clusters / "a" / "web.yaml", clusters / "a" / "moved.yaml"
    tmp = clusters / "a" / ".moved.yaml.tmp"
    tmp.write_bytes(old.read_bytes())
    os.replace(tmp, new)
    old.unlink()
    assert not await cluster.sync() and cluster.objects.refs() == held  # the deletion waits
    await cluster.sync()  # both in one change: nothing left the member
    assert cluster.objects.refs() == held
    new.unlink()  # nothing settling: withdrawn at once
    assert await cluster.sync() and cluster.objects.refs() == set()


def endpoint_addresses(cluster: DirectoryCluster) -> list[tuple[str, ...]]:
    return [e.addresses for s in cluster.objects.slices_for(ServiceKey("test", "web"))
            for e in s.endpoints]


async def test_a_member_file_rewritten_with_its_mtime_put_back_is_read(tmp_path: Path) -> None:
    """`cp -p`, `rsync -t`, `touch -r`: the same size, the same inode, the old mtime; only
    the ctime tells. It used to be ignored for good."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    cluster = DirectoryCluster("a", clusters, out)
    await cluster.sync()
    web = clusters / "a" / "web.yaml"
    before = web.stat()
    member(clusters, "a", 2)
    os.utime(web, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = web.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns, before.st_size, before.st_ino)
    await cluster.sync()  # a fresh change waits a scan to settle
    assert await cluster.sync()
    assert endpoint_addresses(cluster) == [("127.0.2.1",)]


@pytest.mark.skipif(coarse_fs_skip_reason() is not None, reason=coarse_fs_skip_reason() or "")
async def test_a_member_file_written_twice_within_one_timestamp_tick_is_read(
        tmp_path: Path) -> None:
    """On a filesystem with one-second stamps, a rewrite (same size) just after a read
    leaves mtime, size, inode and ctime as they were: only the bytes differ."""
    with coarse_timestamps_dir(tmp_path) as clusters:
        web = clusters / "a" / "web.yaml"
        cluster = DirectoryCluster("a", clusters, tmp_path / "out")
        for _ in range(TRIES):
            at_the_start_of_a_second()
            member(clusters, "a", 1)
            await cluster.sync()
            before = web.stat()
            member(clusters, "a", 2)
            after = web.stat()
            if same_stamps(before, after):
                break
        assert same_stamps(before, after), f"each of {TRIES} tries crossed a second"
        assert await cluster.sync()
        assert endpoint_addresses(cluster) == [("127.0.2.1",)]
        assert not await cluster.sync()  # read again, found the same: nothing to do


async def test_unreadable_member_goes_stale_then_recovers(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    member(clusters, "b", 2, created="2024-02-01T00:00:00Z")

    def stale_flags() -> dict[str, bool]:
        docs = read_out(out, "a")
        return {d["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]:
                STALE_ANNOTATION in d["metadata"].get("annotations", {})
                for n, d in docs.items() if n.startswith("endpointslice")}

    async with Running(clusters, out) as app:
        assert stale_flags() == {"a": False, "b": False}
        hidden = tmp_path / "b-away"
        os.rename(clusters / "b", hidden)
        await until(lambda: stale_flags() == {"a": False, "b": True})
        assert app.controller.members()["b"]["stale"] is True
        assert app.metrics.stale_endpoints.labels("b")._value.get() == 1
        os.rename(hidden, clusters / "b")
        await until(lambda: stale_flags() == {"a": False, "b": False})


async def test_a_member_folder_away_for_a_few_scans_rewrites_nothing(tmp_path: Path) -> None:
    """A member folder away for a moment (`ln -sfn` unlinks before it links, a folder
    replaced by two renames, an NFS hiccup) made the member stale at the first failed
    scan: each slice imported from it written again in every member, and again when it
    was back (120 writes at 3 members of 20 services). It gets a Kubernetes member's
    grace: its error shows at once, nothing is rewritten."""
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out, stale_after_s=30.0) as app:
        controller = app.controller
        assert controller is not None
        before = stamps(out)
        os.rename(clusters / "a", tmp_path / "a-away")
        await until(lambda: "No such file" in (controller.clients["a"].connection.error or ""))
        assert controller.members()["a"]["stale"] is False
        os.rename(tmp_path / "a-away", clusters / "a")
        await until(lambda: controller.clients["a"].connection.error is None)
        await asyncio.sleep(0.2)  # a few scans and reconciles more
        assert stamps(out) == before
        await a_changes_reach_b(clusters, out)


async def test_a_member_folder_whose_scan_hangs_goes_stale_then_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stat on a member volume whose NFS server is gone never returns: the member was
    shown connected, with no error, for as long as it hung (15 s measured, no end)."""
    clusters, out = a_exports_to_b(tmp_path)
    monkeypatch.setattr(file_source, "SCAN_STUCK_S", 0.1)
    hung, scan = threading.Event(), DirectoryCluster._scan

    def hanging(self: DirectoryCluster):  # type: ignore[no-untyped-def]
        if self.cluster_id == "a":
            hung.wait(10)
        return scan(self)

    async with Running(clusters, out) as app:
        controller = app.controller
        assert controller is not None
        monkeypatch.setattr(DirectoryCluster, "_scan", hanging)
        try:
            await until(lambda: controller.members()["a"]["stale"])
            assert "(a hung volume?)" in controller.members()["a"]["error"]
        finally:
            hung.set()  # the volume answers again
        await until(lambda: not controller.members()["a"]["stale"])
        await a_changes_reach_b(clusters, out)


async def test_a_member_folder_away_at_a_restart_is_waited_for(tmp_path: Path) -> None:
    """a's folder is away (a volume not mounted yet) when the controller starts, its
    OUT folder there: as under a running controller, its services stay imported as
    last written until it is back. Before: the restart unexported them everywhere (b's
    import and a's slices deleted), to bring them back when the folder came."""
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out):
        before = read_out(out, "b")
    hidden = tmp_path / "a-away"
    os.rename(clusters / "a", hidden)
    async with Running(clusters, out) as app:
        assert read_out(out, "b") == before
        assert app.controller.members()["a"]["unread"] is True
        assert [str(k) for k in app.controller.waiting("a")] == ["test/web"]
        write_docs(hidden / "web.yaml", namespace(), service(),
                   eslice("web-x", ["127.0.1.1", "127.0.1.2"]), export())
        os.rename(hidden, clusters / "a")

        def two_endpoints() -> bool:
            docs = [d for n, d in read_out(out, "b").items() if n.startswith("endpointslice")]
            return len(docs) == 1 and len(docs[0]["endpoints"]) == 2

        await until(two_endpoints)
        assert app.controller.members()["a"]["connected"] is True
        assert read_out(out, "b")["serviceimport_test_web.yaml"] == \
            before["serviceimport_test_web.yaml"]


async def test_a_multiclusterservice_in_a_member_folder_away_at_a_restart_is_kept(
        tmp_path: Path) -> None:
    """c holds only the MultiClusterService that makes a provide web (nothing is written
    into c): away at a restart, web stays imported in b until c is back. Before: c had no
    OUT folder to be remembered by, nothing read named web, and b's import went."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    write_docs(clusters / "a" / "web.yaml", namespace(), service(),
               eslice("web-x", ["127.0.1.1"]))
    write_docs(clusters / "b" / "ns.yaml", namespace())
    write_docs(clusters / "c" / "mcs.yaml", {
        "apiVersion": "networking.karmada.io/v1alpha1", "kind": "MultiClusterService",
        "metadata": {"name": "web", "namespace": "test"},
        "spec": {"types": ["CrossCluster"], "providerClusters": [{"name": "a"}]}})
    async with Running(clusters, out):
        before = read_out(out, "b")
    assert "serviceimport_test_web.yaml" in before and (out / "c").is_dir()
    os.rename(clusters / "c", tmp_path / "c-away")
    async with Running(clusters, out) as app:
        assert read_out(out, "b") == before
        assert [str(k) for k in app.controller.waiting("c")] == ["test/web"]


async def test_a_service_no_address_is_free_for_waits_and_the_others_go_on(
        tmp_path: Path) -> None:
    """A /30 holds two services. The third used to raise AllocationError out of the
    controller's loop, which then wrote nothing more while /healthz said ok."""
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1, name="s1")
    member(clusters, "a", 1, name="s2")

    def ready(name: str) -> tuple[str, str] | None:
        export = read_out(out, "a").get(f"serviceexport_test_{name}.yaml")
        cond = {c["type"]: c for c in export["status"]["conditions"]} if export else {}
        return (cond["Ready"]["status"], cond["Ready"]["reason"]) if cond else None

    async with Running(clusters, out, clusterset_cidr="127.241.0.0/30") as app:
        s1_ip = read_out(out, "a")["serviceimport_test_s1.yaml"]["spec"]["ips"]
        member(clusters, "a", 1, name="s3")
        await until(lambda: ready("s3") == ("False", "Pending"))
        assert "serviceimport_test_s3.yaml" not in read_out(out, "a")
        assert app.metrics.unallocated._value.get() == 1
        member(clusters, "a", 2, name="s2")  # the others are still reconciled
        await until(lambda: "127.0.2.1" in str(read_out(out, "a")))
        write_docs(clusters / "a" / "s1.yaml", namespace(), service("s1"))  # unexported
        await until(lambda: ready("s3") == ("True", "Exported"))
        assert read_out(out, "a")["serviceimport_test_s3.yaml"]["spec"]["ips"] == s1_ip
        assert app.metrics.unallocated._value.get() == 0


async def test_the_controller_exits_when_its_loop_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop ended by a bug left the process serving /healthz and writing nothing."""
    clusters, out = a_exports_to_b(tmp_path)
    app = DirectoryControllerApp(ControllerConfig(clusters, out, poll_interval_s=0.05))
    await app.start()
    assert app.controller is not None

    def bug() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.controller, "_write_again", bug)
    serving = asyncio.create_task(app.serve())
    member(clusters, "a", 7)  # a change wakes the loop
    with pytest.raises(ClusterError, match="the controller loop ended: RuntimeError"):
        await asyncio.wait_for(serving, 5)


async def test_stale_endpoints_count_exported_services_only(tmp_path: Path) -> None:
    clusters, out = a_exports_to_b(tmp_path)
    write_docs(clusters / "a" / "internal.yaml", service("internal"),
               eslice("internal-x", [f"127.0.1.{i}" for i in range(2, 7)], svc="internal"))
    async with Running(clusters, out) as app:
        os.rename(clusters / "a", tmp_path / "a-away")
        await until(lambda: app.controller.members()["a"]["stale"])
        assert app.metrics.stale_endpoints.labels("a")._value.get() == 1  # was 6


async def test_a_new_cluster_folder_joins(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    async with Running(clusters, out):
        write_docs(clusters / "c" / "ns.yaml", namespace())
        await until(lambda: (out / "c" / "serviceimport_test_web.yaml").exists())


async def test_a_misnamed_folder_is_reported_once_and_new_folders_still_join(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder that cannot be a cluster ID used to stop discovery (every new folder
    waited for it to go) and was logged every second."""
    caplog.set_level(logging.INFO, logger="controlplane.command")
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    bad = clusters / "Not_A_Cluster"
    async with Running(clusters, out) as app:
        bad.mkdir()
        write_docs(clusters / "c" / "ns.yaml", namespace())
        await until(lambda: (out / "c" / "serviceimport_test_web.yaml").exists())
        write_docs(clusters / "d" / "ns.yaml", namespace())  # a later look at DIR
        await until(lambda: (out / "d" / "serviceimport_test_web.yaml").exists())
        assert app.controller is not None and set(app.controller.members()) == {"a", "c", "d"}
        said = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
        assert said == [f"ignoring {bad}: folder name 'Not_A_Cluster' is not an RFC-1123 "
                        "cluster ID; the other cluster folders are still served"]
        bad.rmdir()
        await until(lambda: any(f"{bad}: gone or renamed" in r.getMessage()
                                for r in caplog.records))


async def test_a_namespace_implied_by_a_new_service_brings_the_imports(tmp_path: Path) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    write_docs(clusters / "b" / "other.yaml", namespace("other"))
    async with Running(clusters, out):
        # b's first object in "test" comes without a Namespace document: b has the
        # namespace now, so the import of a's test/web must follow, and leave with it.
        write_docs(clusters / "b" / "api.yaml", service("api"))
        web_b = out / "b" / "serviceimport_test_web.yaml"
        await until(web_b.exists)
        (clusters / "b" / "api.yaml").unlink()
        await until(lambda: not web_b.exists())


# -- end to end: controller → gateway (file source) → DNS and TCP --------------------------
def dns_query(server: tuple[str, int], name: str, qtype: str = "A") -> dnslib.DNSRecord:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(dnslib.DNSRecord.question(name, qtype).pack(), server)
        return dnslib.DNSRecord.parse(s.recv(4096))


async def dns_a(server: tuple[str, int], name: str) -> list[str]:
    reply = await asyncio.to_thread(dns_query, server, name)
    return sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == dnslib.QTYPE.A)


def clusterset_with_backends(root: Path, backends: list[Backend]) -> None:
    for i, b in enumerate(backends):
        write_docs(root / b.cluster / "web.yaml", namespace(),
                   service(ports=[("web", "TCP", 80)]),
                   eslice("web-x", [b.host], ports=[("web", "TCP", b.port)]),
                   export(created=f"2024-0{i + 1}-01T00:00:00Z"))
    write_docs(root / "consumer" / "ns.yaml", namespace())


def gateway_config(cluster: str, source: str, host: str) -> GatewayConfig:
    return GatewayConfig(
        cluster_id=cluster, sources=(source,),
        dns=DnsConfig(listen=(host, free_port(host, socket.SOCK_DGRAM))),
        admin=AdminConfig(listen=(host, free_port(host))),
    )


async def test_controller_output_served_by_a_gateway(tmp_path: Path) -> None:
    backends = [await Backend(f"{c}-1", f"127.48.{i + 1}.1", free_port(f"127.48.{i + 1}.1"),
                              c).start() for i, c in enumerate(["east", "west"])]
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    clusterset_with_backends(clusters, backends)
    assert await asyncio.to_thread(once, clusters, out, "--clusterset-cidr",
                                   "127.240.48.0/24") == 0
    ip = read_out(out, "consumer")["serviceimport_test_web.yaml"]["spec"]["ips"][0]
    gateway = Gateway(gateway_config("consumer", f"file:{out / 'consumer'}", "127.48.9.1"))
    await gateway.start()
    try:
        async with asyncio.timeout(5):
            await gateway.store.loaded.wait()
        assert await dns_a(gateway.config.dns.listen, "web.test.svc.clusterset.local") == [ip]
        seen = set()
        async with asyncio.timeout(10):
            while seen != {"east-1", "west-1"}:
                seen.add(await ask(ip, 80))
    finally:
        await gateway.stop()
        for b in backends:
            await b.stop()


def test_example_clusterset_is_copyable(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "c")
    assert once(tmp_path / "c", tmp_path / "o") == 0


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_during_the_initial_reconcile_stops_the_controller_cleanly(
        tmp_path: Path, sig: str) -> None:
    # Thousands of services take the first reconcile seconds; the signal handlers used
    # to be installed only after it (Ctrl-C: a KeyboardInterrupt traceback, SIGTERM: a
    # bare kill).
    import select
    import signal
    import subprocess
    import sys
    import time

    docs = [yaml.safe_dump(namespace("big"))]
    for i in range(3000):
        docs += [yaml.safe_dump(service(f"s{i}", "big")), yaml.safe_dump(export(f"s{i}", "big"))]
    (tmp_path / "clusters" / "a").mkdir(parents=True)
    (tmp_path / "clusters" / "a" / "objects.yaml").write_text("---\n".join(docs))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcsproxy", "controller", "--clusters-dir",
         str(tmp_path / "clusters"), "--output-dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while not any("the initial reconcile" in line for line in seen):  # handlers are in
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen.append(proc.stdout.readline())
    proc.send_signal(getattr(signal, sig))
    output, _ = proc.communicate(timeout=60)
    output = "".join(seen) + output
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    assert "stopped during the initial reconcile" in output  # it did land there


# The controller command with its member scans hanging from the fifth on, as a stat on
# an NFS volume whose server went away does; it says so on stderr first.
HUNG_VOLUME_CONTROLLER = """
import sys, threading
from controlplane.clusters.directory import DirectoryCluster
from mcsproxy.cli import main
scan = DirectoryCluster._scan
calls = 0
def hanging(self):
    global calls
    calls += 1
    if calls > 4:
        print("the volume hangs", file=sys.stderr, flush=True)
        threading.Event().wait()
    return scan(self)
DirectoryCluster._scan = hanging
sys.exit(main(sys.argv[1:]))
"""


def test_a_controller_whose_member_folder_hangs_still_exits_on_sigterm(
        tmp_path: Path) -> None:
    """The scans (and writes) ran on asyncio's default executor, whose threads are
    joined at the loop's shutdown: after SIGTERM the controller waited for the hung stat
    for ever. Now it exits; the thread is left behind."""
    import select
    import signal
    import subprocess
    import sys
    import time

    clusters, out = a_exports_to_b(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", HUNG_VOLUME_CONTROLLER, "controller", "--clusters-dir",
         str(clusters), "--output-dir", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 30
        seen: list[str] = []
        while not any("the volume hangs" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            if select.select([proc.stderr], [], [], 0.5)[0]:
                seen.append(proc.stderr.readline())
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
        assert proc.returncode == 0, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def test_output_removed_or_edited_by_someone_else_is_written_again(
        tmp_path: Path) -> None:
    """Files the controller wrote into OUT and someone deletes or edits are written again
    within the check interval; a file named like ours that nothing wants is removed; a
    file not named like ours is left alone; nothing is written while nothing changes."""
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out):
        wanted = read_out(out, "b")
        imp = out / "b" / "serviceimport_test_web.yaml"
        [slice_name] = [n for n in wanted if n.startswith("endpointslice")]
        imp.unlink()
        await until(lambda: read_out(out, "b") == wanted)
        edited = dict(wanted[slice_name], endpoints=[])
        write_docs(out / "b" / slice_name, edited)
        await until(lambda: read_out(out, "b") == wanted)
        write_docs(out / "b" / "serviceimport_test_ghost.yaml",
                   dict(wanted[imp.name], metadata={"name": "ghost", "namespace": "test"}))
        (out / "b" / "notes.txt").write_text("mine\n")
        await until(lambda: read_out(out, "b") == wanted)
        before = stamps(out)
        await asyncio.sleep(1.5)  # more than one check of OUT
        assert stamps(out) == before
        assert (out / "b" / "notes.txt").read_text() == "mine\n"


def edit_in_place_keeping_mtime(path: Path, old: bytes, new: bytes) -> None:
    """Someone else's edit of the same size, the mtime put back (`touch -r`, `cp -p`)."""
    before = path.stat()
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    with open(path, "r+b") as f:
        f.write(data.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.skipif(coarse_fs_skip_reason() is not None, reason=coarse_fs_skip_reason() or "")
async def test_output_edited_within_the_timestamp_tick_of_our_write_is_written_again(
        tmp_path: Path) -> None:
    """On a filesystem with one-second stamps, an edit of the same size just after our
    write, its mtime put back, leaves mtime, ctime, size and inode as we left them: only
    the bytes tell. It used to stay in OUT, served by any gateway reading it, for good."""
    clusters, _ = a_exports_to_b(tmp_path)
    with coarse_timestamps_dir(tmp_path) as mnt:
        for attempt in range(TRIES):
            # A controller of its own each try, from its first write.
            if await edited_in_our_tick_is_repaired(clusters, mnt / f"out{attempt}"):
                return
        pytest.fail(f"each of {TRIES} tries crossed a second")


async def edited_in_our_tick_is_repaired(clusters: Path, out: Path) -> bool:
    """The scenario above once; False when a slow moment crossed into the next second
    between our write and the edit (then it was not the scenario)."""
    at_the_start_of_a_second()
    async with Running(clusters, out) as app:
        wanted = read_out(out, "b")
        [slice_file] = (out / "b").glob("endpointslice_*.yaml")
        before = slice_file.stat()
        edit_in_place_keeping_mtime(slice_file, b"127.0.1.1", b"127.0.6.6")
        if not same_stamps(before, slice_file.stat()):
            return False
        await until(lambda: read_out(out, "b") == wanted, timeout=3.5)  # 3 checks
        assert app.metrics.registry.get_sample_value(
            "mcsproxy_controller_drift_repairs_total", {"cluster": "b"}) == 1
        return True


async def test_output_edited_before_our_write_was_stat_ed_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit landing between our rename and our stat, on any filesystem: the stamp kept
    is already of their version, so only the bytes can tell it from ours."""
    (tmp_path / "clusters" / "b").mkdir(parents=True)
    cluster = DirectoryCluster("b", tmp_path / "clusters", tmp_path / "out")
    await cluster.sync()
    ours = {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "test"},
            "spec": {"type": "ClusterSetIP", "ips": ["10.0.0.1"]}}
    theirs = {**ours, "spec": {"type": "ClusterSetIP", "ips": ["10.0.0.9"]}}
    stamp = DirectoryCluster._stamp

    def edited_first(path: str | Path) -> FileStamp | None:
        edit_in_place_keeping_mtime(Path(path), b"10.0.0.1", b"10.0.0.9")
        return stamp(path)

    monkeypatch.setattr(DirectoryCluster, "_stamp", staticmethod(edited_first))
    await cluster.apply([ours])
    monkeypatch.undo()
    seen: list[ChangeSet] = []
    watching = asyncio.create_task(cluster.watch(lambda _, changes: seen.append(changes)))
    try:
        await until(lambda: any(c.published for c in seen), timeout=3.5)  # 3 checks
    finally:
        await cancel_and_wait([watching])
    assert [c.published for c in seen if c.published] == [
        {ObjectRef(KIND_IMPORT, "test", "web"): theirs}]


async def test_a_member_file_that_cannot_be_looked_at_does_not_end_the_watch(
        tmp_path: Path) -> None:
    """A symlink loop among a member's files (stat fails with ELOOP, not ENOENT) is
    rejected like a bad file, the reason in the cluster's error, its last good state
    kept; once it is gone, changes are followed again."""
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out) as app:
        controller = app.controller
        assert controller is not None
        os.symlink("loop.yaml", clusters / "a" / "loop.yaml")
        await until(lambda: "loop.yaml" in (controller.clients["a"].connection.error or ""))
        assert controller.members()["a"]["stale"] is False
        (clusters / "a" / "loop.yaml").unlink()
        await until(lambda: controller.clients["a"].connection.error is None)
        await a_changes_reach_b(clusters, out)


@pytest.mark.parametrize("kind", ["fifo", "device"])
async def test_a_member_file_that_is_not_regular_is_rejected_without_being_read(
        tmp_path: Path, kind: str) -> None:
    """A FIFO among a member's files held its scan for ever on open (no writer comes),
    and the worker thread then held the controller's exit; a symlink to /dev/zero was
    read until memory ran out. Each is rejected like a bad file, named in the error."""
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out) as app:
        controller = app.controller
        assert controller is not None
        odd = clusters / "a" / "odd.yaml"
        if kind == "fifo":
            os.mkfifo(odd)
        else:
            os.symlink("/dev/zero", odd)
        await until(lambda: "odd.yaml" in (controller.clients["a"].connection.error or ""))
        assert "not a regular file" in (controller.clients["a"].connection.error or "")
        assert controller.members()["a"]["stale"] is False
        odd.unlink()
        await until(lambda: controller.clients["a"].connection.error is None)
        await a_changes_reach_b(clusters, out)


async def test_a_member_folder_that_turns_into_a_symlink_loop_goes_stale_then_recovers(
        tmp_path: Path) -> None:
    clusters, out = a_exports_to_b(tmp_path)
    async with Running(clusters, out) as app:
        controller = app.controller
        assert controller is not None
        os.rename(clusters / "a", tmp_path / "a-away")
        os.symlink("a", clusters / "a")  # a loop where the folder was
        await until(lambda: controller.members()["a"]["stale"])
        os.unlink(clusters / "a")
        os.rename(tmp_path / "a-away", clusters / "a")
        await until(lambda: not controller.members()["a"]["stale"])
        await a_changes_reach_b(clusters, out)


def test_once_with_a_member_file_that_cannot_be_looked_at_fails_with_its_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clusters, out = tmp_path / "clusters", tmp_path / "out"
    member(clusters, "a", 1)
    os.symlink("loop.yaml", clusters / "a" / "loop.yaml")
    assert once(clusters, out) == 1
    err = capsys.readouterr().err
    assert "loop.yaml" in err and "Traceback" not in err
