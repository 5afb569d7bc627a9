"""Attention with GQA (no K/V copies per query head): decode, blocked prefill, packed
variable-length, paged decode and flash kernels.

All read KV head h // (Hq / Hkv) for query head h straight from k and v, and all round the
scores as the spec does: s = round(round(q . k) * scale) in the storage dtype. Float32 exp is
`_dtypes.exp32` (vectorisable, within 1 ulp).

* `_attn_rows` (one query, decode; any T with `flash=False`): one task per (query, head).
  The scores of the row are kept (S values), then exactly the spec's cast points:
  p = round(softmax_float32(s)), o = round(sum_j p_j v_j). It differs from the spec only in
  summation orders (q . k in 16 lanes, softmax denominator and p @ v in key order) and exp.
* `_blocks` (prefill, the default for T > 1): one task per (head, block of BQ queries); the
  scores of the block's rows against every visible key are computed with the keys
  transposed in blocks of BK (vector lanes along keys, K read once per query block), held
  (BQ x S float32: 4 MiB at S = 32768), and then each row takes exactly the spec's cast
  points, as `_attn_row`. It equals the spec bit for bit wherever the sums are exact
  (tests/test_kernels.py, exact inputs) and differs otherwise only in summation order and
  exp, like the decode kernel.
* `_varlen` (`attention_varlen`): packed sequences, one parallel loop over every (sequence,
  head, block of BQ queries) task of the batch; each task is `_block_rows` (the blocked
  prefill's rows) on its sequence's slices, keys transposed per sequence from a block of
  their own, so every sequence equals the blocked kernel on it alone, bit for bit.
* `_paged` (`paged_attention`): decode through block tables in place, `_attn_row`'s dot
  products and key order block by block: bit-equal to the decode kernel on gathered keys.
* `_flash` (`flash=True`): one task per (head, block of BQ queries), keys in blocks of BK, an
  online softmax with running max m and sum l, never holding more than BQ x BK scores.
  Deliberate differences from the spec: the probabilities are *not* rounded to the storage
  dtype before multiplying V (they are exp(s - m) in float32, rescaled as m grows), the
  division by the sum happens once at the end, o = round((sum_j e_j v_j) / l), and each
  score sums q[d] k[d] over d in plain order (vector lanes run along keys). Measured against
  the spec (tests/test_kernels.py): normwise 1e-15 in fp64, 1.2e-6 in fp32, 7e-3 in bf16
  (about 2 bf16 ulps at the largest output), 7e-4 in fp16. Skipping the rounding of p makes
  the kernel the more accurate of the two against an exact float64 attention.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.errors import InputError

from ._dtypes import acc_np, acc_zero, check_dtype, empty, ld, like, parallel, raw, rnd, st, vexp
from ._jit import driver, jit
from ._vec import axpy_rows, dot_1x1, dot_1x4

#: queries and keys per flash tile
BLOCK_Q, BLOCK_K = 32, 64


@jit()
def _scores(q, qo, k, base, stride, cnt, scale, s, s0):
    """s[s0 + j] = round(round(q . k_j) * scale) for the cnt keys k_j at k[base + j * stride]
    (flat offsets; 4 keys a tile, the rest one by one: a tile gives a lone dot's bits)."""
    D = q.shape[-1]
    j = 0
    while j + 4 <= cnt:
        r = dot_1x4(q, qo, 0, k, base + j * stride, stride, D)
        for jj in range(4):
            s[s0 + j + jj] = rnd(rnd(r[jj], q) * scale, q)
        j += 4
    while j < cnt:
        s[s0 + j] = rnd(rnd(dot_1x1(q, qo, 0, k, base + j * stride, 0, D)[0], q) * scale, q)
        j += 1


@jit()
def _softmax_rounded(s, n, q):
    """s[:n] = round(exp(s - max) / sum), the sum in key order: the spec's probabilities."""
    m = s[0]
    for j in range(1, n):
        m = max(m, s[j])
    for j in range(n):
        s[j] = vexp(s[j] - m)
    tot = acc_zero(q)
    for j in range(n):
        tot += s[j]
    for j in range(n):
        s[j] = rnd(s[j] / tot, q)


@driver
def _attn_rows(q, k, v, scale, causal, out):
    """Exact cast points, one task per (query t, head h).

    # q [T, Hq, D], k/v [S, Hkv, D] -> out [T, Hq, D]
    """
    n = q.shape[0] * q.shape[1]
    for task in prange(n):
        _attn_row(q, k, v, scale, causal, np.int64(task), out)


@jit()
def _attn_row(q, k, v, scale, causal, task, out):
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    group = Hq // Hkv
    offset = S - T
    z = acc_zero(q)
    t = task // Hq
    h = task - t * Hq
    hk = h // group
    n = offset + t + 1 if causal else S
    qo = (t * Hq + h) * D
    s = np.full(n, z)
    _scores(q, qo, k, hk * D, Hkv * D, n, scale, s, 0)
    _softmax_rounded(s, n, q)                           # p, rounded as the spec
    o = np.full(D, z)
    axpy_rows(o, 0, s, 0, v, hk * D, Hkv * D, n, D)     # o = sum_j p_j v_j, in key order
    for d in range(D):
        st(out, (t, h, d), o[d])


@driver
def _blocks(q, kT, v, scale, causal, bq, out):
    """Exact cast points over (head, query block) tasks.

    # q [T, Hq, D], kT [Hkv, S/bk, D, bk], v [S, Hkv, D] -> out [T, Hq, D]
    """
    n = q.shape[1] * ((q.shape[0] + bq - 1) // bq)
    for task in prange(n):
        _block_task(q, kT, v, scale, causal, bq, np.int64(task), out)


@jit()
def _query_block(T, Hq, Hkv, S, bq, task):
    """The (head, query block) of a prefill task: query head h = task // blocks, its KV head
    h // (Hq / Hkv), the block's first query t0 and size nq, and offset = S - T (query t sits
    at position offset + t)."""
    nqb = (T + bq - 1) // bq
    h = task // nqb
    t0 = (task - h * nqb) * bq
    return h, h // (Hq // Hkv), t0, min(T, t0 + bq) - t0, S - T


@jit()
def _block_task(q, kT, v, scale, causal, bq, task, out):
    """Head h = task // nqb, queries t0 .. t0+nq-1 of the one sequence of q, k, v."""
    h, hk, t0, nq, offset = _query_block(q.shape[0], q.shape[1], kT.shape[0], v.shape[0], bq,
                                         task)
    _block_rows(q, 0, q.shape[0], kT, 0, v, 0, v.shape[0], scale, causal, h, t0, nq, out)


@jit()
def _block_rows(q, q0, T, kT, kb0, v, v0, S, scale, causal, h, t0, nq, out):
    """Queries t0 .. t0+nq-1 of head h of a sequence whose T queries are rows q0.. of q and
    whose S keys are kT blocks kb0.. and rows v0.. of v (the queries are the last T of the S
    positions): all their scores (q . k summed over d in order with fma, lanes along keys),
    then per row the spec's roundings: s = round(round(q . k) * scale),
    p = round(exp(s - max) / sum), o = round(sum_j p_j v_j) in key order.

    # q [*, Hq, D], kT [Hkv, blocks, D, bk], v [*, Hkv, D] -> out rows q0 + t0 ..
    """
    D = q.shape[2]
    Hq, Hkv, nkb, bk = q.shape[1], kT.shape[0], kT.shape[1], kT.shape[3]
    hk = h // (Hq // Hkv)
    offset = S - T
    z = acc_zero(q)
    kend = min(S, offset + t0 + nq) if causal else S
    s = np.full((nq, kend), z)
    qa = np.empty((nq, D), s.dtype)
    for i in range(nq):
        for d in range(D):
            qa[i, d] = ld(q, (q0 + t0 + i, h, d))
    for j0 in range(0, kend, bk):
        nk = min(kend, j0 + bk) - j0
        for i in range(nq):
            lim = min(nk, offset + t0 + i + 1 - j0) if causal else nk
            if lim > 0:
                axpy_rows(s, i * kend + j0, qa, i * D, kT,
                          (hk * nkb + kb0 + j0 // bk) * D * bk, bk, D, lim)   # q . k
    o = np.empty(D, s.dtype)
    for i in range(nq):
        n = min(kend, offset + t0 + i + 1) if causal else kend
        for j in range(n):
            s[i, j] = rnd(rnd(s[i, j], q) * scale, q)                   # spec's score roundings
        _softmax_rounded(s[i], n, q)                                    # p, rounded as the spec
        for d in range(D):
            o[d] = z
        axpy_rows(o, 0, s, i * kend, v, (v0 * Hkv + hk) * D, Hkv * D, n, D)  # o = sum p_j v_j
        for d in range(D):
            st(out, (q0 + t0 + i, h, d), o[d])


@driver
def _varlen(q, kT, v, qs, ks, kbs, tasks, scale, causal, bq, out):
    """Packed sequences, one task per (sequence, head, block of bq queries).

    # q [sum q_lens, Hq, D], kT [Hkv, blocks, D, bk] (each sequence's keys from its own
    # block kbs[b]), v [sum kv_lens, Hkv, D], qs/ks: cumulative lengths [B + 1],
    # tasks [n, 3] (b, h, t0) -> out [sum q_lens, Hq, D]
    """
    n = tasks.shape[0]
    for i in prange(n):
        _varlen_task(q, kT, v, qs, ks, kbs, tasks, scale, causal, bq, np.int64(i), out)


@jit()
def _varlen_task(q, kT, v, qs, ks, kbs, tasks, scale, causal, bq, i, out):
    b, h, t0 = tasks[i, 0], tasks[i, 1], tasks[i, 2]
    T = qs[b + 1] - qs[b]
    _block_rows(q, qs[b], T, kT, kbs[b], v, ks[b], ks[b + 1] - ks[b], scale, causal, h, t0,
                min(T, t0 + bq) - t0, out)


@driver
def _flash(q, kT, v, scale, causal, bq, bk, out):
    """Online-softmax attention over (head, query block) tasks.

    # q [T, Hq, D], k/v [S, Hkv, D] -> out [T, Hq, D]
    """
    n = q.shape[1] * ((q.shape[0] + bq - 1) // bq)
    for task in prange(n):
        _flash_task(q, kT, v, scale, causal, bq, bk, np.int64(task), out)


@driver
def _transpose_keys(k, ks, blk_seq, blk_first, kT):
    """kT[h, g, d, j] = key blk_first... of block g widened to the accumulation dtype: block g
    holds keys (g - blk_first[b]) * bk .. + bk - 1 of sequence b = blk_seq[g], whose keys are
    rows ks[b] .. ks[b + 1] - 1 of k, transposed and contiguous (zero past the sequence).

    # k [sum S, Hkv, D] -> kT [Hkv, blocks, D, bk]
    """
    Hkv, nkb = kT.shape[0], kT.shape[1]
    for hg in prange(Hkv * nkb):
        g = np.int64(hg)
        _transpose_block(k, ks, blk_seq, blk_first, g // nkb, g - (g // nkb) * nkb, kT)


@jit()
def _transpose_block(k, ks, blk_seq, blk_first, h, g, kT):
    D, bk = k.shape[2], kT.shape[3]
    b = blk_seq[g]
    j0 = (g - blk_first[b]) * bk                        # key of the sequence at lane 0
    S = ks[b + 1] - ks[b]
    for j in range(bk):
        t = j0 + j
        if t < S:
            for d in range(D):
                kT[h, g, d, j] = ld(k, (ks[b] + t, h, d))
        else:
            for d in range(D):
                kT[h, g, d, j] = 0


def _transposed_keys(k: np.ndarray, kv_lens: np.ndarray, acc) -> tuple:
    """The keys of packed sequences in transposed blocks of BLOCK_K, each sequence starting a
    block of its own: (kT [Hkv, blocks, D, BLOCK_K], first block of each sequence [B]).
    # k [sum kv_lens, Hkv, D]"""
    S, Hkv, D = k.shape
    nblk = -(-kv_lens // BLOCK_K)                       # [B]
    first = np.concatenate([[0], np.cumsum(nblk)[:-1]]).astype(np.int64)
    blk_seq = np.repeat(np.arange(kv_lens.size), nblk).astype(np.int64)
    ks = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int64)
    kT = np.empty((Hkv, max(1, int(nblk.sum())), D, BLOCK_K), acc)
    if nblk.sum():
        _transpose_keys[parallel(k.size)](raw(k), ks, blk_seq, first, kT)
    return kT, first


@jit()
def _flash_task(q, kT, v, scale, causal, bq, bk, task, out):
    """Head h = task // nqb, queries t0 .. t0+nq-1: keys in blocks of bk, online softmax.

    Both products run with vector lanes along the long axis, without horizontal sums:
    scores s[i, 0:nk] = sum_d q[i, d] * kT[hk, block, d, 0:nk] (keys transposed once per call
    into contiguous [D, bk] blocks of the accumulation dtype; each score sums over d in order
    with fma), and
    acc[i, 0:D] +=
    sum_j p[i, j] * v[j, 0:D] (keys in order), via `_vec.axpy_rows`.
    """
    D = q.shape[2]
    Hkv, nkb = kT.shape[0], kT.shape[1]
    S = v.shape[0]
    h, hk, t0, nq, offset = _query_block(q.shape[0], q.shape[1], Hkv, S, bq, task)
    z = acc_zero(q)
    m = np.full(bq, like(-np.inf, z))
    l = np.full(bq, z)
    acc = np.full((bq, D), z)
    sblk = np.full((bq, bk), z)
    qa = np.empty((bq, D), sblk.dtype)
    for i in range(nq):
        for d in range(D):
            qa[i, d] = ld(q, (t0 + i, h, d))
    kend = min(S, offset + t0 + nq) if causal else S
    for j0 in range(0, kend, bk):
        nk = min(kend, j0 + bk) - j0
        for i in range(nq):
            lim = min(nk, offset + t0 + i + 1 - j0) if causal else nk
            if lim <= 0:
                continue
            for j in range(lim):
                sblk[i, j] = z
            axpy_rows(sblk, i * bk, qa, i * D, kT, (hk * nkb + j0 // bk) * D * bk, bk, D,
                      lim)                                                # q . k
            for j in range(lim):
                sblk[i, j] = rnd(rnd(sblk[i, j], q) * scale, q)          # spec's score roundings
            mx = sblk[i, 0]
            for j in range(1, lim):
                mx = max(mx, sblk[i, j])
            m_new = max(m[i], mx)
            alpha = vexp(m[i] - m_new)
            if alpha != 1:
                l[i] *= alpha
                for d in range(D):
                    acc[i, d] *= alpha
            for j in range(lim):
                sblk[i, j] = vexp(sblk[i, j] - m_new)
            for j in range(lim):
                l[i] += sblk[i, j]
            axpy_rows(acc, i * D, sblk, i * bk, v, (j0 * Hkv + hk) * D, Hkv * D, lim, D)
            m[i] = m_new
    for i in range(nq):
        for d in range(D):
            st(out, (t0 + i, h, d), acc[i, d] / l[i])


@driver
def _paged(q, kc, vc, tables, lens, scale, out):
    """Paged decode, one task per (sequence b, head h).

    # q [B, Hq, D], kc/vc [NB, BS, Hkv, D], tables [B, max_blocks], lens [B] -> out [B, Hq, D]
    """
    n = q.shape[0] * q.shape[1]
    for task in prange(n):
        _paged_row(q, kc, vc, tables, lens, scale, np.int64(task), out)


@jit()
def _paged_row(q, kc, vc, tables, lens, scale, task, out):
    """`_attn_row` reading its keys and values through a block table, block by block: the
    same dot products (4 keys a tile within a block, the rest one by one) and the same key
    order in p @ v, so it equals the contiguous decode kernel bit for bit."""
    B, Hq, D = q.shape
    BS, Hkv = kc.shape[1], kc.shape[2]
    b = task // Hq
    h = task - b * Hq
    hk = h // (Hq // Hkv)
    n = lens[b]
    z = acc_zero(q)
    qo = (b * Hq + h) * D
    s = np.full(n, z)
    nblk = (n + BS - 1) // BS
    for i in range(nblk):
        j0 = i * BS                                     # key 0 of the block, head hk:
        _scores(q, qo, kc, (tables[b, i] * BS * Hkv + hk) * D, Hkv * D, min(n, j0 + BS) - j0,
                scale, s, j0)
    _softmax_rounded(s, n, q)                           # p, rounded as the spec
    o = np.full(D, z)
    for i in range(nblk):                               # o = sum_j p_j v_j, in key order
        j0 = i * BS
        axpy_rows(o, 0, s, j0, vc, (tables[b, i] * BS * Hkv + hk) * D, Hkv * D,
                  min(n, j0 + BS) - j0, D)
    for d in range(D):
        st(out, (b, h, d), o[d])


def paged_attention(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                    block_tables, context_lens, scale: float | None = None) -> np.ndarray:
    """Decode for a batch through a paged KV cache, as `refimpl.ops.paged_attention`.

    # query [B, Hq, D], caches [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks],
    # context_lens [B] -> [B, Hq, D]
    Reads each sequence's keys and values through its block table in place (no gather of the
    cache); only the first ceil(context_lens[b] / block_size) table entries are read.
    Equal bit for bit to `attention` (the decode kernel) over the gathered keys.
    """
    query = np.asarray(query)
    check_dtype(query, "paged_attention")
    tables, lens = spec.check_paged(query, key_cache, value_cache, block_tables, context_lens)
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        return spec.paged_attention(query, key_cache, value_cache, block_tables, context_lens,
                                    scale)
    D = query.shape[2]
    sc = acc_np(query.dtype).type(D ** -0.5 if scale is None else scale)
    out, out_raw = empty(query.shape, query.dtype)
    par = parallel(int(lens.sum()) * query.shape[1] * D)
    _paged[par](raw(query), raw(np.ascontiguousarray(key_cache)),
                raw(np.ascontiguousarray(value_cache)), np.ascontiguousarray(tables),
                np.ascontiguousarray(lens), sc, out_raw)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
              scale: float | None = None, flash: bool | None = None) -> np.ndarray:
    """o = softmax(q k^T * scale + mask) v per head, scale = head_dim ** -0.5, GQA.

    # q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, D] -> [T, Hq, D]
    The T queries are the last T of the S positions (as `refimpl.ops.attention`).
    flash=None picks the decode kernel for T == 1 and the blocked exact-cast-point kernel
    otherwise (both follow the spec's roundings); flash=True the online-softmax kernel
    (probabilities not rounded: see the module docstring); flash=False the decode kernel.
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    check_dtype(q, "attention")
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    if Hq % Hkv:
        raise InputError(f"attention: {Hkv} KV heads do not divide {Hq} query heads")
    if causal and T > S:
        raise InputError(f"attention: {T} queries but only {S} keys; causal rows would be empty")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.shape != v.shape or k.shape[2] != D:
        return spec.attention(q, k, v, causal, scale)  # unusual mixes: the spec decides
    acc = acc_np(q.dtype)
    sc = acc.type(D ** -0.5 if scale is None else scale)
    out, out_raw = empty(q.shape, q.dtype)
    if q.size == 0 or S == 0:
        return out
    qr, kr, vr = raw(q), raw(k), raw(v)
    par = parallel(T * Hq * S * D // (2 if causal and T > 1 else 1))
    if flash is False or (flash is None and T == 1):
        _attn_rows[par](qr, kr, vr, sc, bool(causal), out_raw)
        return out
    kT, _ = _transposed_keys(k, np.array([S], np.int64), acc)  # keys transposed, widened
    if flash:
        _flash[par](qr, kT, vr, sc, bool(causal), BLOCK_Q, BLOCK_K, out_raw)
    else:
        _blocks[par](qr, kT, vr, sc, bool(causal), BLOCK_Q, out_raw)
    return out


def attention_varlen(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_lens, kv_lens,
                     causal: bool = True, scale: float | None = None) -> np.ndarray:
    """Attention over packed sequences, as `refimpl.ops.attention_varlen`.

    # q [sum q_lens, Hq, D], k/v [sum kv_lens, Hkv, D], q_lens/kv_lens [B] -> [sum q_lens, Hq, D]
    One parallel loop over every (sequence, head, block of BLOCK_Q queries) of the batch,
    each the blocked prefill kernel's task on its sequence (no attention across sequences):
    every sequence's rows equal `attention` on that sequence alone bit for bit (its blocked
    kernel; a one-query sequence too, where `attention` would take the decode kernel).
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    check_dtype(q, "attention_varlen")
    ql, kl = spec.check_varlen(q, k, v, q_lens, kv_lens, causal)
    if k.dtype != q.dtype or v.dtype != q.dtype or k.shape[2] != q.shape[2] or \
            q.shape[1] % k.shape[1]:
        return spec.attention_varlen(q, k, v, q_lens, kv_lens, causal, scale)
    acc = acc_np(q.dtype)
    D = q.shape[2]
    sc = acc.type(D ** -0.5 if scale is None else scale)
    out, out_raw = empty(q.shape, q.dtype)
    if q.shape[0] == 0:
        return out
    Hq = q.shape[1]
    nqb = -(-ql // BLOCK_Q)                                               # [B]
    seq = np.repeat(np.arange(ql.size), nqb * Hq)                         # task -> sequence
    within = np.arange(seq.size) - np.repeat(np.cumsum(nqb * Hq) - nqb * Hq, nqb * Hq)
    tasks = np.stack([seq, within // np.repeat(nqb, nqb * Hq),
                      within % np.repeat(nqb, nqb * Hq) * BLOCK_Q], axis=1).astype(np.int64)
    kT, first = _transposed_keys(k, kl, acc)
    qs = np.concatenate([[0], np.cumsum(ql)]).astype(np.int64)
    ks = np.concatenate([[0], np.cumsum(kl)]).astype(np.int64)
    work = int(np.sum(ql * kl)) * Hq * D // (2 if causal else 1)
    _varlen[parallel(work)](raw(q), kT, raw(v), qs, ks, first, tasks, sc, bool(causal), BLOCK_Q,
                            out_raw)
    return out
