"""Which modules mypyc compiles, and the guard that keeps a stale build from running.

setup.py compiles MODULES with mypyc (bench/results/http.md: about a third fewer
instructions per HTTP request) and records each source's SHA-256 in SOURCES_FILE. The
extension modules sit beside their sources, and Python imports an extension before a
.py of the same name, so in a checkout a build older than an edited source would run
the old code without a word. `install` puts a finder first on sys.meta_path that loads
every compiled module from its source when any source differs from what was compiled
(they are one mypyc group and call each other natively, so a mix is not possible), or
when MCSPROXY_INTERPRETED=1 asks for it (cProfile sees into interpreted code only).
Content, not mtimes: an install or a checkout writes files in any order. An extension of
a module not in MODULES (left by a build of another revision) is never loaded either.

This module must import nothing from mcsproxy: setup.py loads it by path before the
package is installed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# The HTTP and TCP data paths, the endpoint choice and the counters they bump: per-request
# and per-connection work, nothing else. The TCP proxy (proxy/tcp.py, context.py) was left
# out once on an A/B run that two gateway processes of the same code differ by as much;
# with both started anew each repetition it gains 3.2-3.4 % connections per second (see
# the commit that put it back).
MODULES = (
    "mcsproxy.http.server",
    "mcsproxy.http.pool",
    "mcsproxy.http.wire",
    "mcsproxy.http.engine",
    "mcsproxy.upstream.upstream_set",
    "mcsproxy.upstream.balance",
    "mcsproxy.observability.stats",
    "mcsproxy.proxy.tcp",
    "mcsproxy.proxy.context",
    "mcsproxy.proxy.poller",
    "mcsproxy.writebatch",
)
INTERPRETED_ENV = "MCSPROXY_INTERPRETED"
PACKAGE_DIR = Path(__file__).resolve().parent
# Written by setup.py next to this file: {module: sha256 of the source compiled}.
SOURCES_FILE = "_dataplane_sources.json"


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    return package_dir.parent.joinpath(*module.split(".")).with_suffix(".py")


def extension_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    source = source_path(module, package_dir)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def source_digests(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{module: sha256 of its source} for MODULES, as setup.py records them."""
    return {m: hashlib.sha256(source_path(m, package_dir).read_bytes()).hexdigest()
            for m in MODULES}


def state(package_dir: Path = PACKAGE_DIR) -> tuple[str, str]:
    """("compiled" | "interpreted", why): what the next import of MODULES will load."""
    if os.environ.get(INTERPRETED_ENV, "") not in ("", "0"):
        return "interpreted", f"{INTERPRETED_ENV} is set"
    if any(extension_path(m, package_dir) is None for m in MODULES):
        return "interpreted", "not compiled (built with MCSPROXY_COMPILE=0 or without mypyc)"
    try:
        built = json.loads((package_dir / SOURCES_FILE).read_text())
    except (OSError, ValueError) as e:
        return "interpreted", f"no record of the compiled sources ({e})"
    if sorted(built) != sorted(MODULES):
        # The group was compiled together: a module taken out still runs as native code
        # inside the others, against its now interpreted class.
        return "interpreted", ("the list of compiled modules changed since the build; "
                               "`make build` recompiles")
    stale = []
    for module in MODULES:
        source = source_path(module, package_dir)
        # A missing source is fine: a wheel may ship the extensions alone.
        if source.exists() and \
                hashlib.sha256(source.read_bytes()).hexdigest() != built.get(module):
            stale.append(source.name)
    if stale:
        return "interpreted", (f"{', '.join(stale)} changed since it was compiled; "
                               "`make build` recompiles")
    return "compiled", "mypyc"


class SourceFirstFinder:
    """Finds every mcsproxy module as its plain source file, ahead of any extension,
    except MODULES while their build is current (`compiled`): an extension left over
    from an older build, or from a module no longer in MODULES, never runs."""

    def __init__(self, compiled: frozenset[str], package_dir: Path = PACKAGE_DIR) -> None:
        self.compiled = compiled
        self.package_dir = package_dir

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if not fullname.startswith("mcsproxy.") or fullname in self.compiled:
            return None
        source = source_path(fullname, self.package_dir)
        if not source.exists():  # a package (its __init__.py), or a wheel without sources
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def interpreter() -> str:
    """The CPython running this process, for the start-up log and /api/status: the same
    data path costs ~12 % less CPU on a PGO+LTO build (distribution packages, the python
    images) than on a plain source build such as pyenv's default (README, Development)."""
    return f"{platform.python_version()} ({os.path.realpath(sys.executable)})"


def install() -> str:
    """Called once by mcsproxy/__init__.py; returns "compiled" or "interpreted"."""
    global STATE, REASON
    STATE, REASON = state()
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, SourceFirstFinder)]
    sys.meta_path.insert(0, SourceFirstFinder(
        frozenset(MODULES) if STATE == "compiled" else frozenset()))
    return STATE


STATE = "interpreted"
REASON = "not checked yet"
