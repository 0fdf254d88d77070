"""Runtime noise: each batch's latency factor drawn from what the runtime measured.

The profiler's spread is that of CUDA-graph replays alone (p99 / median about 1.005 on the
shipped H100 profiles); the runtime's per batch is far wider on a busy host (its worker loop,
the neighbours' launches, the Python process around the graph). ``simulator.noise: runtime``
draws each batch's factor from an empirical distribution of the runtime's own factors instead
of the profile's lognormal.

File (JSON, written by ``benchmarks/fidelity.py --fit-noise OUT RUNS...``)::

    {"format": "stgs.runtime-noise/v1",
     "source": "what it was measured on (free text)",
     "factors": {"resnet50": [0.93, 0.97, ..., 1.41], "*": [...]}}

``factors``: per profile name, a sorted list (quantiles) of ``measured runner time less the
copies / predicted GPU latency``, each (model, partition, bucket) group divided by its median
(median 1: the level is the profile's, or the calibration's, not the noise's). ``"*"`` (optional)
serves profiles without their own list. Every list has 1 to 100,000 finite factors > 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stgs.errors import ConfigError

RUNTIME_NOISE_FORMAT = "stgs.runtime-noise/v1"
FALLBACK = "*"
MAX_FACTORS = 100_000


class RuntimeNoiseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: Literal["stgs.runtime-noise/v1"]
    source: str = ""
    factors: dict[str, list[float]] = Field(min_length=1)

    @field_validator("factors")
    @classmethod
    def _check(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, fs in v.items():
            if not name:
                raise ValueError("an empty profile name")
            if not 1 <= len(fs) <= MAX_FACTORS:
                raise ValueError(f"{name!r}: {len(fs)} factors (1 to {MAX_FACTORS:,})")
            bad = [f for f in fs if not (math.isfinite(f) and f > 0)]
            if bad:
                raise ValueError(f"{name!r}: factors must be finite and > 0 (got {bad[0]!r})")
        return {k: sorted(fs) for k, fs in v.items()}


def load_runtime_noise(path: str | Path) -> dict[str, tuple[float, ...]]:
    """Per profile name (``"*"``: the rest), the runtime's factors; :class:`ConfigError` with
    the file and what is wrong for a file that cannot be read or is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"runtime_noise {p}: cannot read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"runtime_noise {p}: not JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("format") != RUNTIME_NOISE_FORMAT:
        raise ConfigError(
            f"runtime_noise {p}: format {data.get('format')!r}, expected {RUNTIME_NOISE_FORMAT!r}"
        )
    try:
        spec = RuntimeNoiseFile.model_validate(data)
    except ValidationError as exc:
        errs = "; ".join(
            ".".join(str(x) for x in e["loc"]) + ": " + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"runtime_noise {p}: {errs}") from exc
    return {k: tuple(v) for k, v in spec.factors.items()}


def factors_for(factors: Mapping[str, Sequence[float]], profile: str) -> tuple[float, ...]:
    """The factors a profile draws from (its own, else ``"*"``), or ConfigError."""
    fs = factors.get(profile)
    if fs is None:
        fs = factors.get(FALLBACK)
    if fs is None:
        have = ", ".join(sorted(factors)) or "none"
        raise ConfigError(
            f"noise runtime: no factors for profile {profile!r} (the file has: {have};"
            f" add {profile!r} or a {FALLBACK!r} entry)"
        )
    return tuple(float(f) for f in fs)


def quantiles(values: Sequence[float], k: int = 1000) -> list[float]:
    """``k`` evenly spaced quantiles (midpoints) of ``values``, rounded to 5 digits: the file
    stays small and draws from it follow the empirical distribution."""
    import numpy as np

    x = np.sort(np.asarray(values, dtype=np.float64))
    if len(x) <= k:
        return [round(float(v), 5) for v in x]
    q = (np.arange(k) + 0.5) / k
    return [round(float(v), 5) for v in np.quantile(x, q)]


def write_runtime_noise(
    path: str | Path, factors: Mapping[str, Sequence[float]], source: str
) -> dict[str, object]:
    """Write a runtime-noise file (checked by loading it back); returns what was written."""
    out: dict[str, object] = {
        "format": RUNTIME_NOISE_FORMAT,
        "source": source,
        "factors": {k: list(v) for k, v in factors.items()},
    }
    Path(path).write_text(json.dumps(out, indent=None, separators=(",", ":")) + "\n")
    load_runtime_noise(path)
    return out
