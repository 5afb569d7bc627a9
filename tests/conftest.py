"""Shared fixtures: seeded generators and tolerance helpers."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def near_midpoint(values, dtype, ulps: int = 2) -> np.ndarray:
    """Where a float32 value (given in float32 or float64) lies within `ulps` float32 ulps of
    a rounding midpoint of the half-precision `dtype`: there a last-bit difference of a float32
    transcendental (exp, cos) between two correct libraries decides the rounding, not the
    cast point. # [...] -> [...] bool"""
    r = np.asarray(values, dtype=np.float64)
    ulp = np.spacing(np.abs(r).astype(np.float32)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        low = (r - ulps * ulp).astype(np.float32).astype(dtype)
        high = (r + ulps * ulp).astype(np.float32).astype(dtype)
    return low.astype(np.float64) != high.astype(np.float64)
