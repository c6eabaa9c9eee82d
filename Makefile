# All set-up on a fresh machine is in these targets: they create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install proto bench clean

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

# Regenerate the committed gRPC stubs after editing proto/xmodal/v1/*.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/xmodal/v1/xmodal.proto

bench: $(STAMP)
	$(BIN)/python bench/index_throughput.py
	$(BIN)/python bench/search_latency.py

clean:
	rm -rf $(VENV) build *.egg-info
