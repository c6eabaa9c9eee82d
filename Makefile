# All set-up on a fresh machine is in these targets: they create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install proto bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xmodal demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint and format check) and mypy. mypy reads the package through a link tree that
# maps the folders to their xmodal.* names, as pyproject's package-dir does for installs.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/xmodal
	for part in indexer server client; do ln -s $(CURDIR)/$$part $(TYPECHECK)/xmodal/$$part; done
	ln -s $(CURDIR)/proto/xmodal/v1 $(TYPECHECK)/xmodal/v1
	ln -s $(CURDIR)/bench $(TYPECHECK)/bench
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml xmodal bench

# Debian's chromium and chromedriver for tests/test_web.py's browser test (skipped without
# them, except under CI=true). Needs root or sudo; does nothing when both are installed.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver are installed"; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

# Regenerate the committed gRPC stubs after editing proto/xmodal/v1/*.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/xmodal/v1/xmodal.proto

bench: $(STAMP)
	$(BIN)/python bench/index_throughput.py
	$(BIN)/python bench/search_latency.py

clean:
	rm -rf $(VENV) build *.egg-info
