"""Linear layers: y = x @ W^T + b with W kept in its storage dtype, float32 accumulation.

Threads share output features (weight rows) only (`prange`), each thread computing every
token of its rows, so no output depends on the thread count.

* Decode (fewer than 4 tokens): a row-parallel matvec. Each thread walks its weight rows in
  order, one row at a time (`_vec.dot_1x1`), so the weights stream once from memory in a
  single sequential stream per thread, which the hardware prefetcher serves best (measured
  here: 33 GB/s with two threads, against 26 GB/s when four or six rows are interleaved).
* Prefill: tokens in blocks whose rows stay in the core's L2 (TOKEN_BLOCK_BYTES), and in a
  block, tiles of MR tokens x NR weight rows (`_vec.make_dot(MR, NR)`), each block of NR
  weight rows reused across all tokens of the block. The tile follows the ISA Numba
  compiles for (`tile_shape`): 4 x 4 with AVX-512 (eight row loads feed 16 dot products;
  fastest for bf16, whose pair widening needs two registers per row), 2 x 2 with AVX2, whose
  16 registers a 4 x 4 tile of 16-lane accumulators overflows (measured with Numba told to
  compile for AVX2 on an AVX-512 host: 4 x 4 58-87 GFLOP/s, 2 x 2 77-130; BENCHMARKS.md).

* No BLAS, also for float32 weights: alone, OpenBLAS sgemm is ~10-20% faster than this
  kernel in float32 (bf16's cheap pair widening is what makes the bf16 kernel its equal),
  but inside the numba backend it loses that lead, because Numba's OpenMP workers spin
  after each parallel region while OpenBLAS's threads want the same two cores. Measured
  (Embedded-1B width, 8 layers, fp32, three runs each): prefill of 128 tokens 0.55-0.71 s
  with this kernel vs 0.66-0.87 s with BLAS products; 512 tokens 2.15-2.32 s vs 2.44-2.63 s.

Every output is the same dot product whatever the path or tile (see `_vec`), so
linear(x)[t] equals linear(x[t:t+1]) bit for bit.
Cast points as the spec: the bias is added in float32 before the single rounding. Float64
inputs accumulate in float64.

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
from ._vec import dot_1x1, make_dot

#: bytes of token rows kept per cache-resident block (half of a 1 MiB L2)
TOKEN_BLOCK_BYTES = 512 * 1024
def tile_shape() -> tuple:
    """(MR, NR) of the prefill tile for the ISA Numba compiles for (NUMBA_CPU_FEATURES, else
    the host's): 4 x 4 with AVX-512's 32 vector registers; 2 x 2 without, since a tile's
    MR * NR accumulators of 16 float32 lanes take two 256-bit registers each and AVX2 has 16
    (4 x 4 spills: measured 52-58 GFLOP/s against 2 x 2's, BENCHMARKS.md). REFIMPL_TILE=MxN
    overrides (for measuring). Every dot product is the same whatever the tile (`_vec`)."""
    import os

    forced = os.environ.get("REFIMPL_TILE")
    if forced:
        mr, nr = (int(v) for v in forced.lower().split("x"))
        return mr, nr
    from numba.core import config

    features = config.CPU_FEATURES
    if features is None:
        import llvmlite.binding as ll

        features = ll.get_host_cpu_features().flatten()
    return (4, 4) if "+avx512f" in features.split(",") else (2, 2)


#: tile shape of the prefill kernel: MR tokens x NR weight rows
MR, NR = tile_shape()
dot_tile = make_dot(MR, NR)

#: decode: gate rows then up rows stream in runs of this many rows
ROW_RUN = 256

MODE_LINEAR, MODE_GATE_UP = 0, 1


@numba.njit(cache=True)
def _flush(out, t0, n0, nt, nn, r1, r2, b, mode):
    """Store the nt x nn tile at (t0, n0); r1/r2 hold its products, row-major with NR
    columns."""
    for i in range(nt):
        for j in range(nn):
            s = r1[NR * i + j]
            if mode == MODE_LINEAR:
                if b.size:
                    s = s + b[n0 + j]
                st(out, (t0 + i, n0 + j), s)
            else:
                g = rnd(s, out)
                u = rnd(r2[NR * i + j], out)
                a = rnd(silu(g), out)
                st(out, (t0 + i, n0 + j), a * u)


@numba.njit(cache=True)
def _tile(x, w, t, n, K, nt, nn, r):
    """r[NR*i + j] = dot(x[t + i], w[n + j]) for the nt x nn tile: a full MR x NR tile in one
    pass, edge tiles (nt or nn of 1) dot by dot (the same dot products, fewer variants to
    compile)."""
    if nt == MR and nn == NR:
        v = dot_tile(x, t * K, K, w, n * K, K, K)
        for i in range(MR * NR):
            r[i] = v[i]
    else:
        for i in range(nt):
            for j in range(nn):
                r[NR * i + j] = dot_1x1(x, (t + i) * K, 0, w, (n + j) * K, 0, K)[0]


@numba.njit(cache=True)
def _row_block(x, w, w2, b, mode, t0, t1, blk, nbf, r1, r2, out):
    """Tokens t0..t1-1 of output block blk: NR rows, or one row past the last full block."""
    K = x.shape[1]
    n = NR * blk if blk < nbf else NR * nbf + (blk - nbf)
    nn = NR if blk < nbf else 1
    t = t0
    while t < t1:
        nt = MR if t + MR <= t1 else 1
        _tile(x, w, t, n, K, nt, nn, r1)
        if mode == MODE_GATE_UP:
            _tile(x, w2, t, n, K, nt, nn, r2)
        _flush(out, t, n, nt, nn, r1, r2, b, mode)
        t += nt


@numba.njit(cache=True)
def _rows_streamed(x, w, w2, b, mode, n0, n1, out):
    """Rows n0..n1-1 one at a time, every token (few) against the row while it is in L1;
    with two weights, all rows of w first, then those of w2 (one sequential stream at a
    time), ROW_RUN rows at a time."""
    M, K = x.shape
    g = np.empty(ROW_RUN * M, b.dtype)
    u = np.empty(ROW_RUN * M, b.dtype)
    for r0 in range(n0, n1, ROW_RUN):
        r1 = min(n1, r0 + ROW_RUN)
        for n in range(r0, r1):
            for t in range(M):
                g[(n - r0) * M + t] = dot_1x1(x, t * K, 0, w, n * K, 0, K)[0]
        if mode == MODE_GATE_UP:
            for n in range(r0, r1):
                for t in range(M):
                    u[(n - r0) * M + t] = dot_1x1(x, t * K, 0, w2, n * K, 0, K)[0]
        for n in range(r0, r1):
            for t in range(M):
                i = (n - r0) * M + t
                _flush(out, t, n, 1, 1, g[i:i + 1], u[i:i + 1], b, mode)


@numba.njit(parallel=True, cache=True)
def _gemm(x, w, w2, b, mode, tb, par, nthreads, out):
    """out[t, n] = epilogue(dot(x[t], w[n]), dot(x[t], w2[n])); threads share weight rows.

    # x [M, K], w/w2 [N, K], b [N] or [0] (accumulation dtype) -> out [M, N]
    """
    M = x.shape[0]
    N = w.shape[0]
    if M < MR:                      # decode: stream each weight row once
        if par:  # worker k owns rows [k N / nw, (k+1) N / nw): one sequential stream per weight
            nw = max(1, min(nthreads, N // 16))
            for k in prange(nw):
                _rows_streamed(x, w, w2, b, mode, k * N // nw, (k + 1) * N // nw, out)
        else:
            _rows_streamed(x, w, w2, b, mode, 0, N, out)
        return
    nbf = N // NR
    nblocks = nbf + (N - NR * nbf)
    if par:  # one parallel region: worker k owns a contiguous range of row blocks
        nw = max(1, min(nthreads, nblocks))
        for k in prange(nw):
            _blocks(x, w, w2, b, mode, tb, k * nblocks // nw, (k + 1) * nblocks // nw, nbf, out)
    else:
        _blocks(x, w, w2, b, mode, tb, 0, nblocks, nbf, out)


@numba.njit(cache=True)
def _blocks(x, w, w2, b, mode, tb, b0, b1, nbf, out):
    """Row blocks b0..b1-1 for every token, token block by token block."""
    M = x.shape[0]
    r1, r2 = np.zeros(MR * NR, b.dtype), np.zeros(MR * NR, b.dtype)
    for t0 in range(0, M, tb):
        t1 = min(M, t0 + tb)
        for blk in range(b0, b1):
            _row_block(x, w, w2, b, mode, t0, t1, blk, nbf, r1, r2, out)


def token_block(M: int, K: int, itemsize: int) -> int:
    """Tokens per cache-resident block: at most TOKEN_BLOCK_BYTES of token rows, the M tokens
    split into equal blocks (a multiple of MR, at least MR)."""
    most = max(MR, (TOKEN_BLOCK_BYTES // max(1, K * itemsize)) // MR * MR)
    nblocks = -(-M // most)
    return max(MR, -(-(-(-M // nblocks)) // MR) * MR)


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
        _gemm(xr, raw(w), raw(w2), b, mode, token_block(M, K, xr.itemsize), parallel(work),
              numba.get_num_threads(), out_raw)
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
