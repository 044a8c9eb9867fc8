"""The server's API fuzzed from its own OpenAPI description (schemathesis): whatever a token holder sends,
the answer is a clear 4xx, never a server error; every answer is one the description declares (status codes,
content types, headers, bodies), so clients can be generated from it; requests the description forbids are
refused; and the repository stays verifiable."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings

from conftest import needed
from cryopool.repo import Operation, Repository
from cryopool.repo.population import empty_population
from cryopool.repo.server import OBJECT, PACK, create_app
from cryopool.repo.verify import verify

schemathesis = needed("schemathesis")
checks = schemathesis.checks

ROOT = Path(tempfile.mkdtemp(prefix="cryopool-api-fuzz-"))
_repo = Repository.init(ROOT / "pop")
_repo.commit(empty_population(), message="empty", operation=Operation(kind="init", parameters={}, software="test"),
             allow_empty=True)
TOKENS = {"writer": ["read", "write"], "reader": ["read"]}
schemathesis.serializer.alias(PACK, OBJECT)  # packs are bytes, as object files are
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(str(ROOT / "pop"), tokens=TOKENS))
# Not asserted: that every schema-valid request is accepted. An object is accepted only if it hashes to its id
# and a ref only if it names a stored commit, which no schema can say.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection,
          checks.unsupported_method, checks.allow_header_conformance, checks.missing_required_header]


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_one_the_api_description_declares(case):
    for token in ("writer", "reader", None):
        case.headers = {**(case.headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        if token is None:
            case.headers.pop("Authorization", None)
        response = case.call()
        case.validate_response(response, checks=CHECKS)


def test_the_fuzzed_repository_still_verifies():
    assert verify(Repository.open(ROOT / "pop")).ok
