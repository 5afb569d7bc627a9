"""Fused RMSNorm: one pass per row for the statistics, one for the output."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from refimpl import ops as spec

from ._dtypes import acc_np, check_dtype, empty, ld, like, parallel, raw, rnd, same_accum, st
from ._vec import dot_1x1


@numba.njit(cache=True)
def _rms_row(x, w, eps, r, out):
    """out[r] = round(w * round(x[r] / sqrt(mean(x[r]^2) + eps))).  # [R, H], [H] -> [R, H]"""
    H = x.shape[1]
    ss = dot_1x1(x, r * H, 0, x, r * H, 0, H)[0]       # sum of squares, lane order
    inv = like(1.0, ss) / np.sqrt(ss / like(H, ss) + eps)
    for i in range(H):
        n = rnd(ld(x, (r, i)) * inv, x)                 # rounded before the weight
        st(out, (r, i), ld(w, i) * n)


@numba.njit(parallel=True, cache=True)
def _rms_norm(x, w, eps, par, out):
    if par:
        for r in prange(x.shape[0]):
            _rms_row(x, w, eps, r, out)
    else:
        for r in range(x.shape[0]):
            _rms_row(x, w, eps, r, out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = round(weight * round(x / sqrt(mean(x^2) + eps))), statistics in the accumulation
    dtype, as `refimpl.ops.rms_norm`.

    # [..., H], [H] -> [..., H]
    Differs from the spec only in the order of the sum of squares (16 float32 lanes, then a
    fixed tree, instead of NumPy's pairwise sum): the inverse RMS agrees to about 1 ulp.
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    check_dtype(x, "rms_norm")
    if weight.shape != x.shape[-1:] or not same_accum(x, weight):
        return spec.rms_norm(x, weight, eps)
    H = x.shape[-1]
    out, out_raw = empty(x.shape, x.dtype)
    if x.size:
        _rms_norm(raw(x).reshape(-1, H), raw(weight), acc_np(x.dtype).type(eps),
                  parallel(x.size), out_raw.reshape(-1, H))
    return out
