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

ROOT = Path(__file__).resolve().parent


def ext_modules() -> list:
    if os.environ.get("MCSPROXY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    # Loaded by path: the package itself cannot be imported before it is installed.
    guard = runpy.run_path(str(ROOT / "mcsproxy" / "compiled.py"))
    paths = [str(Path(*m.split(".")).with_suffix(".py")) for m in guard["MODULES"]]
    # What is compiled, so an edited source is noticed (mcsproxy/compiled.py).
    (ROOT / "mcsproxy" / guard["SOURCES_FILE"]).write_text(
        json.dumps(guard["source_digests"](), indent=1, sort_keys=True) + "\n")
    # opt_level 3 is mypyc's default; debug_level 1 keeps C line numbers for gdb/perf.
    # One group under a fixed name: its shared library lands inside the package
    # (mcsproxy/_dataplane__mypyc.*.so), not at the top level under a hash.
    return mypycify(paths, opt_level="3", debug_level="1", group_name="mcsproxy._dataplane")


setup(ext_modules=ext_modules())
