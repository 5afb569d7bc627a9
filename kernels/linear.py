"""Linear layers: y = x @ W^T + b with W kept in its storage dtype, float32 accumulation.

Every output is the dot product of `_vec.dot_1x1`: 16 float32 lanes (8 in float64), lane l
accumulating its own k (l, l+16, ...; in bfloat16 pairs 2l then 2l+1 of every 32) by fma in
increasing order, the lanes added by a fixed pairwise tree, the last K mod 16 (32) products
added in order. Whatever path, tile, block, ISA or thread count computes an output, it is
that dot product, so linear(x)[t] equals linear(x[t:t+1]) bit for bit and an AVX2 host
gives the bits of an AVX-512 one. Threads share output features (weight rows) only.

* Decode and small groups (fewer than ROWS_BELOW tokens, or fewer than NR weight rows): a
  row-parallel matvec. Each thread walks its weight rows in order, so the weights stream
  once from memory, unpacked. One token takes one row at a time (`_vec.dot_1x1`: a single
  sequential stream per thread, which the hardware prefetcher serves best, measured 33 GB/s
  with two threads against 26 GB/s when four or six rows are interleaved); more tokens take
  two rows at a time, four tokens against the pair (`_vec.dot_4x2`).
* Prefill (`_gemm_tiles`): the lanes of a dot product never meet until the tree, so the
  lanes of MR x NR dot products are 16 independent GEMMs, each summing its k in the lane's
  order; each is run as the outer-product micro-kernel of GotoBLAS (`_vec.make_lane_gemm`:
  one token value broadcast against NR weight rows, MR x NR accumulators in registers), which
  streams far fewer bytes per fma than dot products of whole rows (docs/kernels.md). Per call:
  1. the tokens are packed once (`pack_tokens`): widened, lane after lane, MR tokens
     together per step, zero rows up to a multiple of MR;
  2. each thread owns a range of NR-row weight tiles; a tile is packed once
     (`_pack_weights`: widened and transposed by `_vec.pack_lanes`, chunk after chunk, its
     rows asked from memory PACK_AHEAD chunks ahead), then for every block of MB_TILES
     token tiles the 16 lanes run in the tree's post-order (`_vec.lane_order`), one lane's
     weights (K/16 steps x NR rows) staying in L1/L2 while the token tiles pass;
  3. each lane's result is added at once to the sibling subtrees it completes (a stack of
     at most STACK tiles per token tile, `lane_gemm`'s merge), so when the last lane is done
     the stack holds the sums, and the epilogue (the last K mod 16/32 products in order, the
     bias or gate-up's SwiGLU, the one rounding) writes them out.
  The tile follows the ISA (`tile_shape`): 8 tokens x 32 rows with AVX-512 (16 zmm
  accumulators: a broadcast token value feeds two fmas), 6 x 16 with AVX2 (12 ymm: 16
  weight rows are two ymm).

* No BLAS, also for float32 weights: inside the numba backend BLAS's threads and Numba's
  OpenMP workers want the same cores (measured at Embedded-1B width, 8 layers, fp32:
  prefill of 128 tokens 0.55-0.71 s with Numba kernels vs 0.66-0.87 s with BLAS products).

Cast points as the spec: the bias is added in float32 before the single rounding. Float64
inputs accumulate in float64.

`gate_up` is the fused first half of SwiGLU: the gate and up tiles of the same outputs are
computed together and only h = round(round(silu(round(g))) * round(u)) is stored.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.numerics import STORAGE_DTYPES, bfloat16

from ._dtypes import acc_np, check_dtype, empty, fma, ld, parallel, raw, rnd, silu, st
from ._jit import driver, jit
from ._vec import (LANE_NR, VECTOR_BITS, dot_1x1, dot_1x2, dot_4x2, lane_order,
                   make_lane_gemm, pack_lanes, prefetch)

#: (MR, NR) by vector width: MR x NR float32 accumulators + NR weights + one broadcast token
#: value within the registers (AVX-512 8 x 32: 16 + 2 + 1 of 32 zmm; AVX2 6 x 16: 12 + 2 + 1
#: of 16 ymm)
TILES = {512: (8, 32), 256: (6, 16), 128: (6, 16)}


def tile_shape() -> tuple:
    """(MR, NR) of the prefill tile: MR tokens x NR weight rows (a multiple of 16), by the
    vector width Numba compiles for (`_vec.VECTOR_BITS`: NUMBA_CPU_FEATURES when set, else
    the host's). REFIMPL_TILE=MRxNR overrides (for measuring; its own Numba cache
    directory). Every dot product is the same whatever the tile."""
    forced = os.environ.get("REFIMPL_TILE")
    if forced:
        mr, nr = (int(v) for v in forced.lower().split("x"))
        return mr, nr
    return TILES[VECTOR_BITS]


#: tile shape of the prefill kernel: MR tokens x NR weight rows
MR, NR = tile_shape()
lane_gemm = make_lane_gemm(MR, NR)

#: token tiles per block: a block's stacks of lane subtrees (MB_TILES x STACK x MR x 16
#: float32, 24 KiB at 12 x 4 x 8) stay in L1/L2 while the 16 lanes pass; the block's packed
#: tokens (MB_TILES*MR x K float32) are read once per lane from L2
MB_TILES = 12
#: (lane, merges, stack position) in the tree's post-order, for 16 and for 8 lanes; at most
#: STACK subtrees are stored at once
LANE_ORDER_16 = np.array(lane_order(16), np.int64)
LANE_ORDER_8 = np.array(lane_order(8), np.int64)
STACK = 4

#: decode: gate rows then up rows stream in runs of this many rows
ROW_RUN = 256
#: fewer tokens than this take the streamed-rows path (no packing): with AVX-512 up to 15
#: (measured at the Pro-MoE expert shape, 64 experts' gate-up from memory, bf16: 8 tokens
#: 149 -> 117 ms, 12 tokens 213 -> 151 ms; level at 16), with AVX2 below the tile height
#: (there the rows path's eight 16-lane accumulators are 16 ymm and spill)
ROWS_BELOW = 16 if VECTOR_BITS == 512 else MR

MODE_LINEAR, MODE_GATE_UP = 0, 1


# ---------------------------------------------------------------------------- decode
@jit()
def _flush_one(out, t, n, s, u, b, mode):
    """out[t, n] = epilogue(s, u): s + bias rounded (linear), or the SwiGLU of gate s and
    up u (gate-up); the one epilogue of both paths (rows and tiles)."""
    if mode == MODE_LINEAR:
        if b.size:
            s = s + b[n]
        st(out, (t, n), s)
    else:
        g = rnd(s, out)
        a = rnd(silu(g), out)
        st(out, (t, n), a * rnd(u, out))


@jit()
def _row_dots(x, w, n, M, K, dst, d0):
    """dst[d0 + t] = dot(x[t], w[n]) for the M tokens, one at a time (`_vec.dot_1x1`): the
    decode path of one token, and an odd last row."""
    for t in range(M):
        dst[d0 + t] = dot_1x1(x, t * K, 0, w, n * K, 0, K)[0]


@jit()
def _row_pair_dots(x, w, n, M, K, dst, d0):
    """dst[d0 + t] = dot(x[t], w[n]), dst[d0 + M + t] = dot(x[t], w[n + 1]): two rows at
    once, four tokens at a time (`_vec.dot_4x2`: eight independent fma chains, each token
    vector loaded once for two rows), the last M mod 4 tokens one at a time against both
    rows (`dot_1x2`). Measured at the Pro-MoE expert shape (64 experts' gate-up from
    memory, bf16, AVX-512): 4 tokens 123 -> 86 ms against one row at a time and four
    tokens against it (four fma chains, two dependent fmas per bfloat16 pair: latency
    bound), 2 tokens 89 -> 78 ms; every value the same dot product."""
    t = 0
    while t + 4 <= M:
        v = dot_4x2(x, t * K, K, w, n * K, K, K)
        dst[d0 + t], dst[d0 + M + t] = v[0], v[1]
        dst[d0 + t + 1], dst[d0 + M + t + 1] = v[2], v[3]
        dst[d0 + t + 2], dst[d0 + M + t + 2] = v[4], v[5]
        dst[d0 + t + 3], dst[d0 + M + t + 3] = v[6], v[7]
        t += 4
    while t < M:
        v = dot_1x2(x, t * K, 0, w, n * K, K, K)
        dst[d0 + t], dst[d0 + M + t] = v[0], v[1]
        t += 1


@jit()
def _run_dots(x, w, r0, r1, M, K, dst):
    """dst[(n - r0) * M + t] = dot(x[t], w[n]) for rows r0..r1-1: two rows at a time, or
    one at a time for one token (one sequential weight stream: 33 GB/s against 26 GB/s
    when rows are interleaved, see the module docstring)."""
    n = r0
    while M > 1 and n + 2 <= r1:
        _row_pair_dots(x, w, n, M, K, dst, (n - r0) * M)
        n += 2
    while n < r1:
        _row_dots(x, w, n, M, K, dst, (n - r0) * M)
        n += 1


@jit()
def _rows_streamed(x, w, w2, b, mode, n0, n1, out):
    """Rows n0..n1-1 in order (`_run_dots`), every token (few) against them while in L1;
    with two weights, all rows of w first, then those of w2 (one sequential stream at a
    time), ROW_RUN rows at a time."""
    M, K = x.shape
    g = np.empty(ROW_RUN * M, b.dtype)
    u = np.empty(ROW_RUN * M, b.dtype)
    for r0 in range(n0, n1, ROW_RUN):
        r1 = min(n1, r0 + ROW_RUN)
        _run_dots(x, w, r0, r1, M, K, g)
        if mode == MODE_GATE_UP:
            _run_dots(x, w2, r0, r1, M, K, u)
        for n in range(r0, r1):
            for t in range(M):
                i = (n - r0) * M + t
                _flush_one(out, t, n, g[i], u[i], b, mode)


@driver
def _gemm_rows(x, w, w2, b, mode, nw, out):
    """out[t, n] for few tokens: worker k of nw owns rows [k N / nw, (k+1) N / nw), one
    sequential stream per weight. # x [M, K], w/w2 [N, K] -> out [M, N]"""
    N = w.shape[0]
    for kk in prange(nw):
        k = np.int64(kk)
        _rows_streamed(x, w, w2, b, mode, k * N // nw, (k + 1) * N // nw, out)


# ---------------------------------------------------------------------------- prefill
@jit()
def lane_k(s, lane, lanes, pairs):
    """Element k of K at step s of lane `lane` (pairs: chunks of 2*lanes, each lane taking
    its even element 2l, then its odd one 2l+1)."""
    if pairs:
        return (s // 2) * 2 * lanes + 2 * lane + s % 2
    return s * lanes + lane


@jit()
def pack_tokens(x, t0, t1, pairs, lanes, ap):
    """Rows t0..t1-1 of x widened into ap for `lane_gemm`, token tile by token tile (MR rows),
    in a tile lane after lane, in a lane step after step, the tile's MR tokens together:

        ap[T*MR*K + l*D*MR + s*MR + i] = x[T*MR + i, lane_k(s, l)]    (D = Kv / lanes)

    then the last K - Kv elements of each row in natural order at T*MR*K + Kv*MR + i*(K - Kv).
    Kv: K rounded down to whole chunks (16 elements, 32 in pairs, 8 in float64)."""
    K = x.shape[1]
    S = lanes * (2 if pairs else 1)
    Kv = K // S * S
    D = Kv // lanes
    for t in range(t0, t1):
        tile, i = t // MR, t % MR
        base = tile * MR * K
        for l in range(lanes):
            for s in range(D):
                ap[base + (l * D + s) * MR + i] = ld(x, (t, lane_k(s, l, lanes, pairs)))
        for k in range(Kv, K):
            ap[base + Kv * MR + i * (K - Kv) + k - Kv] = ld(x, (t, k))


#: chunks ahead that `_pack_weights` asks for its rows (one line per row and chunk in float32)
PACK_AHEAD = 8


@jit()
def chunk_stride(lanes, pairs):
    """Elements from one chunk of a packed weight tile to the next: every lane's NR-row
    vectors of the chunk (two in pairs), and one vector more, so that one lane's vectors,
    read chunk after chunk, do not fall into a few sets of the L1 cache."""
    return lanes * (2 if pairs else 1) * NR + NR


@jit()
def _pack_weights(w, n0, pairs, lanes, bp):
    """Weight rows n0..n0+NR-1 packed chunk after chunk (`_vec.pack_lanes`, 16 rows a call),
    each chunk written in one run: bp[c*CS + l*Q*NR + q*NR + j] = w[n0 + j, lane_k(c*Q + q,
    l)], CS =
    chunk_stride(lanes, pairs), Q = 2 in pairs else 1; rows asked for PACK_AHEAD chunks
    ahead."""
    K = w.shape[1]
    Q = 2 if pairs else 1
    S = lanes * Q
    CS = chunk_stride(lanes, pairs)
    ahead = PACK_AHEAD * S * w.itemsize // 64 * 64 // w.itemsize   # whole lines ahead
    for c in range(K // S):
        k = c * S
        if k + ahead < K:
            for j in range(NR):
                prefetch(w, (n0 + j) * K + k + ahead)
        for r in range(0, NR, LANE_NR):                 # 16 rows at a time
            pack_lanes(w, (n0 + r) * K + k, K, pairs, bp, c * CS + r, Q * NR, NR)


@jit()
def _epilogue(cb, cb2, ap, w, w2, b, mode, t0, t1, n0, j0, Kv, out):
    """out[t0:t1, n0 + j0 : n0 + NR] from the sums (output (t, n0 + j) at cb[(t - t0)*NR + j]):
    the last K - Kv products in order, then the bias or the SwiGLU, and the one rounding."""
    K = w.shape[1]
    if Kv < K:
        for t in range(t0, t1):
            tail = (t // MR) * MR * K + Kv * MR + (t % MR) * (K - Kv) - Kv
            for j in range(j0, NR):
                c = (t - t0) * NR + j
                for k in range(Kv, K):
                    cb[c] = fma(ap[tail + k], ld(w, (n0 + j, k)), cb[c])
                    if mode == MODE_GATE_UP:
                        cb2[c] = fma(ap[tail + k], ld(w2, (n0 + j, k)), cb2[c])
    for t in range(t0, t1):
        row = (t - t0) * NR - n0
        for n in range(n0 + j0, n0 + NR):   # (linear ignores the up sum; cb2 is empty there)
            up = cb2[row + n] if mode == MODE_GATE_UP else cb[row + n]
            _flush_one(out, t, n, cb[row + n], up, b, mode)


@jit()
def _tiles_worker(ap, M, Mp, w, w2, b, mode, pairs, lanes, mb_tiles, j0, j1, out):
    """Weight tiles j0..j1-1 (tile j: rows min(NR j, N - NR) .. + NR; the last one may
    overlap its neighbour and writes only its own rows) for every token."""
    N, K = w.shape
    Q = 2 if pairs else 1
    Kv = K // (lanes * Q) * lanes * Q
    D = Kv // lanes
    CS = chunk_stride(lanes, pairs)
    nch = K // (lanes * Q)
    bp = np.empty(nch * CS, ap.dtype)                   # the tile's weights, packed
    bp2 = np.empty(nch * CS if mode == MODE_GATE_UP else 0, ap.dtype)
    ntiles = Mp // MR
    nblk = -(-ntiles // mb_tiles)                       # token blocks of equal size
    per = -(-ntiles // nblk)
    order = LANE_ORDER_16 if lanes == 16 else LANE_ORDER_8
    tsz = MR * NR
    cb = np.empty(per * STACK * tsz, ap.dtype)          # per token tile: a stack of subtrees
    cb2 = np.empty(per * STACK * tsz if mode == MODE_GATE_UP else 0, ap.dtype)
    for jt in range(j0, j1):
        n0 = min(jt * NR, N - NR)
        _pack_weights(w, n0, pairs, lanes, bp)
        if mode == MODE_GATE_UP:
            _pack_weights(w2, n0, pairs, lanes, bp2)
        for T0 in range(0, ntiles, per):
            nt = min(per, ntiles - T0)
            for p in range(lanes):                      # the lane's panel stays in L1
                l, merges, pos = order[p, 0], order[p, 1], order[p, 2]
                for ii in range(nt):
                    a0 = (T0 + ii) * MR * K + l * D * MR
                    c0 = (ii * STACK + pos) * tsz
                    lane_gemm(ap, a0, bp, l * Q * NR, nch, Q, CS, cb, c0, merges, tsz)
                    if mode == MODE_GATE_UP:
                        lane_gemm(ap, a0, bp2, l * Q * NR, nch, Q, CS, cb2, c0, merges, tsz)
            for ii in range(nt):                        # the sums: each tile's stack bottom
                T = T0 + ii
                _epilogue(cb[ii * STACK * tsz:], cb2[ii * STACK * tsz:] if mode == MODE_GATE_UP
                          else cb2, ap, w, w2, b, mode, T * MR, min(M, T * MR + MR), n0,
                          jt * NR - n0, Kv, out)


@driver
def _gemm_tiles(x, w, w2, b, mode, pairs, lanes, mb_tiles, nw, ap, out):
    """out[t, n] = epilogue(dot(x[t], w[n]), dot(x[t], w2[n])) for M >= ROWS_BELOW tokens
    and N >= NR rows; worker k of nw packs its share of the tokens, then owns weight tiles
    [k ntiles / nw, (k+1) ntiles / nw); ap: zeros for the packed tokens (Mp x K, Mp = M
    rounded up to MR). # x [M, K], w/w2 [N, K] -> out [M, N]"""
    M, K = x.shape
    N = w.shape[0]
    Mp = ap.size // K
    ntiles = -(-N // NR)
    for kk in prange(nw):
        k = np.int64(kk)
        pack_tokens(x, k * M // nw, (k + 1) * M // nw, pairs, lanes, ap)
    for kk in prange(nw):
        k = np.int64(kk)
        _tiles_worker(ap, M, Mp, w, w2, b, mode, pairs, lanes, mb_tiles,
                      k * ntiles // nw, (k + 1) * ntiles // nw, out)


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
    N = w.shape[0]
    out, out_raw = empty((M, N), out_dtype)
    if M and N:
        xr = raw(x2)
        work = M * K * N * (2 if mode == MODE_GATE_UP else 1)
        par = parallel(work)
        threads = numba.get_num_threads() if par else 1
        if M < ROWS_BELOW or N < NR:
            nw = max(1, min(threads, N // 16))
            _gemm_rows[par](xr, raw(w), raw(w2), b, mode, nw, out_raw)
        else:
            lanes = 8 if b.dtype == np.float64 else 16
            pairs = int(np.dtype(x2.dtype) == bfloat16 and np.dtype(w.dtype) == bfloat16)
            ap = np.zeros(-(-M // MR) * MR * K, b.dtype)   # packed tokens, zero rows past M
            nw = max(1, min(threads, -(-N // NR)))
            _gemm_tiles[par](xr, raw(w), raw(w2), b, mode, pairs, lanes, MB_TILES, nw, ap,
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
    Gate and up of different storage dtypes (a different lane order for bfloat16 pairs) run
    as two products and the spec's silu_and_mul.
    """
    if np.dtype(w_gate.dtype) != np.dtype(w_up.dtype):
        return spec.silu_and_mul(linear(x, w_gate), linear(x, w_up))
    acc = acc_np(x.dtype)
    return _run(x, w_gate, w_up, np.zeros(0, acc), MODE_GATE_UP, x.dtype)
