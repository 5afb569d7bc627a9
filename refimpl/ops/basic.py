"""Elementary operators: softmax, silu, linear, embedding.

All take arrays in a storage dtype (float64, float32, bfloat16, float16), compute in the
accumulation dtype (float64 for float64, else float32) and round the result back, at the cast
points listed in `refimpl.numerics`.
"""

from __future__ import annotations

import numpy as np

from ..numerics import accum_dtype, to_accum


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)), in the accumulation dtype.

    The result stays in the accumulation dtype (float32 for half inputs, as torch's
    ``softmax(..., dtype=float32)``). Entries equal to -inf get probability 0; a row that is
    entirely -inf is undefined (NaN) and callers must not produce one.
    """
    xa = to_accum(x)
    shifted = xa - np.max(xa, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    """silu(x) = x * sigmoid(x) = x / (1 + exp(-x)), computed in the accumulation dtype,
    returned in x's dtype."""
    xa = to_accum(x)
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives silu -> -0
        y = xa / (1.0 + np.exp(-xa))
    return y.astype(x.dtype)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ weight^T + bias, weight in the checkpoint's [out, in] layout.

    # [..., in] x [out, in] -> [..., out]
    The product accumulates in the accumulation dtype of x and the bias is added there
    before the single rounding to x's dtype.
    """
    acc = accum_dtype(x.dtype)
    y = to_accum(x) @ np.asarray(weight).astype(acc, copy=False).T
    if bias is not None:
        y = y + np.asarray(bias).astype(acc, copy=False)
    return y.astype(x.dtype)


def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residual add: round(x + y) in x's dtype. # [T, H], [T, H] -> [T, H]"""
    return (to_accum(x) + to_accum(y)).astype(x.dtype)


def embedding(token_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Rows of the embedding table. # [T] ids, [V, H] table -> [T, H]"""
    ids = np.asarray(token_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        from ..errors import InputError
        bad = ids[(ids < 0) | (ids >= table.shape[0])][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary [0, {table.shape[0]})")
    return np.asarray(table[ids])
