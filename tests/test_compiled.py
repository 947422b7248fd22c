"""The mypyc build of the data path, and the guard that keeps a stale build from running."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcsproxy import compiled

ROOT = Path(__file__).resolve().parents[1]


def fake_package(tmp_path: Path) -> Path:
    """A package directory holding the compiled modules' sources, nothing built yet."""
    package = tmp_path / "mcsproxy"
    for module in compiled.MODULES:
        source = compiled.source_path(module, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
    return package


def build(package: Path) -> None:
    """What setup.py leaves behind: an extension beside each source, and their digests."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for module in compiled.MODULES:
        compiled.source_path(module, package).with_suffix(suffix).write_bytes(b"\x7fELF")
    (package / compiled.SOURCES_FILE).write_text(json.dumps(compiled.source_digests(package)))


def test_state_follows_what_was_compiled(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.INTERPRETED_ENV, raising=False)
    package = fake_package(tmp_path)
    kind, why = compiled.state(package)
    assert (kind, why.split(" (")[0]) == ("interpreted", "not compiled")

    build(package)
    assert compiled.state(package) == ("compiled", "mypyc")

    # A checkout or an install rewrites files in any order: a new mtime alone is no change.
    wire = compiled.source_path("mcsproxy.http.wire", package)
    os.utime(wire, (wire.stat().st_atime, wire.stat().st_mtime + 60))
    assert compiled.state(package) == ("compiled", "mypyc")

    wire.write_text("NAME = 'edited'\n")
    kind, why = compiled.state(package)
    assert kind == "interpreted" and why.startswith("wire.py changed since it was compiled")

    build(package)  # `make build`
    assert compiled.state(package)[0] == "compiled"

    monkeypatch.setenv(compiled.INTERPRETED_ENV, "1")
    assert compiled.state(package) == ("interpreted", "MCSPROXY_INTERPRETED is set")
    monkeypatch.setenv(compiled.INTERPRETED_ENV, "0")
    assert compiled.state(package)[0] == "compiled"

    # A build of another module list (a module taken off it, or one added): the group's
    # code calls the modules of its own list natively.
    record = json.loads((package / compiled.SOURCES_FILE).read_text())
    (package / compiled.SOURCES_FILE).write_text(json.dumps(
        {**record, "mcsproxy.proxy.udp": "0" * 64}))
    kind, why = compiled.state(package)
    assert kind == "interpreted" and why.startswith("the list of compiled modules changed")

    monkeypatch.delenv(compiled.INTERPRETED_ENV)
    build(package)
    (package / compiled.SOURCES_FILE).unlink()
    assert compiled.state(package)[0] == "interpreted"
    # One extension missing means no build at all: the group is compiled together.
    build(package)
    extension = compiled.extension_path(compiled.MODULES[-1], package)
    assert extension is not None
    extension.unlink()
    assert compiled.state(package)[0] == "interpreted"


def test_finder_loads_sources_unless_their_build_is_current(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    build(package)
    # An extension left by a build of a revision that compiled one more module.
    leftover = compiled.source_path("mcsproxy.config", package)
    leftover.write_text("NAME = 'config'\n")
    leftover.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"\x7fELF")
    current = compiled.SourceFirstFinder(frozenset(compiled.MODULES), package)
    spec = current.find_spec("mcsproxy.config", None)
    assert spec is not None and spec.origin == str(leftover)
    assert current.find_spec("mcsproxy.http.server", None) is None  # the extension loads
    assert current.find_spec("mcsproxy.http", None) is None  # a package: the normal way
    assert current.find_spec("json", None) is None
    stale = compiled.SourceFirstFinder(frozenset(), package)
    spec = stale.find_spec("mcsproxy.http.server", None)
    assert spec is not None and spec.origin == str(
        compiled.source_path("mcsproxy.http.server", package))


def loaded(interpreted: str | None) -> list[str]:
    """The state and the loader of each compiled module, in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != compiled.INTERPRETED_ENV}
    if interpreted is not None:
        env[compiled.INTERPRETED_ENV] = interpreted
    code = ("import importlib, mcsproxy.compiled as c\n"
            "print(c.STATE)\n"
            "for m in c.MODULES:\n"
            "    print(type(importlib.import_module(m).__spec__.loader).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=ROOT, env=env)
    return out.stdout.split()


def test_interpreted_mode_loads_every_module_from_source() -> None:
    assert loaded("1") == \
        ["interpreted"] + ["SourceFileLoader"] * len(compiled.MODULES)


@pytest.mark.skipif(os.environ.get("MCSPROXY_COMPILE") == "0",
                    reason="built with MCSPROXY_COMPILE=0: nothing is compiled")
def test_the_build_under_test_is_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make test` runs the compiled data path, as the image ships it: a build that
    silently fell back to the sources would test something else."""
    monkeypatch.delenv(compiled.INTERPRETED_ENV, raising=False)
    assert compiled.state() == ("compiled", "mypyc"), "run `make build`"
    assert loaded(None) == ["compiled"] + ["ExtensionFileLoader"] * len(compiled.MODULES)


def test_the_readme_names_every_compiled_module() -> None:
    """README's Development section listed the compiled sources without
    mcsproxy/proxy/poller.py, which mypyc has compiled since the TCP proxy got an epoll
    of its own: an edit to it is an edit to compiled code (mypy-clean, `make build`)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Compiled data path.**"):]
    section = section[:section.index("\n\n")]
    named = set()
    for module in compiled.MODULES:
        path = compiled.source_path(module, ROOT / "mcsproxy").relative_to(ROOT)
        # The paragraph names a module by its path, or by its file name after a
        # sibling's path in the same package.
        if f"`{path}`" in section or (f"`{path.name}`" in section
                                      and f"`{path.parent}/" in section):
            named.add(module)
    assert sorted(set(compiled.MODULES) - named) == []
