"""Schemathesis over the daemon's OpenAPI: no generated request may get a 5xx.

Every operation of ``/openapi.json`` gets property-based requests (valid and invalid by the
schema), with the bearer token, against the app on the simulated node with one model
registered (``echo``) so that inference and plan operations reach their real code paths.
The app is built at import (schemathesis reads the schema at collection) in a temporary
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

schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@pytest.fixture(scope="module", autouse=True)
def _close_daemon() -> Iterator[None]:
    yield
    _DAEMON.close()
    shutil.rmtree(_DIR, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_errors(case: Any) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
