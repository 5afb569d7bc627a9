"""Shared fixtures: seeded generators, tolerance helpers, the CLI, candidate verdicts."""

import subprocess
import sys

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


def cli(*args, check_rc=None):
    """`python -m refimpl ARGS` in a subprocess (its exit status checked when check_rc)."""
    p = subprocess.run([sys.executable, "-m", "refimpl", *args], capture_output=True,
                       text=True)
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr
    return p


def one_line_error(p) -> str:
    """The one `error:` line of a run that must exit 2 without a traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def candidate_verdicts(case_dir, directory, arrays) -> dict:
    """Write a candidate's outputs as NAME.npy (bfloat16 as its uint16 bits) into
    `directory`, compare them with the golden case and return {output: verdict}."""
    from refimpl.golden.compare import Options, compare_paths
    from refimpl.numerics import bfloat16

    directory.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        a = np.asarray(a)
        np.save(directory / f"{name}.npy", a.view(np.uint16) if a.dtype == bfloat16 else a)
    report = compare_paths(str(case_dir), str(directory), Options())
    return {o["name"]: o["verdict"] for c in report["cases"] for o in c["outputs"]}
