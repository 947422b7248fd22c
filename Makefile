VENV ?= .venv
PY := $(VENV)/bin/python
# The interpreter .venv is made from: the first of these that is Python 3.11+, can make a
# venv and has the headers the compiled data path builds against. The distribution's own
# CPython comes before whatever `python3` is on PATH: Debian's, Ubuntu's and Fedora's are
# built with PGO and LTO, like the python:3.11 image the Dockerfile uses, while pyenv and
# source builds are not unless configured so, and the data path runs mostly inside the
# interpreter (measured on one core, against Debian's 3.11.2, a plain pyenv 3.11.7 build
# cost the gateway 13 % more CPU per HTTP request and 8 % of its TCP connections/s: README,
# Development). `make PYTHON=python3.13` picks another; an existing .venv is kept until
# `make clean`.
PYTHON ?= $(shell for p in /usr/bin/python3 /usr/local/bin/python3 python3; do \
	  $$p -c 'import os, sys, sysconfig, ensurepip, venv; sys.exit(sys.version_info < (3, 11) \
	    or not os.path.exists(sysconfig.get_path("include") + "/Python.h"))' 2>/dev/null \
	  && { echo $$p; exit; }; done; echo python3)
PYTEST_ARGS ?=

.PHONY: test lint build demo bench bench-smoke bench-peers clean audit run-example

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# `make build` runs setup.py in this venv: the same setuptools floor as the build's.
	$(PY) -m pip install --quiet 'setuptools>=77'
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# Recompiles the data path (mcsproxy/compiled.py) when a compiled source changed since the
# last build; until then those modules run interpreted. MCSPROXY_COMPILE=0 builds none.
build: $(VENV)/.installed
	@$(PY) -c 'import os, shutil, sys; want = shutil.which(sys.argv[1]); \
	  have = os.path.realpath(sys._base_executable); \
	  want and os.path.realpath(want) != have and print(f"note: $(VENV) runs {have}, not " \
	    f"{os.path.realpath(want)} (PYTHON): make clean rebuilds it", file=sys.stderr)' '$(PYTHON)'
	@env -u MCSPROXY_INTERPRETED $(PY) -c 'import sys, mcsproxy.compiled as c; \
	  sys.exit(c.state()[0] != "compiled" and "$(MCSPROXY_COMPILE)" != "0")' \
	  || $(PY) setup.py --quiet build_ext --inplace

# The data-path tests run twice: compiled (what ships) and interpreted (MCSPROXY_COMPILE=0
# builds); the second run is skipped when PYTEST_ARGS picks tests.
DATA_PATH_TESTS := tests/test_http_proxy.py tests/test_http_semantics.py \
	tests/test_http_large_bodies.py tests/test_http_smuggling.py tests/test_http_retry_bodies.py \
	tests/test_proxy_tcp.py tests/test_proxy_bulk.py tests/test_limits.py tests/test_upstream_set.py \
	tests/test_upstream_balance.py tests/test_metrics_families.py tests/test_metrics_http.py \
	tests/test_writebatch.py tests/test_proxy_poller.py tests/test_proxy_ipv6.py

test: build
	$(VENV)/bin/ruff check mcsproxy controlplane tests bench setup.py
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,MCSPROXY_INTERPRETED=1 $(PY) -m pytest -q $(DATA_PATH_TESTS))

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mcsproxy controlplane tests bench setup.py

demo: $(VENV)/.installed
	$(VENV)/bin/mcsproxy demo

# Peers the benchmarks compare with (Debian packages) and the binaries that show they are there.
BENCH_APT := haproxy nginx wrk dnsperf iperf3 knot dnsdist iproute2 util-linux
BENCH_BIN := haproxy nginx wrk dnsperf iperf3 knotd dnsdist ip taskset
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BENCH_ARGS ?=
BENCH_SMOKE_OUT ?= /tmp/mcsproxy-bench-smoke

bench-peers:
	@missing=""; for b in $(BENCH_BIN); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then echo "installing peers (missing:$$missing)"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(BENCH_APT); fi

# Every benchmark (~25 min on 2 cores; BENCH_ARGS=--quick skips the 50k-service size);
# results in bench/results/<date>.md with JSON and PNG plots. After `build`: a data-path
# source edited since the last build would otherwise run (and be measured) interpreted.
bench: build bench-peers
	$(PY) bench/run_all.py $(BENCH_ARGS)

# Each benchmark in its smoke mode (seconds each), results in $(BENCH_SMOKE_OUT).
bench-smoke: build bench-peers
	$(PY) bench/run_all.py --smoke --out $(BENCH_SMOKE_OUT) $(BENCH_ARGS)

# Known vulnerabilities in the installed dependencies. Needs PyPI's JSON API (the advisory
# data); without it pip-audit reports every package as "could not be audited" and fails,
# so AUDIT_STRICT=0 (CI) reports and carries on.
AUDIT_STRICT ?= 1
audit: $(VENV)/.installed
	$(VENV)/bin/pip-audit --version >/dev/null 2>&1 || $(PY) -m pip install --quiet -e '.[audit]'
	$(VENV)/bin/pip-audit --progress-spinner off --skip-editable || \
	  { echo "pip-audit failed (vulnerabilities, or the advisory service unreachable)"; \
	    [ "$(AUDIT_STRICT)" = 0 ]; }

clean:
	rm -rf $(VENV) build *.egg-info mcsproxy/_dataplane_sources.json
	find mcsproxy -name '*.so' -delete

run-example: $(VENV)/.installed
	$(VENV)/bin/mcsproxy gateway --cluster-id cluster-a --source file:examples/gateway
