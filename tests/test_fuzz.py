"""Schemathesis against the gateway's own OpenAPI document: generated valid and invalid requests to
every operation; none may get a 5xx. A client's mistake is a 4xx, always."""

import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from epd.ops.up import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import start_cluster

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("EPD_FUZZ_EXAMPLES", "40"))  # per operation and mode; more for a deeper run


@pytest.fixture(scope="module")
def fuzzed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # a short max_tokens limit keeps each generated request quick; everything else as shipped
    c = start_cluster(tiny_model, tmp_path_factory.mktemp("fuzz"), "epd", max_tokens_limit=4)
    yield c
    c.stop()


def servable(case: schemathesis.Case) -> schemathesis.Case:
    """The generated body with what this server supports fixed (model, n, limits); the rest as generated."""
    body = case.body
    if isinstance(body, dict) and "model" in body:
        body["model"] = "tiny-qwen2-vl"
        body["n"] = 1
        for key in ("echo", "suffix", "logprobs"):
            body.pop(key, None)
        body["max_tokens"] = min(body.get("max_tokens") or 4, 4)
        if isinstance(body.get("max_completion_tokens"), int):
            body["max_completion_tokens"] = min(body["max_completion_tokens"], 4)
        if "prompt" in body:
            prompt = body["prompt"]
            body["prompt"] = (prompt[0] if isinstance(prompt, list) and prompt else prompt) or "x"
    return case


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_request_gets_a_server_error(fuzzed: Cluster, mode: schemathesis.GenerationMode) -> None:
    # (schemathesis's own pytest plugin does not run under this pytest; its strategies do, with hypothesis)
    api = schemathesis.openapi.from_url(fuzzed.base_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
        "GET /ready",
    }
    server_errors = []
    statuses: dict[str, set[int]] = defaultdict(set)
    for op in operations:
        inputs = len(op.body) + len(op.query) + len(op.path_parameters) + len(op.headers) + len(op.cookies)
        if mode is schemathesis.GenerationMode.NEGATIVE and not inputs:
            continue  # nothing to make invalid (GET /health and the like)

        strategy = op.as_strategy(generation_mode=mode)
        if mode is schemathesis.GenerationMode.POSITIVE:  # half as generated, half made servable to go deeper
            strategy = st.one_of(strategy, strategy.map(servable))

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzzed.base_url, timeout=60)
            statuses[case.path].add(response.status_code)
            if response.status_code >= 500:
                server_errors.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

        call()
    assert not server_errors, server_errors[:5]
    if mode is schemathesis.GenerationMode.POSITIVE:  # the fuzzer got through to the model, and was refused too
        assert 200 in statuses["/v1/completions"] and any(400 <= c < 500 for c in statuses["/v1/chat/completions"])
    assert not fuzzed.dead()  # and every process still runs
