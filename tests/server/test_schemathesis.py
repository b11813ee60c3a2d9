"""Property tests from the OpenAPI document: whatever Schemathesis sends (valid or not), the
server never answers 5xx and every response matches the document."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi
from starlette.applications import Starlette

from paymaster.authority import Authority
from paymaster.bootstrap import create_service_key
from paymaster.server.openapi import document

from .conftest import ADMIN

MAX_EXAMPLES = 30

# The document the server serves (test_admin_api pins GET /openapi.json to it). Loaded
# here rather than through schemathesis.pytest.from_fixture, which pytest 9 breaks.
schema = schemathesis.openapi.from_dict(document())
schema.config.generation.update(max_examples=MAX_EXAMPLES)


@pytest.fixture(autouse=True)
def _stop_lifespans() -> Iterator[None]:
    yield
    # schemathesis starts the app's lifespan (the sweeper) and keeps it; stop it with the test
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_responses_match_the_document(
    case: schemathesis.Case, app: Starlette, authority: Authority
) -> None:
    headers = dict(ADMIN)
    if case.operation.path == "/v1/reservations":
        # a service key gets a reserve past authentication, into parsing and the budgets
        headers = {"Authorization": f"Bearer {create_service_key(authority, 'team:fuzz')}"}
    case.call_and_validate(
        app=app,
        headers=headers,
        checks=[
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.status_code_conformance,
            schemathesis.checks.content_type_conformance,
            schemathesis.checks.response_schema_conformance,
        ],
    )
