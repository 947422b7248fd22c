"""Compiles the data path's modules with mypyc; everything else stays interpreted.

MCSPROXY_COMPILE=0 builds a pure-Python package (the same code, slower: see
bench/results/http.md). Metadata lives in pyproject.toml; this file only adds the
extension modules, which setuptools cannot declare there.
"""

import json
import os
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Loaded by path: the package itself cannot be imported before it is installed.
GUARD = runpy.run_path(str(ROOT / "mcsproxy" / "compiled.py"))
# Read before compiling: a source edited during the build then differs from the record,
# and loads interpreted (mcsproxy/compiled.py), never the other way round.
DIGESTS = GUARD["source_digests"]()


class BuildExtRecordingSources(build_ext):
    """Writes what was compiled (mcsproxy/_dataplane_sources.json) only once every
    extension is built: a failed build must leave the previous record, which the edited
    sources no longer match."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        record = json.dumps(DIGESTS, indent=1, sort_keys=True) + "\n"
        targets = {ROOT / "mcsproxy"} if self.inplace else {Path(self.build_lib) / "mcsproxy"}
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            (target / GUARD["SOURCES_FILE"]).write_text(record)


def ext_modules() -> list:
    if os.environ.get("MCSPROXY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    paths = [str(Path(*m.split(".")).with_suffix(".py")) for m in GUARD["MODULES"]]
    # opt_level 3 is mypyc's default; debug_level 1 keeps C line numbers for gdb/perf.
    # One group under a fixed name: its shared library lands inside the package
    # (mcsproxy/_dataplane__mypyc.*.so), not at the top level under a hash.
    return mypycify(paths, opt_level="3", debug_level="1", group_name="mcsproxy._dataplane")


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExtRecordingSources})
