# The two commands of the README: `make run` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GEN := build/gen
PROTOS := $(shell find protos -name '*.proto' | sort)
# Tools the suite runs (buf, prometheus, promtool), pinned, in a project-local folder.
TOOLS := build/tools
BUF_VERSION := v1.75.0
# Debian bookworm's prometheus package: prometheus and promtool, static binaries. Only
# the two binaries are taken out of the .deb (no system install, no service started).
PROMETHEUS_DEB := 2.42.0+ds-5+deb12u1
# ghz, the gRPC load generator of `make load`.
GHZ_VERSION := v0.93.0

.PHONY: run test bench load chaos install proto client tools infra-up infra-down clean distclean

run: install proto ## venv, stubs, Kafka + PostgreSQL, every service; Ctrl-C stops all
	$(PY) -m services.devstack run

test: install proto tools ## the same set-up, then the whole suite against the real servers
	$(PY) -m services.devstack test -- $(PYTEST_ARGS)

bench: install proto ## benchmark scripts; their output is quoted in README
	$(PY) -m services.devstack bench

load: install proto tools ## ghz against Subscribe and Redeem, then a 10-minute mixed soak; quoted in README
	$(PY) -m services.devstack load -- $(LOAD_ARGS)

chaos: install proto ## N seeded chaos runs (SIGKILL at seeded moments, compared with calm runs); SEED=s replays one
	$(PY) -m tests.chaos.run_chaos --seeds $(or $(SEEDS),1) $(if $(SEED),--seed $(SEED)) $(CHAOS_ARGS)

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
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=quiet:$(GEN) $(PROTOS)
	touch $@

# The client package for internal consumers (protos/python): its stubs generated from
# protos/ into build/client, the wheel into build/dist; offline (pip wheel, no isolation).
client: install ## earn-client wheel in build/dist: pip install build/dist/earn_client-*.whl
	$(PY) protos/python/build_client.py --stage build/client --dist build/dist

tools: $(TOOLS)/.buf-$(BUF_VERSION) $(TOOLS)/.prometheus-$(PROMETHEUS_DEB) $(TOOLS)/.ghz-$(GHZ_VERSION) ## buf, prometheus, promtool, ghz in build/tools

$(TOOLS)/.buf-$(BUF_VERSION):
	mkdir -p $(TOOLS)
	GOBIN="$(CURDIR)/$(TOOLS)" go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
	rm -f $(TOOLS)/.buf-* && touch $@

$(TOOLS)/.ghz-$(GHZ_VERSION):
	mkdir -p $(TOOLS)
	GOBIN="$(CURDIR)/$(TOOLS)" go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)
	rm -f $(TOOLS)/.ghz-* && touch $@

$(TOOLS)/.prometheus-$(PROMETHEUS_DEB):
	rm -rf $(TOOLS)/deb && mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && { apt-get download prometheus=$(PROMETHEUS_DEB) 2>/dev/null \
	  || { apt-get update -qq && apt-get download prometheus=$(PROMETHEUS_DEB); }; }
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root
	install -m 0755 $(TOOLS)/deb/root/usr/bin/prometheus $(TOOLS)/deb/root/usr/bin/promtool $(TOOLS)/
	rm -rf $(TOOLS)/deb $(TOOLS)/.prometheus-* && touch $@

clean: ## stop local servers and remove all local data (.data/)
	-[ -x $(PY) ] && $(PY) -m services.devstack infra-down
	rm -rf .data

distclean: clean ## also the venv, generated code and fetched Kafka jars
	rm -rf $(VENV) build
