# The two commands of the README: `make run` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GEN := build/gen
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: run test bench chaos install proto infra-up infra-down clean distclean

run: install proto ## venv, stubs, Kafka + PostgreSQL, every service; Ctrl-C stops all
	$(PY) -m services.devstack run

test: install proto ## the same set-up, then the whole suite against the real servers
	$(PY) -m services.devstack test -- $(PYTEST_ARGS)

bench: install proto ## benchmark scripts; their output is quoted in README
	$(PY) -m services.devstack bench

infra-up: install ## Kafka + PostgreSQL only, in the background (stop with `make infra-down`)
	$(PY) -m services.devstack infra-up

infra-down: install
	$(PY) -m services.devstack infra-down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	echo "$(CURDIR)/$(GEN)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/earn_generated.pth"
	touch $@

proto: $(GEN)/.stamp

$(GEN)/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	touch $@

clean: ## stop local servers and remove all local data (.data/)
	-[ -x $(PY) ] && $(PY) -m services.devstack infra-down
	rm -rf .data

distclean: clean ## also the venv, generated code and fetched Kafka jars
	rm -rf $(VENV) build
