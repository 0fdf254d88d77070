"""Shared test fixtures.

Unit tests never touch a real GPU: NVML initialisation fails in them as on a machine without
an NVIDIA driver (``NVMLError_LibraryNotFound``), whatever machine runs them. Tests marked
``@pytest.mark.gpu`` are exempt.

Tests plan on the shipped SYNTHETIC example profiles (``STGS_PROFILES=example``): they cover
every catalog SKU (L4, A100, H200, ...), where the measured set covers the GPUs profiled so far.
Tests marked ``@pytest.mark.shipped_profiles`` run on the real default (the measured set).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# Module- and session-scoped fixtures read profiles before any function-scoped fixture runs.
os.environ["STGS_PROFILES"] = "example"
os.environ.pop("STGS_INTERFERENCE", None)


@pytest.fixture(autouse=True)
def _example_profiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STGS_INTERFERENCE", raising=False)
    if request.node.get_closest_marker("shipped_profiles") is not None:
        monkeypatch.delenv("STGS_PROFILES", raising=False)
    else:
        monkeypatch.setenv("STGS_PROFILES", "example")


@pytest.fixture(autouse=True)
def _forbid_nvml_init(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    try:
        import pynvml
    except ImportError:  # nothing to forbid
        yield
        return

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", forbidden)
    if hasattr(pynvml, "nvmlInitWithFlags"):
        monkeypatch.setattr(pynvml, "nvmlInitWithFlags", forbidden)
    yield


# tritonclient's clients for a test module's ``daemon`` fixture (an api.launch.LocalDaemon)
@pytest.fixture(scope="module")
def http_c(daemon: Any) -> Iterator[Any]:
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{daemon.port}", network_timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_c(daemon: Any) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url=f"127.0.0.1:{daemon.grpc_port}")
    yield c
    c.close()
