"""Property-based requests from the server's own OpenAPI schema (schemathesis): no 5xx and no hang, whatever the
generated bodies hold. Bounded: a short context and a fixed number of examples per operation."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from server.settings import Settings
from tests.integration.conftest import SMOL_NAME, RunningServer, engine_for, serve, smol_loaded  # noqa: F401

EXAMPLES_PER_OPERATION = 60
REQUEST_SECONDS = 60


@pytest.fixture(scope="module")
def fuzzed_server(smol_loaded) -> Iterator[RunningServer]:  # noqa: F811
    engine = engine_for(smol_loaded, max_num_seqs=8)
    yield from serve(Settings(served_model_name=SMOL_NAME, max_model_len=96, grammar_timeout=10), engine)
    engine.shutdown()


def test_no_generated_request_gets_a_server_error(fuzzed_server):
    api = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    statuses: list[int] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def no_server_error(case) -> None:
            response = case.call_and_validate(base_url=fuzzed_server.url, checks=[not_a_server_error],
                                              timeout=REQUEST_SECONDS)
            statuses.append(response.status_code)

        no_server_error()
    assert len(statuses) >= 150 and max(statuses) < 500
    assert 200 in statuses  # some generated requests were valid and served, not only refused
