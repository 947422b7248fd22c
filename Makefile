VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/ruff check mcsproxy controlplane tests bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mcsproxy controlplane tests bench

demo: $(VENV)/.installed
	$(VENV)/bin/mcsproxy demo

clean:
	rm -rf $(VENV) build *.egg-info

run-example: $(VENV)/.installed
	$(VENV)/bin/mcsproxy gateway --cluster-id cluster-a --source file:examples/gateway
