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


#: the largest accumulation-dtype copy of a weight that `linear` makes in one piece (bytes)
LINEAR_BLOCK_BYTES = 256 * 2**20


def linear_block_rows(weight: np.ndarray, acc) -> int:
    """Rows of `weight` that `linear` converts to the accumulation dtype `acc` at once.

    All of them when no copy is needed (the weight is in `acc`) or the copy fits in
    LINEAR_BLOCK_BYTES; otherwise as many as fit (at least one). Only weights whose float32
    copy exceeds the limit are split (at the real widths: the LM head, 153376 x 5120, whose
    float32 copy would be 3 GiB).
    """
    acc = np.dtype(acc)
    if weight.ndim != 2 or weight.dtype == acc:
        return weight.shape[0]
    row_bytes = max(1, weight.shape[1] * acc.itemsize)
    if weight.shape[0] * row_bytes <= LINEAR_BLOCK_BYTES:
        return weight.shape[0]
    return max(1, LINEAR_BLOCK_BYTES // row_bytes)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ weight^T + bias, weight in the checkpoint's [out, in] layout.

    # [..., in] x [out, in] -> [..., out]
    The product accumulates in the accumulation dtype of x and the bias is added there
    before the single rounding to x's dtype. A weight not in the accumulation dtype is
    converted to it; when that copy would exceed LINEAR_BLOCK_BYTES the weight is converted
    and multiplied a block of output rows at a time (`linear_block_rows`), so a
    memory-mapped LM head is never copied whole. Each output is still one float32 dot
    product, but BLAS chooses its kernel (and so the summation order) by shape: a split
    product can differ from the one-piece product in the last bits, which is why weights
    under the limit are never split.
    """
    acc = accum_dtype(x.dtype)
    xa = to_accum(x)
    w = np.asarray(weight)
    rows = linear_block_rows(w, acc)
    if rows >= w.shape[0]:
        y = xa @ w.astype(acc, copy=False).T                      # [..., in] x [in, out]
    else:
        y = np.empty(xa.shape[:-1] + (w.shape[0],), acc)          # [..., out]
        for r in range(0, w.shape[0], rows):                      # copy of <= rows rows
            y[..., r:r + rows] = xa @ w[r:r + rows].astype(acc).T
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
