"""The server's API fuzzed from its own OpenAPI description (schemathesis): whatever a token holder sends,
the answer is a clear 4xx, never a server error, and the repository stays verifiable."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings

from conftest import needed
from cryopool.repo import Operation, Repository
from cryopool.repo.population import empty_population
from cryopool.repo.server import create_app
from cryopool.repo.verify import verify

schemathesis = needed("schemathesis")

ROOT = Path(tempfile.mkdtemp(prefix="cryopool-api-fuzz-"))
_repo = Repository.init(ROOT / "pop")
_repo.commit(empty_population(), message="empty", operation=Operation(kind="init", parameters={}, software="test"),
             allow_empty=True)
TOKENS = {"writer": ["read", "write"], "reader": ["read"]}
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(str(ROOT / "pop"), tokens=TOKENS))


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    for token in ("writer", "reader", None):
        case.headers = {**(case.headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        if token is None:
            case.headers.pop("Authorization", None)
        response = case.call()
        assert response.status_code < 500, (case.method, case.formatted_path, token, response.status_code,
                                            response.text[:300])


def test_the_fuzzed_repository_still_verifies():
    assert verify(Repository.open(ROOT / "pop")).ok
