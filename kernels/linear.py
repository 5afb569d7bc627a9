"""Linear layers: y = x @ W^T + b with W kept in its storage dtype, float32 accumulation.

One kernel serves decode and prefill. Output rows (features) are split into blocks of four
and the blocks are shared among threads (`prange`); each thread computes all tokens of its
blocks, so no output depends on the thread count. Tokens are taken in blocks small enough
for their rows to stay in the core's L2 cache, and within a block in tiles of four: a 4x4
tile of outputs reads four weight rows and four token rows once for 16 dot products, so a
weight row is reused across every token of the block (prefill), while one token (decode)
streams each weight row exactly once at memory bandwidth (`_vec.dot_1x4`).

Every output is the same dot product whatever the tile (see `_vec`), so linear(x)[t] equals
linear(x[t:t+1]) bit for bit. Cast points as the spec: the bias is added in float32 before
the single rounding. Float64 inputs accumulate in float64.

`gate_up` is the fused first half of SwiGLU: the gate and up tiles of the same outputs are
computed together and only h = round(round(silu(round(g))) * round(u)) is stored.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.numerics import STORAGE_DTYPES

from ._dtypes import acc_np, check_dtype, empty, parallel, raw, rnd, silu, st
from ._vec import dot_1x1, dot_1x4, dot_4x1, dot_4x4

#: bytes of token rows kept per cache-resident block (about half an L2)
TOKEN_BLOCK_BYTES = 256 * 1024

MODE_LINEAR, MODE_GATE_UP = 0, 1


@numba.njit(cache=True)
def _flush(out, t0, n0, nt, nn, r1, r2, b, mode):
    """Store the nt x nn tile at (t0, n0): r1/r2 hold its products (row-major, 4 columns)."""
    for i in range(nt):
        for j in range(nn):
            s = r1[4 * i + j]
            if mode == MODE_LINEAR:
                if b.size:
                    s = s + b[n0 + j]
                st(out, (t0 + i, n0 + j), s)
            else:
                g = rnd(s, out)
                u = rnd(r2[4 * i + j], out)
                a = rnd(silu(g), out)
                st(out, (t0 + i, n0 + j), a * u)


@numba.njit(cache=True)
def _tile(x, w, t, n, K, nt, nn, r):
    """r[4*i + j] = dot(x[t + i], w[n + j]) for the nt x nn tile (nt, nn in {1, 4})."""
    if nt == 4 and nn == 4:
        v = dot_4x4(x, t * K, K, w, n * K, K, K)
        for i in range(16):
            r[i] = v[i]
    elif nt == 1 and nn == 4:
        v4 = dot_1x4(x, t * K, 0, w, n * K, K, K)
        for j in range(4):
            r[j] = v4[j]
    elif nt == 4:
        v4 = dot_4x1(x, t * K, K, w, n * K, 0, K)
        for i in range(4):
            r[4 * i] = v4[i]
    else:
        r[0] = dot_1x1(x, t * K, 0, w, n * K, 0, K)[0]


@numba.njit(cache=True)
def _row_block(x, w, w2, b, mode, t0, t1, blk, nb4, r1, r2, out):
    """All tokens t0..t1-1 of output block blk (4 rows, or one row past the last full 4)."""
    K = x.shape[1]
    n = 4 * blk if blk < nb4 else 4 * nb4 + (blk - nb4)
    nn = 4 if blk < nb4 else 1
    t = t0
    while t < t1:
        nt = 4 if t + 4 <= t1 else 1
        _tile(x, w, t, n, K, nt, nn, r1)
        if mode == MODE_GATE_UP:
            _tile(x, w2, t, n, K, nt, nn, r2)
        _flush(out, t, n, nt, nn, r1, r2, b, mode)
        t += nt


@numba.njit(parallel=True, cache=True)
def _gemm(x, w, w2, b, mode, tb, par, out):
    """out[t, n] = epilogue(dot(x[t], w[n]), dot(x[t], w2[n])); threads share output blocks.

    # x [M, K], w/w2 [N, K], b [N] or [0] (accumulation dtype) -> out [M, N]
    """
    M = x.shape[0]
    N = w.shape[0]
    nb4 = N // 4
    nblocks = nb4 + (N - 4 * nb4)
    for t0 in range(0, M, tb):
        t1 = min(M, t0 + tb)
        if par:
            for blk in prange(nblocks):
                r1, r2 = np.zeros(16, b.dtype), np.zeros(16, b.dtype)
                _row_block(x, w, w2, b, mode, t0, t1, blk, nb4, r1, r2, out)
        else:
            r1, r2 = np.zeros(16, b.dtype), np.zeros(16, b.dtype)
            for blk in range(nblocks):
                _row_block(x, w, w2, b, mode, t0, t1, blk, nb4, r1, r2, out)


def token_block(K: int, itemsize: int) -> int:
    """Tokens per cache-resident block: a multiple of 4, at least 4."""
    return max(4, (TOKEN_BLOCK_BYTES // max(1, K * itemsize)) // 4 * 4)


def _kernel_ok(x: np.ndarray, *weights) -> bool:
    """True when the kernel computes exactly the spec's semantics for these dtypes: float64
    with float64 only; float32, bfloat16, float16 in any mix (all exact in float32)."""
    f64 = np.dtype(np.float64)
    for w in weights:
        if (w.ndim != 2 or w.shape[1] != x.shape[-1]
                or np.dtype(w.dtype) not in STORAGE_DTYPES.values()):
            return False
        if (np.dtype(w.dtype) == f64) != (np.dtype(x.dtype) == f64):
            return False
    return True


def _run(x2, w, w2, b, mode, out_dtype):
    M, K = x2.shape
    out, out_raw = empty((M, w.shape[0]), out_dtype)
    if M:
        xr = raw(x2)
        work = M * K * w.shape[0] * (2 if mode == MODE_GATE_UP else 1)
        _gemm(xr, raw(w), raw(w2), b, mode, token_block(K, xr.itemsize), parallel(work),
              out_raw)
    return out


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = round(x @ weight^T + bias), weight [out, in] in its storage dtype.

    # [..., in] x [out, in] -> [..., out]
    Same semantics as `refimpl.ops.linear` (float32 accumulation for half and float32 inputs,
    the bias added before the single rounding); other dtype mixes go to the spec.
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    check_dtype(x, "linear")
    if not _kernel_ok(x, weight) or (bias is not None and np.shape(bias) != (weight.shape[0],)):
        return spec.linear(x, weight, bias)
    acc = acc_np(x.dtype)
    b = (np.zeros(0, acc) if bias is None
         else np.ascontiguousarray(np.asarray(bias).astype(acc, copy=False)))
    x2 = x.reshape(-1, x.shape[-1])
    y = _run(x2, weight, weight, b, MODE_LINEAR, x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gate_up(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
    """h = round(round(silu(round(x Wg^T))) * round(x Wu^T)), one pass over both weights.

    # x [T, H], w_gate/w_up [I, H] -> [T, I]
    """
    acc = acc_np(x.dtype)
    return _run(x, w_gate, w_up, np.zeros(0, acc), MODE_GATE_UP, x.dtype)
