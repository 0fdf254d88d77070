"""Shared test fixtures.

Unit tests never touch a real GPU: NVML initialisation fails in them as on a machine without
an NVIDIA driver (``NVMLError_LibraryNotFound``), whatever machine runs them. Tests marked
``@pytest.mark.gpu`` are exempt.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


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
