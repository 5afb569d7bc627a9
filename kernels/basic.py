"""Residual add."""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec

from ._dtypes import check_dtype, empty, ld, parallel, raw, same_accum, st
from ._jit import driver


@driver
def _add(x, y, out):
    for i in prange(x.size):
        st(out, np.int64(i), ld(x, np.int64(i)) + ld(y, np.int64(i)))


def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residual add: round(x + y) in x's dtype, as `refimpl.ops.add` (bit-exact).

    # [T, H], [T, H] -> [T, H]
    """
    x, y = np.asarray(x), np.asarray(y)
    check_dtype(x, "add")
    if x.shape != y.shape or not same_accum(x, y):
        return spec.add(x, y)
    out, out_raw = empty(x.shape, x.dtype)
    if x.size:
        _add[parallel(x.size)](raw(x).reshape(-1), raw(y).reshape(-1), out_raw.reshape(-1))
    return out
