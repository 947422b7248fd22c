VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test lint demo bench bench-smoke bench-peers clean audit

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/ruff check mcsproxy controlplane tests bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mcsproxy controlplane tests bench

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

# Every benchmark (~20 min on 2 cores; BENCH_ARGS=--quick skips the 50k-service size);
# results in bench/results/<date>.md with JSON and PNG plots.
bench: $(VENV)/.installed bench-peers
	$(PY) bench/run_all.py $(BENCH_ARGS)

# Each benchmark in its smoke mode (seconds each), results in $(BENCH_SMOKE_OUT).
bench-smoke: $(VENV)/.installed bench-peers
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
	rm -rf $(VENV) build *.egg-info

run-example: $(VENV)/.installed
	$(VENV)/bin/mcsproxy gateway --cluster-id cluster-a --source file:examples/gateway
