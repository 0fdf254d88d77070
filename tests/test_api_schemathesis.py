"""Schemathesis over the daemon's OpenAPI, every check: the document tells the truth.

Every operation of ``/openapi.json`` gets property-based requests (valid and invalid by the
schema, and the coverage phase's edge cases: missing fields, unsupported methods, requests
without the token), with the bearer token, against the app on the simulated node with one model
registered (``echo``) so that inference and plan operations reach their real code paths (half the
KServe requests name it; the document's infer example is served). Every
built-in check runs: no server error, documented status codes, content types and response
schemas, ``Allow`` on 405, the token enforced where the document says, and the schema and the
validation agreeing (negative data rejected, positive data accepted).

Positive data may still be refused for reasons a schema cannot state: registration of a model
the node does not know, or that admission control refuses (422), and inference with an input the
model cannot take (400). Those operations expect these statuses on valid data; a request the
schema allows but the validation rejects is still caught there, because its error starts with
``invalid request`` (``check_not_a_validation_error``).

20 examples per operation plus the coverage phase: ~35 s on a shared 2-core machine. The app is
built at import (schemathesis reads the schema at collection) in a temporary
directory, and closed by a module fixture.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from test_api import TOKEN, _daemon

from api.app import create_app

pytestmark = pytest.mark.slow

_DIR = Path(tempfile.mkdtemp(prefix="stgs-schemathesis-"))
_DAEMON = _daemon(_DIR)
_APP = create_app(_DAEMON.ctx)
with TestClient(_APP) as _c:
    _r = _c.post(
        "/v1/models",
        json={"name": "echo", "slo_ms": 100, "rate_rps": 50},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert _r.status_code in (201, 202), _r.text

# Valid by the schema, refused by what the schema cannot know (see the module docstring).
_SEMANTIC = {
    "POST /v1/models": "422",
    "POST /v2/models/{model}/infer": "400",
    "POST /v2/models/{model}/versions/{version}/infer": "400",
    # parameters it does not take (Triton's config override), a model it cannot load
    "POST /v2/repository/models/{name}/load": "400",
}
_ACCEPTED = ["2xx", "401", "404", "409", "429", "503"]
_CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {"enabled": True},
        # half the KServe model names are the registered model's, so that inference and its
        # metadata answer too (not DELETE's or unload's name: it would delete the model midway)
        "dictionaries": {"models": {"values": ["echo"]}},
        "parameters": {"path.model": {"dictionary": "models", "probability": 0.5}},
        "operations": [
            {
                "include-name": name,
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_ACCEPTED, status]}},
            }
            for name, status in _SEMANTIC.items()
        ],
    }
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP, config=_CONFIG)
load_all_checks()
_ALL_CHECKS = list(CHECKS.get_all())


@pytest.fixture(scope="module", autouse=True)
def _close_daemon() -> Iterator[None]:
    yield
    _DAEMON.close()
    shutil.rmtree(_DIR, ignore_errors=True)


def check_not_a_validation_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Where valid data may be refused on its meaning, it is never refused on its form."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_positive and response.status_code in (400, 422):
        error = response.json().get("error", "")
        assert not error.startswith(("invalid request", "invalid inference request")), error
    return None


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_schema(case: Any) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=_ALL_CHECKS,
        additional_checks=[check_not_a_validation_error],
    )
