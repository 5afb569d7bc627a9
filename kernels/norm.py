"""Fused RMSNorm (one pass per row for the statistics, one for the output) and the fused
residual add + RMSNorm of the serving path."""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec

from ._dtypes import acc_np, check_dtype, empty, ld, like, parallel, raw, rnd, same_accum, st
from ._jit import driver, jit
from ._vec import dot_1x1


@jit()
def _rms_row(x, w, eps, r, out):
    """out[r] = round(w * round(x[r] / sqrt(mean(x[r]^2) + eps))); returns the inverse RMS.
    # [R, H], [H] -> [R, H]"""
    H = x.shape[1]
    ss = dot_1x1(x, r * H, 0, x, r * H, 0, H)[0]       # sum of squares, lane order
    inv = like(1.0, ss) / np.sqrt(ss / like(H, ss) + eps)
    for i in range(H):
        n = rnd(ld(x, (r, i)) * inv, x)                 # rounded before the weight
        st(out, (r, i), ld(w, i) * n)
    return inv


@driver
def _rms_norm(x, w, eps, out):
    for r in prange(x.shape[0]):
        _rms_row(x, w, eps, np.int64(r), out)


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
        _rms_norm[parallel(x.size)](raw(x).reshape(-1, H), raw(weight), acc_np(x.dtype).type(eps),
                                    out_raw.reshape(-1, H))
    return out


@jit()
def _add_rms_row(x, res, w, eps, r, x_sum, out, rstd):
    """x_sum[r] = round(x[r] + res[r]); out[r] = rms_norm(x_sum[r]); rstd[r] its inverse RMS."""
    for i in range(x.shape[1]):
        st(x_sum, (r, i), ld(x, (r, i)) + ld(res, (r, i)))
    rstd[r] = _rms_row(x_sum, w, eps, r, out)


@driver
def _add_rms_norm(x, res, w, eps, x_sum, out, rstd):
    for r in prange(x.shape[0]):
        _add_rms_row(x, res, w, eps, np.int64(r), x_sum, out, rstd)


def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float):
    """Fused residual add and RMSNorm, as `refimpl.ops.add_rms_norm`.

    # x, residual [..., H], weight [H] -> y [..., H], x_sum [..., H], rstd [..., 1]
    One pass per row: x_sum = round(x + residual) is written and read back rounded, so the
    statistics are those of the stored sum (as the spec's); y and rstd as `rms_norm` (sum of
    squares in 16 lanes: rstd within about 1 ulp of the spec's, y and x_sum bit-equal to the
    spec's but where that ulp decides a rounding of y).
    """
    x, residual, weight = np.asarray(x), np.asarray(residual), np.asarray(weight)
    check_dtype(x, "add_rms_norm")
    if (residual.shape != x.shape or residual.dtype != x.dtype or x.ndim == 0 or
            weight.shape != x.shape[-1:] or not same_accum(x, weight)):
        return spec.add_rms_norm(x, residual, weight, eps)
    H = x.shape[-1]
    acc = acc_np(x.dtype)
    y, y_raw = empty(x.shape, x.dtype)
    x_sum, x_sum_raw = empty(x.shape, x.dtype)
    rstd = np.empty(x.shape[:-1] + (1,), acc)
    if x.size:
        _add_rms_norm[parallel(x.size)](raw(x).reshape(-1, H), raw(residual).reshape(-1, H),
                                        raw(weight), acc.type(eps), x_sum_raw.reshape(-1, H),
                                        y_raw.reshape(-1, H), rstd.reshape(-1))
    return y, x_sum, rstd
