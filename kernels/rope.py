"""Rotate-half RoPE applied to q or k in one pass, into a fresh output."""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.numerics import round_to

from ._dtypes import acc_np, check_dtype, empty, ld, parallel, raw, rnd, st
from ._jit import driver, jit


@jit()
def _rope_row(x, c, s, t, out):
    """out[t] = round(round(x[t] * c[t]) + round(rotate_half(x[t]) * s[t])).

    # x [T, heads, D], c/s [T, D] in x's accumulation dtype -> out [T, heads, D]
    c and s are rounded to x's storage dtype here (rnd), as the spec's round_to does.
    """
    NH, D = x.shape[1], x.shape[2]
    d2 = D // 2
    for h in range(NH):
        for i in range(d2):      # rotate_half: -x[i + d/2] on the first half
            y = rnd(ld(x, (t, h, i)) * rnd(c[t, i], x), x) \
                + rnd(-ld(x, (t, h, i + d2)) * rnd(s[t, i], x), x)
            st(out, (t, h, i), y)
        for i in range(d2, D):   # ... and x[i - d/2] on the second
            y = rnd(ld(x, (t, h, i)) * rnd(c[t, i], x), x) \
                + rnd(ld(x, (t, h, i - d2)) * rnd(s[t, i], x), x)
            st(out, (t, h, i), y)


@driver
def _rope(x, c, s, out):
    for t in prange(x.shape[0]):
        _rope_row(x, c, s, np.int64(t), out)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE with the spec's cast points (exactly `refimpl.ops.apply_rope`).

    # x [T, heads, D], cos/sin [T, D] -> [T, heads, D]
    cos and sin are rounded to x's dtype first: in the kernel when they come in x's
    accumulation dtype (as the model passes them), else by the spec's own `round_to` (a
    float64 table rounds straight to bfloat16, not through float32).
    """
    x = np.asarray(x)
    check_dtype(x, "apply_rope")
    cos, sin = np.asarray(cos), np.asarray(sin)
    if x.ndim != 3 or x.shape[-1] % 2 or cos.shape != (x.shape[0], x.shape[2]) \
            or sin.shape != cos.shape:
        return spec.apply_rope(x, cos, sin)
    acc = acc_np(x.dtype)
    if cos.dtype == acc and sin.dtype == acc:
        c, s = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
    else:
        c = np.ascontiguousarray(round_to(cos, x.dtype), dtype=acc)
        s = np.ascontiguousarray(round_to(sin, x.dtype), dtype=acc)
    out, out_raw = empty(x.shape, x.dtype)
    if x.size:
        _rope[parallel(x.size)](raw(x), c, s, out_raw)
    return out
