"""Attention with GQA (no K/V copies per query head): a decode kernel and a flash prefill kernel.

Both read KV head h // (Hq / Hkv) for query head h straight from k and v, and both round the
scores as the spec does: s = round(round(q . k) * scale) in the storage dtype.

* `_attn_rows` (one query, decode; any T with `flash=False`): one task per (query, head).
  The scores of the row are kept (S values), then exactly the spec's cast points:
  p = round(softmax_float32(s)), o = round(sum_j p_j v_j). It differs from the spec only in
  summation orders (softmax denominator in key order; q . k in 16 lanes).
* `_flash` (prefill): one task per (head, block of BQ queries), keys in blocks of BK, an
  online softmax with running max m and sum l, never holding more than BQ x BK scores.
  Deliberate difference from the spec: the probabilities are *not* rounded to the storage
  dtype before multiplying V (they are exp(s - m) in float32, rescaled as m grows), and the
  division by the sum happens once at the end, o = round((sum_j e_j v_j) / l). In float32
  and float64 the only difference is rounding order (~1e-7 / 1e-16 relative); in bfloat16
  the spec's rounding of each p_j to 8 bits is skipped, so the kernel is the *more* accurate
  of the two; they differ by up to ~1 bf16 ulp of the output (measured in the tests).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.errors import InputError

from ._dtypes import acc_np, acc_zero, check_dtype, empty, like, parallel, raw, rnd, st
from ._vec import axpy, dot_1x1, dot_1x4, dot_4x1, dot_4x4

#: queries and keys per flash tile
BLOCK_Q, BLOCK_K = 32, 64


@numba.njit(parallel=True, cache=True)
def _attn_rows(q, k, v, scale, causal, par, out):
    """Exact cast points, one task per (query t, head h).

    # q [T, Hq, D], k/v [S, Hkv, D] -> out [T, Hq, D]
    """
    n = q.shape[0] * q.shape[1]
    if par:
        for task in prange(n):
            _attn_row(q, k, v, scale, causal, task, out)
    else:
        for task in range(n):
            _attn_row(q, k, v, scale, causal, task, out)


@numba.njit(cache=True)
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
    j = 0
    while j + 4 <= n:
        r = dot_1x4(q, qo, 0, k, (j * Hkv + hk) * D, Hkv * D, D)
        for jj in range(4):
            s[j + jj] = rnd(rnd(r[jj], q) * scale, q)
        j += 4
    while j < n:
        s[j] = rnd(rnd(dot_1x1(q, qo, 0, k, (j * Hkv + hk) * D, 0, D)[0], q) * scale, q)
        j += 1
    m = s.max()
    tot = z
    for j in range(n):
        s[j] = np.exp(s[j] - m)
        tot += s[j]
    o = np.full(D, z)
    for j in range(n):
        axpy(o, 0, rnd(s[j] / tot, q), v, (j * Hkv + hk) * D, D)
    for d in range(D):
        st(out, (t, h, d), o[d])


@numba.njit(cache=True)
def _scores(q, k, scale, t0, nq, j0, nk, h, hk, sblk):
    """sblk[i, j] = round(round(q[t0+i, h] . k[j0+j, hk]) * scale) for i < nq, j < nk."""
    _, Hq, D = q.shape
    Hkv = k.shape[1]
    i = 0
    while i < nq:
        mi = 4 if i + 4 <= nq else 1
        qo = ((t0 + i) * Hq + h) * D
        j = 0
        while j < nk:
            mj = 4 if j + 4 <= nk else 1
            ko = ((j0 + j) * Hkv + hk) * D
            if mi == 4 and mj == 4:
                r = dot_4x4(q, qo, Hq * D, k, ko, Hkv * D, D)
                for a in range(4):
                    for b in range(4):
                        sblk[i + a, j + b] = rnd(rnd(r[4 * a + b], q) * scale, q)
            elif mi == 4:
                r4 = dot_4x1(q, qo, Hq * D, k, ko, 0, D)
                for a in range(4):
                    sblk[i + a, j] = rnd(rnd(r4[a], q) * scale, q)
            elif mj == 4:
                r4 = dot_1x4(q, qo, 0, k, ko, Hkv * D, D)
                for b in range(4):
                    sblk[i, j + b] = rnd(rnd(r4[b], q) * scale, q)
            else:
                sblk[i, j] = rnd(rnd(dot_1x1(q, qo, 0, k, ko, 0, D)[0], q) * scale, q)
            j += mj
        i += mi


@numba.njit(parallel=True, cache=True)
def _flash(q, k, v, scale, causal, bq, bk, par, out):
    """Online-softmax attention over (head, query block) tasks.

    # q [T, Hq, D], k/v [S, Hkv, D] -> out [T, Hq, D]
    """
    n = q.shape[1] * ((q.shape[0] + bq - 1) // bq)
    if par:
        for task in prange(n):
            _flash_task(q, k, v, scale, causal, bq, bk, task, out)
    else:
        for task in range(n):
            _flash_task(q, k, v, scale, causal, bq, bk, task, out)


@numba.njit(cache=True)
def _flash_task(q, k, v, scale, causal, bq, bk, task, out):
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    group = Hq // Hkv
    offset = S - T
    nqb = (T + bq - 1) // bq
    z = acc_zero(q)
    h = task // nqb
    qb = task - h * nqb
    hk = h // group
    t0 = qb * bq
    nq = min(T, t0 + bq) - t0
    m = np.full(bq, like(-np.inf, z))
    l = np.full(bq, z)
    acc = np.full((bq, D), z)
    sblk = np.full((bq, bk), z)
    kend = min(S, offset + t0 + nq) if causal else S
    for j0 in range(0, kend, bk):
        nk = min(kend, j0 + bk) - j0
        _scores(q, k, scale, t0, nq, j0, nk, h, hk, sblk)
        for i in range(nq):
            lim = min(nk, offset + t0 + i + 1 - j0) if causal else nk
            if lim <= 0:
                continue
            mx = sblk[i, 0]
            for j in range(1, lim):
                mx = max(mx, sblk[i, j])
            m_new = max(m[i], mx)
            alpha = np.exp(m[i] - m_new)
            if alpha != 1:
                l[i] *= alpha
                for d in range(D):
                    acc[i, d] *= alpha
            for j in range(lim):
                p = np.exp(sblk[i, j] - m_new)
                l[i] += p
                axpy(acc, i * D, p, v, ((j0 + j) * Hkv + hk) * D, D)
            m[i] = m_new
    for i in range(nq):
        for d in range(D):
            st(out, (t0 + i, h, d), acc[i, d] / l[i])


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
              scale: float | None = None, flash: bool | None = None) -> np.ndarray:
    """o = softmax(q k^T * scale + mask) v per head, scale = head_dim ** -0.5, GQA.

    # q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, D] -> [T, Hq, D]
    The T queries are the last T of the S positions (as `refimpl.ops.attention`).
    flash=None picks the decode kernel for T == 1 and the flash kernel otherwise.
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
    if flash is None:
        flash = T > 1
    par = parallel(T * Hq * S * D // (2 if causal and T > 1 else 1))
    if flash:
        _flash(qr, kr, vr, sc, bool(causal), BLOCK_Q, BLOCK_K, par, out_raw)
    else:
        _attn_rows(qr, kr, vr, sc, bool(causal), par, out_raw)
    return out
