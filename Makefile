# Two entry points: `make serve` and `make test`. Both set up on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: serve test lint clean

serve: $(STAMP)
	$(VENV)/bin/epd up $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

$(STAMP): pyproject.toml ops/bind_shim.c
	@if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then \
	  echo "installing libibverbs1 (Mooncake needs it)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1; fi
	@if ! command -v cc >/dev/null; then \
	  echo "installing a C compiler (for ops/bind_shim.c: Mooncake's listeners on EPD_BIND_HOST)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; fi
	@if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing pulls a CUDA build onto a CPU machine
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,test]"
	cc -O2 -shared -fPIC -o $(VENV)/lib/epd_bind_shim.so ops/bind_shim.c -ldl
	touch $(STAMP)

clean:
	rm -rf $(VENV) .epd .pytest_cache
